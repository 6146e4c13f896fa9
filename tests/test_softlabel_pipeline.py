"""The hard- vs soft-label table: coresets and distilled sets through the HL and SL regimes, on real digits."""

import json
import os

from ddfast.cli import main
from ddfast.experiments.softlabel import format_softlabel_table, softlabel_table


def test_table_runs_every_set_and_regime(tmp_path):
    out = str(tmp_path / "sl")
    table, teacher_acc = softlabel_table("digits", ipcs=(2,), sets=("random", "kcenters", "dm", "dc", "tm"),
                                         regimes=("hl", "sl"), models=1, budget=2, iterations=1, out=out)
    assert teacher_acc > 80.0
    for name in ("random", "kcenters", "dm", "dc", "tm"):
        for regime in ("hl", "sl"):
            accs = table[name][2][regime].accuracies
            assert len(accs) == 1 and 0.0 <= accs[0] <= 100.0
    text = format_softlabel_table(table, (2,))
    assert "K-Centers" in text and "SL IPC 2" in text
    assert os.path.exists(os.path.join(out, "dm-ipc2-seed0.safetensors"))
    with open(os.path.join(out, "softlabel-digits.json")) as f:
        stored = json.load(f)
    assert set(stored["table"]) == {"random", "kcenters", "dm", "dc", "tm"}
    assert stored["teacher_accuracy"] == teacher_acc
    # cached distilled sets are reused
    table2, _ = softlabel_table("digits", ipcs=(2,), sets=("dm",), regimes=("hl", "sl"), models=1, budget=2,
                                iterations=1, out=out)
    assert table2["dm"][2]["hl"].accuracies == table["dm"][2]["hl"].accuracies


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["softlabel-table", "--ipc", "1", "--sets", "random", "kcenters", "--models", "1", "--budget", "2",
                 "--out", out, "--no-progress"]) == 0
    assert "Random real" in capsys.readouterr().out
