"""The device plumbing of the test suite itself (tests/conftest.py, tests/contract.py): which backends move
to CUDA, how inputs move (leaves stay leaves, strides kept, modules follow), and which tolerance row applies.
Runs everywhere: the moves are checked on the ``meta`` device when there is no GPU."""

from __future__ import annotations

import torch
from torch import nn

import conftest
import contract


def test_device_for_moves_only_the_gpu_backends(monkeypatch):
    monkeypatch.setattr(conftest, "CUDA", True)
    assert [conftest.device_for(b).type for b in ("triton", "cuda", "cpu", "reference", None)] == \
        ["cuda", "cuda", "cpu", "cpu", "cpu"]
    assert not conftest.interpreted("triton")
    monkeypatch.setattr(conftest, "CUDA", False)
    assert {conftest.device_for(b).type for b in ("triton", "cuda", "cpu", "reference")} == {"cpu"}
    assert conftest.interpreted("triton") and not conftest.interpreted("cpu")


def test_inputs_move_as_leaves_with_their_strides():
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")
    x = torch.randn(3, 4, 5).mT.requires_grad_()  # a transposed (non-contiguous) leaf
    cl = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    net = nn.Linear(4, 2)
    inputs = {"x": x, "lam": 0.5, "kwargs": {"model": net, "cl": cl, "idx": torch.arange(3), "reg": "trace"}}
    moved = contract._to_device(inputs, device)
    mx, kw = moved["x"], moved["kwargs"]
    assert mx.device.type == device.type and mx.is_leaf and mx.requires_grad and mx.stride() == x.stride()
    assert kw["cl"].stride() == cl.stride() and not kw["cl"].requires_grad
    assert kw["model"] is net and net.weight.device.type == device.type
    assert kw["idx"].dtype == torch.int64 and moved["lam"] == 0.5 and kw["reg"] == "trace"
    assert x.device.type == "cpu"  # the original inputs are left as they were


def test_cpu_backends_keep_the_same_objects_and_the_cpu_rule(monkeypatch):
    class C(contract.OpContract):
        pass

    monkeypatch.setattr(conftest, "CUDA", False)
    inputs = {"x": torch.randn(2, requires_grad=True)}
    for backend in ("cpu", "triton", "reference"):
        assert C().to_device(inputs, backend) is inputs
        assert C().parity_rule(backend) == (2.0, contract.TOLERANCES[torch.float32][0])
    monkeypatch.setattr(conftest, "CUDA", True)
    assert C().parity_rule("triton") == contract.TOLERANCES_CUDA[torch.float32]
    assert C().parity_rule("cpu") == (2.0, contract.TOLERANCES[torch.float32][0])
