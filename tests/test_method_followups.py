"""EAD's plain-SGD preset and choice on validation; CLI options of KRR-ST (real_augment, pool_reset), EAD
(trajectory momentum, --select) and LD architecture transfer reaching their configurations."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

import ddfast.experiments.ead as ead_exp
from ddfast.cli import build_parser, main
from ddfast.evaluate.train import EvalResult


# ------------------------------------------------------------------------------------------ EAD preset


def test_ead_presets_are_plain_sgd():
    for name, p in ead_exp.PRESETS.items():
        assert p["traj"]["momentum"] == 0.0, name
    assert ead_exp.preset("kmnist")["traj"]["momentum"] == 0.0  # the fallback preset too


def test_existing_momentum_trajectory_is_refused_unless_asked_for(tmp_path):
    from ddfast.data import load_dataset
    from ddfast.trajectory import train_trajectory

    data = load_dataset("digits")
    out = str(tmp_path / "traj")
    train_trajectory(data, "convnet", out, epochs=1, every=5, lr=0.05, momentum=0.9, batch_size=256,
                     model_options={"widths": (4, 4), "norm": "instance"}, progress=False)
    with pytest.raises(ValueError, match="momentum 0.9"):
        ead_exp.trajectory_for("digits", data, out)
    traj = ead_exp.trajectory_for("digits", data, out, momentum=0.9)  # asked for: reused as it is
    assert traj.index["optimizer"]["momentum"] == 0.9
    assert ead_exp.trajectory_for("digits", data, out, strict=False) is not None


# ------------------------------------------------------------------------------------------ EAD selection


class _Recorder:
    """Fake distillation + evaluation: the distilled "images" carry the candidate's learning rate, the
    evaluation scores it per split and records the order of split reads."""

    def __init__(self, val_best_lr, test_best_lr):
        self.reads, self.distilled = [], []
        self.val_best, self.test_best = val_best_lr, test_best_lr

    def distill(self, dataset, ipc, *, out, **kw):
        self.distilled.append((os.path.basename(out), kw.get("objective"), kw.get("lr_images")))
        lr = kw["lr_images"]
        res = SimpleNamespace(images=torch.full((2, 1, 4, 4), lr), soft_labels=torch.zeros(2, 10))
        return None, res, None

    def evaluate_set(self, make_model, images, targets, data, settings, models=5, seed=0, subsets=None,
                     split="test"):
        lr = None if images is None else float(images.flatten()[0])
        self.reads.append((split, lr))
        best = self.val_best if split == "val" else self.test_best
        acc = 90.0 if lr is not None and abs(lr - best) < 1e-6 else 50.0
        return EvalResult([acc] * models)


@pytest.fixture
def fake(monkeypatch):
    rec = _Recorder(val_best_lr=3e-2, test_best_lr=1e-2)  # validation and test disagree on purpose
    data = SimpleNamespace(train_x=torch.zeros(40, 1, 4, 4), train_y=torch.arange(40) % 10, num_classes=10,
                           val_x=torch.zeros(10, 1, 4, 4), val_y=torch.arange(10))
    monkeypatch.setattr(ead_exp, "load_dataset", lambda *a, **k: data)
    monkeypatch.setattr(ead_exp, "trajectory_for", lambda *a, **k: None)
    monkeypatch.setattr(ead_exp, "distill", rec.distill)
    monkeypatch.setattr(ead_exp, "evaluate_set", rec.evaluate_set)
    return rec


def test_select_chooses_on_validation_and_reads_test_once_after(fake, tmp_path):
    cands = ead_exp.candidate_grid(lr=[1e-2, 3e-2, 1e-1], objective=["normalised"])
    sel = ead_exp.ead_select("digits", 2, cands, out=str(tmp_path), models=2, resume=False)
    assert dict(sel.chosen) == {"lr": 3e-2, "objective": "normalised"}  # validation's best, not test's
    splits = [s for s, _ in fake.reads]
    assert splits == ["val", "val", "val", "test"]
    assert fake.reads[-1][0] == "test" and fake.reads[-1][1] == pytest.approx(3e-2)
    assert sel.test_score == 50.0  # the chosen candidate's test score, even though another one tests better
    assert set(sel.val_scores.values()) == {50.0, 90.0}
    # one distillation per candidate (the chosen one is not distilled again for its test read), own folders
    assert len(fake.distilled) == 3 and len({d[0] for d in fake.distilled}) == 3


def test_table_with_select_records_choice_and_validation(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(ead_exp, "make_model_factory", lambda *a: None)
    fake_traj = SimpleNamespace(build_model=lambda: torch.nn.Identity(), final=lambda: {})
    monkeypatch.setattr(ead_exp, "trajectory_for", lambda *a, **k: fake_traj)
    monkeypatch.setattr(ead_exp, "balanced_subset", lambda y, ipc, **k: torch.arange(ipc * 10))
    rows = ead_exp.ead_table("digits", (1,), out=str(tmp_path), models=2,
                             select={"lr": [1e-2, 3e-2], "objective": ["normalised", "printed"]})
    assert [r.name for r in rows] == ["Random (hard)", "Random + SL", "EAD (chosen on validation)"]
    ead_row = rows[-1]
    record = ead_row.selection[1]
    assert record["chosen"]["lr"] == 3e-2 and len(record["val"]) == 4
    assert ead_row.results[1].mean == record["test"]["mean"]
    ead_reads = [(s, lr) for s, lr in fake.reads if lr is not None]
    assert [s for s, _ in ead_reads] == ["val"] * 4 + ["test"]


def test_candidate_grid_refuses_unknown_settings():
    with pytest.raises(ValueError, match="probe_batch"):
        ead_exp.candidate_grid(probe_batch=[32])
    with pytest.raises(ValueError, match="t_m"):
        ead_exp.candidate_grid(t_m=[])


def test_evaluate_set_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="split"):
        ead_exp.evaluate_set(None, None, None, None, None, split="train")


# ------------------------------------------------------------------------------------------ CLI


def test_ead_table_select_reaches_the_table(monkeypatch, tmp_path, capsys):
    import ddfast.experiments.ead as mod

    seen = {}

    def fake_table(dataset, ipcs, **kw):
        seen.update(kw)
        row = mod.TableRow("EAD (chosen on validation)", {1: EvalResult([80.0])},
                           {1: {"chosen": {"lr": 0.03}, "val": [{"candidate": {"lr": 0.03}, "mean": 81.0}],
                                "test": {"mean": 80.0}}})
        return [row]

    monkeypatch.setattr(mod, "ead_table", fake_table)
    out = str(tmp_path)
    assert main(["ead-table", "--ipc", "1", "--select", "--lr", "0.01", "0.03", "--t-m", "3", "5",
                 "--objectives", "normalised", "--trajectory-momentum", "0.9", "--out", out, "--no-progress"]) == 0
    assert seen["select"] == {"objective": ["normalised"], "t_m": [3, 5], "lr": [0.01, 0.03]}
    assert seen["trajectory_momentum"] == 0.9 and "t_m" not in seen
    assert "chosen on validation" in capsys.readouterr().out
    saved = json.load(open(os.path.join(out, "ead-table-digits-selected.json")))
    assert saved["EAD (chosen on validation)"]["1"]["selection"]["chosen"] == {"lr": 0.03}
    # several candidates without --select: refused (a choice would otherwise be made on test)
    assert main(["ead-table", "--lr", "0.01", "0.03", "--out", out]) == 2
    assert main(["ead-table", "--trajectory-momentum", "1.5", "--out", out]) == 2


def test_distill_ead_trajectory_momentum_option():
    args = build_parser().parse_args(["distill", "ead", "--out", "x", "--trajectory-momentum", "0.9"])
    assert args.trajectory_momentum == 0.9
    assert build_parser().parse_args(["distill", "ead", "--out", "x"]).trajectory_momentum is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "ead", "--out", "x", "--trajectory-momentum", "-0.1"])


def _krr(*extra):
    return ["distill", "krr-st", "--target", "t", "--out", "o", *extra]


def test_krr_st_flags_parse_and_reach_the_config(monkeypatch):
    import ddfast.experiments.krr_st as krr_exp
    from ddfast.distill.krr_st import KRRSTConfig

    p = build_parser()
    a = p.parse_args(_krr("--real-augment", "--pool-reset", "official"))
    assert a.real_augment is True and a.pool_reset == "official"
    a = p.parse_args(_krr("--no-real-augment"))
    assert a.real_augment is False and a.pool_reset is None
    for bad in (_krr("--pool-reset", "never"), _krr("--real-augment", "yes")):
        with pytest.raises(SystemExit):
            p.parse_args(bad)

    seen = {}

    def fake_distill(dataset, target, **kw):
        fields = KRRSTConfig.__dataclass_fields__
        cfg = KRRSTConfig(**{k: v for k, v in kw.items() if k in fields and v is not None})
        seen["config"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(krr_exp, "distill", fake_distill)
    assert main(_krr("--real-augment", "--pool-reset", "official")) == 0
    assert seen["config"].real_augment is True and seen["config"].pool_reset == "official"
    assert main(_krr()) == 0
    assert seen["config"].real_augment is False and seen["config"].pool_reset == "paper"  # the paper's default


def test_krr_st_options_recorded_in_the_manifest(tmp_path):
    from ddfast.ssl import train_barlow_twins

    from ddfast.data import load_dataset

    target = str(tmp_path / "target")
    digits = load_dataset("digits", image_size=16)
    train_barlow_twins(digits, widths=(4, 8), epochs=1, batch_size=64, projector=(16, 16), max_train=128,
                       out=target, progress=False)
    out = str(tmp_path / "run")
    args = ["distill", "krr-st", "--dataset", "digits", "--target", target, "--out", out, "--m", "10", "--steps", "2",
            "--batch-size", "32", "--pool-size", "1", "--pool-steps", "1", "--widths", "4", "8", "--no-progress"]
    assert main(args + ["--real-augment", "--pool-reset", "official"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["config"]["krr_st"]["real_augment"] is True
    assert manifest["config"]["krr_st"]["pool_reset"] == "official"
    # resuming with the other pool policy is refused: the options are part of the compared configuration
    assert main(args + ["--real-augment", "--pool-reset", "paper", "--resume"]) == 1


def test_evaluate_archs_option(monkeypatch, capsys):
    import ddfast.cli.distill as cli_distill

    a = build_parser().parse_args(["evaluate", "R", "--archs", "lenet", "alexnet"])
    assert a.archs == ["lenet", "alexnet"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "R", "--archs", "nosuchnet"])
    with pytest.raises(ValueError, match="archs"):
        cli_distill.evaluate_architectures_run("R", ["nosuchnet"])
    calls = []
    monkeypatch.setattr(cli_distill, "evaluate_architectures_run",
                        lambda run, archs, **kw: calls.append((run, archs, kw)) or {n: EvalResult([70.0]) for n in archs})
    assert main(["evaluate", "R", "--archs", "lenet", "alexnet", "--models", "3"]) == 0
    assert calls == [("R", ["lenet", "alexnet"], {"models": 3, "seed": 0, "backend": "auto"})]
    assert "lenet: test accuracy" in capsys.readouterr().out
