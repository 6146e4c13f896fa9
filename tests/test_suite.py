"""ddfast.suite: config → cells, resumable runs (SIGKILL mid-way, then resume to the same table), submitit's local
executor, bring-your-own sets, the fair scores on hand-made numbers, shards and the report."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddfast.suite import scores as S
from ddfast.suite.cell import write_cell
from ddfast.suite.config import parse_config
from ddfast.suite.methods import SetData, load_set, save_set
from ddfast.suite.report import accuracy_table, update_readme, write_report
from ddfast.suite.results import collect, read_table, write_table
from ddfast.suite.runner import parse_shard, run_suite, select_shard

# Students: one tiny ConvNet, 2 epochs. DM: 3 iterations of a small network. Hard labels only (no teacher).
TINY = """
[suite]
name = "tiny"
datasets = ["digits"]
methods = ["random", "dm"]
ipc = [1, 2]
seeds = [0]
regimes = ["hl"]

[evaluation]
model_options = { widths = [8], norm = "instance" }
models = 1
epochs = 2

[methods.dm]
iterations = 3
real_batch = 16
widths = [8]
"""

METRICS = ("cell_id", "status", "method", "ipc", "seed", "regime", "augmentation", "accuracies", "acc_mean",
           "gain_over_random")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def _metrics(csv_path):
    return sorted(tuple(str(r[k]) for k in METRICS) for r in read_table(csv_path))


def _config(text, out, source=None):
    from ddfast.suite.config import read_toml

    path = _write(os.path.join(out, "suite.toml"), text) if source is None else source
    return parse_config(read_toml(path), source=path, out=os.path.join(out, "run"))


def test_config_cells_and_hashes(tmp_path):
    cfg = _config(TINY, str(tmp_path))
    assert len(cfg.cells) == 4  # (random, dm) × (1, 2); the random cells double as the baseline
    assert len({c.id for c in cfg.cells}) == 4
    again = _config(TINY, str(tmp_path))
    assert [c.id for c in again.cells] == [c.id for c in cfg.cells]  # the id is the configuration's hash
    changed = _config(TINY.replace("iterations = 3", "iterations = 4"), str(tmp_path))
    dm_ids = {c.id for c in cfg.cells if c.method == "dm"}
    assert dm_ids.isdisjoint(c.id for c in changed.cells if c.method == "dm")
    assert {c.id for c in cfg.cells if c.method == "random"} == {c.id for c in changed.cells if c.method == "random"}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\]"):
        _config(TINY.replace("epochs = 2", "epoch = 2"), str(tmp_path))
    with pytest.raises(ValueError, match="method: expected one of"):
        _config(TINY.replace('"dm"]', '"dmx"]'), str(tmp_path))
    with pytest.raises(ValueError, match="regimes"):
        _config(TINY.replace('["hl"]', '["hard"]'), str(tmp_path))


def test_shards_partition_the_cells(tmp_path):
    cells = _config(TINY, str(tmp_path)).cells
    parts = [select_shard(cells, parse_shard(f"{i}/3")) for i in range(3)]
    ids = [c.id for p in parts for c in p]
    assert sorted(ids) == sorted(c.id for c in cells) and len(ids) == len(set(ids))
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_killed_suite_resumes_to_the_same_table(tmp_path):
    # Reference: the whole suite, uninterrupted, in this process.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = run_suite(_config(TINY, str(ref_dir)), inline=True, progress=False, log=lambda *a: None)
    assert ref["done"] == 4 and not ref["failed"]
    # Same suite in a subprocess, SIGKILLed once the first cell has finished.
    work = tmp_path / "work"
    work.mkdir()
    cfg_path = _write(str(work / "suite.toml"), TINY)
    root = str(work / "run")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as this process
    cmd = [sys.executable, "-m", "ddfast.suite", "run", cfg_path, "--out", root, "--inline", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    first = None
    while time.time() < deadline and proc.poll() is None:
        done = [d for d in (os.listdir(os.path.join(root, "cells")) if os.path.isdir(os.path.join(root, "cells")) else [])
                if os.path.exists(os.path.join(root, "cells", d, "results.json"))]
        if done:
            first = done[0]
            break
        time.sleep(0.05)
    assert first is not None, "no cell finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cfg = _config(TINY, str(work), source=cfg_path)
    finished = [c.id for c in cfg.cells if os.path.exists(os.path.join(root, "cells", c.id, "results.json"))]
    assert 1 <= len(finished) < 4, "the kill should land mid-way"
    before = {c: os.path.getmtime(os.path.join(root, "cells", c, "results.json")) for c in finished}
    out = run_suite(cfg, inline=True, progress=False, log=lambda *a: None)
    assert out["skipped"] == len(finished) and out["done"] == 4
    for c, t in before.items():  # finished cells were not run again
        assert os.path.getmtime(os.path.join(root, "cells", c, "results.json")) == t
    assert _metrics(out["csv"]) == _metrics(ref["csv"])
    for c in cfg.cells:  # every cell folder has its artifacts, meta (versions) and results
        d = os.path.join(root, "cells", c.id)
        meta = json.load(open(os.path.join(d, "meta.json")))
        assert meta["torch"] == torch.__version__ and "commit" in meta
        assert load_set(os.path.join(d, "set.safetensors")).images.shape[0] == 10 * c.config["ipc"]
    rows = read_table(out["csv"])
    dm = [r for r in rows if r["method"] == "dm"]
    assert all(r["gain_over_random"] is not None and r["peak_memory_mib"] > 0 for r in dm)


def test_bring_your_own_artifact_and_failure_record(tmp_path):
    from ddfast.data import load_dataset

    d = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(20, 1, 8, 8, generator=g)
    save_set(str(tmp_path / "mine.safetensors"), SetData(images, torch.arange(10).repeat(2), torch.randn(20, 10)))
    save_set(str(tmp_path / "bad.safetensors"), SetData(torch.randn(20, 1, 7, 7), torch.arange(10).repeat(2)))
    text = TINY.replace('methods = ["random", "dm"]', 'methods = ["random"]').replace("ipc = [1, 2]", "ipc = [2]") + """
[[cell]]
method = "artifact"
name = "mine"
path = "mine.safetensors"
ipc = 2

[[cell]]
method = "artifact"
name = "broken"
path = "bad.safetensors"
ipc = 2
"""
    src = _write(str(tmp_path / "byo.toml"), text)
    cfg = _config(text, str(tmp_path), source=src)
    assert sorted(c.config.get("name", c.method) for c in cfg.cells) == ["broken", "mine", "random"]
    logs = []
    out = run_suite(cfg, inline=True, progress=False, log=logs.append)
    assert out["done"] == 2 and len(out["failed"]) == 1  # the suite went on past the broken set
    assert any("FAILED broken" in m and "[N, 1, 8, 8]" in m for m in logs)
    rows = {r["name"]: r for r in read_table(out["csv"])}
    assert rows["mine"]["status"] == "done" and 0 <= rows["mine"]["acc_mean"] <= 100
    assert rows["mine"]["gain_over_random"] == pytest.approx(rows["mine"]["acc_mean"] - rows["random"]["acc_mean"], abs=1e-3)
    assert rows["broken"]["status"] == "failed" and "images" in rows["broken"]["error"]
    broken = next(c for c in cfg.cells if c.config.get("name") == "broken")
    fail = json.load(open(os.path.join(cfg.out, "cells", broken.id, "failure.json")))
    assert "Traceback" in fail["traceback"]
    s = load_set(str(tmp_path / "mine.safetensors"), d)
    assert torch.equal(s.images, images) and s.soft_labels.shape == (20, 10)


def _fake_cell(root, cfg, evaluations):
    """A finished cell with hand-made accuracies (no training)."""
    from ddfast.artifacts import write_json_atomic
    from ddfast.suite.config import Cell

    cell = Cell(cfg)
    d = write_cell(root, cell)
    write_json_atomic(os.path.join(d, "results.json"), {
        "status": "done", "id": cell.id, "config": cfg, "n_images": 10 * cfg["ipc"], "set_seconds": 1.0,
        "peak_memory_mib": 100.0, "device": "cpu", "versions": {"torch": "x", "commit": "y"},
        "evaluations": [{"regime": r, "augmentation": a, "accuracies": accs, "label_source": "hard", "seconds": 0.5}
                        for (r, a), accs in evaluations.items()]})
    return cell


def test_scores_on_hand_made_numbers(tmp_path):
    assert S.gain_over_random(71.0, 65.5) == 5.5
    assert S.soft_label_gain(80.0, 72.5) == 7.5 and S.kd_gain(83.0, 80.0) == 3.0
    assert S.augmentation_gain(70.0, 64.0) == 6.0 and S.augmentation_robustness(5.0, -1.0) == -1.0
    assert S.worst_gain([3.0, float("nan"), -2.0, None]) == -2.0 and math.isnan(S.worst_gain([]))
    assert S.gain_std(2.0, 4, 1.0, 1) == pytest.approx(math.sqrt(4 / 4 + 1 / 1))
    assert S.mean_std([1.0, 3.0]) == (2.0, 1.0)

    root = str(tmp_path)
    base = _config(TINY, root).cells[0].config
    cfg = lambda method: {**base, "method": method, "ipc": 1, "regimes": ["hl", "sl", "sl+kd"],  # noqa: E731
                          "augmentations": ["default", "none"]}
    rnd = _fake_cell(root, cfg("random"), {("hl", "default"): [60.0, 62.0], ("hl", "none"): [50.0, 50.0],
                                           ("sl", "default"): [70.0, 70.0], ("sl", "none"): [66.0, 66.0],
                                           ("sl+kd", "default"): [75.0, 75.0], ("sl+kd", "none"): [70.0, 70.0]})
    dm = _fake_cell(root, cfg("dm"), {("hl", "default"): [70.0, 72.0], ("hl", "none"): [52.0, 54.0],
                                      ("sl", "default"): [74.0, 74.0], ("sl", "none"): [70.0, 70.0],
                                      ("sl+kd", "default"): [76.0, 78.0], ("sl+kd", "none"): [69.0, 69.0]})
    rows = {(r["method"], r["regime"], r["augmentation"]): r for r in collect(root, [rnd, dm])}
    hl, hl0 = rows[("dm", "hl", "default")], rows[("dm", "hl", "none")]
    assert hl["acc_mean"] == 71.0 and hl["acc_std"] == 1.0 and hl["random_acc_mean"] == 61.0
    assert hl["gain_over_random"] == 10.0 and hl0["gain_over_random"] == 3.0
    assert hl["gain_se"] == pytest.approx(math.sqrt(1 / 2 + 1 / 2))
    assert hl["augmentation_gain"] == 71.0 - 53.0 and hl["augmentation_robustness"] == 3.0
    assert rows[("dm", "sl", "default")]["soft_label_gain"] == 74.0 - 71.0
    assert rows[("dm", "sl+kd", "default")]["kd_gain"] == 77.0 - 74.0
    assert rows[("dm", "sl+kd", "default")]["augmentation_robustness"] == min(77.0 - 75.0, 69.0 - 70.0)
    assert hl["worst_gain"] == min(10.0, 4.0, 2.0)  # over the regimes, default augmentation
    assert rows[("random", "hl", "default")]["gain_over_random"] == 0.0
    # a different evaluation setting is not matched with this random subset
    other = _fake_cell(root, {**cfg("dc"), "evaluation": {**base["evaluation"], "epochs": 3}},
                       {("hl", "default"): [1.0], ("hl", "none"): [1.0], ("sl", "default"): [1.0],
                        ("sl", "none"): [1.0], ("sl+kd", "default"): [1.0], ("sl+kd", "none"): [1.0]})
    rows = collect(root, [rnd, dm, other])
    assert all(r.get("gain_over_random") is None for r in rows if r["method"] == "dc")


def test_report_regenerates_the_readme_table(tmp_path):
    root = str(tmp_path / "run")
    base = _config(TINY, str(tmp_path)).cells[0].config
    cells = [_fake_cell(root, {**base, "method": m, "ipc": i}, {("hl", "default"): [a + i, a + i + 2.0]})
             for m, a in (("random", 50.0), ("dm", 60.0)) for i in (1, 10)]
    csv_path = write_table(collect(root, cells, suite="tiny"), str(tmp_path / "results.csv"))[0]
    readme = _write(str(tmp_path / "README.md"), "intro\n<!-- suite-table:tiny -->\nold\n<!-- /suite-table:tiny -->\nend\n")
    rc = __import__("ddfast.suite.cli", fromlist=["main"]).main(
        ["report", csv_path, "--out", str(tmp_path / "docs"), "--readme", readme, "--no-plots"])
    assert rc == 0
    text = open(readme).read()
    table = accuracy_table(read_table(csv_path))
    assert "old" not in text and table in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| dm | 62.00 ± 1.00 | 71.00 ± 1.00 |" in table and "| HL IPC 1 | HL IPC 10 |" in table
    md = open(tmp_path / "docs" / "results.md").read()
    assert "+10.00" in md  # gain over random, hand-made
    assert update_readme(readme, "tiny", table) and open(readme).read() == text  # idempotent
    assert not update_readme(readme, "other", table)
    written = write_report(read_table(csv_path), str(tmp_path / "plots"), "tiny")
    pytest.importorskip("matplotlib")
    assert os.path.getsize(written["accuracy"]) > 0 and os.path.getsize(written["gain"]) > 0


def test_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit", reason="pip install submitit (optional extra: .[slurm])")
    text = TINY.replace('methods = ["random", "dm"]', 'methods = ["random"]').replace("ipc = [1, 2]", "ipc = [1]")
    text += "\n[slurm]\ntimeout_min = 5\n"
    cfg = _config(text, str(tmp_path))
    out = run_suite(cfg, launcher="submitit", cluster="local", progress=False, log=lambda *a: None)
    assert out["done"] == 1 and not out["failed"]
    assert os.path.isdir(os.path.join(cfg.out, "submitit"))
    rows = read_table(out["csv"])
    assert rows[0]["status"] == "done" and rows[0]["gain_over_random"] == 0.0
    again = run_suite(cfg, launcher="submitit", cluster="local", progress=False, log=lambda *a: None)
    assert again["skipped"] == 1  # nothing resubmitted
