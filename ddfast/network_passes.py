"""How the network forward/backward passes of a distiller run: precision, memory format, compilation.

The distillers spend most of their time in the network passes (LD: the outer pass over N_o real
examples; KRR-ST: the ConvNet passes over X_s and the real batch; EAD: the passes over P, D_t, S at
each checkpoint), not in the fused ops. :class:`PassOptions` holds the three levers:

* ``precision="bf16"``: the network passes run under ``torch.autocast(dtype=torch.bfloat16)``
  (oneDNN bf16 convolutions/GEMMs on CPUs with AMX/AVX512-BF16, tensor cores on GPU). Everything
  else stays float32: the parameters and optimiser state (autocast casts a bf16 copy per op, the
  gradient arrives in float32), the synthetic images and labels (master copies), the losses
  (logits are cast to float32 before softmax / CE / MSE), the ridge and kernel-ridge solves and the
  label meta-gradient kernels (they see float32 features), and every optimiser step.
* ``channels_last=True``: conv nets and image tensors in NHWC (``torch.channels_last``), which
  oneDNN runs without layout reorders; images that never change are converted once.
* ``compile=True``: ``nn.Module.compile()`` on the model and its ``features`` (torch.compile in place,
  parameter names unchanged, so ``functional_call`` and state dicts work as before); the first calls
  compile (tens of seconds on CPU) and are excluded from timings.

:func:`fold_batchnorm` folds eval-mode BatchNorm into the preceding convolution
(W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β) for passes that need no parameter gradients (KRR-ST's
outer loss, where only X_s and Y_s are differentiated).

Defaults are float32, NCHW, eager: bit-for-bit the plain PyTorch passes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PRECISIONS", "PassOptions", "autocast", "prepare_model", "prepare_images", "check_pass_options",
           "check_op_precision", "fold_batchnorm"]

PRECISIONS = ("fp32", "bf16")


def check_pass_options(precision: str, channels_last, compile) -> None:
    """Clear errors for the three options (shared by every config that carries them)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    for name, v in (("channels_last", channels_last), ("compile", compile)):
        if not isinstance(v, bool):
            raise ValueError(f"{name}: expected True or False, got {v!r}")


def check_op_precision(precision: str, reference: bool) -> None:
    """An op's ``precision`` argument: "fp32" | "bf16"; bf16 only on fused paths (the reference is the truth)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and reference:
        raise ValueError("precision: 'bf16' runs on the fused path only; the reference is the float32/float64 truth "
                         "(use backend='auto' or 'fused')")


@dataclass(frozen=True)
class PassOptions:
    """precision "fp32" | "bf16"; channels_last; compile (see the module docstring)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self):
        check_pass_options(self.precision, self.channels_last, self.compile)

    @classmethod
    def of(cls, config) -> "PassOptions":
        """The options of a distiller config with ``precision`` / ``channels_last`` / ``compile`` fields."""
        return cls(getattr(config, "precision", "fp32"), bool(getattr(config, "channels_last", False)),
                   bool(getattr(config, "compile", False)))


def autocast(precision: str, device: torch.device | str = "cpu"):
    """``torch.autocast`` to bfloat16 for ``precision="bf16"``, else a no-op context."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def prepare_model(model: nn.Module, options: PassOptions) -> nn.Module:
    """In place: channels_last for conv nets, ``model.compile()`` when asked. Returns ``model``."""
    if options.channels_last and _has_conv(model):
        model.to(memory_format=torch.channels_last)
    if options.compile:
        # Distillers call ``model.features`` on its own (ridge heads, KRR, the fused LD head path):
        # compile it as well as the whole model.
        features = getattr(model, "features", None)
        if isinstance(features, nn.Module):
            features.compile()
        model.compile()
    return model


def prepare_images(x: torch.Tensor, options: PassOptions) -> torch.Tensor:
    """Images in the memory format of the passes (a no-op unless channels_last and 4-D)."""
    if options.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose ``nn.Sequential`` Conv2d → BatchNorm2d (eval mode, running statistics)
    pairs are one convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``); ``module`` itself is unchanged.

    Only for passes that differentiate the inputs, not the parameters: the folded weights are new
    tensors without a graph to the original ones. Modules in training mode are returned unchanged.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training or not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        return module

    def fold(seq: nn.Module) -> nn.Module:
        if not isinstance(seq, nn.Sequential):
            return seq
        layers, out, i = list(seq.children()), [], 0
        while i < len(layers):
            a = layers[i]
            b = layers[i + 1] if i + 1 < len(layers) else None
            if (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.track_running_stats
                    and b.running_mean is not None):
                with torch.no_grad():
                    fused = fuse_conv_bn_eval(a, b)
                for p in fused.parameters():
                    p.requires_grad_(False)
                out.append(fused)
                i += 2
            else:
                out.append(fold(a))
                i += 1
        return nn.Sequential(*out).eval()

    return fold(module)
