"""Contract test base class: an op supplies inputs, its reference and its kernel; the suite follows.

A subclass defines

* ``make_inputs(case, dtype)`` -> dict of named tensors (differentiable ones with requires_grad)
  plus non-tensor keyword arguments under ``"kwargs"``,
* ``reference(inputs)`` -> output of the eager reference,
* ``kernel(inputs, backend)`` -> output of the public op on ``backend``,
* ``gradcheck_cases`` / ``parity_cases`` (lists of cases) and ``backends`` (pytest params),

and inherits float64 gradcheck and float32 parity (forward and every input gradient, random
grad_output) for every backend.

Tolerances (float32 parity): the kernel's error against the float64 reference must be at most
``2 × (float32 reference error) + atol`` (the rule flash-attention uses), with ``atol`` relative to
the output's magnitude. A Cholesky solve and an LU solve differ in rounding, but both are backward
stable: 2× the reference's own float32 error bounds the difference between well-implemented solvers.

Devices: the ``triton`` and ``cuda`` backends run on CUDA tensors when a GPU is visible, against the
reference on the same device (``device_for`` in ``tests/conftest.py``); ``make_inputs`` builds CPU
tensors and :meth:`OpContract.to_device` moves them (leaves stay leaves, strides are kept). On CPU
nothing moves and the CPU table applies unchanged.
"""

from __future__ import annotations

import pytest
import torch

# (atol relative to max |output|, rtol) per dtype, with the reason.
TOLERANCES = {
    # float64: both sides are backward-stable solvers in double precision; cond(A) ≤ ~1e4 in the cases.
    torch.float64: (1e-10, 1e-9),
    # float32: used only as the additive floor of the 2×-reference rule.
    torch.float32: (2e-5, 0.0),
}

# On CUDA tensors: (multiplier of the float32 reference error, atol relative to max |output|) of the rule
# kernel error ≤ k × (float32 reference error) + atol, with the reason. float64 uses TOLERANCES (fp64
# sqrt / div / exp are correctly rounded on the GPU in Triton and nvcc alike).
TOLERANCES_CUDA = {
    # Triton lowers fp32 tl.sqrt / tl.exp / "/" to sqrt.approx.ftz, ex2.approx and div.full (≤ 2 ulp
    # each, against ≤ 0.5 ulp for the reference's correctly rounded ops): up to ~one extra unit roundoff
    # per such op, amplified by the same conditioning as the reference's own error. Hence k = 3
    # (2 + 1 for the approximate ops) and a floor 5× the CPU one for outputs where the reference's error
    # is near zero. The CUDA C++ kernels use the same table (nvcc's default fp32 division and sqrt are
    # IEEE-rounded, but FMA contraction changes the rounding of every dot product).
    torch.float32: (3.0, 1e-4),
}


def _clone_inputs(inputs, dtype=None):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().to(dtype) if dtype is not None else v.detach().clone()
            out[k] = t.requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _to_device(obj, device):
    """Move the tensors (and modules) of an inputs dict to ``device``; leaves stay leaves."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to(device)  # preserve_format: strides of transposed / channels_last views kept
        return t.requires_grad_(obj.requires_grad)
    if isinstance(obj, torch.nn.Module):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _grads(out, inputs, grad_out):
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    gs = torch.autograd.grad(out, [inputs[k] for k in names], grad_out, allow_unused=True)
    return dict(zip(names, gs))


class OpContract:
    gradcheck_cases: list = []
    parity_cases: list = []
    backends: list = []

    # -- to implement ------------------------------------------------------
    def make_inputs(self, case, dtype):
        raise NotImplementedError

    def reference(self, inputs):
        raise NotImplementedError

    def kernel(self, inputs, backend):
        raise NotImplementedError

    def parity_cases_for(self, backend):
        return self.parity_cases

    def gradcheck_cases_for(self, backend):
        return self.gradcheck_cases

    def gradcheck_fast_mode(self, backend):
        """Interpreted backends may use gradcheck's fast mode (random projections) to stay quick."""
        return False

    # -- devices -----------------------------------------------------------
    @staticmethod
    def device_for(backend) -> torch.device:
        """CUDA for ``triton`` / ``cuda`` when a GPU is visible, else CPU (tests/conftest.py)."""
        from conftest import device_for

        return device_for(backend)

    def to_device(self, inputs, backend):
        """``inputs`` on :meth:`device_for` ``(backend)``; unchanged (the same objects) on CPU."""
        device = self.device_for(backend)
        return inputs if device.type == "cpu" else _to_device(inputs, device)

    def parity_rule(self, backend):
        """(multiplier, atol relative to max |output|) of the float32 rule for ``backend`` here."""
        if self.device_for(backend).type == "cuda":
            return TOLERANCES_CUDA[torch.float32]
        return 2.0, TOLERANCES[torch.float32][0]

    # -- the suite ---------------------------------------------------------
    def test_gradcheck_float64(self, backend, gcase):
        if gcase not in self.gradcheck_cases_for(backend):
            pytest.skip(f"{backend}: gradcheck covered by the other cases (interpreter time)")
        inputs = self.to_device(self.make_inputs(gcase, torch.float64), backend)
        names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

        def fn(*xs):
            local = dict(inputs)
            local.update(zip(names, xs))
            return self.kernel(local, backend)

        assert torch.autograd.gradcheck(
            fn, [inputs[k] for k in names], eps=1e-6, atol=1e-6, rtol=1e-5,
            fast_mode=self.gradcheck_fast_mode(backend) and self.device_for(backend).type == "cpu",
        )

    def test_parity_float32(self, backend, pcase):
        if pcase not in self.parity_cases_for(backend):
            pytest.skip(f"{backend}: case outside this backend's supported sizes")
        inputs32 = self.to_device(self.make_inputs(pcase, torch.float32), backend)
        inputs64 = _clone_inputs(inputs32, torch.float64)
        inputs_ref32 = _clone_inputs(inputs32)
        out = self.kernel(inputs32, backend)
        ref64 = self.reference(inputs64)
        ref32 = self.reference(inputs_ref32)
        assert out.shape == ref64.shape and out.dtype == torch.float32
        grad_out = torch.randn_like(ref64)
        g_k = _grads(out, inputs32, grad_out.float())
        g_64 = _grads(ref64, inputs64, grad_out)
        g_32 = _grads(ref32, inputs_ref32, grad_out.float())
        mult, atol_rel = self.parity_rule(backend)
        pairs = [("output", out, ref64, ref32)] + [(f"grad {k}", g_k[k], g_64[k], g_32[k]) for k in g_64]
        for what, k, r64, r32 in pairs:
            assert torch.isfinite(k).all(), f"{what}: non-finite"
            err_k = (k.double().to(r64.device) - r64).abs().max().item()
            err_r = (r32.double() - r64).abs().max().item()
            atol = atol_rel * max(r64.abs().max().item(), 1.0)
            assert err_k <= mult * err_r + atol, f"{what}: kernel error {err_k:.3g} > {mult:g}×{err_r:.3g} + {atol:.3g}"

    def test_float64_matches_reference(self, backend, pcase):
        if pcase not in self.parity_cases_for(backend):
            pytest.skip(f"{backend}: case outside this backend's supported sizes")
        inputs = self.to_device(self.make_inputs(pcase, torch.float64), backend)
        ref_inputs = _clone_inputs(inputs)
        out, ref = self.kernel(inputs, backend), self.reference(ref_inputs)
        atol_rel, rtol = TOLERANCES[torch.float64]
        scale = max(ref.abs().max().item(), 1.0)
        torch.testing.assert_close(out.to(ref.device), ref, atol=atol_rel * scale, rtol=rtol)


def assert_parity(what: str, got: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor) -> None:
    """The float32 rule of this suite for one tensor: ``got``'s error against the float64 reference is at
    most k × (the float32 reference's error) + atol·max|ref| — (2, 2e-5) on CPU tensors, the
    TOLERANCES_CUDA row on CUDA tensors."""
    mult, atol_rel = TOLERANCES_CUDA[torch.float32] if got.device.type == "cuda" else (2.0, TOLERANCES[torch.float32][0])
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    err_k = (got.double().to(ref64.device) - ref64).abs().max().item()
    err_r = (ref32.double().to(ref64.device) - ref64).abs().max().item()
    atol = atol_rel * max(ref64.abs().max().item(), 1.0)
    assert err_k <= mult * err_r + atol, f"{what}: kernel error {err_k:.3g} > {mult:g}×{err_r:.3g} + {atol:.3g}"
