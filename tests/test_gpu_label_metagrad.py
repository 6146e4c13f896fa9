"""The label meta-gradient on CUDA tensors (LeNet and a ConvNet on the device): L_out and ∂L_out/∂ỹ of
every compiled backend against the create_graph reference on the same device, and LD-RR's ridge
meta-gradient (skipped without CUDA; DDFAST_GPU_TESTS_ON_CPU=1 runs ``auto`` on CPU tensors)."""

from __future__ import annotations

import pytest
import torch

from ddfast.errors import BackendUnavailableError
from ddfast.models import ConvNet, LeNet
from ddfast.ops.label_metagrad import label_metagrad, ridge_label_metagrad

from contract import assert_parity


def _problem(model, N, M, C, device, dtype):
    torch.manual_seed(0)
    net = (LeNet(1, C, 28) if model == "lenet" else ConvNet(3, C, 16, widths=(16, 16), norm="instance"))
    shape = (1, 28, 28) if model == "lenet" else (3, 16, 16)
    g = torch.Generator().manual_seed(1)
    xb = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    y = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)
    xr = torch.randn(M, *shape, generator=g, dtype=torch.float64)
    yr = torch.randint(0, C, (M,), generator=g)
    return net.to(device, dtype), xb.to(device, dtype), y.to(device, dtype), xr.to(device, dtype), yr.to(device)


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("model, N, M", [("lenet", 10, 256), ("lenet", 50, 64), ("convnet", 12, 40)])
def test_label_metagrad_on_device(gpu_device, backend, model, N, M):
    if backend != "auto" and gpu_device.type == "cpu":
        pytest.skip(f"dry run on CPU: the {backend} kernels need a GPU")
    outs = {}
    for name, dtype, be in (("k", torch.float32, backend), ("r64", torch.float64, "reference"),
                            ("r32", torch.float32, "reference")):
        net, xb, y, xr, yr = _problem(model, N, M, 10, gpu_device, dtype)
        try:
            outs[name] = label_metagrad(net, xb, y, xr, yr, inner_lr=0.1, backend=be)
        except BackendUnavailableError as exc:
            assert backend != "auto", exc
            pytest.skip(str(exc).splitlines()[0][:200])
    k, r64, r32 = outs["k"], outs["r64"], outs["r32"]
    assert k.grad.device.type == gpu_device.type
    assert_parity("loss", k.loss, r64.loss, r32.loss)
    assert_parity("grad y_soft", k.grad, r64.grad, r32.grad)


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_ridge_label_metagrad_on_device(gpu_device, backend):
    if backend != "auto" and gpu_device.type == "cpu":
        pytest.skip(f"dry run on CPU: the {backend} kernels need a GPU")
    g = torch.Generator().manual_seed(3)
    N, d, C, M = 10, 84, 10, 64
    zb, y = torch.randn(N, d, generator=g, dtype=torch.double), torch.softmax(torch.randn(N, C, generator=g, dtype=torch.double), -1)
    zr, yr = torch.randn(M, d, generator=g, dtype=torch.double), torch.randint(0, C, (M,), generator=g)
    w0 = torch.randn(d + 1, C, generator=g, dtype=torch.double) * 0.1
    args64 = [t.to(gpu_device) for t in (zb, y, zr, yr, w0)]
    ref = ridge_label_metagrad(*args64, scale=1.3, backend="reference")
    try:
        out = ridge_label_metagrad(*args64, scale=1.3, backend=backend)
    except BackendUnavailableError as exc:
        assert backend != "auto", exc
        pytest.skip(str(exc).splitlines()[0][:200])
    for a, b in zip(out, ref):
        assert a.device == b.device
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
