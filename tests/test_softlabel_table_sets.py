"""The soft-label table's DATM / SRe2L / DWA sets, its SL+KD column, its caches and its name checks.

Tiny scale: a 2-checkpoint-interval trajectory stand-in is avoided by building the sets directly on a small
balanced slice of digits with a few iterations; the table itself runs once on digits with 1-epoch students.
"""

import json
import os

import pytest
import torch

from ddfast.cli import main
from ddfast.data import load_dataset
from ddfast.experiments import softlabel as sl
from ddfast.experiments.softlabel import SETS, build_set, format_softlabel_table, softlabel_table

C = 10


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """One tiny run of every new set under every regime (shared by the tests below)."""
    out = str(tmp_path_factory.mktemp("slt"))
    lines = []
    table, teacher_acc = softlabel_table("digits", ipcs=(2,), sets=("random", "datm", "sre2l", "dwa"), models=1,
                                         budget=1, iterations=2, out=out, log=lines.append)
    return out, table, teacher_acc, lines


def test_new_sets_are_in_sets_and_presets():
    for name in ("datm", "sre2l", "dwa"):
        assert name in SETS and name in sl.PRESETS and name in sl.SET_NAMES
    assert sl.REGIMES == ("hl", "sl", "sl+kd")
    assert sl.PRESETS["datm"]["iterations"] >= 1 and sl.PRESETS["sre2l"]["iterations"] >= 1


def test_table_has_every_regime_column(table_run):
    out, table, teacher_acc, lines = table_run
    assert teacher_acc > 80.0
    for name in ("random", "datm", "sre2l", "dwa"):
        assert set(table[name][2]) == {"hl", "sl", "sl+kd"}
        for cell in table[name][2].values():
            assert len(cell.accuracies) == 1 and 0.0 <= cell.accuracies[0] <= 100.0
    text = format_softlabel_table(table, (2,))
    assert "SL+KD IPC 2" in text and "| DATM |" in text and "| SRe2L |" in text and "| DWA |" in text
    with open(os.path.join(out, "softlabel-digits.json")) as f:
        stored = json.load(f)
    assert set(stored["table"]) == {"random", "datm", "sre2l", "dwa"}
    assert set(stored["table"]["dwa"]["2"]) == {"hl", "sl", "sl+kd"}
    assert 0.0 < stored["bn_teacher_accuracy"] <= 100.0
    assert any("BatchNorm teacher" in line for line in lines)


def test_new_sets_have_the_right_shapes_and_labels(table_run, digits):
    out = table_run[0]
    for name in ("datm", "sre2l", "dwa"):
        path = os.path.join(out, f"{name}-ipc2-seed0.safetensors")
        assert os.path.exists(path)
        images, labels, extra = build_set(name, 2, digits, None, None, out=out, iterations=2, return_extra=True)
        assert images.shape == (2 * C, *digits.train_x.shape[1:]) and images.dtype == torch.float32
        assert torch.isfinite(images).all()
        assert labels.dtype == torch.int64 and labels.shape == (2 * C,)
        assert int(labels.min()) >= 0 and int(labels.max()) < C
        if name == "datm":  # HL labels are the argmax of the learned label logits kept in the file
            logits = extra["learned_labels"]
            assert logits.shape == (2 * C, C) and torch.equal(logits.argmax(-1), labels)
        else:  # SRe2L / DWA: the classes the images were recovered for, class-balanced
            assert "learned_labels" not in extra
            assert torch.bincount(labels, minlength=C).tolist() == [2] * C
    # SRe2L and DWA recover different images from the same BatchNorm teacher, which is cached in out
    a = build_set("sre2l", 2, digits, None, None, out=out, iterations=2)[0]
    b = build_set("dwa", 2, digits, None, None, out=out, iterations=2)[0]
    assert not torch.equal(a, b)
    assert any(f.startswith("bn-teacher-digits") for f in os.listdir(out))


def test_sets_and_cells_are_reused(table_run, monkeypatch):
    out, table = table_run[0], table_run[1]

    def no_distilling(*a, **k):
        raise AssertionError("a cached set was rebuilt")

    def no_training(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    import ddfast.distill.sre2l as sre2l_mod
    import ddfast.distill.tm as tm_mod
    import ddfast.evaluate.regimes as regimes_mod

    monkeypatch.setattr(tm_mod.TMDistiller, "fit", no_distilling)
    monkeypatch.setattr(sre2l_mod.SRe2LDistiller, "fit", no_distilling)
    monkeypatch.setattr(regimes_mod, "evaluate", no_training)
    again, _ = softlabel_table("digits", ipcs=(2,), sets=("datm", "sre2l", "dwa"), models=1, budget=1,
                               iterations=2, out=out)
    for name in ("datm", "sre2l", "dwa"):
        for regime in ("hl", "sl", "sl+kd"):
            assert again[name][2][regime].accuracies == table[name][2][regime].accuracies


def test_a_cached_set_made_with_other_settings_is_refused(table_run, digits):
    with pytest.raises(ValueError, match="another --out folder"):
        build_set("sre2l", 2, digits, None, None, out=table_run[0], iterations=3)


def test_a_changed_budget_recomputes_the_cell(table_run, monkeypatch):
    out = table_run[0]
    calls = []
    import ddfast.evaluate.regimes as regimes_mod

    real = regimes_mod.evaluate

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(regimes_mod, "evaluate", counting)
    softlabel_table("digits", ipcs=(2,), sets=("random",), regimes=("hl",), models=1, budget=2, out=out)
    assert calls == ["hl"]


@pytest.mark.parametrize("kwargs, match", [
    ({"sets": ("random", "sre2")}, r"sets: expected names from .*'sre2'"),
    ({"sets": "random"}, "sets: expected a sequence"),
    ({"sets": ()}, "sets: expected at least one"),
    ({"regimes": ("hl", "kd")}, r"regimes: expected names from .*'kd'"),
    ({"regimes": ()}, "regimes: expected at least one"),
])
def test_bad_names_fail_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        softlabel_table("digits", ipcs=(2,), out=str(tmp_path / "x"), **kwargs)
    assert not os.path.exists(tmp_path / "x")


def test_build_set_rejects_an_unknown_name(digits):
    with pytest.raises(ValueError, match="name: expected one of"):
        build_set("kmeans", 2, digits, None, None)


@pytest.mark.parametrize("flag, value", [("--sets", "sre2"), ("--regimes", "kd")])
def test_cli_rejects_unknown_names(tmp_path, capsys, flag, value):
    assert main(["softlabel-table", "--ipc", "1", flag, value, "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and value in err
    assert not os.path.exists(tmp_path / "c")


def test_cli_regimes_option(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["softlabel-table", "--ipc", "1", "--sets", "random", "--regimes", "sl+kd", "--models", "1",
                 "--budget", "1", "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "SL+KD IPC 1" in text and "HL IPC 1" not in text and "Random real" in text


def test_sl_kd_regime_uses_rrc_and_cutmix(digits, monkeypatch):
    """Table 1's SL+KD: RandomResizedCrop (+ flip, off for greyscale) and CutMix, the teacher scoring each view."""
    from ddfast.evaluate import regimes
    from ddfast.models import build_model

    seen = {"rrc": 0, "cutmix": 0, "teacher": []}
    rrc, mix = regimes.random_resized_crop, regimes.cutmix

    def counting_rrc(x, g, **k):
        seen["rrc"] += 1
        assert k.get("flip") is False  # digits are greyscale
        return rrc(x, g, **k)

    def counting_cutmix(x, g, *a, **k):
        seen["cutmix"] += 1
        out = mix(x, g, *a, **k)
        seen["last_view"] = out
        return out

    class Teacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build_model("convnet", 1, C, digits.image_size, widths=(8,), norm="instance")

        def forward(self, x):
            seen["teacher"].append(x)
            return self.net(x)

    monkeypatch.setattr(regimes, "random_resized_crop", counting_rrc)
    monkeypatch.setattr(regimes, "cutmix", counting_cutmix)
    x, y = digits.train_x[:20], digits.train_y[:20]
    regimes.evaluate(x, y, "sl+kd", teacher=Teacher(), data=digits, model_options={"widths": (8,)}, budget=2,
                     models=1)
    assert seen["rrc"] == 2 and seen["cutmix"] == 2
    assert any(torch.equal(t, seen["last_view"]) for t in seen["teacher"])  # the teacher relabels each view
    seen["rrc"] = seen["cutmix"] = 0
    regimes.evaluate(x, y, "hl", data=digits, model_options={"widths": (8,)}, budget=2, models=1)
    assert seen["rrc"] == 0 and seen["cutmix"] == 0
