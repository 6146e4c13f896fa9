"""EAD distiller (effect-alignment Algorithm 1) on a real digits trajectory."""

import os

import pytest
import torch

from ddfast.data import load_dataset
from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
from ddfast.trajectory import train_trajectory

OPTS = {"widths": (6, 8), "norm": "instance"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def traj(digits, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("traj"))
    return train_trajectory(digits, "convnet", out, epochs=2, every=4, lr=0.05, momentum=0.9, batch_size=128,
                            model_options=OPTS, progress=False)


def _cfg(**kw):
    base = dict(ipc=2, iterations=3, t_m=2, probe_batch=32, real_batch=32)
    base.update(kw)
    return EADConfig(**base)


def test_init_balanced_real_images_and_final_checkpoint_soft_labels(digits, traj):
    d = EffectAlignmentDistiller(traj, (digits.train_x, digits.train_y), _cfg(ipc=3))
    idx = d.init_indices
    assert idx.numel() == 30
    assert torch.bincount(digits.train_y[idx], minlength=10).tolist() == [3] * 10
    torch.testing.assert_close(d.images.detach(), digits.train_x[idx])
    teacher = traj.build_model()
    teacher.load_state_dict(traj.final())
    teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(d.labels.detach(), teacher(digits.train_x[idx]))
    assert d.coefficient == 1.0
    printed = EffectAlignmentDistiller(traj, (digits.train_x, digits.train_y), _cfg(ipc=3, objective="printed"))
    n_d, n_s = digits.train_x.shape[0], 30
    assert printed.coefficient == pytest.approx((2 * n_s - n_d) / n_s)


def test_fused_and_reference_give_the_same_result(digits, traj):
    x, y = digits.train_x.double(), digits.train_y
    out = {}
    for backend in ("reference", "auto"):
        d = EffectAlignmentDistiller(traj, (x, y), _cfg(iterations=3, backend=backend))
        out[backend] = d.fit()
    a, b = out["reference"], out["auto"]
    torch.testing.assert_close(a.images, b.images, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(a.soft_labels, b.soft_labels, atol=1e-9, rtol=1e-7)
    for ha, hb in zip(a.history, b.history):
        assert ha["checkpoints"] == hb["checkpoints"]
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-7, abs=1e-12)
    assert not torch.equal(a.images, a.init_images)  # it moved


def test_loss_goes_down_on_digits(digits, traj):
    d = EffectAlignmentDistiller(traj, (digits.train_x, digits.train_y),
                                 _cfg(ipc=2, iterations=40, probe_batch=128, real_batch=128, t_m=2, lr_images=3e-2))
    res = d.fit()
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_resume_is_bit_identical(digits, traj, tmp_path):
    data = (digits.train_x, digits.train_y)
    full = EffectAlignmentDistiller(traj, data, _cfg(iterations=4)).fit()
    run = str(tmp_path / "run")
    first = EffectAlignmentDistiller(traj, data, _cfg(iterations=2))
    first.fit(out_dir=run, checkpoint_every=1)
    assert os.path.exists(os.path.join(run, "checkpoint.safetensors"))
    assert not [f for f in os.listdir(run) if f.startswith(".tmp")]
    second = EffectAlignmentDistiller(traj, data, _cfg(iterations=4))
    res = second.fit(out_dir=run, resume=True, checkpoint_every=1)
    assert torch.equal(res.images, full.images) and torch.equal(res.soft_labels, full.soft_labels)
    other = EffectAlignmentDistiller(traj, data, _cfg(iterations=4, ipc=3))
    with pytest.raises(ValueError, match="resume: checkpoint has ipc=2"):
        other.fit(out_dir=run, resume=True)


def test_bad_input(digits, traj, tmp_path):
    data = (digits.train_x, digits.train_y)
    with pytest.raises(ValueError, match=r"t_m: 99 checkpoints .* the trajectory has"):
        EffectAlignmentDistiller(traj, data, _cfg(t_m=99))
    with pytest.raises(ValueError, match="objective"):
        EffectAlignmentDistiller(traj, data, _cfg(objective="x"))
    with pytest.raises(ValueError, match="per_class=500"):
        EffectAlignmentDistiller(traj, data, _cfg(ipc=500))
    with pytest.raises(ValueError, match="train y"):
        EffectAlignmentDistiller(traj, (digits.train_x, digits.train_y[:5]), _cfg())
    small = load_dataset("digits", image_size=6)
    with pytest.raises((ValueError, RuntimeError)):
        EffectAlignmentDistiller(traj, (small.train_x, small.train_y), _cfg())
    d = EffectAlignmentDistiller(traj, data, _cfg())
    with torch.no_grad():
        d.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images: contains non-finite"):
        d.step()
    other = train_trajectory(digits, "mlp", str(tmp_path / "mlp"), epochs=1, every=50, lr=0.05, batch_size=256,
                             model_options={"hidden": (8,)}, progress=False)
    with pytest.raises(ValueError):
        other.check_model(traj.build_model())


def test_cli_trajectory_distill_resume_table(tmp_path, capsys):
    from safetensors.torch import load_file

    from ddfast.cli import main

    traj = str(tmp_path / "traj")
    assert main(["trajectory", "--dataset", "digits", "--arch", "convnet", "--width", "8", "--norm", "instance",
                 "--epochs", "1", "--every", "3", "--lr", "0.05", "--batch-size", "128", "--out", traj,
                 "--no-progress"]) == 0
    run = str(tmp_path / "run")
    args = ["distill", "ead", "--dataset", "digits", "--ipc", "1", "--trajectory", traj, "--out", run, "--t-m", "2",
            "--probe-batch", "32", "--real-batch", "32", "--checkpoint-every", "1", "--no-progress"]
    assert main(args + ["--iterations", "2"]) == 0
    assert main(args + ["--iterations", "3", "--resume", "--evaluate", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 iterations" in out and "init" in out and "EAD" in out
    t = load_file(os.path.join(run, "distilled.safetensors"))
    assert t["images"].shape == (10, 1, 8, 8) and t["soft_labels"].shape == (10, 10)
    assert t["init_indices"].shape == (10,)
    for name in ("images.png", "images_before.png", "meta.json", "checkpoint.safetensors"):
        assert os.path.exists(os.path.join(run, name)), name
    capsys.readouterr()
    assert main(["distill", "ead", "--dataset", "digits", "--ipc", "1", "--trajectory", traj, "--out",
                 str(tmp_path / "bad"), "--t-m", "50", "--no-progress"]) == 1
    assert "t_m" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad")
