"""label_metagrad_fwd / label_metagrad_bwd kernels (cpu C++, Triton interpreted, CUDA where built) against
the eager reference: the forward residual R = d(scale·Σ CE)/dZ by autograd through
``soft_cross_entropy``, the per-row loss, and ``head_residual_ref`` for the backward; bad input.

The op layer (ddfast.ops.label_metagrad) is tested elsewhere; these are the kernels alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddfast import dispatch
from ddfast.reference.label_metagrad import head_residual_ref, soft_cross_entropy

from conftest import backend_param, op_backend_params

# (atol relative to max |ref|, rtol) per dtype, with the reason.
TOLERANCES = {
    # float64: the same arithmetic as the reference up to summation order (d-long dot products,
    # C-long softmax sums); ~1e-12 relative leaves room for d in the thousands.
    torch.float64: (1e-12, 1e-12),
    # float32: only the additive floor of the rule  kernel error ≤ 2 × (float32 torch error) + atol
    # (both errors against the float64 reference).
    torch.float32: (2e-5, 0.0),
}


@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    d: int
    C: int
    bias: bool = False  # gb and Vb present
    noncontig: bool = False  # H, GW, Z, Y, Vb as transposed views
    big: bool = False  # too slow for the Triton interpreter: compiled backends only

    @property
    def id(self):
        flags = ["bias"] * self.bias + ["noncontig"] * self.noncontig
        return "-".join([f"N{self.N}-d{self.d}-C{self.C}"] + flags)


CASES = [
    Case(1, 5, 3),  # N = 1
    Case(1, 5, 3, bias=True),
    Case(10, 84, 10),  # LeNet-sized head
    Case(10, 84, 10, bias=True),
    Case(10, 84, 10, bias=True, noncontig=True),  # cpu: register-tiled loop on copies of H / GW
    Case(50, 20, 1),  # C = 1: the residual is 0
    Case(50, 20, 1, bias=True),
    Case(7, 33, 26, bias=True),  # odd sizes; cpu: BLAS path (C > 16)
    Case(7, 33, 26, noncontig=True),  # BLAS on strided H / GW
    Case(9, 1, 4, bias=True),  # d = 1
    Case(6, 1100, 5, bias=True),  # d over several tiles / cache chunks
    Case(1024, 84, 10, bias=True, big=True),  # cpu: BLAS path (many rows)
    Case(1024, 84, 10, noncontig=True, big=True),
    Case(200, 2100, 10, bias=True, big=True),  # cpu: register-tiled loop, large d
    Case(3, 7, 0, bias=True, big=True),  # C = 0: empty output, zero loss rows
]
SMALL = [c for c in CASES if not c.big]

BACKENDS = op_backend_params("label_metagrad", reference=False)


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _skip_big(backend, case):
    if case.big and backend == "triton" and _device(backend) == "cpu":
        pytest.skip("large shape: too slow under the Triton interpreter")


def _triton():
    from ddfast.kernels import label_metagrad

    return label_metagrad


def kernel_fwd(backend, Z, Y, scale):
    if backend == "cpu":
        return dispatch.extension().label_metagrad_fwd(Z, Y, scale)
    if backend == "triton":
        return _triton().label_metagrad_fwd(Z, Y, scale)
    stream = torch.cuda.current_stream(Z.device).cuda_stream
    return dispatch.extension().label_metagrad_fwd_cuda(Z, Y, scale, stream)


def kernel_bwd(backend, H, GW, gb, Vb, Z, scale):
    if backend == "cpu":
        return dispatch.extension().label_metagrad_bwd(H, GW, gb, Vb, Z, scale)
    if backend == "triton":
        return _triton().label_metagrad_bwd(H, GW, gb, Vb, Z, scale)
    stream = torch.cuda.current_stream(Z.device).cuda_stream
    return dispatch.extension().label_metagrad_bwd_cuda(H, GW, gb, Vb, Z, scale, stream)


def make_inputs(case: Case, seed: int = 0):
    """float64 inputs on the CPU; logits with a spread that makes the softmax non-trivial."""
    g = torch.Generator().manual_seed(seed * 7919 + case.N * 131 + case.d * 17 + case.C)

    def mat(rows, cols, mult=1.0):
        if case.noncontig:  # transposed storage: a non-contiguous view with the right shape
            return (mult * torch.randn(cols, rows, dtype=torch.float64, generator=g)).t()
        return mult * torch.randn(rows, cols, dtype=torch.float64, generator=g)

    H, GW, Z = mat(case.N, case.d), mat(case.C, case.d, 0.1), mat(case.N, case.C, 3.0)
    Y = mat(case.N, case.C).abs()  # soft labels: non-negative, rows not normalised
    gb = torch.randn(case.C, dtype=torch.float64, generator=g) if case.bias else None
    Vb = mat(case.N, case.C) if case.bias else None
    return dict(H=H, GW=GW, gb=gb, Vb=Vb, Z=Z, Y=Y, scale=1.0 / max(case.N, 1))


def _to(inputs, dtype, device):
    return {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def ref_fwd(Z, Y, scale):
    """(R, loss_rows) by autograd through the reference soft cross-entropy, in Z's dtype."""
    Zr = Z.detach().clone().requires_grad_(True)
    loss = soft_cross_entropy(Zr, Y, "none")
    (R,) = torch.autograd.grad(scale * loss.sum(), Zr)
    return R, loss.detach()


def ref_bwd(H, GW, gb, Vb, Z, scale):
    return head_residual_ref(H, GW, gb, Vb, Z, scale)


def assert_matches(got, inputs64, ref_fn, args, dtype, name):
    """float64: tight closeness; float32: kernel error ≤ 2 × (float32 torch error) + atol."""
    ref64 = ref_fn(*[inputs64[a] if isinstance(a, str) else a for a in args])
    got = got.detach().cpu()
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    if ref64.numel() == 0:
        return
    scale_ref = ref64.abs().max().item()
    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref64, atol=atol * max(scale_ref, 1e-300), rtol=rtol, msg=name)
        return
    inputs32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in inputs64.items()}
    ref32 = ref_fn(*[inputs32[a] if isinstance(a, str) else a for a in args])
    err_kernel = (got.double() - ref64).abs().max().item()
    err_torch = (ref32.double() - ref64).abs().max().item()
    bound = 2 * err_torch + atol * scale_ref
    assert err_kernel <= bound, f"{name}: float32 error {err_kernel:.3e} > 2×{err_torch:.3e} + {atol}×{scale_ref:.3e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fwd_matches_reference(backend, case, dtype):
    _skip_big(backend, case)
    x64 = make_inputs(case)
    x = _to(x64, dtype, _device(backend))
    if dtype == torch.float32:  # the reference sees exactly the kernel's (rounded) inputs
        x64 = _to(_to(x64, torch.float32, "cpu"), torch.float64, "cpu")
    R, loss = kernel_fwd(backend, x["Z"], x["Y"], x["scale"])
    assert R.is_contiguous() and loss.is_contiguous()
    assert_matches(R, x64, lambda *a: ref_fwd(*a)[0], ("Z", "Y", x64["scale"]), dtype, "R")
    assert_matches(loss, x64, lambda *a: ref_fwd(*a)[1], ("Z", "Y", x64["scale"]), dtype, "loss_rows")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bwd_matches_reference(backend, case, dtype):
    _skip_big(backend, case)
    x64 = make_inputs(case, seed=1)
    x = _to(x64, dtype, _device(backend))
    if dtype == torch.float32:
        x64 = _to(_to(x64, torch.float32, "cpu"), torch.float64, "cpu")
    out = kernel_bwd(backend, x["H"], x["GW"], x["gb"], x["Vb"], x["Z"], x["scale"])
    assert out.is_contiguous()
    assert_matches(out, x64, ref_bwd, ("H", "GW", "gb", "Vb", "Z", x64["scale"]), dtype, "out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_example_rows_match_batch_of_one(backend):
    """Row i of each output depends on row i of the inputs only (opacus-style batch-of-1 loop)."""
    x = _to(make_inputs(Case(5, 12, 4, bias=True)), torch.float64, _device(backend))
    R, loss = kernel_fwd(backend, x["Z"], x["Y"], 0.3)
    out = kernel_bwd(backend, x["H"], x["GW"], x["gb"], x["Vb"], x["Z"], 0.3)
    for i in range(5):
        r_i, l_i = kernel_fwd(backend, x["Z"][i : i + 1], x["Y"][i : i + 1], 0.3)
        o_i = kernel_bwd(backend, x["H"][i : i + 1], x["GW"], x["gb"], x["Vb"][i : i + 1], x["Z"][i : i + 1], 0.3)
        torch.testing.assert_close(r_i[0], R[i], atol=1e-14, rtol=1e-13)
        torch.testing.assert_close(l_i[0], loss[i], atol=1e-13, rtol=1e-13)
        torch.testing.assert_close(o_i[0], out[i], atol=1e-14, rtol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    dev = _device(backend)
    Z = torch.empty(0, 4, dtype=torch.float64, device=dev)
    R, loss = kernel_fwd(backend, Z, Z, 1.0)
    assert R.shape == (0, 4) and loss.shape == (0,)
    out = kernel_bwd(backend, torch.empty(0, 3, dtype=torch.float64, device=dev),
                     torch.zeros(4, 3, dtype=torch.float64, device=dev), None, None, Z, 1.0)
    assert out.shape == (0, 4)


def test_cpu_bias_arguments_default_to_none():
    ext = dispatch.extension()
    if not hasattr(ext, "label_metagrad_bwd"):
        pytest.skip("ddfast._C predates label_metagrad")
    x = make_inputs(Case(4, 6, 3))
    out = ext.label_metagrad_bwd(H=x["H"], GW=x["GW"], Z=x["Z"], scale=0.5)
    torch.testing.assert_close(out, ref_bwd(x["H"], x["GW"], None, None, x["Z"], 0.5), atol=1e-14, rtol=1e-12)


# --------------------------------------------------------------------------- bad input

ERRORS = (RuntimeError, ValueError, TypeError)


def _good(dev, N=4, d=6, C=3, dtype=torch.float32):
    t = lambda *s: torch.randn(*s, dtype=dtype, device=dev)  # noqa: E731
    return dict(H=t(N, d), GW=t(C, d), gb=t(C), Vb=t(N, C), Z=t(N, C), Y=t(N, C).abs())


FWD_BAD = [
    ("Z", lambda x: dict(x, Z=x["Z"][0])),  # 1-D logits
    ("Y", lambda x: dict(x, Y=x["Y"][:, :2])),  # wrong number of classes
    ("Y", lambda x: dict(x, Y=x["Y"].double())),  # dtype differs from Z
    ("Z", lambda x: dict(x, Z=x["Z"].long(), Y=x["Y"].long())),  # integer logits
]

BWD_BAD = [
    ("H", lambda x: dict(x, H=x["H"][None])),  # 3-D features
    ("GW", lambda x: dict(x, GW=x["GW"][:, :5])),  # d mismatch
    ("GW", lambda x: dict(x, GW=x["GW"][:2])),  # C mismatch
    ("GW", lambda x: dict(x, GW=x["GW"].double())),  # dtype
    ("gb", lambda x: dict(x, gb=x["gb"][:2])),
    ("gb", lambda x: dict(x, gb=x["gb"].double())),
    ("Vb", lambda x: dict(x, Vb=x["Vb"][:3])),
    ("Vb", lambda x: dict(x, Vb=x["Vb"].double())),
    ("Z", lambda x: dict(x, Z=x["Z"][:3])),  # N mismatch with H
    ("Z", lambda x: dict(x, Z=x["Z"].double())),
    ("H", lambda x: dict(x, H=x["H"].to(torch.float16), GW=x["GW"].half(), Z=x["Z"].half())),  # unsupported dtype
]


@pytest.mark.parametrize("name, mutate", FWD_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(FWD_BAD)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fwd_bad_input_names_the_argument(backend, name, mutate):
    x = mutate(_good(_device(backend)))
    with pytest.raises(ERRORS, match=rf"(^|\W){name}:"):
        kernel_fwd(backend, x["Z"], x["Y"], 0.5)


@pytest.mark.parametrize("name, mutate", BWD_BAD, ids=[f"{n}{i}" for i, (n, _) in enumerate(BWD_BAD)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bwd_bad_input_names_the_argument(backend, name, mutate):
    x = mutate(_good(_device(backend)))
    with pytest.raises(ERRORS, match=rf"(^|\W){name}:"):
        kernel_bwd(backend, x["H"], x["GW"], x["gb"], x["Vb"], x["Z"], 0.5)


def test_triton_not_supported_reasons():
    mod = _triton()
    Z = torch.empty(2, 1025)
    assert any("C = 1025" in r for r in mod.not_supported_reasons_fwd(Z, Z))
    assert any("C = 1025" in r for r in mod.not_supported_reasons_bwd(Z.new_empty(2, 3), Z.new_empty(1025, 3), Z))
    # the probe the op layer uses: H [1,1], GW [C,1], Z [1,C]
    Z = torch.empty(1, 10)
    reasons = mod.not_supported_reasons_fwd(Z, Z) + mod.not_supported_reasons_bwd(Z.new_empty(1, 1), Z.new_empty(10, 1), Z)
    if mod.TRITON_AVAILABLE and mod._INTERPRETED:
        assert reasons == []
    assert any("float32/float64" in r for r in mod.not_supported_reasons_fwd(Z.half(), Z.half()))
