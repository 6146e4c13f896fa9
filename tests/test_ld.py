"""Label distillation (LD / LD-RR): algorithm behaviour, backends agreeing, resume, artifacts, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from ddfast.artifacts import load_state, save_state
from ddfast.cli import main as cli_main
from ddfast.data import load_dataset
from ddfast.distill.ld import LDConfig, LabelDistiller, project_to_simplex_rows
from ddfast.experiments.ld import distill, load_distilled, prepare
from ddfast.reference.ridge_solve import ridge_weights_ref


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _distiller(digits, variant="second_order", n_per_class=1, backend="auto", **cfg):
    idx = torch.cat([torch.nonzero(digits.train_y == c).flatten()[:n_per_class] for c in range(10)])
    config = LDConfig(variant=variant, model="mlp", outer_batch=128, epochs=cfg.pop("epochs", 2), val_every=1,
                      backend=backend, **cfg)
    return LabelDistiller(digits.train_x[idx], (digits.train_x[:400], digits.train_y[:400]),
                          (digits.val_x, digits.val_y), 10, config)


def test_project_to_simplex_rows():
    y = torch.tensor([[0.5, -0.2, 0.9], [2.0, 0.0, 0.0], [-1.0, -3.0, -0.1], [0.2, 0.2, 0.1]])
    project_to_simplex_rows(y)
    torch.testing.assert_close(y.sum(1), torch.ones(4))
    assert (y >= 0).all()
    torch.testing.assert_close(y[0], torch.tensor([0.5, 0.0, 0.9]) / 1.4)
    torch.testing.assert_close(y[1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(y[2], torch.full((3,), 1 / 3))  # all clamped to 0 → uniform


@pytest.mark.parametrize("variant", ["second_order", "rr"])
def test_labels_start_uniform_and_stay_distributions(digits, variant):
    ld = _distiller(digits, variant)
    torch.testing.assert_close(ld.labels.detach(), torch.full((10, 10), 0.1))
    for _ in range(5):
        ld.step(digits.train_x[:128], digits.train_y[:128])
    y = ld.labels.detach()
    assert (y >= 0).all() and (y <= 1).all()
    torch.testing.assert_close(y.sum(1), torch.ones(10))
    assert not torch.allclose(y, torch.full((10, 10), 0.1))  # they moved


def test_reset_on_plateau_records_steps_to_overfit(digits):
    ld = _distiller(digits, stats_gap=3)
    first_model = ld.model
    errors = [50, 40, 30, 20, 10, 90, 90, 90, 90]
    for e in errors[:-1]:
        ld._monitor(e)
    assert ld.resets == 0 and ld.model is first_model
    ld._monitor(errors[-1])
    # windows (size 3) end at steps 3..9: the best window ends at step 5; 3 more non-improving
    # steps are allowed, the next one (step 9) resets: T = 5.
    assert ld.resets == 1 and ld.steps_list == [5]
    assert ld.model is not first_model and ld.steps_since_reset == 0
    # current_steps: the mean of the last three recorded T.
    ld.steps_list += [7, 10, 13]
    assert ld.current_steps() == 10


def test_reset_during_distillation(digits):
    ld = _distiller(digits, stats_gap=2, epochs=3)
    ld.fit()
    assert ld.resets > 0 and len(ld.steps_list) == ld.resets and all(t >= 2 for t in ld.steps_list)


def test_rr_pseudo_gradient_update(digits):
    ld = _distiller(digits, "rr", pseudo_lr=0.25)
    g_state = ld.generator.get_state()
    idx = torch.randperm(10, generator=ld.generator)[: ld.inner_batch]
    ld.generator.set_state(g_state)
    w_prev = torch.randn_like(ld.model.weight) * 0.1
    ld.model.weight.copy_(w_prev)
    with torch.no_grad():
        z = ld.model.features(ld.base_images[idx])
    w_local = ridge_weights_ref(z, ld.labels.detach()[idx], 1.0, bias=True)
    ld.step(digits.train_x[:128], digits.train_y[:128])
    torch.testing.assert_close(ld.model.weight, 0.75 * w_prev + 0.25 * w_local, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["second_order", "rr"])
def test_fused_equals_reference_distillation(digits, variant):
    runs = {}
    for backend in ("reference", "fused"):
        ld = _distiller(digits, variant, backend=backend, epochs=1)
        for _ in range(8):
            ld.step(digits.train_x[:128], digits.train_y[:128])
        runs[backend] = ld.labels.detach().clone()
    torch.testing.assert_close(runs["fused"], runs["reference"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("variant", ["second_order", "rr"])
def test_resume_is_bit_identical(digits, tmp_path, variant):
    straight = _distiller(digits, variant, epochs=4, stats_gap=3)
    r1 = straight.fit()
    part = _distiller(digits, variant, epochs=2, stats_gap=3)
    part.fit(out_dir=str(tmp_path))
    resumed = _distiller(digits, variant, epochs=4, stats_gap=3)
    r2 = resumed.fit(out_dir=str(tmp_path), resume=True)
    assert torch.equal(straight.labels.detach(), resumed.labels.detach())
    assert torch.equal(r1.soft_labels, r2.soft_labels)
    assert r1.steps_to_overfit_history == r2.steps_to_overfit_history and r1.history == r2.history
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_is_plain_safetensors(tmp_path):
    state = {"a": torch.arange(3), "opt": {"state": {0: {"step": torch.tensor(2.0)}}, "groups": [{"lr": 1e-3}]}, "x": None}
    path = str(tmp_path / "s.safetensors")
    save_state(path, state)
    back = load_state(path)
    assert torch.equal(back["a"], state["a"]) and back["opt"]["state"][0]["step"].item() == 2.0
    assert back["opt"]["groups"][0]["lr"] == 1e-3 and back["x"] is None
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_bad_input(digits):
    x, y = digits.train_x[:50], digits.train_y[:50]
    val = (digits.val_x, digits.val_y)
    with pytest.raises(ValueError, match="base_images: the base set is empty"):
        LabelDistiller(x[:0], (x, y), val, 10)
    with pytest.raises(ValueError, match="class indices must lie in"):
        LabelDistiller(x[:5], (x, y), val, 5)  # C mismatch: labels go up to 9
    with pytest.raises(ValueError, match="base_images: expected images shaped like"):
        LabelDistiller(torch.zeros(3, 1, 28, 28), (x, y), val, 10)
    with pytest.raises(ValueError, match="variant"):
        LDConfig(variant="third_order")
    with pytest.raises(ValueError, match="unknown data set"):
        prepare("no-such-set", 10)
    with pytest.raises(ValueError, match="multiple of C"):
        prepare("digits", 15)


def test_cross_dataset_labels_target_classes(digits):
    """Base examples from another source: labels over the target's C classes (source labels unused)."""
    prepared = prepare("digits", 12, source="npz:" + _write_npz_source())
    assert prepared.base_true_labels is None and prepared.base_images.shape == (12, 1, 8, 8)
    ld, res, _ = distill("digits", 12, "rr", prepared=prepared, epochs=1, outer_batch=256, model="mlp")
    assert res.soft_labels.shape == (12, 10)


def _write_npz_source():
    import tempfile

    import numpy as np

    rng = np.random.default_rng(0)
    path = os.path.join(tempfile.mkdtemp(), "letters.npz")
    np.savez(path, x_train=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), y_train=rng.integers(0, 3, 40),
             x_test=rng.integers(0, 255, (10, 8, 8), dtype=np.uint8), y_test=rng.integers(0, 3, 10))
    return path


def test_cli_distill_evaluate_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["distill", "ld", "--dataset", "digits", "--base-examples", "10", "--variant", "rr", "--backend", "fused",
              "--val-every", "1", "--out", out, "--no-progress"]
    assert cli_main(common + ["--epochs", "2"]) == 0
    for f in ("distilled.safetensors", "meta.json", "labels.png", "checkpoint.safetensors"):
        assert os.path.exists(os.path.join(out, f)), f
    tensors, meta = load_distilled(out)
    assert tensors["soft_labels"].shape == (10, 10) and tensors["base_indices"].shape == (10,)
    assert meta["dataset"] == "digits" and meta["config"]["variant"] == "rr" and meta["status"] == "done"
    with safe_open(os.path.join(out, "distilled.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"base_images", "base_indices", "soft_labels", "calibration", "steps_to_overfit"}
    assert cli_main(["evaluate", out, "--models", "2"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "eval.json")))["models"] == 2
    # Resume a finished run with more epochs: continues from the checkpoint.
    assert cli_main(common + ["--epochs", "3", "--resume"]) == 0
    assert json.load(open(os.path.join(out, "meta.json")))["iterations"] == 3 * 5


def test_cli_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "ddfast.cli", "distill", "ld", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout


@pytest.mark.parametrize("name, c, size, dim", [("lenet", 1, 28, 84), ("lenet", 3, 32, 84), ("alexnet", 3, 32, 192),
                                                ("resnet18", 3, 32, 512), ("mlp", 1, 8, 64)])
def test_models_split_into_features_and_linear_head(name, c, size, dim):
    from ddfast.models import build_model
    from ddfast.ops.label_metagrad import split_model

    m = build_model(name, c, 7, size)
    x = torch.randn(2, c, size, size)
    features, head = split_model(m)
    h = features(x)
    assert h.shape == (2, dim) and head.in_features == dim
    torch.testing.assert_close(m(x), head(h))
    with pytest.raises(ValueError, match="model"):
        build_model("vgg", c, 7, size)
