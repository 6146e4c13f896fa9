"""Network-pass levers (bf16 autocast, channels_last, compile, checkpoint cache): each keeps the result.

Tolerances: channels_last in float32 changes only the convolution algorithm's summation order
(rtol 1e-4); bf16 autocast rounds every conv/GEMM input to 8 mantissa bits, so bf16 results are
compared with a relative-norm tolerance of 5e-2 (observed 1e-2) against float32.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from ddfast.benchmarks.e2e import MODES, format_table, mode_options
from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller, outer_loss
from ddfast.distill.ld import LDConfig, LabelDistiller
from ddfast.evaluate.train import TrainSettings, make_optimizers, train_step
from ddfast.models import build_model
from ddfast.network_passes import PassOptions, autocast, check_pass_options, prepare_images, prepare_model
from ddfast.ops.checkpoint_grad_inner import checkpoint_grad_inner
from ddfast.ops.label_metagrad import label_metagrad
from ddfast.reference.label_metagrad import label_metagrad_ref

BF16_RTOL = 5e-2


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _images(n, c=1, s=28, seed=0):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- options


def test_pass_options_errors():
    with pytest.raises(ValueError, match="precision"):
        PassOptions(precision="fp16")
    with pytest.raises(ValueError, match="channels_last"):
        check_pass_options("fp32", "yes", False)
    with pytest.raises(ValueError, match="precision"):
        LDConfig(precision="half")
    with pytest.raises(ValueError, match="compile"):
        KRRSTConfig(compile=1)
    assert PassOptions.of(LDConfig(precision="bf16", channels_last=True)) == PassOptions("bf16", True, False)


def test_autocast_and_memory_format():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with autocast("fp32"):
        assert (x @ w).dtype == torch.float32
    with autocast("bf16"):
        assert (x @ w).dtype == torch.bfloat16
    model = build_model("lenet", 1, 10, 28)
    prepare_model(model, PassOptions(channels_last=True))
    assert model.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    img = prepare_images(_images(2), PassOptions(channels_last=True))
    assert img.is_contiguous(memory_format=torch.channels_last)
    assert prepare_images(torch.randn(2, 5), PassOptions(channels_last=True)).shape == (2, 5)


# --------------------------------------------------------------------------- ops


def _ld_inputs(n=20, m=96, seed=0):
    torch.manual_seed(seed)
    model = build_model("lenet", 1, 10, 28)
    y = torch.softmax(torch.randn(n, 10), -1)
    return model, _images(n, seed=seed), y, _images(m, seed=seed + 1), torch.randint(0, 10, (m,))


def test_label_metagrad_bf16_and_channels_last():
    """bf16: error vs the float64 truth ≤ 2 × plain PyTorch's bf16 error (the reference under autocast) + atol."""
    model, xb, y, xr, yr = _ld_inputs()
    ref = label_metagrad(model, xb, y, xr, yr, outer_chunk=40)
    truth = label_metagrad_ref(copy.deepcopy(model).double(), xb.double(), y.double(), xr.double(), yr, 0.01, "mean", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_bf16 = label_metagrad_ref(model, xb, y, xr, yr, 0.01, "mean", True)
    bf = label_metagrad(model, xb, y, xr, yr, outer_chunk=40, precision="bf16")
    assert bf.grad.dtype == torch.float32 and bf.loss.dtype == torch.float32
    assert rel(bf.grad, truth[1]) <= 2 * rel(torch_bf16[1], truth[1]) + 1e-3
    assert abs(float(bf.loss) - float(ref.loss)) < 1e-2 * abs(float(ref.loss))
    for k in ref.inner_grads:
        assert bf.inner_grads[k].dtype == torch.float32
        assert rel(bf.inner_grads[k], truth[3][k]) <= 2 * rel(torch_bf16[3][k], truth[3][k]) + 1e-3
    prepare_model(model, PassOptions(channels_last=True))
    cl = label_metagrad(model, prepare_images(xb, PassOptions(channels_last=True)), y,
                        prepare_images(xr, PassOptions(channels_last=True)), yr, outer_chunk=40)
    torch.testing.assert_close(cl.grad, ref.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cl.loss, ref.loss, rtol=1e-5, atol=1e-7)


def test_label_metagrad_bf16_needs_fused():
    model, xb, y, xr, yr = _ld_inputs(n=4, m=8)
    with pytest.raises(ValueError, match="precision"):
        label_metagrad(model, xb, y, xr, yr, backend="reference", precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        label_metagrad(model, xb, y, xr, yr, precision="fp8")


def _ead_model(seed=0):
    torch.manual_seed(seed)
    return build_model("convnet", 1, 10, 16, widths=(8, 8), norm="instance").eval()


def test_checkpoint_grad_inner_bf16_and_channels_last():
    model = _ead_model()
    states = [{k: v.clone() for k, v in _ead_model(s).state_dict().items()} for s in (1, 2)]
    probe = (_images(24, s=16, seed=3), torch.randint(0, 10, (24,)))
    real = (_images(24, s=16, seed=4), torch.randint(0, 10, (24,)))
    images = _images(10, s=16, seed=5).requires_grad_(True)
    labels = torch.randn(10, 10).requires_grad_(True)
    r, s = checkpoint_grad_inner(model, states, probe, real, images, labels)
    gx, gy = torch.autograd.grad(s, [images, labels])
    rb, sb = checkpoint_grad_inner(model, states, probe, real, images, labels, precision="bf16")
    gxb, gyb = torch.autograd.grad(sb, [images, labels])
    assert gxb.dtype == torch.float32 and sb.dtype == torch.float32
    # Truth in float64; plain PyTorch bf16 = the double-backward reference under autocast.
    st64 = [{k: v.double() for k, v in st.items()} for st in states]
    x64, y64 = images.detach().double().requires_grad_(True), labels.detach().double().requires_grad_(True)
    r64, s64 = checkpoint_grad_inner(copy.deepcopy(model).double(), st64, (probe[0].double(), probe[1]),
                                     (real[0].double(), real[1]), x64, y64, backend="reference")
    g64 = torch.autograd.grad(s64, [x64, y64])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rt, st_ = checkpoint_grad_inner(model, states, probe, real, images, labels, backend="reference")
        gt = torch.autograd.grad(st_, [images, labels])
    for ours, torch_bf16, truth in ((rb, rt, r64), (sb.detach(), st_.detach(), s64.detach()), (gxb, gt[0], g64[0]),
                                    (gyb, gt[1], g64[1])):
        assert rel(ours, truth) <= 2 * rel(torch_bf16, truth) + 1e-2
    opts = PassOptions(channels_last=True)
    prepare_model(model, opts)
    states_cl = [{k: prepare_images(v, opts) for k, v in st.items()} for st in states]
    x_cl = prepare_images(images.detach(), opts).requires_grad_(True)
    rc, sc = checkpoint_grad_inner(model, states_cl, (prepare_images(probe[0], opts), probe[1]),
                                   (prepare_images(real[0], opts), real[1]), x_cl, labels)
    gxc, gyc = torch.autograd.grad(sc, [x_cl, labels])
    torch.testing.assert_close(sc, s, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gxc, gx, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="precision"):
        checkpoint_grad_inner(model, states, probe, real, images, labels, backend="reference", precision="bf16")


def test_krr_outer_loss_bf16_keeps_solve_fp32():
    torch.manual_seed(0)
    model = build_model("convnet", 1, 16, 16, widths=(8, 16), norm="batch").eval()
    xs = _images(12, s=16).requires_grad_(True)
    ys = torch.randn(12, 16).requires_grad_(True)
    xr, yr = _images(40, s=16, seed=1), torch.randn(40, 16)
    loss = outer_loss(model.features, xs, ys, xr, yr)
    loss_b = outer_loss(model.features, xs, ys, xr, yr, precision="bf16")
    assert loss_b.dtype == torch.float32
    g = torch.autograd.grad(loss, [xs, ys])
    gb = torch.autograd.grad(loss_b, [xs, ys])
    assert abs(float(loss_b.detach() - loss.detach())) < BF16_RTOL * float(loss.detach())
    assert rel(gb[0], g[0]) < 0.1 and rel(gb[1], g[1]) < BF16_RTOL


def test_train_step_bf16():
    torch.manual_seed(0)
    model = build_model("lenet", 1, 10, 28)
    settings = TrainSettings(precision="bf16")
    opts = make_optimizers(model, settings)
    loss = train_step(model, opts, _images(8), torch.softmax(torch.randn(8, 10), -1), settings)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --------------------------------------------------------------------------- distillers


def _ld(variant, **kw):
    torch.manual_seed(0)
    x, y = _images(300, seed=7), torch.randint(0, 10, (300,))
    cfg = LDConfig(variant=variant, outer_batch=100, inner_batch=10, stats_gap=50, seed=3, **kw)
    return LabelDistiller(x[:20], (x, y), (x[:50], y[:50]), 10, cfg)


@pytest.mark.parametrize("variant", ["second_order", "rr"])
def test_ld_channels_last_and_bf16_steps(variant):
    runs = {}
    for name, kw in {"nchw": {}, "cl": dict(channels_last=True), "bf16": dict(precision="bf16")}.items():
        ld = _ld(variant, **kw)
        for s in range(3):
            sel = torch.arange(s * 100, s * 100 + 100)
            ld.step(ld.x_train[sel], ld.y_train[sel])
        runs[name] = ld.labels.detach()
        assert ld.labels.dtype == torch.float32
    torch.testing.assert_close(runs["cl"], runs["nchw"], rtol=1e-4, atol=1e-6)
    assert rel(runs["bf16"], runs["nchw"]) < BF16_RTOL


def test_krr_distiller_bf16_channels_last():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 16, 16, generator=g)
    t = torch.randn(64, 8, generator=g)
    base = dict(m=6, batch_size=16, steps=3, pool_size=2, pool_steps=2, widths=(8, 8), seed=0)
    out = {}
    for name, kw in {"fp32": {}, "cl": dict(channels_last=True), "bf16": dict(precision="bf16", channels_last=True)}.items():
        krr = KRRSTDistiller(x, train_targets=t, config=KRRSTConfig(**base, **kw))
        losses = [krr.step() for _ in range(3)]
        assert krr.images.dtype == torch.float32 and krr.targets.dtype == torch.float32
        out[name] = (torch.tensor(losses), krr.images.detach().clone(), krr.targets.detach().clone())
    torch.testing.assert_close(out["cl"][0], out["fp32"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["cl"][2], out["fp32"][2], rtol=1e-4, atol=1e-6)
    assert rel(out["bf16"][0], out["fp32"][0]) < BF16_RTOL


class _Traj:
    def __init__(self, count=4):
        self.states = [{k: v.clone() for k, v in _ead_model(s).state_dict().items()} for s in range(count)]
        self.loads = 0

    def __len__(self):
        return len(self.states)

    def build_model(self):
        return _ead_model()

    def check_model(self, model):
        return None

    def final(self):
        return self.states[-1]

    def load(self, t):
        self.loads += 1
        return self.states[t]

    def sample(self, m, generator, weights="lr"):
        return torch.randperm(len(self.states), generator=generator)[:m].sort().values.tolist()


def test_ead_checkpoint_cache_and_channels_last():
    x, y = _images(60, s=16, seed=9), torch.arange(60) % 10
    base = dict(ipc=2, iterations=3, t_m=2, probe_batch=16, real_batch=16, seed=0)
    results = {}
    for name, kw in {"cache": {}, "nocache": dict(cache_checkpoints=False), "cl": dict(channels_last=True),
                     "bf16": dict(precision="bf16")}.items():
        traj = _Traj()
        ead = EffectAlignmentDistiller(traj, (x, y), EADConfig(**base, **kw))
        for _ in range(3):
            ead.step()
        results[name] = (ead.images.detach().clone(), ead.labels.detach().clone(), traj.loads)
    assert torch.equal(results["cache"][0], results["nocache"][0])
    assert torch.equal(results["cache"][1], results["nocache"][1])
    assert results["cache"][2] <= 4 < results["nocache"][2]  # each checkpoint read once with the cache
    torch.testing.assert_close(results["cl"][0], results["cache"][0], rtol=1e-4, atol=1e-5)
    assert rel(results["bf16"][0], results["cache"][0]) < BF16_RTOL


def test_compile_keeps_the_step():
    torch.manual_seed(0)
    x, y = torch.randn(200, 1, 8, 8), torch.randint(0, 10, (200,))
    labels = {}
    for comp in (False, True):
        cfg = LDConfig(variant="second_order", model="mlp", outer_batch=100, inner_batch=10, seed=0, compile=comp)
        ld = LabelDistiller(x[:20], (x, y), (x[:50], y[:50]), 10, cfg)
        for s in range(2):
            ld.step(x[s * 100 : s * 100 + 100], y[s * 100 : s * 100 + 100])
        labels[comp] = ld.labels.detach()
    torch.testing.assert_close(labels[True], labels[False], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- benchmark helpers


def test_e2e_modes_and_table():
    assert mode_options("reference-fp32", "ld") == dict(backend="reference", precision="fp32", channels_last=False,
                                                        compile=False)
    assert mode_options("fused-fp32", "krr-st")["fold_bn"] is True
    assert mode_options("fused-bf16-compile", "krr-st")["compile"] is True
    with pytest.raises(ValueError, match="mode"):
        mode_options("fast", "ld")
    rows = [dict(workload="w", mode=m, seconds=1.0 / (i + 1), speedup=float(i + 1), peak_mib=10.0 * (i + 1))
            for i, m in enumerate(MODES)]
    table = format_table(rows)
    assert "| w | 1.000 s (×1.00)" in table and "×4.00" in table


def test_fold_batchnorm_outer_loss():
    from ddfast.network_passes import fold_batchnorm

    torch.manual_seed(0)
    model = build_model("convnet", 1, 16, 16, widths=(8, 16), norm="batch")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
    assert fold_batchnorm(model.features) is model.features  # training mode: unchanged
    model.eval()
    folded = fold_batchnorm(model.features)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.features.modules())
    xs = _images(12, s=16).requires_grad_(True)
    ys = torch.randn(12, 16).requires_grad_(True)
    xr, yr = _images(40, s=16, seed=1), torch.randn(40, 16)
    a = outer_loss(model.features, xs, ys, xr, yr, lam=1e-2)  # well-conditioned: float32 rounding only
    b = outer_loss(folded, xs, ys, xr, yr, lam=1e-2)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert rel(torch.autograd.grad(b, xs)[0], torch.autograd.grad(a, xs)[0]) < 1e-4
    cfg = KRRSTConfig(m=4, batch_size=8, steps=2, pool_size=1, pool_steps=2, widths=(8,), fold_bn=True)
    krr = KRRSTDistiller(torch.randn(20, 1, 8, 8), train_targets=torch.randn(20, 4), config=cfg)
    assert all(torch.isfinite(torch.tensor(krr.step())) for _ in range(2))


def test_ead_compile_is_a_clear_error():
    x, y = _images(20, s=16, seed=9), torch.arange(20) % 10
    with pytest.raises(ValueError, match="compile"):
        EffectAlignmentDistiller(_Traj(), (x, y), EADConfig(ipc=1, t_m=1, compile=True))


def test_parity_table_format_and_study_check(tmp_path):
    from ddfast.experiments.e2e_parity import format_parity, parity

    rows = [dict(study="ld-digits", variant="rr", mode=m, accuracy=90.0 + i, std=0.5, seconds_per_iteration=0.01)
            for i, m in enumerate(MODES)]
    table = format_parity(rows)
    assert "| ld-digits rr | 90.00 ± 0.50 | 91.00 ± 0.50" in table
    with pytest.raises(ValueError, match="target_dir"):
        parity(["krr-st"], ["fused-fp32"], out=str(tmp_path), log=None)
    with pytest.raises(ValueError, match="studies"):
        parity(["nope"], ["fused-fp32"], out=str(tmp_path), log=None)


def test_ld_compile_of_the_double_backward_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="compile"):
        LDConfig(variant="second_order", backend="reference", compile=True)
    LDConfig(variant="rr", backend="reference", compile=True)  # first order: fine
