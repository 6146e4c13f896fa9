"""Triton relu_max_pool2d kernels: int32 and int64 index math, NCHW and NHWC walks, against the reference.

The kernels are specialized for int64 index math only when a lane index or an element offset can reach
2³¹ (``kernels.relu_max_pool2d._needs_int64``); here the limit is lowered so both specializations run on
small tensors, for contiguous and channels_last inputs (the NHWC walk: channels innermost) and a strided
view. Exact equality: every output is a copy of an input element and every gradient a copy of a
grad_out element. Runs under TRITON_INTERPRET=1 when no GPU is visible (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from ddfast.kernels import relu_max_pool2d as K
from ddfast.reference.relu_max_pool2d import relu_max_pool2d_ref

pytestmark = pytest.mark.skipif(bool(K.not_supported_reasons(torch.zeros(1, 1, 2, 2))),
                                reason="Triton kernels cannot run here")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _make(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    x[..., 0, 0] = torch.where(x[..., 0, 0] > 0, -x[..., 0, 0], x[..., 0, 0])  # some non-positive windows
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # H/W-transposed storage
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    return x.to(_device())


@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(2, 8, 5, 6), (1, 3, 7, 9)])
def test_index_widths_and_walks_match_reference(monkeypatch, int64, layout, shape):
    if int64:
        monkeypatch.setattr(K, "_INT32_LIMIT", 64)  # every launch takes the int64 specialization
    x = _make(shape, layout, torch.float32, seed=sum(shape))
    assert K._needs_int64(x.numel(), x) == int64
    out, code = K.relu_max_pool2d_fwd(x)
    xr = x.detach().clone().requires_grad_()
    ref = relu_max_pool2d_ref(xr)
    assert torch.equal(out, ref.detach())
    channels_last = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    gi = K.relu_max_pool2d_bwd(g, code, x.shape[2], x.shape[3], channels_last)
    (gref,) = torch.autograd.grad(ref, xr, g)
    assert torch.equal(gi, gref)
    assert torch.equal(torch.signbit(gi), torch.signbit(gref))


def test_int64_only_where_an_offset_or_lane_can_reach_2_31():
    small = torch.empty((1024, 64, 32, 32), device="meta")  # 2^26 elements
    assert not K._needs_int64(small.numel(), small)
    big = torch.empty((2**21, 64, 4, 4), device="meta")  # 2^31 elements
    assert K._needs_int64(big.numel() // 4, big)
    # few elements, but an offset beyond 2^31 (a strided view of a large storage)
    wide = torch.empty((2, 1, 2, 2), device="meta").as_strided((2, 1, 2, 2), (2**31, 4, 2, 1))
    assert K._needs_int64(8, wide)
    assert K._needs_int64(2**31 - K._BLOCK, small)  # the last block's lanes would pass 2^31
