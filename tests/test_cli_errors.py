"""The command line speaks like one: validated values, one error line on stderr with a non-zero exit,
--debug for the traceback, help for every argument with its default, --version."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from ddfast.cli import build_parser, main


@pytest.mark.parametrize("argv", [
    ["distill", "ld", "--out", "{out}", "--inner-batch", "0"],
    ["distill", "ld", "--out", "{out}", "--inner-batch", "-2"],
    ["distill", "ld", "--out", "{out}", "--backend", "nope"],
    ["distill", "ld", "--out", "{out}", "--seed", "-1"],
    ["distill", "ld", "--out", "{out}", "--checkpoint-every", "0"],
    ["distill", "krr-st", "--target", "t", "--out", "{out}", "--checkpoint-every", "0"],
    ["distill", "ead", "--out", "{out}", "--ipc", "0"],
    ["distill", "ead", "--out", "{out}", "--lr-images", "nan"],
    ["trajectory", "--epochs", "1", "--every", "0", "--out", "{out}"],
    ["trajectory", "--epochs", "1", "--every", "1", "--out", "{out}", "--arch", "mlp", "--norm", "batch"],
    ["evaluate", "{out}", "--models", "0"],
    ["distill", "ld", "--out", "{out}", "--resume", "--overwrite"],
])
def test_bad_values_exit_2_before_any_write(tmp_path, capsys, argv):
    out = str(tmp_path / "run")
    rc = main([a.replace("{out}", out) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "error:" in err
    assert not os.path.exists(out)


def test_parser_errors_exit_2_in_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ddfast.cli", "distill", "ld", "--out", str(tmp_path / "r"),
                        "--inner-batch", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--inner-batch" in r.stderr


def test_own_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    assert main(["evaluate", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ddfast: error: {missing}: no such run folder") and len(err.strip().splitlines()) == 1
    from ddfast.errors import ArtifactError

    with pytest.raises(ArtifactError):
        main(["--debug", "evaluate", missing])


def test_evaluate_models_0_keeps_eval_json(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "eval.json").write_text('{"mean": 67.7}')
    assert main(["evaluate", str(run), "--models", "0"]) == 2
    assert (run / "eval.json").read_text() == '{"mean": 67.7}'


def test_version(capsys):
    from ddfast import __version__

    assert main(["--version"]) == 0 and __version__ in capsys.readouterr().out


def _all_parsers(parser, path=("ddfast",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, path + (name,))


def test_every_argument_has_help_and_defaults_are_shown():
    parser = build_parser()
    seen = 0
    for path, p in _all_parsers(parser):
        if path[:2] == ("ddfast", "suite"):  # the suite's own parser (ddfast.suite.cli)
            continue
        help_text = p.format_help()
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{' '.join(path)} {action.option_strings or action.dest}: no help"
            seen += 1
            default = action.default
            if (action.option_strings and default not in (None, argparse.SUPPRESS) and default is not False
                    and not isinstance(action, (argparse._StoreTrueAction, argparse._VersionAction))):
                shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
                assert f"(default: {shown})" in " ".join(help_text.split()), f"{' '.join(path)} {action.dest}"
    assert seen > 150


def test_every_count_option_rejects_zero():
    """Each option typed as a positive integer refuses 0 (what --inner-batch 0 used to accept)."""
    from ddfast.cli._common import positive_int

    parser = build_parser()
    n = 0
    for _, p in _all_parsers(parser):
        for action in p._actions:
            if action.type is positive_int:
                n += 1
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type("0")
    assert n > 40


def test_bench_runs_the_harness(capsys):
    assert main(["bench", "--list", "--ops", "relu_max_pool2d", "--device", "cpu"]) == 0
    assert "relu_max_pool2d" in capsys.readouterr().out
