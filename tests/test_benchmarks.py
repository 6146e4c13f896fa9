"""The benchmark harness (ddfast.benchmarks): rows, CSV / JSON, the markdown table, providers that cannot
run, compile failures, the case lists, and the GPU check's no-GPU exit. No timing is asserted."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest
import torch

from ddfast.benchmarks import harness, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_cpu_run_writes_csv_json_and_table(tmp_path):
    out = tmp_path / "bench"
    rc = harness.main(["--ops", "relu_max_pool2d", "--quick", "--device", "cpu", "--providers", "reference,cpu",
                       "triton", "--repeats", "2", "--out", str(out)])
    assert rc == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(harness.FIELDS) <= set(rows[0])
    modes = {r["mode"] for r in rows}
    assert modes == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["commit"]
        if r["provider"] == "triton":  # the interpreter is never timed
            assert r["status"] == "skipped" and "interpreter" in r["note"]
        else:
            assert r["status"] == "ok", r
            assert float(r["median_ms"]) > 0 and float(r["min_ms"]) <= float(r["median_ms"])
            assert float(r["gbps"]) > 0 and float(r["peak_mib"]) >= 0
        if r["provider"] == "reference" and r["status"] == "ok":
            assert float(r["speedup_vs_reference"]) == pytest.approx(1.0)
    cpu = [r for r in rows if r["provider"] == "cpu"]
    ref = {(r["case"], r["mode"]): float(r["median_ms"]) for r in rows if r["provider"] == "reference"}
    for r in cpu:
        assert float(r["speedup_vs_reference"]) == pytest.approx(ref[(r["case"], r["mode"])] / float(r["median_ms"]), rel=1e-4)
    data = json.loads((out / "results.json").read_text())
    assert len(data) == len(rows)
    md = (out / "results.md").read_text()
    assert "## relu_max_pool2d" in md and "| reference | cpu |" in md and "(×" in md
    assert "triton: Triton on CPU tensors runs the interpreter" in md
    # The report module regenerates the same table from the CSV.
    target = tmp_path / "benchmarks-cpu.md"
    assert report.main([str(out / "results.csv"), "-o", str(target)]) == 0
    assert target.read_text() == md


def test_compile_failure_is_a_skipped_row_with_the_reason(monkeypatch):
    def broken(fn, *a, **k):
        raise RuntimeError("backend exploded\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    case = harness.cases("relu_max_pool2d", "cpu", quick=True)[0]
    row = harness.measure(case, "compiled", "fwd", "cpu", repeats=2, memory=False)
    assert row["status"] == "skipped" and row["note"] == "torch.compile failed: RuntimeError: backend exploded"


def test_unavailable_backend_and_cuda_on_cpu_are_skipped_with_reasons():
    case = next(c for c in harness.cases("ridge_solve", "cpu") if c.name == "ridge_weights:ld_rr_N10")
    row = harness.measure(case, "cuda", "fwd", "cpu", repeats=2, memory=False)
    assert row["status"] == "skipped" and "CUDA tensors" in row["note"]
    rows = harness.add_speedups([
        dict(op="o", case="c", mode="fwd", dtype="fp32", provider="reference", status="ok", median_ms=4.0),
        dict(op="o", case="c", mode="fwd", dtype="fp32", provider="compiled", status="ok", median_ms=2.0),
        dict(op="o", case="c", mode="fwd", dtype="fp32", provider="auto", status="ok", median_ms=1.0),
        dict(op="o", case="c", mode="fwd", dtype="fp32", provider="cuda", status="skipped", note="why"),
    ])
    assert rows[2]["speedup_vs_reference"] == 4.0 and rows[2]["speedup_vs_compiled"] == 2.0
    assert rows[3]["speedup_vs_reference"] is None


def test_case_lists_cover_the_distillers_shapes():
    gpu = {op: harness.cases(op, "cuda") for op in harness.OPS}
    names = {op: {c.name for c in cs} for op, cs in gpu.items()}
    assert {"ridge_weights:ld_rr_N10", "ridge_weights:ld_rr_N100", "krr_predict:fewshot_B64_N32",
            "krr_predict:fewshot_B64_N128", "krr_predict:krr_st_m5000_d8192_b1024",
            "krr_predict:krr_N500_d8192", "krr_predict:krr_N10_d512"} <= names["ridge_solve"]
    assert {"convnet28_ipc10_t1", "convnet28_ipc50_t10"} <= names["checkpoint_grad_inner"]
    assert {c.split("_")[0] for c in names["label_metagrad"]} == {"lenet", "convnet"}
    pools = gpu["relu_max_pool2d"]
    assert {c.dtype for c in pools} == {torch.float32, torch.bfloat16}
    assert {c.name.rsplit("_", 1)[1] for c in pools} == {"nchw", "nhwc"}
    assert {"ld-rr", "ld-second-order", "krr-st-m1000-b1024", "ead-tm5"} <= names["e2e"]
    for op in harness.OPS:  # a curated subset and a small CPU list for every op
        quick = harness.cases(op, "cuda", quick=True)
        assert quick and {c.name for c in quick} <= names[op]
        assert harness.cases(op, "cpu"), op


def test_cli_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        harness.main(["--ops", "nope"])
    with pytest.raises(SystemExit):
        harness.main(["--providers", "reference,gpu"])
    assert "unknown provider 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            harness.main(["--device", "cuda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU exit")
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DDFAST_GPU_CHECK_CPU_DRY_RUN"}
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "no CUDA GPU" in res.stderr
    assert not (tmp_path / "out" / "build.log").exists()  # nothing was built


def test_krr_eager_small_n_script_rows(capsys):
    """bench/krr_eager_small_n.py (krr_predict vs the user's eager torch.linalg.solve formulation) writes one
    CSV row per cell with both times and the same predictions."""
    import csv
    import io
    import pathlib
    import runpy

    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "krr_eager_small_n.py"
    runpy.run_path(str(script))["main"](["--N", "4", "40", "--d", "48", "--M", "8", "--rounds", "1", "--calls", "1"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["N"], r["mode"]) for r in rows] == [("4", "fwd"), ("4", "fwd+bwd"), ("40", "fwd"), ("40", "fwd+bwd")]
    for r in rows:
        assert float(r["eager_us"]) > 0 and float(r["op_us"]) > 0 and float(r["rel_diff"]) < 1e-4
