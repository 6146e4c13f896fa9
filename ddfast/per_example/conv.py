"""``nn.Conv2d`` (groups = 1): rows A = input patches ``[N, H_out·W_out, C_in·kh·kw(+1)]``, G = output gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddfast.per_example.registry import LayerKind, register


def unfold_rows(m: nn.Conv2d, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """Patches of a Conv2d input as ``[N, P, K(+1)]``, stored per example as ``[K(+1), P]`` (unit stride
    along P, the layout of ``F.unfold`` and of conv output gradients): one strided copy of the padded
    input, the ones row of the bias written in place (no unfold + transpose + concatenate passes)."""
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    elif any(m.padding):
        ph, pw = m.padding
        x = F.pad(x, (pw, pw, ph, ph))
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    sN, sC, sH, sW = x.stride()
    patches = x.as_strided((N, C, kh, kw, Ho, Wo), (sN, sC, sH * dh, sW * dw, sH * sh, sW * sw))
    K = C * kh * kw
    A = x.new_empty(N, K + int(bias), Ho * Wo)
    A[:, :K].view(N, C, kh, kw, Ho, Wo).copy_(patches)
    if bias:
        A[:, K].fill_(1)
    return A.transpose(1, 2)


@register(nn.Conv2d)
class Conv2dKind(LayerKind):
    name = "conv2d"
    ghost = True

    def accepts(self, module: nn.Module) -> bool:
        return module.groups == 1

    def rows(self, record) -> torch.Tensor:
        return unfold_rows(record.module, record.input, record.has_bias)

    def output_rows(self, record, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(record.batch_size, grad.shape[1], -1).transpose(1, 2)
