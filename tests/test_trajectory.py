"""Training-trajectory store: index + checkpoint files, resume, lazy loading, P(t) ∝ η_t sampling, CLI."""

import json
import math
import os

import pytest
import torch

import ddfast.trajectory as trajectory_mod
from ddfast.artifacts import _atomic_write
from ddfast.data import load_dataset
from ddfast.models import build_model
from ddfast.trajectory import INDEX_FILE, RESUME_FILE, Trajectory, data_hash, lr_at, train_trajectory

# ConvNet with batch norm so that buffers (running stats, num_batches_tracked) are part of every checkpoint.
CONV = {"widths": [4, 4], "norm": "batch"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def traj(digits, tmp_path_factory):
    """2 epochs × 5 steps (batch 256 of 1222), a checkpoint every 3 steps: 0, 3, 6, 9, 10."""
    out = tmp_path_factory.mktemp("traj")
    return train_trajectory(digits, "convnet", out, epochs=2, every=3, lr=0.05, momentum=0.9, weight_decay=5e-4,
                            model_options=CONV, seed=1, progress=False)


def _files(folder):
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------- writing


def test_index_and_checkpoint_files(traj, digits):
    assert traj.steps == [0, 3, 6, 9, 10]
    assert _files(traj.path) == [f"ckpt-{s:06d}.safetensors" for s in traj.steps] + [INDEX_FILE]
    ix = json.load(open(os.path.join(traj.path, INDEX_FILE)))
    assert ix["complete"] and ix["arch"] == "convnet" and ix["model_options"] == CONV
    assert (ix["dataset"], ix["in_channels"], ix["num_classes"], ix["image_size"]) == ("digits", 1, 10, 8)
    assert ix["data_hash"] == data_hash(digits.train_x, digits.train_y)
    assert ix["optimizer"] == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                               "schedule": "constant", "milestones": [], "gamma": None}
    assert (ix["seed"], ix["batch_size"], ix["steps_per_epoch"], ix["total_steps"]) == (1, 256, 5, 10)
    assert [c["epoch"] for c in ix["checkpoints"]] == [0.0, 0.6, 1.2, 1.8, 2.0]
    assert ix["checkpoints"][0]["train_loss"] is None
    assert all(math.isfinite(c["train_loss"]) for c in ix["checkpoints"][1:])
    assert 0.0 <= ix["test_accuracy"] <= 100.0 and traj.test_accuracy == ix["test_accuracy"]
    # Constant learning rate: η_t recorded for every checkpoint, the final one included.
    assert torch.equal(traj.lrs, torch.full((5,), 0.05, dtype=torch.float64))


def test_checkpoint_zero_is_the_initialisation(traj):
    torch.manual_seed(1)
    init = build_model("convnet", 1, 10, 8, **CONV).state_dict()
    state = traj.load(0)
    assert set(state) == set(init) and "features.1.running_mean" in state and "features.1.num_batches_tracked" in state
    assert all(torch.equal(state[k], init[k]) for k in init)
    # Training moved the parameters and the batch-norm statistics.
    final = traj.final()
    assert not torch.equal(final["head.weight"], init["head.weight"])
    assert int(final["features.1.num_batches_tracked"]) == 10


def test_final_state_reproduces_the_test_accuracy(traj, digits):
    from ddfast.evaluate.train import accuracy

    model = traj.load_model()
    assert accuracy(model, digits.test_x, digits.test_y) == traj.test_accuracy
    final = traj.final()
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())


def test_loads_one_checkpoint_at_a_time(traj, monkeypatch):
    final, reads = traj.final(), []
    real = trajectory_mod.load_file
    monkeypatch.setattr(trajectory_mod, "load_file", lambda path, device="cpu": reads.append(path) or real(path, device))
    it = traj.iter([4, 1, 2])
    assert reads == []  # lazy: nothing read before the first item is asked for
    i, state = next(it)
    assert i == 4 and reads == [traj.file(4)] and all(torch.equal(state[k], final[k]) for k in final)
    assert [i for i, _ in it] == [1, 2] and reads == [traj.file(i) for i in (4, 1, 2)]
    assert [i for i, _ in traj.iter(torch.tensor([3, 0]))] == [3, 0]
    with pytest.raises(IndexError, match="out of range"):
        traj.load(5)


def test_build_model_and_check_model(traj, digits):
    model = traj.build_model()
    traj.check_model(model)
    model.load_state_dict(traj.load(2))
    traj.check_data(digits.train_x, digits.train_y)
    with pytest.raises(ValueError, match=r"'features.0.weight' has shape \[8, 1, 3, 3\]"):
        traj.check_model(build_model("convnet", 1, 10, 8, widths=[8, 4], norm="batch"))
    with pytest.raises(ValueError, match="has no parameter/buffer .*'features.1.running_mean'"):
        traj.check_model(build_model("convnet", 1, 10, 8, widths=[4, 4], norm="instance"))
    with pytest.raises(ValueError, match=r"model: 'features\.1\.weight' has shape \[128, 64\]"):
        traj.check_model(build_model("mlp", 1, 10, 8))


def test_data_hash_mismatch(traj, digits):
    x = digits.train_x.clone()
    x[0, 0, 0, 0] += 1.0
    with pytest.raises(ValueError, match=r"data hash .* \[1222, 1, 8, 8\] differs .*digits, 1222 examples"):
        traj.check_data(x, digits.train_y)
    with pytest.raises(ValueError, match="data hash"):
        traj.check_data(digits.train_x, digits.train_y.roll(1))


# ------------------------------------------------------------------------------------------- resume


def _interrupt_after(monkeypatch, calls):
    """Make the ``calls``-th SGD step raise KeyboardInterrupt (before it updates anything)."""
    real, count = trajectory_mod._sgd_step, [0]

    def step(*args):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(trajectory_mod, "_sgd_step", step)


def test_interrupted_run_resumes_bit_identically(digits, tmp_path, monkeypatch):
    kw = dict(epochs=3, every=4, lr=0.05, momentum=0.9, weight_decay=1e-3, schedule="cosine", batch_size=200,
              model_options=CONV, seed=3, progress=False)  # 7 steps per epoch (the last one of 22 examples)
    full = train_trajectory(digits, "convnet", tmp_path / "full", **kw)
    out = tmp_path / "cut"
    _interrupt_after(monkeypatch, 11)  # step 10 → 11, inside the second epoch, after the checkpoint at step 8
    with pytest.raises(KeyboardInterrupt):
        train_trajectory(digits, "convnet", out, **kw)
    monkeypatch.undo()
    assert _files(out) == ["ckpt-000000.safetensors", "ckpt-000004.safetensors", "ckpt-000008.safetensors",
                           RESUME_FILE, INDEX_FILE]  # no temporary or half-written file
    cut = Trajectory.open(out)
    assert cut.steps == [0, 4, 8] and not cut.complete and cut.test_accuracy is None
    with pytest.raises(FileExistsError, match="resume=True"):
        train_trajectory(digits, "convnet", out, **kw)
    resumed = train_trajectory(digits, "convnet", out, resume=True, **kw)
    assert resumed.steps == full.steps == [0, 4, 8, 12, 16, 20, 21]
    assert resumed.index["checkpoints"] == full.index["checkpoints"]
    assert resumed.test_accuracy == full.test_accuracy and resumed.complete
    for (_, a), (_, b) in zip(resumed.iter(), full.iter()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert RESUME_FILE not in _files(out)
    # A complete run resumed is returned as is.
    assert train_trajectory(digits, "convnet", out, resume=True, **kw).steps == full.steps


def test_interrupt_while_writing_leaves_a_consistent_folder(digits, tmp_path, monkeypatch):
    kw = dict(epochs=1, every=2, model_options={"hidden": [16]}, batch_size=256, progress=False)
    real = trajectory_mod.save_file

    def save_file(tensors, path, metadata=None):
        if metadata["step"] == "4":  # a half-written temporary file, then the interrupt
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise KeyboardInterrupt
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(trajectory_mod, "save_file", save_file)
    with pytest.raises(KeyboardInterrupt):
        train_trajectory(digits, "mlp", tmp_path, **kw)
    monkeypatch.undo()
    assert _files(tmp_path) == ["ckpt-000000.safetensors", "ckpt-000002.safetensors", RESUME_FILE, INDEX_FILE]  # no tmp
    assert Trajectory.open(tmp_path).steps == [0, 2]
    assert train_trajectory(digits, "mlp", tmp_path, resume=True, **kw).steps == [0, 2, 4, 5]
    # Interrupted while writing the first resume state: no index yet, so the folder holds no trajectory
    # and a new run (resume or not) starts over.
    first = tmp_path / "first"

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trajectory_mod, "save_state", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_trajectory(digits, "mlp", first, **kw)
    monkeypatch.undo()
    assert _files(first) == ["ckpt-000000.safetensors"]
    with pytest.raises(FileNotFoundError, match="trajectory.json: missing"):
        Trajectory.open(first)
    assert train_trajectory(digits, "mlp", first, **kw).steps == [0, 2, 4, 5]


def test_resume_with_other_settings_or_data_is_refused(digits, tmp_path, monkeypatch):
    kw = dict(epochs=1, every=2, model_options={"hidden": [16]}, progress=False)
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_trajectory(digits, "mlp", tmp_path, **kw)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"optimizer\.lr=0\.01, this run has optimizer\.lr=0\.02"):
        train_trajectory(digits, "mlp", tmp_path, resume=True, **{**kw, "lr": 0.02})
    with pytest.raises(ValueError, match=r"model_options\.hidden=\[16\]"):
        train_trajectory(digits, "mlp", tmp_path, resume=True, **{**kw, "model_options": {"hidden": [8]}})
    other = load_dataset("digits", split_seed=1)
    with pytest.raises(ValueError, match="trained on other data"):
        train_trajectory(other, "mlp", tmp_path, resume=True, **kw)


# ------------------------------------------------------------------------------------------- sampling


def test_schedules_record_their_learning_rates(digits, tmp_path):
    kw = dict(every=1, batch_size=512, model_options={"hidden": [8]}, progress=False)  # 3 steps per epoch
    step = train_trajectory(digits, "mlp", tmp_path / "step", epochs=3, lr=0.1, schedule="step", milestones=[1, 2],
                            gamma=0.5, **kw)
    assert step.lrs.tolist() == [0.1] * 3 + [0.05] * 3 + [0.025] * 4
    cos = train_trajectory(digits, "mlp", tmp_path / "cos", epochs=1, lr=0.1, schedule="cosine", **kw)
    assert torch.allclose(cos.lrs, 0.05 * (1 + torch.cos(math.pi * torch.arange(4, dtype=torch.float64) / 3)))
    assert cos.lrs[-1] == lr_at(3, cos.index["optimizer"], 3, 3) and abs(cos.lrs[-1]) < 1e-12
    with pytest.raises(ValueError, match="only 3 of the 4 checkpoints have a learning rate > 0"):
        cos.sample(4)
    assert sorted(cos.sample(3, torch.Generator().manual_seed(0)).tolist()) == [0, 1, 2]


def test_sample_follows_the_learning_rate(digits, tmp_path):
    traj = train_trajectory(digits, "mlp", tmp_path, epochs=2, every=1, batch_size=512, lr=0.1, schedule="step",
                            milestones=[1], gamma=0.25, model_options={"hidden": [8]}, progress=False)
    lrs = traj.lrs  # 3 checkpoints at η, 4 at η/4
    p = lrs / lrs.sum()
    g = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.bincount(torch.cat([traj.sample(1, g) for _ in range(draws)]), minlength=len(traj)).double()
    # χ² goodness of fit, 6 degrees of freedom: P(χ² > 30) ≈ 4e-5.
    chi2 = float(((counts - draws * p) ** 2 / (draws * p)).sum())
    assert chi2 < 30, (counts / draws, p)
    uniform = torch.bincount(torch.cat([traj.sample(1, g, weights="uniform") for _ in range(7000)]), minlength=7)
    assert ((uniform.double() - 1000).abs() < 150).all()
    # Without replacement: m distinct indices; m = all gives a permutation.
    for m in (2, 5, 7):
        idx = traj.sample(m, g)
        assert idx.dtype == torch.int64 and idx.shape == (m,) and len(set(idx.tolist())) == m
    assert sorted(traj.sample(7, g).tolist()) == list(range(7))
    assert 6 not in traj.sample(6, g, exclude_last=True).tolist()
    # Reproducible given the generator.
    assert torch.equal(traj.sample(4, torch.Generator().manual_seed(5)), traj.sample(4, torch.Generator().manual_seed(5)))


def test_sample_rejects_bad_requests(traj):
    with pytest.raises(ValueError, match="t_m=6 .* 5 checkpoints"):
        traj.sample(6)
    with pytest.raises(ValueError, match="t_m=5 .* 4 checkpoints \\(last excluded\\)"):
        traj.sample(5, exclude_last=True)
    with pytest.raises(ValueError, match="m: expected"):
        traj.sample(0)
    with pytest.raises(ValueError, match="weights"):
        traj.sample(1, weights="loss")


# ------------------------------------------------------------------------------------------- bad inputs


def _copy(traj, dst):
    dst.mkdir()
    for name in os.listdir(traj.path):
        (dst / name).write_bytes(open(os.path.join(traj.path, name), "rb").read())
    return dst


def _edit_index(folder, edit):
    path = folder / INDEX_FILE
    ix = json.loads(path.read_text())
    edit(ix)
    path.write_text(json.dumps(ix))


def test_open_rejects_broken_folders(traj, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such trajectory folder"):
        Trajectory.open(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="trajectory.json: missing"):
        Trajectory.open(tmp_path / "empty")
    no_ckpt = _copy(traj, tmp_path / "no-ckpt")
    _edit_index(no_ckpt, lambda ix: ix.update(checkpoints=[]))
    with pytest.raises(ValueError, match="empty"):
        Trajectory.open(no_ckpt)
    missing = _copy(traj, tmp_path / "missing")
    os.unlink(missing / "ckpt-000006.safetensors")
    with pytest.raises(FileNotFoundError, match=r"ckpt-000006.safetensors: checkpoint 2 \(step 6\)"):
        Trajectory.open(missing)
    unordered = _copy(traj, tmp_path / "unordered")
    _edit_index(unordered, lambda ix: ix["checkpoints"].insert(2, ix["checkpoints"][0]))
    with pytest.raises(ValueError, match="increase strictly, got step 0 after 3"):
        Trajectory.open(unordered)
    other = _copy(traj, tmp_path / "other")
    (other / INDEX_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a ddfast trajectory index"):
        Trajectory.open(other)
    assert Trajectory.open(os.path.join(traj.path, INDEX_FILE)).steps == traj.steps


def test_train_rejects_bad_arguments(digits, tmp_path):
    kw = dict(epochs=1, every=1, progress=False)
    with pytest.raises(ValueError, match="arch"):
        train_trajectory(digits, "transformer", tmp_path, **kw)
    with pytest.raises(ValueError, match="every"):
        train_trajectory(digits, "mlp", tmp_path, **{**kw, "every": 0})
    with pytest.raises(ValueError, match="momentum"):
        train_trajectory(digits, "mlp", tmp_path, momentum=1.0, **kw)
    with pytest.raises(ValueError, match="schedule"):
        train_trajectory(digits, "mlp", tmp_path, schedule="linear", **kw)
    with pytest.raises(ValueError, match="milestones"):
        train_trajectory(digits, "mlp", tmp_path, schedule="step", **kw)
    with pytest.raises(TypeError, match="model_options"):
        train_trajectory(digits, "mlp", tmp_path, model_options={"act": torch.nn.ReLU}, **kw)
    assert os.listdir(tmp_path) == []


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    def fail(tmp):
        open(tmp, "wb").write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(str(tmp_path / "x.safetensors"), fail)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_a_trajectory(tmp_path, capsys):
    from ddfast.cli import main

    out = str(tmp_path / "traj")
    args = ["trajectory", "--dataset", "digits", "--arch", "convnet", "--width", "4", "--norm", "instance",
            "--epochs", "1", "--every", "2", "--batch-size", "256", "--lr", "0.05", "--momentum", "0.5",
            "--out", out, "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 checkpoints of convnet on digits" in printed and "test accuracy" in printed and out in printed
    traj = Trajectory.open(out)
    assert traj.steps == [0, 2, 4, 5] and traj.complete
    assert traj.model_options == {"widths": [4, 4], "norm": "instance"}
    assert traj.index["optimizer"]["momentum"] == 0.5
    capsys.readouterr()
    assert main(args) == 1  # a finished run is not overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert main(["trajectory", "--arch", "mlp", "--norm", "batch", "--epochs", "1", "--every", "1", "--out", out]) == 2
    assert "--norm" in capsys.readouterr().err
