"""The command line's backend and provider choices come from the op registry (ddfast.dispatch): ``--backend``
offers auto, fused and every backend the registered ops declare (the reference always); ``ddfast bench
--providers`` offers reference, compiled, the declared kernel backends and auto."""

from __future__ import annotations

from ddfast import dispatch
from ddfast.benchmarks import harness
from ddfast.cli import _common, main


def test_backend_choices_are_the_registry_backends():
    declared = {b for backends in dispatch.registered_ops().values() for b in backends}
    names = dispatch.backend_names()
    assert set(names) == declared | {"reference"}
    assert list(names) == [b for b in dispatch.BACKENDS if b in names]  # auto order
    assert _common.BACKENDS == _common.backend_choices() == ("auto", "fused") + names
    assert {"auto", "fused", "reference"} <= set(_common.BACKENDS)
    assert harness.PROVIDERS == harness._providers()
    assert harness.PROVIDERS[:2] == ("reference", "compiled") and harness.PROVIDERS[-1] == "auto"
    assert set(harness.PROVIDERS[2:-1]) == set(names) - {"reference"}


def test_choices_follow_a_registry_change(monkeypatch):
    """An op set that declares only the C++ kernel: the triton / cuda choices go away, the rest stay."""
    monkeypatch.setattr(dispatch, "registered_ops", lambda: {"some_op": ("cpu", "reference")})
    assert dispatch.backend_names() == ("cpu", "reference")
    assert _common.BACKENDS == ("auto", "fused", "cpu", "reference")
    assert harness._providers() == ("reference", "compiled", "cpu", "auto")


def test_distill_rejects_a_backend_no_op_declares(monkeypatch, capsys):
    monkeypatch.setattr(dispatch, "registered_ops", lambda: {"some_op": ("cpu", "reference")})
    assert main(["distill", "ld", "--backend", "triton", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "'triton'" in err and "'fused'" in err and "'cuda'" not in err.split("choose from")[1]


def test_bench_rejects_an_unknown_provider_listing_the_registry_ones(capsys):
    assert main(["bench", "--providers", "reference,gpu"]) == 2
    err = capsys.readouterr().err
    assert "'gpu'" in err and ", ".join(harness.PROVIDERS) in err
