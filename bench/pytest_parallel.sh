#!/usr/bin/env bash
# Run test files as parallel pytest processes (one per file: Triton's JIT compiles and the CPU work spread
# over the cores), each with its own log and junit XML; print the tail of every log; exit 1 if any failed.
#
#   bench/pytest_parallel.sh OUT_DIR "K_EXPR" FILE... [-- PYTEST_ARGS...]
#
# Logs: OUT_DIR/tests/<file>.log; junit: OUT_DIR/junit/<file>.xml. Threads per process: PYTEST_THREADS
# (default: cores / files, at least 1). A per-test timeout is added when pytest-timeout is installed.
set -u
[ $# -ge 3 ] || { echo "usage: bench/pytest_parallel.sh OUT_DIR K_EXPR FILE... [-- PYTEST_ARGS...]" >&2; exit 64; }
OUT=$1 K=$2
shift 2
FILES=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do FILES+=("$1"); shift; done
[ $# -gt 0 ] && shift
EXTRA=("$@")
PY=${PYTHON:-python3}
mkdir -p "$OUT/tests" "$OUT/junit"
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 4)
THREADS=${PYTEST_THREADS:-$(( CORES / ${#FILES[@]} > 0 ? CORES / ${#FILES[@]} : 1 ))}
ARGS=(-q -rfEs -p no:cacheprovider -o junit_family=xunit2)
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then ARGS+=(--timeout="${PYTEST_TIMEOUT:-120}"); fi
PIDS=()
for f in "${FILES[@]}"; do
    name=$(basename "$f" .py)
    OMP_NUM_THREADS=$THREADS "$PY" -m pytest "${ARGS[@]}" --junitxml="$OUT/junit/$name.xml" "${EXTRA[@]}" "$f" -k "$K" \
        > "$OUT/tests/$name.log" 2>&1 &
    PIDS+=($!)
    echo "started $f (pid $!, $THREADS threads)"
done
RC=0
for i in "${!PIDS[@]}"; do
    wait "${PIDS[$i]}"
    rc=$?
    # pytest: 0 passed, 5 nothing selected; anything else is a failure
    if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then RC=1; fi
    echo "== ${FILES[$i]}: rc $rc"
    tail -n 25 "$OUT/tests/$(basename "${FILES[$i]}" .py).log"
done
exit $RC
