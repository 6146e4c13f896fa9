"""Run folders: one folder is one run (manifest, resume refusals before any write, one writer, one policy),
and a run killed mid-way resumes bit-identically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddfast.cli import main
from ddfast.errors import RunFolderError
from ddfast.runs import MANIFEST, RunFolder, read_manifest

LD = ["distill", "ld", "--dataset", "digits", "--model", "mlp", "--outer-batch", "256", "--val-every", "1",
      "--no-progress"]


def _digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "ld")
    assert main(LD + ["--epochs", "1", "--out", out]) == 0
    return out


def test_manifest_records_config_data_versions_and_artifacts(finished):
    m = read_manifest(os.path.join(finished, MANIFEST))
    assert m["kind"] == "ld" and m["status"] == "done"
    assert m["config"]["ld"]["variant"] == "second_order" and m["config"]["base_examples"] == 10
    data = m["inputs"]["data"]
    assert data["name"] == "digits" and set(data["sha256"]) == {"train", "val", "test"}
    assert set(m["versions"]) >= {"ddfast", "torch", "numpy", "python"} and "commit" in m
    assert set(m["artifacts"]) == {"distilled.safetensors", "meta.json"}
    assert m["artifacts"]["distilled.safetensors"]["tensors"]["soft_labels"] == ["probability_rows"]
    meta = json.load(open(os.path.join(finished, "meta.json")))
    assert meta["data"]["sha256"] == data["sha256"]


@pytest.mark.parametrize("change", [["--variant", "rr"], ["--base-examples", "20"], ["--seed", "1"],
                                    ["--outer-batch", "128"], ["--epochs", "0"]])
def test_resume_with_another_config_is_refused_before_any_write(finished, change, capsys):
    before = _digest(finished)
    args = LD + ["--epochs", "1", "--out", finished, "--resume"]
    for flag, value in zip(change[::2], change[1::2]):
        i = args.index(flag) if flag in args else None
        if i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
    rc = main(args)
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("ddfast") and len(err.strip().splitlines()) == 1
    assert _digest(finished) == before  # meta.json, manifest, artifacts byte-identical


def test_resume_with_another_data_set_is_refused(finished, tmp_path, capsys):
    from ddfast.data import load_dataset

    d = load_dataset("digits")
    npz = tmp_path / "other.npz"
    to8 = lambda x: np.clip(np.rint((x[:, 0].numpy() * 0.3081 + 0.1307) * 255), 0, 255).astype(np.uint8)
    np.savez(npz, x_train=to8(d.train_x), y_train=d.train_y.numpy(), x_test=to8(d.test_x), y_test=d.test_y.numpy())
    before = _digest(finished)
    rc = main([a if a != "digits" else f"npz:{npz}" for a in LD] + ["--epochs", "1", "--out", finished, "--resume"])
    err = capsys.readouterr().err
    assert rc == 1 and "--resume refused" in err and "dataset" in err
    assert _digest(finished) == before


def test_finished_run_needs_overwrite_and_resume_may_extend(finished, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(finished, out)
    before = _digest(out)
    assert main(LD + ["--epochs", "1", "--out", out]) == 1
    assert "--overwrite" in capsys.readouterr().err and _digest(out) == before
    assert main(LD + ["--epochs", "2", "--out", out, "--resume"]) == 0
    assert json.load(open(os.path.join(out, "meta.json")))["iterations"] == 2 * 5
    assert main(LD + ["--epochs", "1", "--out", out, "--overwrite"]) == 0
    assert json.load(open(os.path.join(out, "meta.json")))["iterations"] == 5


def test_unfinished_run_needs_resume_and_stale_tmp_files_go(tmp_path, capsys):
    out = str(tmp_path / "r")
    with RunFolder(out, "ld") as run:
        run.begin({"x": 1})
    open(os.path.join(out, ".tmp-abc123"), "w").write("partial")
    with pytest.raises(RunFolderError, match="unfinished"):
        with RunFolder(out, "ld") as run:
            run.begin({"x": 1})
    assert os.path.exists(os.path.join(out, ".tmp-abc123"))  # nothing touched on refusal
    with RunFolder(out, "ld") as run:
        assert run.begin({"x": 1}, resume=True) is True
    assert not os.path.exists(os.path.join(out, ".tmp-abc123"))
    with pytest.raises(RunFolderError, match="kind|'trajectory'"):
        with RunFolder(out, "trajectory") as run:
            run.begin({"x": 1})


def test_files_without_manifest_are_not_silently_replaced(tmp_path):
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    with pytest.raises(RunFolderError, match="without a manifest"):
        with RunFolder(str(out), "ld") as run:
            run.begin({"x": 1}, resume=True)
    assert (out / "meta.json").read_text() == "{}"


def test_second_writer_fails_at_once_naming_the_pid(tmp_path, capsys):
    out = str(tmp_path / "busy")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ddfast.runs import RunFolder\n"
        f"r = RunFolder({out!r}, 'ld'); r.lock(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        rc = main(LD + ["--epochs", "1", "--out", out])
        err = capsys.readouterr().err
        assert rc == 1 and f"PID {holder.pid}" in err and time.perf_counter() - t0 < 10
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its holder: the folder is usable again.
    with RunFolder(out, "ld") as run:
        run.begin({"x": 1})


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    """Kill a CLI run after a few checkpoints (at an arbitrary point, possibly inside an atomic write),
    resume it, and compare with an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = LD[2:] + ["--epochs", "10", "--checkpoint-every", "1"]
    ref = str(tmp_path / "ref")
    subprocess.run([sys.executable, "-m", "ddfast.cli", "distill", "ld", *args, "--out", ref], check=True, env=env,
                   capture_output=True)
    out = str(tmp_path / "killed")
    p = subprocess.Popen([sys.executable, "-m", "ddfast.cli", "distill", "ld", *args, "--out", out], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    killed = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert killed, "the run finished before it could be killed"
    assert read_manifest(os.path.join(out, MANIFEST))["status"] == "running"
    open(os.path.join(out, ".tmp-left-by-kill"), "wb").write(b"x")
    r = subprocess.run([sys.executable, "-m", "ddfast.cli", "distill", "ld", *args, "--out", out], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unfinished" in r.stderr  # resuming needs --resume
    subprocess.run([sys.executable, "-m", "ddfast.cli", "distill", "ld", *args, "--out", out, "--resume"],
                   check=True, env=env, capture_output=True)
    assert not os.path.exists(os.path.join(out, ".tmp-left-by-kill"))
    from ddfast.runs import read_safetensors

    # safetensors writes its metadata map in hash order, so compare contents (bitwise), not file bytes.
    (ta, ma), (tb, mb) = (read_safetensors(os.path.join(r, "distilled.safetensors")) for r in (ref, out))
    assert ma == mb and set(ta) == set(tb)
    for k in ta:
        a, b = ta[k].reshape(-1), tb[k].reshape(-1)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), k
    meta_a, meta_b = (json.load(open(os.path.join(r, "meta.json"))) for r in (ref, out))
    assert meta_a["history"] == meta_b["history"] and meta_a["steps_to_overfit"] == meta_b["steps_to_overfit"]


def test_python_fit_writes_the_cli_artifacts(tmp_path):
    from ddfast.data import load_dataset
    from ddfast.distill.ld import LDConfig, LabelDistiller
    from ddfast.experiments.ld import load_distilled

    d = load_dataset("digits")
    idx = torch.cat([torch.nonzero(d.train_y == c).flatten()[:1] for c in range(10)])
    ld = LabelDistiller(d.train_x[idx], (d.train_x[:256], d.train_y[:256]), (d.val_x, d.val_y), 10,
                        LDConfig(model="mlp", outer_batch=128, epochs=1, val_every=1))
    out = str(tmp_path / "fit")
    result = ld.fit(out_dir=out)
    assert {"checkpoint.safetensors", "distilled.safetensors", "meta.json", MANIFEST} <= set(os.listdir(out))
    tensors, meta = load_distilled(out)
    assert torch.equal(tensors["soft_labels"], result.soft_labels) and int(tensors["steps_to_overfit"]) == \
        result.steps_to_overfit
    m = read_manifest(os.path.join(out, MANIFEST))
    assert m["kind"] == "ld" and m["status"] == "done" and m["config"]["epochs"] == 1
    assert m["artifacts"]["distilled.safetensors"]["tensors"]["soft_labels"] == ["probability_rows"]


def test_resume_compares_every_input_and_lets_only_the_length_grow(tmp_path):
    out = str(tmp_path / "r")
    config = {"ead": {"ipc": 1, "iterations": 5, "objective": "normalised"}, "dataset": "digits"}
    inputs = {"data": {"sha256": {"train": "a"}}, "trajectory": {"path": "/t", "sha256": "b"}}
    with RunFolder(out, "ead") as run:
        run.begin(config, inputs=inputs)
    before = _digest(out)
    for changed, pattern in [
        ({**inputs, "trajectory": {"path": "/t", "sha256": "c"}}, "inputs.trajectory.sha256"),
        ({**inputs, "trajectory": {"path": "/elsewhere", "sha256": "b"}}, "inputs.trajectory.path"),
        ({**inputs, "data": {"sha256": {"train": "z"}}}, "inputs.data.sha256.train"),
    ]:
        with pytest.raises(RunFolderError, match=pattern.replace(".", r"\.")):
            with RunFolder(out, "ead") as run:
                run.begin(config, inputs=changed, resume=True, growable=("ead.iterations",))
    shrunk = {**config, "ead": {**config["ead"], "iterations": 3}}
    with pytest.raises(RunFolderError, match="grow, not shrink"):
        with RunFolder(out, "ead") as run:
            run.begin(shrunk, inputs=inputs, resume=True, growable=("ead.iterations",))
    with pytest.raises(RunFolderError, match="objective"):
        with RunFolder(out, "ead") as run:
            run.begin({**config, "ead": {**config["ead"], "objective": "printed"}}, inputs=inputs, resume=True,
                      growable=("ead.iterations",))
    assert _digest(out) == before
    grown = {**config, "ead": {**config["ead"], "iterations": 9}}
    with RunFolder(out, "ead") as run:
        assert run.begin(grown, inputs=inputs, resume=True, growable=("ead.iterations",)) is True
    assert read_manifest(os.path.join(out, MANIFEST))["config"]["ead"]["iterations"] == 9
