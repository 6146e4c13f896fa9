"""KRR-ST end to end on the embedded digits set: ssl target → distill (CLI) → artifacts → transfer table."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ddfast.cli import main
from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller
from ddfast.experiments.krr_st import distill, load_distilled


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("target")
    assert main(["ssl", "--dataset", "digits", "--image-size", "16", "--epochs", "1", "--widths", "8", "16",
                 "--batch-size", "64", "--projector", "32", "32", "--out", str(out), "--no-progress"]) == 0
    return str(out)


def _distill_args(target, out, *extra):
    return ["distill", "krr-st", "--dataset", "digits", "--target", target, "--out", out, "--m", "20",
            "--steps", "6", "--batch-size", "64", "--pool-size", "2", "--pool-steps", "3", "--widths", "8", "16",
            "--checkpoint-every", "2", "--no-progress", *extra]


def test_cli_distill_writes_artifacts_and_resumes(target_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(_distill_args(target_dir, out)) == 0
    for name in ("distilled.safetensors", "meta.json", "images.png", "pca.png", "checkpoint.safetensors"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    tensors, meta = load_distilled(out)
    assert tensors["images"].shape == (20, 1, 16, 16) and tensors["targets"].shape == (20, 16)
    assert meta["status"] == "done" and meta["steps"] == 6
    assert "KRR-ST m=20, 6 steps" in capsys.readouterr().out
    # resume to more steps continues from the checkpoint
    assert main(_distill_args(target_dir, out, "--resume") + ["--steps", "8"]) == 0
    assert json.load(open(os.path.join(out, "meta.json")))["steps"] == 8


def test_cli_table_runs_on_a_tiny_budget(target_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(_distill_args(target_dir, out)) == 0
    js = str(tmp_path / "table.json")
    assert main(["krr-st-table", out, "--runs", "1", "--widths", "8", "16", "--pretrain-epochs", "2",
                 "--finetune-steps", "3", "--target-train-size", "30", "--json", js, "--no-progress"]) == 0
    text = capsys.readouterr().out
    for row in ("w/o pre", "Random", "K-means", "Random+g_φ", "KRR-ST"):
        assert row in text
    table = json.load(open(js))["transfer"]
    assert set(table) == {"w/o pre", "Random", "K-means", "Random+g_φ", "KRR-ST"}
    for row in table.values():
        mean, std = row["digits"]
        assert 0.0 <= mean <= 100.0
    # a subset of the rows (an ablation run's own row) gives the same numbers as the full table
    js2 = str(tmp_path / "rows.json")
    assert main(["krr-st-table", out, "--runs", "1", "--widths", "8", "16", "--pretrain-epochs", "2",
                 "--finetune-steps", "3", "--target-train-size", "30", "--rows", "krr-st", "random",
                 "--json", js2, "--no-progress"]) == 0
    subset = json.load(open(js2))["transfer"]
    assert set(subset) == {"Random", "KRR-ST"}
    assert subset["KRR-ST"] == table["KRR-ST"] and subset["Random"] == table["Random"]
    # the linear-evaluation protocol (frozen trunk + linear head)
    assert main(["krr-st-table", out, "--runs", "1", "--widths", "8", "16", "--pretrain-epochs", "2",
                 "--protocol", "linear", "--linear-steps", "5", "--json", js, "--no-progress"]) == 0
    assert json.load(open(js))["protocol"] == "linear"


def test_cli_kd_table_on_a_tiny_budget(target_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(_distill_args(target_dir, out)) == 0
    assert main(["krr-st-table", out, "--runs", "1", "--widths", "8", "16", "--pretrain-epochs", "2",
                 "--kd", "digits", "--kd-only", "--kd-epochs", "2", "--teacher-steps", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "data-free KD on digits" in text
    for row in ("Gaussian", "Random", "K-means", "KRR-ST"):
        assert row in text


def test_transfer_rows_rejects_unknown_row_names(target_dir, tmp_path):
    from ddfast.experiments.krr_st import transfer_rows

    out = str(tmp_path / "run")
    assert main(_distill_args(target_dir, out)) == 0
    with pytest.raises(ValueError, match="rows: expected a non-empty subset"):
        transfer_rows(out, rows=["KRR-ST"])


def test_missing_target_checkpoint_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="ddfast ssl"):
        distill("digits", str(tmp_path / "nowhere"), out=str(tmp_path / "run"), m=5, steps=1)


def test_target_resolution_mismatch(target_dir, tmp_path):
    with pytest.raises(ValueError, match="target: the model in .* takes 1×16×16 images"):
        distill("digits", target_dir, image_size=8, out=str(tmp_path / "run"), m=5, steps=1, widths=(4,))


def test_target_width_differs_from_checkpoint_targets(tmp_path):
    x = torch.randn(50, 1, 8, 8)
    cfg = dict(m=5, steps=2, batch_size=16, pool_size=1, pool_steps=2, widths=(4,))
    KRRSTDistiller(x, train_targets=torch.randn(50, 6), config=KRRSTConfig(**cfg)).fit(out_dir=str(tmp_path))
    other = KRRSTDistiller(x, train_targets=torch.randn(50, 9), config=KRRSTConfig(**{**cfg, "steps": 3}))
    with pytest.raises(ValueError, match=r"Y_s \(5, 6\).*\[m, 9\]"):
        other.fit(out_dir=str(tmp_path), resume=True)


def test_m_larger_than_the_data_set(target_dir, tmp_path):
    with pytest.raises(ValueError, match="m: 5000 synthetic examples requested"):
        distill("digits", target_dir, out=str(tmp_path / "run"), m=5000, steps=1, widths=(8, 16))
