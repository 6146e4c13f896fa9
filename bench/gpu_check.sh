#!/usr/bin/env bash
# One prepared GPU check of ddfast: build the CUDA extension, print `python -m ddfast.info`, run the GPU
# tests (compiled Triton + CUDA kernels on CUDA tensors), run the benchmark harness on the curated GPU
# shapes, build the wheel and smoke-test it in a fresh venv; logs, junit XML, CSV / JSON and the markdown
# table land in OUT_DIR, with summary.txt at the end.
#
#   bench/gpu_check.sh OUT_DIR                  # on the GPU machine (stops at once without a GPU)
#   bench/gpu_check.sh OUT_DIR --cpu-dry-run    # rehearse every stage on CPU with small shapes (no CUDA
#                                               # build; the in-tree extension is used, the wheel is built
#                                               # from a copy of the tree)
#
# Every stage is time-boxed with `timeout` and logged as it goes; a stage that fails or times out is
# recorded and the next one runs. Stage limits (seconds; all within 10 minutes on one H200, 16 cores):
#   GPU_CHECK_BUILD_S=200 GPU_CHECK_TESTS_S=170 GPU_CHECK_BENCH_S=130 GPU_CHECK_WHEEL_S=70,
#   GPU_CHECK_TOTAL_S=585 (no stage starts past it; each is cut to what is left).
# GPU_CHECK_STAGES="build info tests bench wheel" runs a subset (e.g. a rerun of "tests bench").
# Exit status: 0 when every stage passed, 1 when one failed, 2 when there is no GPU (nothing ran).
set -u

usage() { echo "usage: bench/gpu_check.sh OUT_DIR [--cpu-dry-run]" >&2; exit 64; }
[ $# -ge 1 ] || usage
OUT_ARG=$1
DRY=${DDFAST_GPU_CHECK_CPU_DRY_RUN:-0}
if [ $# -ge 2 ]; then
    [ "$2" = "--cpu-dry-run" ] || usage
    DRY=1
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
T0=$(date +%s)

if [ "$DRY" != 1 ]; then
    # No device node and no nvidia-smi listing: stop before importing torch (that alone takes seconds).
    if ! compgen -G "/dev/nvidia[0-9]*" >/dev/null && ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no CUDA GPU visible (no /dev/nvidia* device, no nvidia-smi): nothing to check." >&2
        echo "gpu_check: run this on the GPU machine, or rehearse the stages on CPU with --cpu-dry-run." >&2
        exit 2
    fi
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False for $PY): nothing to check." >&2
        echo "gpu_check: run this on the GPU machine, or rehearse the stages on CPU with --cpu-dry-run." >&2
        exit 2
    fi
fi

mkdir -p "$OUT_ARG" || exit 1
OUT=$(cd "$OUT_ARG" && pwd)
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 1
NPROC=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 4)  # nproc reads OMP_NUM_THREADS
TOTAL_S=${GPU_CHECK_TOTAL_S:-585}
FAILED=0

{
    echo "ddfast GPU check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  mode: $([ "$DRY" = 1 ] && echo 'CPU dry run' || echo GPU)"
    echo "tree: $ROOT  commit: $(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)  cores: $NPROC"
    echo
    printf '%-8s %-8s %6s %6s  %s\n' stage result rc secs log
} > "$SUMMARY"

STAGES=" ${GPU_CHECK_STAGES:-build info tests bench wheel} "
want() { case "$STAGES" in *" $1 "*) return 0 ;; esac; return 1; }

# stage NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, log to OUT/NAME.log as it goes, record it.
stage() {
    local name=$1 limit=$2
    shift 2
    local now left start rc secs result
    now=$(date +%s)
    left=$((TOTAL_S - (now - T0)))
    if [ "$left" -lt 15 ]; then
        printf '%-8s %-8s %6s %6s  %s\n' "$name" "not-run" "-" "0" "(total time budget spent)" >> "$SUMMARY"
        echo "== $name: not run (total budget of ${TOTAL_S}s spent)"
        FAILED=1
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    start=$(date +%s)
    set -o pipefail
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set +o pipefail
    secs=$(($(date +%s) - start))
    if [ "$rc" = 0 ]; then result=ok; elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then result=timeout; else result=failed; fi
    [ "$rc" = 0 ] || FAILED=1
    printf '%-8s %-8s %6s %6s  %s\n' "$name" "$result" "$rc" "$secs" "$name.log" >> "$SUMMARY"
    echo "== $name: $result (rc $rc, ${secs}s)"
    return 0
}

# -- 1. build the CUDA extension (in place, editable) -------------------------------------------------
if ! want build; then :
elif [ "$DRY" = 1 ]; then
    stage build 120 bash -c "echo 'dry run: CUDA build skipped (would run: DDFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
MAX_JOBS=$NPROC $PY -m pip install --no-build-isolation --no-deps -e .)'; $PY -c 'import ddfast._C as c; print(c.__file__)'"
else
    stage build "${GPU_CHECK_BUILD_S:-200}" env DDFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$NPROC" \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi

# -- 2. what is built and usable ----------------------------------------------------------------------
want info && stage info 60 bash -c "nvidia-smi 2>/dev/null || echo '(no nvidia-smi)'; $PY -m ddfast.info"

# -- 3. GPU tests: compiled kernels on CUDA tensors (interpreter off), every failure reported (no -x); ------
#       one pytest process per file in parallel (bench/pytest_parallel.sh): Triton JIT-compiles per process
OP_TESTS="tests/test_ridge_solve.py tests/test_label_metagrad.py tests/test_label_metagrad_kernels.py
          tests/test_ghost_products.py tests/test_relu_max_pool2d.py tests/test_checkpoint_grad_inner.py
          tests/test_ridge_label_metagrad.py"
GPU_TESTS=$(ls tests/test_gpu_*.py 2>/dev/null)
rm -rf "$OUT/junit" "$OUT/tests"
if ! want tests; then :
elif [ "$DRY" = 1 ]; then
    # CPU: the GPU-only files on CPU tensors, and the contract suite of one op through the interpreter.
    stage tests "${GPU_CHECK_TESTS_S:-170}" env DDFAST_GPU_TESTS_ON_CPU=1 PYTEST_THREADS=1 \
        bash bench/pytest_parallel.sh "$OUT" "Contract or gpu" $GPU_TESTS tests/test_relu_max_pool2d.py
else
    stage tests "${GPU_CHECK_TESTS_S:-170}" env TRITON_INTERPRET=0 \
        bash bench/pytest_parallel.sh "$OUT" "triton or cuda or gpu" $GPU_TESTS $OP_TESTS
fi

# -- 4. benchmark harness on the curated shapes; the markdown table from its CSV --------------------------
if ! want bench; then :
elif [ "$DRY" = 1 ]; then
    stage bench "${GPU_CHECK_BENCH_S:-130}" env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" -m ddfast.benchmarks \
        --quick --device cpu --ops relu_max_pool2d,ridge_solve --providers reference,triton,cuda,cpu,auto \
        --repeats 3 --out "$OUT/bench"
else
    stage bench "${GPU_CHECK_BENCH_S:-130}" "$PY" -m ddfast.benchmarks --quick --device cuda --repeats 30 \
        --time-budget $(( ${GPU_CHECK_BENCH_S:-130} - 25 )) --out "$OUT/bench"
fi
if want bench && [ -s "$OUT/bench/results.csv" ]; then
    # report.py needs only the standard library: run by path, without importing torch.
    TABLE="$OUT/benchmarks-$([ "$DRY" = 1 ] && echo cpu || echo gpu).md"
    stage report 60 "$PY" "$ROOT/ddfast/benchmarks/report.py" "$OUT/bench/results.csv" -o "$TABLE"
fi

# -- 5. wheel, installed into a fresh venv (system site-packages for torch), smoke-tested outside the tree --
SMOKE='
import os, sys, torch, ddfast
from ddfast.ops import krr_predict, relu_max_pool2d
from ddfast.reference import krr_predict_ref
from ddfast.reference.relu_max_pool2d import relu_max_pool2d_ref
where = os.path.dirname(ddfast.__file__)
print("ddfast", ddfast.__version__, "from", where)
assert where.startswith(sys.prefix), f"imported {where}, not the wheel installed in {sys.prefix}"
import ddfast._C
print("backends:", {k: v["available"] for k, v in ddfast.backends().items()})
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
zq, zs, ys = (torch.randn(*s, generator=g).to(dev) for s in ((8, 64), (32, 64), (32, 5)))
for backend in (["auto", "triton", "cuda"] if dev == "cuda" else ["auto", "cpu"]):
    out = krr_predict(zq, zs, ys, 0.1, backend=backend)
    torch.testing.assert_close(out, krr_predict_ref(zq, zs, ys, 0.1), rtol=1e-4, atol=1e-4)
    x = torch.randn(4, 3, 8, 8, generator=g).to(dev)
    assert torch.equal(relu_max_pool2d(x, backend=backend), relu_max_pool2d_ref(x))
    print("smoke ok:", backend, dev)
'
if [ "$DRY" = 1 ]; then
    # Build from a copy of the tree so the shared checkout's build/ and extension are left alone.
    WHEEL_CMD="rm -rf '$OUT/src' '$OUT/wheel' '$OUT/venv' && mkdir -p '$OUT/src' && \
git ls-files -co --exclude-standard -z | tar cf - --null --no-recursion --ignore-failed-read -T - 2>/dev/null \
| tar xf - -C '$OUT/src' && \
cd '$OUT/src' && MAX_JOBS=$NPROC $PY -m pip wheel --no-build-isolation --no-deps -w '$OUT/wheel' ."
else
    WHEEL_CMD="rm -rf '$OUT/wheel' '$OUT/venv' && DDFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NPROC \
$PY -m pip wheel --no-build-isolation --no-deps -w '$OUT/wheel' ."
fi
WHEEL_CMD="$WHEEL_CMD && ls -l '$OUT/wheel' && $PY -m venv --system-site-packages '$OUT/venv' && \
'$OUT/venv/bin/python' -m pip install --no-deps --no-index '$OUT'/wheel/ddfast-*.whl && \
cd '$OUT' && '$OUT/venv/bin/python' -c \"\$SMOKE\""
export SMOKE
want wheel && stage wheel "${GPU_CHECK_WHEEL_S:-70}" bash -c "$WHEEL_CMD"

# -- summary ------------------------------------------------------------------------------------------
{
    echo
    if compgen -G "$OUT/junit/*.xml" >/dev/null; then
        "$PY" - "$OUT"/junit/*.xml <<'EOF'
import sys
import xml.etree.ElementTree as ET

suites = []
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        print(f"  unreadable {path}: {exc}")
        continue
    suites += [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"tests: {n['tests']} run, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped (junit/*.xml)")
for s in suites:
    for case in s.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            print(f"  FAILED {case.get('classname')}::{case.get('name')}  {msg}")
EOF
    fi
    if [ -s "$OUT/bench/results.csv" ]; then
        "$PY" - "$OUT/bench/results.csv" <<'EOF'
import csv
import sys

rows = list(csv.DictReader(open(sys.argv[1], newline="")))
by = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
print(f"bench: {len(rows)} cells: {by['ok']} timed, {by['error']} errors, {by['skipped']} skipped (bench/results.csv)")
for r in rows:
    if r["status"] == "error":
        print(f"  ERROR {r['op']} {r['case']} {r['dtype']} {r['mode']} {r['provider']}: {r['note'][:160]}")
EOF
    fi
    echo "total: $(($(date +%s) - T0)) s; $([ "$FAILED" = 0 ] && echo 'every stage passed' || echo 'some stage failed')"
} >> "$SUMMARY" 2>&1
echo
cat "$SUMMARY"
exit "$FAILED"
