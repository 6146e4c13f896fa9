"""Ghost products (ghost_bilinear / ghost_norms / ghost_inner) on every backend against the eager reference,
and the model-level per-example gradient norms / inner products / grad_dot against a batch-of-1 loop.

Kernels: cpu (C++), triton (interpreted on CPU tensors, tiny shapes), cuda where built, reference; both
algorithms (ghost / materialize) forced; float32 and float64; edge shapes and strided layouts.
Model level: MLP and ConvNet (instance norm / no norm) on the digits data, plus layers the hooks must
handle (Embedding, LayerNorm, in-place ReLU, strided / dilated / padded / grouped convolutions, eval-mode
BatchNorm, module reuse, tied weights, frozen biases).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddfast.data.datasets import load_dataset
from ddfast.errors import BackendUnavailableError
from ddfast.models.convnet import ConvNet
from ddfast.models.mlp import MLP
from ddfast.ops.ghost_products import (
    capture_layers,
    ghost_bilinear,
    ghost_inner,
    ghost_is_cheaper,
    ghost_norms,
    grad_dot,
    layer_weight_matrix,
    per_example_grad_inner,
    per_example_grad_norms,
)
from ddfast.reference.ghost_products import (
    ghost_bilinear_ref,
    ghost_inner_ref,
    ghost_norms_ref,
    grad_dot_ref,
    per_example_grad_inner_ref,
    per_example_grad_norms_ref,
    per_example_grads_ref,
)

from conftest import available_backends, backend_param, op_backend_params
from contract import OpContract

# (atol relative to max |ref|, rtol) per dtype, with the reason.
TOLERANCES = {
    # float64: the reference's arithmetic up to summation order (sums of P·max(O, K) products; the
    # ghost path squares Gram entries); 1e-12 relative leaves room for the sizes below.
    torch.float64: (1e-12, 1e-12),
    # float32: only the additive floor of the rule  kernel error ≤ 2 × (float32 torch error) + atol
    # (both errors against the float64 reference).
    torch.float32: (2e-5, 0.0),
}
# Model-level results against the batch-of-1 loop: float64 only differs by summation order through
# the whole network (a forward and a backward), so a looser floor than the kernel table.
MODEL_TOL = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=1e-4, rtol=2e-4)}

KERNEL_BACKENDS = op_backend_params("ghost_products")


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _interpreted(backend):
    return backend == "triton" and _device(backend) == "cpu"


# Model-level tests come first: they are torch-heavy, and after the Triton interpreter has run (numpy
# worker threads) the OpenMP threads of torch contend for the cores on small machines.


# --------------------------------------------------------------------------- model level


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return ds.train_x[:10], ds.train_y[:10]


def _model(name, dtype):
    torch.manual_seed(0)
    if name == "mlp":
        m = MLP(1, 10, 8, hidden=(32, 16))
    elif name == "convnet-instance":
        m = ConvNet(1, 10, 8, widths=(8, 16), norm="instance")
    elif name == "convnet-none":
        m = ConvNet(1, 10, 8, widths=(8, 16), norm="none")
    else:  # eval-mode BatchNorm with non-trivial running statistics
        m = ConvNet(1, 10, 8, widths=(8, 16), norm="batch").eval()
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m.to(dtype)


MODELS = ["mlp", "convnet-instance", "convnet-none", "convnet-batch-eval"]
MODEL_BACKENDS = [backend_param("cpu"), backend_param("reference")]


@pytest.mark.parametrize("algorithm", ["auto", "ghost", "materialize"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_per_example_grad_norms_match_batch_of_one(digits, backend, name, dtype, algorithm):
    x, y = digits
    m = _model(name, torch.float64)
    ref = per_example_grad_norms_ref(m, x.double(), y).to(dtype)  # the loop in float64
    got = per_example_grad_norms(copy.deepcopy(m).to(dtype), x.to(dtype), y, algorithm=algorithm, backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, **MODEL_TOL[dtype])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_per_example_grad_inner_match_batch_of_one(digits, backend, name):
    x, y = digits
    x = x.double()
    m = _model(name, torch.float64)
    ref = per_example_grad_inner_ref(m, x[:4], y[:4], x[4:], y[4:])
    for alg in ("ghost", "materialize"):
        got = per_example_grad_inner(m, x[:4], y[:4], x[4:], y[4:], algorithm=alg, backend=backend)
        torch.testing.assert_close(got, ref, **MODEL_TOL[torch.float64])
    gram = per_example_grad_inner(m, x[:5], y[:5], backend=backend)
    torch.testing.assert_close(gram.diagonal(), per_example_grad_norms(m, x[:5], y[:5], backend=backend))


def test_per_example_options(digits):
    """Soft labels, a callable loss, squared=False, chunks, parameter replacement; vmap reference agrees."""
    x, y = digits
    x = x.double()
    m = _model("convnet-instance", torch.float64)
    soft = torch.softmax(torch.randn(10, 10, dtype=torch.float64), -1)
    ref_soft = per_example_grad_norms_ref(m, x, soft)
    torch.testing.assert_close(per_example_grad_norms(m, x, soft), ref_soft, **MODEL_TOL[torch.float64])
    torch.testing.assert_close(per_example_grad_norms_ref(m, x, soft, method="vmap"), ref_soft)
    mse = lambda z, t: (z - F.one_hot(t, 10).to(z)).pow(2).sum(-1)  # noqa: E731
    ref = per_example_grad_norms_ref(m, x, y, loss=mse)
    got = per_example_grad_norms(m, x, y, loss=mse, squared=False, chunk=3)
    torch.testing.assert_close(got, ref.sqrt(), **MODEL_TOL[torch.float64])
    params = {k: p.detach() * 1.5 for k, p in m.named_parameters()}
    torch.testing.assert_close(per_example_grad_norms(m, x, y, params=params),
                               per_example_grad_norms_ref(m, x, y, params=params), **MODEL_TOL[torch.float64])
    with pytest.raises(ValueError, match=r"loss: a callable must return per-example losses of shape \[10\]"):
        per_example_grad_norms(m, x, y, loss=lambda z, t: F.cross_entropy(z, t))


def test_grad_dot_matches_autograd(digits):
    x, y = digits
    x = x.double()
    for name in ("mlp", "convnet-instance"):
        m = _model(name, torch.float64)
        v = {k: torch.randn_like(p) for k, p in m.named_parameters()}
        mean_ce = lambda z, t: F.cross_entropy(z, t)  # noqa: E731
        for loss in ("ce", mean_ce):
            torch.testing.assert_close(grad_dot(m, None, v, x, y, loss), grad_dot_ref(m, None, v, x, y, loss))
    # train-mode BatchNorm couples the examples, but the summed gradient is still exact
    m = ConvNet(1, 10, 8, widths=(8, 16), norm="batch").double().train()
    v = {k: torch.randn_like(p) for k, p in m.named_parameters() if not k.endswith("bias")}  # missing = zero
    params = {k: p.detach() + 0.1 for k, p in m.named_parameters()}
    torch.testing.assert_close(grad_dot(m, params, v, x, y), grad_dot_ref(m, params, v, x, y))


def test_batchnorm_in_training_mode_is_an_error(digits):
    x, y = digits
    m = ConvNet(1, 10, 8, widths=(8, 16), norm="batch").train()
    with pytest.raises(ValueError, match=r"BatchNorm 'features.1'.*couples the examples.*model.eval\(\)"):
        per_example_grad_norms(m, x, y)
    with pytest.raises(ValueError, match="BatchNorm"):
        per_example_grad_inner(m, x, y)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 10))
    with pytest.raises(ValueError, match=r"BatchNorm '2'"):  # no parameters, still couples the examples
        per_example_grad_norms(plain, x, y)
    per_example_grad_norms(plain.eval(), x, y)


def test_model_level_bad_input(digits):
    x, y = digits
    m = _model("mlp", torch.float32)
    with pytest.raises(ValueError, match=r"y: expected class indices of shape \[10\]"):
        per_example_grad_norms(m, x, y[:3])
    with pytest.raises(ValueError, match=r"y: expected soft labels of shape \[10, C\]"):
        per_example_grad_norms(m, x, torch.rand(10))
    with pytest.raises(ValueError, match="x: the batch is empty"):
        per_example_grad_norms(m, x[:0], y[:0])
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        per_example_grad_norms(lambda t: t, x, y)
    with pytest.raises(ValueError, match="x2, y2: give both or neither"):
        per_example_grad_inner(m, x, y, x2=x)


class _SeqModel(nn.Module):
    """Embedding (torch.func path), Linear on [N, L, ·] rows followed by an in-place ReLU, LayerNorm,
    a bias-free Linear, a flattening head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.l1 = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.l2 = nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.l1(self.emb(x)), inplace=True)
        return self.head(self.l2(self.ln(h)).flatten(1))


class _ConvZoo(nn.Module):
    """Stride / padding / dilation / 'same' / reflect / circular convolutions, a grouped conv (torch.func
    path), GroupNorm, eval-mode BatchNorm, a frozen bias and a Linear called twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, (2, 3), padding="same", padding_mode="reflect", dilation=(1, 2))
        self.c3 = nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.c4 = nn.Conv2d(6, 5, 2, stride=(1, 2), dilation=2, padding=(1, 0), padding_mode="circular", bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.c5 = nn.Conv2d(5, 3, 1)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.gn(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        h = self.c5(torch.tanh(self.bn(self.c4(h)))).mean((2, 3))
        return self.lin(h) + self.lin(h * h)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _zoo(name):
    torch.manual_seed(1)
    if name == "seq":
        return _SeqModel().double(), torch.randint(0, 20, (6, 3)), torch.randint(0, 3, (6,))
    if name == "tied":
        return _Tied().double(), torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    m = _ConvZoo().double().eval()
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2)
    m.c1.bias.requires_grad_(False)
    return m, torch.randn(5, 2, 11, 9, dtype=torch.float64), torch.randint(0, 3, (5,))


@pytest.mark.parametrize("name", ["seq", "convzoo", "tied"])
def test_layer_zoo_matches_batch_of_one(name):
    m, x, y = _zoo(name)
    ref = per_example_grad_norms_ref(m, x, y)
    for alg in ("ghost", "materialize"):
        torch.testing.assert_close(per_example_grad_norms(m, x, y, algorithm=alg), ref, **MODEL_TOL[torch.float64])
    torch.testing.assert_close(per_example_grad_inner(m, x[:2], y[:2], x[2:], y[2:]),
                               per_example_grad_inner_ref(m, x[:2], y[:2], x[2:], y[2:]), **MODEL_TOL[torch.float64])
    v = {k: torch.randn_like(p) for k, p in m.named_parameters()}
    torch.testing.assert_close(grad_dot(m, None, v, x, y), grad_dot_ref(m, None, v, x, y))


def test_capture_layers_rows_reproduce_the_layer():
    """A @ Vᵀ with V = layer_weight_matrix(weight, bias) is the layer output; G are its gradients."""
    m, x, y = _zoo("convzoo")
    with capture_layers(m) as cap:
        loss = F.cross_entropy(m(x), y, reduction="sum")
    grads = cap.output_grads(loss)
    assert [r.name for r in cap.records] == ["c1", "c2", "c4", "c5", "lin", "lin"]  # grouped c3: not a ghost layer
    params = dict(m.named_parameters())
    per = per_example_grads_ref(m, x, y)
    for rec, g in zip(cap.records, grads):
        mod = rec.module
        V = layer_weight_matrix(mod, params, prefix=f"{rec.name}.")
        torch.testing.assert_close(V, layer_weight_matrix(mod, (mod.weight, mod.bias)))
        out = rec.A @ V.transpose(0, 1)
        real = mod(rec.input)
        real = real.flatten(2).transpose(1, 2) if rec.kind == "conv2d" else real.reshape(out.shape)
        torch.testing.assert_close(out, real)
        if rec.name in ("c2", "c4"):  # called once, all parameters trainable: W_n = G_nᵀ A_n
            Vn = torch.cat([per[f"{rec.name}.weight"].flatten(2)] + ([per[f"{rec.name}.bias"][..., None]] if mod.bias is not None else []), 2)
            torch.testing.assert_close(rec.G(g).transpose(1, 2) @ rec.A, Vn)
    with pytest.raises(ValueError, match="module: expected nn.Linear or nn.Conv2d"):
        layer_weight_matrix(m.gn, (m.gn.weight, m.gn.bias))


def test_parameters_on_a_non_leaf_module_are_an_error():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * self.lin(x)

    with pytest.raises(ValueError, match=r"holds parameters \['scale'\] and has submodules"):
        per_example_grad_norms(Scaled(), torch.randn(4, 3), torch.randint(0, 2, (4,)))


@pytest.mark.skipif("triton" not in available_backends(), reason="triton: not usable here")
def test_model_level_on_triton_interpreted():
    """The whole model-level path on the Triton kernels (tiny MLP: the interpreter is slow)."""
    torch.manual_seed(0)
    m = MLP(1, 3, 2, hidden=(3,)).double()
    x, y = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 2, 1])
    torch.testing.assert_close(per_example_grad_norms(m, x, y, backend="triton"), per_example_grad_norms_ref(m, x, y))


# --------------------------------------------------------------------------- kernel cases


@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    P: int
    K: int
    O: int
    N2: int = 3
    P2: int | None = None  # rows per example of the second batch (inner); default P
    layout: str = "contig"  # contig | col (unit stride along P, as unfold / conv grads) | padded (row stride > K)
    big: bool = False  # too slow for the Triton interpreter

    @property
    def id(self):
        p2 = "" if self.P2 is None else f"-P2{self.P2}"
        return f"N{self.N}-P{self.P}-K{self.K}-O{self.O}-N2{self.N2}{p2}-{self.layout}" + "-big" * self.big


CASES = [
    Case(1, 1, 1, 1, N2=1),  # everything 1
    Case(6, 1, 13, 4),  # nn.Linear rows (P = 1)
    Case(4, 9, 10, 8, P2=5),  # conv-like, P1 != P2
    Case(5, 3, 1, 6, layout="col"),  # K = 1
    Case(3, 4, 7, 1, layout="padded"),  # O = 1
    Case(2, 7, 5, 3, N2=1, layout="col"),  # N2 = 1, column layout
    Case(2, 20, 5, 3, N2=2, P2=17),  # P >= 16: triton float32 Gram tiles by tl.dot
    Case(7, 33, 17, 5, layout="padded", big=True),  # odd sizes, several tiles
    Case(3, 150, 11, 6, N2=4, P2=70, layout="col", big=True),  # cpu: per-example bilinear, Gram tiles
    Case(300, 1, 20, 10, N2=5, big=True),  # many examples, P = 1
]
SMALL = [c for c in CASES if not c.big]
PRODUCTS = ["bilinear", "norms-ghost", "norms-materialize", "inner-ghost", "inner-materialize"]


def _rows(g, N, P, X, layout):
    if layout == "col":
        return torch.randn(N, X, P, dtype=torch.float64, generator=g).transpose(1, 2)
    if layout == "padded":
        return torch.randn(N, P + 2, X + 3, dtype=torch.float64, generator=g)[:, 1 : P + 1, 2 : X + 2]
    return torch.randn(N, P, X, dtype=torch.float64, generator=g)


def make_inputs(case: Case, seed: int = 0):
    """float64 CPU inputs in the case's layout (the same layout for both batches)."""
    g = torch.Generator().manual_seed(seed * 7919 + case.N * 131 + case.P * 17 + case.K * 3 + case.O)
    P2 = case.P if case.P2 is None else case.P2
    return dict(
        A=_rows(g, case.N, case.P, case.K, case.layout),
        G=_rows(g, case.N, case.P, case.O, case.layout),
        V=torch.randn(case.O, case.K, dtype=torch.float64, generator=g),
        A2=_rows(g, case.N2, P2, case.K, case.layout),
        G2=_rows(g, case.N2, P2, case.O, case.layout),
    )


def _to(x, dtype, device):
    """Same strides on the new dtype / device (layouts survive)."""
    out = {}
    for k, v in x.items():
        t = torch.empty_strided(v.size(), v.stride(), dtype=dtype, device=device)
        out[k] = t.copy_(v)
    return out


def _run(product, backend, x):
    if product == "bilinear":
        return ghost_bilinear(x["A"], x["G"], x["V"], backend=backend)
    kind, alg = product.split("-")
    if kind == "norms":
        return ghost_norms(x["A"], x["G"], algorithm=alg, backend=backend)
    return ghost_inner(x["A"], x["G"], x["A2"], x["G2"], algorithm=alg, backend=backend)


def _ref(product, x):
    if product == "bilinear":
        return ghost_bilinear_ref(x["A"], x["G"], x["V"])
    if product.startswith("norms"):
        return ghost_norms_ref(x["A"], x["G"])
    return ghost_inner_ref(x["A"], x["G"], x["A2"], x["G2"])


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_matches_reference(backend, case, dtype, product):
    if case.big and _interpreted(backend):
        pytest.skip("large shape: too slow under the Triton interpreter")
    x64 = make_inputs(case)
    x = _to(x64, dtype, _device(backend))
    if dtype == torch.float32:  # the reference sees exactly the kernel's (rounded) inputs
        x64 = _to(_to(x64, torch.float32, "cpu"), torch.float64, "cpu")
    with torch.no_grad():
        got = _run(product, backend, x).cpu()
    ref64 = _ref(product, x64)
    assert got.dtype == dtype and got.shape == ref64.shape
    scale = ref64.abs().max().item()
    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref64, atol=atol * max(scale, 1e-300), rtol=rtol)
        return
    ref32 = _ref(product, _to(x64, torch.float32, "cpu"))
    err_kernel = (got.double() - ref64).abs().max().item()
    err_torch = (ref32.double() - ref64).abs().max().item()
    assert err_kernel <= 2 * err_torch + atol * scale, f"float32 error {err_kernel:.3e} > 2×{err_torch:.3e} + floor"


@pytest.mark.parametrize("backend", [backend_param("cpu"), backend_param("triton")])
def test_empty_and_zero_sized(backend):
    dev = _device(backend)
    z = lambda *s: torch.randn(*s, dtype=torch.float64, device=dev)  # noqa: E731
    assert ghost_norms(z(0, 3, 4), z(0, 3, 2), backend=backend).shape == (0,)
    assert ghost_bilinear(z(0, 3, 4), z(0, 3, 2), z(2, 4), backend=backend).shape == (0,)
    assert ghost_inner(z(0, 3, 4), z(0, 3, 2), z(5, 2, 4), z(5, 2, 2), backend=backend).shape == (0, 5)
    for alg in ("ghost", "materialize"):  # P = 0: every W_n is zero
        assert (ghost_norms(z(3, 0, 4), z(3, 0, 2), algorithm=alg, backend=backend) == 0).all()
        assert (ghost_inner(z(3, 0, 4), z(3, 0, 2), z(2, 1, 4), z(2, 1, 2), algorithm=alg, backend=backend) == 0).all()


def test_cpu_broadcast_and_permuted_layouts():
    """Zero example stride (expanded) and examples-not-outermost storage go through the C++ kernel."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(1, 5, 4, dtype=torch.float64, generator=g).expand(4, 5, 4)
    G = torch.randn(5, 4, 3, dtype=torch.float64, generator=g).permute(1, 0, 2)
    V = torch.randn(3, 4, dtype=torch.float64, generator=g)
    for alg in ("ghost", "materialize"):
        torch.testing.assert_close(ghost_norms(A, G, algorithm=alg, backend="cpu"), ghost_norms_ref(A, G))
        torch.testing.assert_close(ghost_inner(A, G, A, G, algorithm=alg, backend="cpu"), ghost_inner_ref(A, G, A, G))
    torch.testing.assert_close(ghost_bilinear(A, G, V, backend="cpu"), ghost_bilinear_ref(A, G, V))


# --------------------------------------------------------------------------- autograd (contract suite)


@dataclasses.dataclass(frozen=True)
class GCase:
    N: int
    P: int
    K: int
    O: int
    N2: int = 2
    P2: int = 2
    algorithm: str = "auto"

    @property
    def id(self):
        return f"N{self.N}-P{self.P}-K{self.K}-O{self.O}-{self.algorithm}"


class _GhostContract(OpContract):
    backends = [backend_param("cpu"), backend_param("triton"), backend_param("reference")]
    gradcheck_cases = [GCase(2, 3, 3, 2, algorithm="ghost"), GCase(3, 1, 4, 2, algorithm="materialize")]
    parity_cases = [GCase(4, 5, 6, 3, algorithm="ghost"), GCase(3, 2, 7, 5, N2=4, P2=3, algorithm="materialize")]

    def make_inputs(self, case, dtype):
        g = torch.Generator().manual_seed(case.N * 100 + case.P * 10 + case.K)
        t = lambda *s: torch.randn(*s, dtype=dtype, generator=g).requires_grad_()  # noqa: E731
        return dict(A=t(case.N, case.P, case.K), G=t(case.N, case.P, case.O), V=t(case.O, case.K),
                    A2=t(case.N2, case.P2, case.K), G2=t(case.N2, case.P2, case.O), kwargs=dict(algorithm=case.algorithm))

    def gradcheck_cases_for(self, backend):
        return self.gradcheck_cases[:1] if backend == "triton" else self.gradcheck_cases

    def gradcheck_fast_mode(self, backend):
        return backend == "triton"


class TestGhostBilinearContract(_GhostContract):
    def make_inputs(self, case, dtype):
        x = super().make_inputs(case, dtype)
        return {k: x[k] for k in ("A", "G", "V")}

    def reference(self, x):
        return ghost_bilinear_ref(x["A"], x["G"], x["V"])

    def kernel(self, x, backend):
        return ghost_bilinear(x["A"], x["G"], x["V"], backend=backend)


class TestGhostNormsContract(_GhostContract):
    def make_inputs(self, case, dtype):
        x = super().make_inputs(case, dtype)
        return {"A": x["A"], "G": x["G"], "kwargs": x["kwargs"]}

    def reference(self, x):
        return ghost_norms_ref(x["A"], x["G"])

    def kernel(self, x, backend):
        return ghost_norms(x["A"], x["G"], backend=backend, **x["kwargs"])


class TestGhostInnerContract(_GhostContract):
    def make_inputs(self, case, dtype):
        x = super().make_inputs(case, dtype)
        return {k: x[k] for k in ("A", "G", "A2", "G2", "kwargs")}

    def reference(self, x):
        return ghost_inner_ref(x["A"], x["G"], x["A2"], x["G2"])

    def kernel(self, x, backend):
        return ghost_inner(x["A"], x["G"], x["A2"], x["G2"], backend=backend, **x["kwargs"])


def test_bilinear_backward_computes_only_what_is_asked():
    A, G = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
    V = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (dV,) = torch.autograd.grad(ghost_bilinear(A, G, V, backend="cpu").sum(), V)
    torch.testing.assert_close(dV, torch.einsum("npo,npk->ok", G, A))
    assert torch.autograd.gradgradcheck(lambda v: ghost_bilinear(A, G, v, backend="cpu"), [V])


# --------------------------------------------------------------------------- validation and dispatch

ERRORS = (ValueError, TypeError)


def _good(N=3, P=2, K=4, O=5):
    return torch.randn(N, P, K), torch.randn(N, P, O), torch.randn(O, K)


BAD = [
    ("A", lambda A, G, V: (A[0], G, V), "shape"),
    ("G", lambda A, G, V: (A, G[:, :1], V), "shape"),
    ("G", lambda A, G, V: (A, G.double(), V), "dtype"),
    ("A", lambda A, G, V: (A.long(), G.long(), V), "dtype"),
    ("V", lambda A, G, V: (A, G, V[:, :3]), "shape"),
    ("V", lambda A, G, V: (A, G, V.double()), "dtype"),
]


@pytest.mark.parametrize("name, mutate, what", BAD, ids=[f"{n}-{w}{i}" for i, (n, _, w) in enumerate(BAD)])
@pytest.mark.parametrize("backend", [backend_param("cpu"), backend_param("reference")])
def test_bad_input_names_the_argument(backend, name, mutate, what):
    A, G, V = mutate(*_good())
    with pytest.raises(ERRORS, match=rf"(^|\W){name}:"):
        ghost_bilinear(A, G, V, backend=backend)
    if name != "V":
        with pytest.raises(ERRORS, match=rf"(^|\W){name}:"):
            ghost_norms(A, G, backend=backend)


def test_bad_inner_and_algorithm_arguments():
    A, G, _ = _good()
    with pytest.raises(ValueError, match=r"A2:.*K = 4"):
        ghost_inner(A, G, torch.randn(2, 2, 3), torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match=r"G2:.*O = 5"):
        ghost_inner(A, G, torch.randn(2, 2, 4), torch.randn(2, 2, 6))
    with pytest.raises(ValueError, match="algorithm:"):
        ghost_norms(A, G, algorithm="fast")
    with pytest.raises(ValueError, match="backend:"):
        ghost_norms(A, G, backend="gpu")


def test_cpu_extension_errors_name_the_argument():
    from ddfast import dispatch

    ext = dispatch.extension()
    A, G, V = _good()
    with pytest.raises(RuntimeError, match=r"G: expected output gradients of shape \[N, P, O\]"):
        ext.ghost_norms_fwd(A, G[:2], True)
    with pytest.raises(RuntimeError, match=r"V: expected shape \[O, K\]"):
        ext.ghost_bilinear_fwd(A, G, V.t())
    with pytest.raises(RuntimeError, match="A2: expected K = 4"):
        ext.ghost_inner_fwd(A, G, torch.randn(2, 2, 3), torch.randn(2, 2, 5), False)


def test_dispatch():
    from ddfast.ops import ghost_products as gp

    A, G, _ = _good()
    assert gp._select("auto", A.device, A.dtype, "ghost_norms") == "cpu"
    assert gp._select("fused", A.device, A.dtype, "ghost_norms") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run these inputs"):
            ghost_norms(A, G, backend="cuda")


def test_cpu_materialized_inner_in_blocks():
    """N·O·K above the per-side block budget (2^23 elements): W in several blocks, both for two batches
    and for the same tensors on both sides (one W block serves both)."""
    g = torch.Generator().manual_seed(5)
    A, G = torch.randn(300, 2, 200, generator=g), torch.randn(300, 2, 150, generator=g)
    A2, G2 = torch.randn(290, 1, 200, generator=g), torch.randn(290, 1, 150, generator=g)
    for a2, g2 in ((A, G), (A2, G2)):
        got = ghost_inner(A, G, a2, g2, algorithm="materialize", backend="cpu")
        ref64 = ghost_inner_ref(A.double(), G.double(), a2.double(), g2.double())
        ref32 = ghost_inner_ref(A, G, a2, g2)
        err, err_torch = (got.double() - ref64).abs().max(), (ref32.double() - ref64).abs().max()
        assert err <= 2 * err_torch + TOLERANCES[torch.float32][0] * ref64.abs().max()


def test_triton_not_supported_reasons():
    from ddfast.kernels import ghost_products as mod

    t = torch.empty(1, 1, 1)
    if mod.TRITON_AVAILABLE and mod._INTERPRETED:
        assert mod.not_supported_reasons(t) == []
    assert any("float32/float64" in r for r in mod.not_supported_reasons(t.half()))


def test_ghost_is_cheaper():
    assert ghost_is_cheaper(1, 10, 577)  # a linear head: ‖g‖²‖a‖²
    assert not ghost_is_cheaper(784, 16, 10)  # first conv of a 28×28 ConvNet: many positions, tiny W
    assert ghost_is_cheaper(49, 64, 289)
    assert ghost_is_cheaper(1, 10, 577, 64, 1, 64) and not ghost_is_cheaper(196, 32, 145, 64, 196, 64)
