"""The operator registry: torch.ops.ddfast schemas with CPU and Meta kernels (opcheck), the backend
registry in ddfast.dispatch (one declaration per backend, fall-through on limits, one error listing every
backend, DDFAST_BACKEND, explain / DDFAST_LOG_DISPATCH), the CUDA ridge route for problems the one-block
kernel cannot take, and the public exports."""

from __future__ import annotations

import pytest
import torch

from ddfast import dispatch
from ddfast.errors import BackendUnavailableError

ext = pytest.importorskip("ddfast._C", reason="compiled extension not built")

F64 = dict(dtype=torch.float64)

#: Every compiled operator and a valid CPU call of it (small shapes).
COMPILED_OPS = {
    "ridge_solve_fwd": lambda: (torch.randn(3, 5, 4, **F64), torch.randn(3, 5, 2, **F64), torch.ones(3, **F64), False, True),
    "ridge_solve_bwd": None,  # built from a forward below
    "cholesky_solve": lambda: (torch.randn(2, 4, 3, **F64), torch.eye(4, **F64).expand(2, 4, 4) * 2),
    "label_metagrad_fwd": lambda: (torch.randn(4, 3, **F64), torch.rand(4, 3, **F64), 0.5),
    "label_metagrad_bwd": lambda: (torch.randn(4, 5, **F64), torch.randn(3, 5, **F64), torch.randn(3, **F64), None,
                                   torch.randn(4, 3, **F64), 0.25),
    "ghost_bilinear_fwd": lambda: (torch.randn(2, 3, 4, **F64), torch.randn(2, 3, 5, **F64), torch.randn(5, 4, **F64)),
    "ghost_norms_fwd": lambda: (torch.randn(2, 3, 4, **F64), torch.randn(2, 3, 5, **F64), True),
    "ghost_inner_fwd": lambda: (torch.randn(2, 3, 4, **F64), torch.randn(2, 3, 5, **F64), torch.randn(3, 2, 4, **F64),
                                torch.randn(3, 2, 5, **F64), False),
    "krr_predict_fwd": lambda: (torch.randn(2, 6, 4, **F64), torch.randn(2, 3, 4, **F64), torch.randn(2, 3, 2, **F64),
                                0.5, 1, 0.25, True),
    "krr_predict_bwd": None,  # built from a forward below
    "relu_max_pool2d_fwd": lambda: (torch.randn(2, 3, 5, 6).contiguous(memory_format=torch.channels_last),),
    "relu_max_pool2d_bwd": None,
}


def _args(name, primal=False):
    if name == "ridge_solve_bwd":
        Z, Y, mu = torch.randn(3, 5, 4, **F64), torch.randn(3, 5, 2, **F64), torch.ones(3, **F64)
        _, L, aux, _, _ = torch.ops.ddfast.ridge_solve_fwd(Z, Y, mu, primal, True)
        return (torch.randn(3, 4, 2, **F64), Z, Y, L, aux, primal, True, True, True)
    if name == "relu_max_pool2d_bwd":
        _, code = torch.ops.ddfast.relu_max_pool2d_fwd(torch.randn(2, 3, 5, 6))
        return (torch.randn(2, 3, 2, 3), code, 5, 6, False)
    if name == "krr_predict_bwd":
        Zq, Zs, Ys = COMPILED_OPS["krr_predict_fwd"]()[:3]
        _, L, alpha, _ = torch.ops.ddfast.krr_predict_fwd(Zq, Zs, Ys, 0.5, 1, 0.25, False)
        return (torch.randn(2, 6, 2, **F64), Zq, Zs, L, alpha, 0.25, 0.5 / 3, True, True, True)
    return COMPILED_OPS[name]()


def test_every_compiled_op_is_registered():
    for name in COMPILED_OPS:
        assert hasattr(torch.ops.ddfast, name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddfast::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddfast::{name}", "Meta"), name


@pytest.mark.parametrize("name", sorted(COMPILED_OPS))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.ddfast, name).default, _args(name))


def test_opcheck_primal_ridge_backward():
    torch.library.opcheck(torch.ops.ddfast.ridge_solve_bwd.default, _args("ridge_solve_bwd", primal=True))


@pytest.mark.parametrize("name", sorted(COMPILED_OPS))
def test_meta_matches_cpu(name):
    args = _args(name)
    meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    op = getattr(torch.ops.ddfast, name)
    cpu, meta = op(*args), op(*meta_args)
    cpu = cpu if isinstance(cpu, (tuple, list)) else (cpu,)
    meta = meta if isinstance(meta, (tuple, list)) else (meta,)
    for c, m in zip(cpu, meta):
        if c is None:
            assert m is None
            continue
        assert m.device.type == "meta" and m.shape == c.shape and m.dtype == c.dtype, name
        if c.dim() == 4:
            assert m.is_contiguous(memory_format=torch.channels_last) == c.is_contiguous(memory_format=torch.channels_last)


def test_meta_rejects_what_the_kernel_rejects():
    Z = torch.empty(3, 5, 4, device="meta", **F64)
    with pytest.raises(RuntimeError, match="Y: expected shape"):
        torch.ops.ddfast.ridge_solve_fwd(Z, torch.empty(2, 5, 2, device="meta", **F64), torch.empty(3, device="meta", **F64),
                                         False)


@pytest.mark.parametrize("primal", [False, True])
def test_cuda_large_problem_route_matches_the_kernel(primal):
    """The ATen route the CUDA operators take when the one-block kernel cannot (shared memory, n > 128)
    gives the kernels' outputs; run here on CPU tensors."""
    Z, Y, mu = torch.randn(3, 6, 4, **F64), torch.randn(3, 6, 2, **F64), torch.rand(3, **F64) + 0.5
    want = torch.ops.ddfast.ridge_solve_fwd(Z, Y, mu, primal, True)
    got = ext.ridge_solve_fwd_composite(Z, Y, mu, primal, True)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    G = torch.randn(3, 4, 2, **F64)
    L, aux = want[1], want[2]
    for w, g in zip(torch.ops.ddfast.ridge_solve_bwd(G, Z, Y, L, aux, primal, True, True, True),
                    ext.ridge_solve_bwd_composite(G, Z, Y, L, aux, primal, True, True, True)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("via_weights", [False, True])
@pytest.mark.parametrize("reg, c", [(0, 0.0), (1, 0.25), (2, 1.0)])
def test_cuda_krr_forward_matches_the_cpu_kernel(via_weights, reg, c):
    """torch.ops.ddfast.krr_predict_fwd's CUDA implementation is this ATen composite; run here on CPU tensors
    (batched and unbatched) against the CPU kernel, including a member that does not factor."""
    for lead in [(), (3,)]:
        Zq, Zs, Ys = torch.randn(*lead, 7, 5, **F64), torch.randn(*lead, 4, 5, **F64), torch.randn(*lead, 4, 2, **F64)
        want = torch.ops.ddfast.krr_predict_fwd(Zq, Zs, Ys, 0.3, reg, c, via_weights)
        got = ext.krr_predict_fwd_composite(Zq, Zs, Ys, 0.3, reg, c, via_weights)
        assert int(got[3]) == int(want[3]) == 0
        for g, w in zip(got[:3], want[:3]):  # P, L, α
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
        # the backward: the composite (CUDA) against the CPU implementation, each gradient on its own too
        G = torch.randn(*lead, 7, 2, **F64)
        coef = (0.0, 0.3 / 4, 0.3)[reg]
        full = torch.ops.ddfast.krr_predict_bwd(G, Zq, Zs, want[1], want[2], c, coef, True, True, True)
        for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
            comp = ext.krr_predict_bwd_composite(G, Zq, Zs, want[1], want[2], c, coef, *need)
            for f, g, n in zip(full, comp, need):
                if n:
                    torch.testing.assert_close(g, f, atol=1e-12, rtol=1e-10)
                else:
                    assert g is None
    Zs = torch.full((2, 4, 5), float("nan"), **F64)
    P, L, alpha, status = ext.krr_predict_fwd_composite(torch.randn(2, 3, 5, **F64), Zs, torch.randn(2, 4, 1, **F64),
                                                        0.3, reg, c, via_weights)
    assert int(status) == 1 and P.shape == (2, 3, 1) and L.shape == (2, 4, 4) and alpha.shape == (2, 4, 1)


@pytest.mark.parametrize("via_weights", [False, True])
def test_krr_operators_with_a_float64_solve_of_float32_features(via_weights):
    """Ys in float64 beside float32 features: the factor, α and P in float64, the feature gradients in
    float32; the CPU kernel and the composite (CUDA route) agree, Meta gives the same dtypes, opcheck."""
    g = torch.Generator().manual_seed(2)
    Zq, Zs = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    Ys = torch.randn(4, 2, generator=g, **F64)
    want = torch.ops.ddfast.krr_predict_fwd(Zq, Zs, Ys, 0.3, 1, 0.25, via_weights)
    got = ext.krr_predict_fwd_composite(Zq, Zs, Ys, 0.3, 1, 0.25, via_weights)
    meta = torch.ops.ddfast.krr_predict_fwd(Zq.to("meta"), Zs.to("meta"), Ys.to("meta"), 0.3, 1, 0.25, via_weights)
    for w, c, m in zip(want[:3], got[:3], meta[:3]):
        assert w.dtype == c.dtype == m.dtype == torch.float64 and w.shape == m.shape
        torch.testing.assert_close(c, w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(want[0], ext.krr_predict_fwd_composite(Zq.double(), Zs.double(), Ys, 0.3, 1, 0.25,
                                                                      via_weights)[0], atol=1e-5, rtol=1e-5)
    G = torch.randn(7, 2, generator=g, **F64)
    args = (G, Zq, Zs, want[1], want[2], 0.25, 0.3 / 4, True, True, True)
    for a, b, dt in zip(torch.ops.ddfast.krr_predict_bwd(*args), ext.krr_predict_bwd_composite(*args),
                        (torch.float32, torch.float32, torch.float64)):
        assert a.dtype == b.dtype == dt
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    torch.library.opcheck(torch.ops.ddfast.krr_predict_fwd.default, (Zq, Zs, Ys, 0.3, 1, 0.25, via_weights))
    torch.library.opcheck(torch.ops.ddfast.krr_predict_bwd.default, args)
    with pytest.raises(RuntimeError, match="Ys: expected dtype"):  # narrower targets than the features
        torch.ops.ddfast.krr_predict_fwd(Zq.double(), Zs.double(), Ys.float(), 0.3, 1, 0.25, via_weights)
    with pytest.raises(RuntimeError, match="G: expected dtype"):
        torch.ops.ddfast.krr_predict_bwd(G.float(), *args[1:])


def test_cuda_route_reports_a_failed_factor():
    Z = torch.zeros(2, 3, 4, **F64)
    mu = torch.tensor([1.0, -1.0], **F64)  # member 1 is negative definite
    W, L, aux, info, status = ext.ridge_solve_fwd_composite(Z, torch.ones(2, 3, 1, **F64), mu, False, True)
    assert info.tolist()[0] == 0 and info.tolist()[1] > 0 and int(status) == 1


# --------------------------------------------------------------------------- backend registry


def test_registered_ops_declare_their_backends():
    ops = dispatch.registered_ops()
    assert set(ops) >= {"ridge_solve", "label_metagrad", "ghost_products", "relu_max_pool2d"}
    for name, backends in ops.items():
        assert backends[-1] == "reference" and set(backends) <= set(dispatch.BACKENDS), name


def test_backend_status_lists_cpu_as_usable_here():
    status = dispatch.backend_status("cpu", torch.float32)
    for op, per_backend in status.items():
        assert per_backend["cpu"] == [] and per_backend["reference"] == [], op
        assert per_backend["cuda"], op  # never usable on CPU tensors


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA build with a visible device whose opt-in shared memory per block is ``fake_cuda.optin`` bytes."""
    real = dispatch._availability
    state = {"optin": 232_448}  # H100 / H200
    monkeypatch.setattr(dispatch, "_availability", lambda name: [] if name == "cuda" else real(name))
    monkeypatch.setattr(dispatch, "shared_memory_optin", lambda device: state["optin"])
    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    from ddfast.ops.ridge_solve import RIDGE_SOLVE

    def set_optin(nbytes):
        state["optin"] = nbytes
        RIDGE_SOLVE.cache.clear()

    RIDGE_SOLVE.cache.clear()
    RIDGE_SOLVE.set_optin = set_optin
    yield RIDGE_SOLVE
    del RIDGE_SOLVE.set_optin
    RIDGE_SOLVE.cache.clear()


def _krr_inputs(m, C, dtype=torch.float32, d=2048):
    return {"device": torch.device("cuda"), "dtype": dtype, "solve_dtype": dtype, "N": m, "d": d, "C": C,
            "primal": d < m}


def test_shared_memory_formula_matches_the_cuda_header():
    from ddfast.ops.ridge_solve import cuda_shared_memory_bytes

    # csrc/cuda/ridge_solve.h: n·(n|1) + 2·n·(32+1) + 2·32·(32+1) + 256/32 values
    assert cuda_shared_memory_bytes(100, 4) == (100 * 101 + 2 * 100 * 33 + 2 * 32 * 33 + 8) * 4 == 75_280
    assert cuda_shared_memory_bytes(128, 8) == 216_640


def test_cuda_ridge_shared_memory_limit_falls_through(fake_cuda):
    """KRR-ST at m=100 support images, d_y=512 targets, fp32 needs 75,280 B of shared memory: the kernel on
    an H200, and never the kernel on a device that cannot give that much (faked here)."""
    inputs = _krr_inputs(100, 512)
    assert dispatch.not_supported_reasons(fake_cuda, "cuda", inputs) == []
    assert dispatch.select_for(fake_cuda, "auto", inputs) == "cuda"
    fake_cuda.set_optin(48 * 1024)
    reasons = dispatch.not_supported_reasons(fake_cuda, "cuda", inputs)
    assert any("shared memory" in r and "75,280" in r and "49,152" in r for r in reasons), reasons
    assert dispatch.select_for(fake_cuda, "auto", inputs) != "cuda"
    with pytest.raises(BackendUnavailableError, match="shared memory"):
        dispatch.select_for(fake_cuda, "cuda", inputs)


def test_cuda_ridge_limits_per_dtype_and_device(fake_cuda):
    # fp64 n=128 needs 216,640 B: fits an H200 (232,448 B), not an A100 (166,912 B)
    assert dispatch.select_for(fake_cuda, "auto", _krr_inputs(128, 10, torch.float64)) == "cuda"
    fake_cuda.set_optin(166_912)
    assert dispatch.select_for(fake_cuda, "auto", _krr_inputs(128, 10, torch.float64)) != "cuda"
    assert dispatch.select_for(fake_cuda, "auto", _krr_inputs(128, 10, torch.float32)) == "cuda"
    assert dispatch.select_for(fake_cuda, "auto", _krr_inputs(100, 10, torch.float64)) == "cuda"
    assert any("factor size 129 > 128" in r for r in dispatch.not_supported_reasons(fake_cuda, "cuda", _krr_inputs(129, 1)))
    mixed = {**_krr_inputs(50, 10), "solve_dtype": torch.float64}
    assert any("mixed precision" in r for r in dispatch.not_supported_reasons(fake_cuda, "cuda", mixed))


def test_shared_memory_is_not_queried_for_cpu_inputs(monkeypatch):
    def boom(device):
        raise AssertionError("queried a GPU for CPU inputs")

    monkeypatch.setattr(dispatch, "shared_memory_optin", boom)
    from ddfast.ops.ridge_solve import RIDGE_SOLVE

    inputs = {**_krr_inputs(100, 512), "device": torch.device("cpu")}
    assert dispatch.not_supported_reasons(RIDGE_SOLVE, "cuda", inputs)
    assert dispatch.select_for(RIDGE_SOLVE, "auto", inputs) == "cpu"


def test_no_backend_fits_lists_every_backend():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float16)
    from ddfast.ops import relu_max_pool2d

    with pytest.raises(BackendUnavailableError) as info:
        relu_max_pool2d(x, backend="fused")
    msg = str(info.value)
    for name in ("cuda:", "triton:", "cpu:"):
        assert name in msg
    assert "float16" in msg


def test_ddfast_backend_override(monkeypatch):
    from ddfast.ops.relu_max_pool2d import RELU_MAX_POOL2D

    inputs = {"device": torch.device("cpu"), "dtype": torch.float32}
    assert dispatch.select_for(RELU_MAX_POOL2D, "auto", inputs) == "cpu"
    monkeypatch.setenv("DDFAST_BACKEND", "reference")
    assert dispatch.select_for(RELU_MAX_POOL2D, "auto", inputs) == "reference"
    assert dispatch.select_for(RELU_MAX_POOL2D, "cpu", inputs) == "cpu"  # an explicit backend wins
    monkeypatch.setenv("DDFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend: expected one of"):
        dispatch.select_for(RELU_MAX_POOL2D, "auto", inputs)


def test_explain_names_the_choice_and_every_other_backend():
    from ddfast.ops import explain

    text = explain("ridge_weights", torch.randn(4, 10, 8), torch.randn(4, 10, 3), 1.0)
    assert "-> cpu" in text and "cuda:" in text and "triton:" in text and "reference:" in text
    text = explain("krr_predict", torch.randn(7, 8), torch.randn(10, 8), torch.randn(10, 3), 1.0)
    assert "N=10" in text and "C=3" in text
    text = explain("relu_max_pool2d", torch.randn(1, 2, 4, 4, dtype=torch.float16))
    assert "-> reference" in text and "float16" in text
    with pytest.raises(ValueError, match="op: expected one of"):
        explain("nope")


def test_log_dispatch_prints_new_choices(monkeypatch, capsys):
    from ddfast.ops.ghost_products import GHOST_PRODUCTS

    monkeypatch.setenv("DDFAST_LOG_DISPATCH", "1")
    GHOST_PRODUCTS.cache.clear()
    dispatch.select_for(GHOST_PRODUCTS, "auto", {"device": torch.device("cpu"), "dtype": torch.float64})
    err = capsys.readouterr().err
    assert "ddfast dispatch: ghost_products" in err and "-> cpu" in err


def test_register_op_rejects_unknown_backends():
    with pytest.raises(ValueError, match="unknown backends"):
        dispatch.register_op("bogus_op_for_test", [dispatch.Impl("tpu")])


# --------------------------------------------------------------------------- public API


def test_ops_export_every_op():
    import ddfast.ops as ops

    for name in ("ridge_weights", "krr_predict", "label_metagrad", "ridge_label_metagrad", "label_meta_loss",
                 "checkpoint_grad_inner", "ghost_bilinear", "ghost_norms", "ghost_inner", "relu_max_pool2d",
                 "explain"):
        assert name in ops.__all__ and callable(getattr(ops, name)), name


def test_reference_exports_every_reference():
    import ddfast.reference as ref

    for name in ("ridge_weights_ref", "krr_predict_ref", "label_metagrad_ref", "checkpoint_grad_inner_ref",
                 "ghost_bilinear_ref", "ghost_norms_ref", "ghost_inner_ref", "relu_max_pool2d_ref"):
        assert name in ref.__all__ and callable(getattr(ref, name)), name


def test_info_reports_every_op():
    from ddfast.info import report

    text = report()
    for op in dispatch.registered_ops():
        assert op in text


# --------------------------------------------------------------------------- Triton operators

TRITON_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")  # + aot_dispatch on a GPU


def _triton_cases():
    F = dict(dtype=torch.float64)
    Z, Y, mu = torch.randn(2, 5, 4, **F), torch.randn(2, 5, 3, **F), torch.ones(2, **F)
    A, G, V = torch.randn(2, 3, 4, **F), torch.randn(2, 3, 5, **F), torch.randn(5, 4, **F)
    return {
        "triton_ridge_solve_fwd": lambda: (Z, Y, mu, False),
        "triton_ridge_solve_bwd": lambda: (torch.randn(2, 4, 3, **F), Z, Y,
                                           *torch.ops.ddfast.triton_ridge_solve_fwd(Z, Y, mu, False)[1:3],
                                           False, True, False, True),
        "triton_ghost_bilinear_fwd": lambda: (A, G, V),
        "triton_ghost_norms_fwd": lambda: (A, G, True),
        "triton_ghost_inner_fwd": lambda: (A, G, A, G, False),
        "triton_label_metagrad_fwd": lambda: (torch.randn(4, 3, **F), torch.rand(4, 3, **F), 0.5),
        "triton_label_metagrad_bwd": lambda: (torch.randn(4, 5, **F), torch.randn(3, 5, **F), None,
                                              torch.randn(4, 3, **F), torch.randn(4, 3, **F), 0.5),
        "triton_relu_max_pool2d_fwd": lambda: (torch.randn(2, 3, 5, 6).contiguous(memory_format=torch.channels_last),),
        "triton_relu_max_pool2d_bwd": lambda: (torch.randn(2, 3, 2, 3),
                                               torch.ops.ddfast.triton_relu_max_pool2d_fwd(torch.randn(2, 3, 5, 6))[1],
                                               5, 6, False),
    }


@pytest.mark.parametrize("name", sorted(_triton_cases()))
def test_triton_kernels_are_operators(name):
    """Each Triton launcher is torch.ops.ddfast.triton_* (torch.library.triton_op): fake-tensor shapes and
    schema checked here under the interpreter; on a GPU torch.compile traces into the kernels."""
    if not dispatch.backends()["triton"]["available"]:
        pytest.skip(dispatch.backends()["triton"]["reason"])
    import ddfast.kernels.ghost_products  # noqa: F401  (registers the operators)
    import ddfast.kernels.label_metagrad  # noqa: F401
    import ddfast.kernels.relu_max_pool2d  # noqa: F401
    import ddfast.kernels.ridge_solve  # noqa: F401

    args = _triton_cases()[name]()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.ddfast, name).default, args,
                          test_utils=None if on_gpu else TRITON_CHECKS)
