#!/usr/bin/env bash
# The one script for the H200: build, the autotuners' picks, CUDA tests, memcheck and racecheck, quick
# bench; within 9 minutes.
#
#   bench/device_check.sh OUTDIR              on the GPU machine (its own python3, no network)
#   bench/device_check.sh --dry-run OUTDIR    everything but the GPU parts, on the CPU
#
# Uses $PYTHON (default python3); never creates a venv or downloads anything. Writes at most 8
# files into OUTDIR: build.log, picks.md, tests.log, memcheck.log, bench.log, the bench CSV, its
# summary and one plot. Each stage runs under `timeout`, so none can eat the others' time; the last
# thing printed is a short table of the stages (and before it the bench's own table).
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; fi
OUTDIR=$1
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
START=$(date +%s)
export PYTHONUNBUFFERED=1
# Triton keeps its autotuning choices on disk: the sanitizer run and the bench reuse them.
export TRITON_CACHE_AUTOTUNING=1
NPROC=$(nproc 2>/dev/null || echo 4)

# Stage budgets (seconds); they add up to 530, under 9 minutes with the checks between them. The
# picks stage compiles and autotunes the target shapes first (Triton caches both on disk), so
# the tests and the bench after it mostly reuse its work.
T_BUILD=170 T_PICKS=100 T_TESTS=100 T_MEMCHECK=45 T_RACECHECK=35 T_BENCH=80
# The dry run checks the script, not the GPU machine's clock: a from-scratch build on 2 shared
# cores takes far longer than on the H200's 16.
[ $DRY -eq 1 ] && T_BUILD=900

STAGES=()
record() {  # name status seconds note
    STAGES+=("$(printf '%-9s %-8s %5ss  %s' "$1" "$2" "$3" "$4")")
}
run_stage() {  # name limit logfile command...: runs it under timeout, logs, returns its status
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    LAST_SECS=$(( $(date +%s) - t0 ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then LAST_STATUS=TIMEOUT
    elif [ $rc -eq 0 ]; then LAST_STATUS=ok
    else LAST_STATUS="FAIL($rc)"; fi
    echo "== $name: $LAST_STATUS in ${LAST_SECS}s" | tee -a "$log"
    return $rc
}

# ---- 1. build the extension in place, with every core ---------------------------------------
BUILD_LOG=$OUTDIR/build.log
: >"$BUILD_LOG"
{
    echo "date: $(date -u +%FT%TZ)  dry-run: $DRY  python: $(command -v "$PY")"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
} >>"$BUILD_LOG" 2>&1
BUILD_CMD=(env MAX_JOBS="$NPROC" "$PY" setup.py build_ext --inplace)
if [ $DRY -eq 1 ] && command -v flock >/dev/null; then
    # Other shells may build the same tree here (make build takes this lock too).
    BUILD_CMD=(flock /tmp/bigmodel-build.lock "${BUILD_CMD[@]}")
fi
run_stage build $T_BUILD "$BUILD_LOG" "${BUILD_CMD[@]}"
if [ "$LAST_STATUS" != ok ] && [ "$LAST_STATUS" != TIMEOUT ]; then
    echo "== build_ext failed; trying pip install -e (no build isolation, no downloads)" | tee -a "$BUILD_LOG"
    run_stage build $T_BUILD "$BUILD_LOG" env MAX_JOBS="$NPROC" "$PY" -m pip install --no-index \
        --no-build-isolation --no-deps -e .
fi
B_STATUS=$LAST_STATUS B_SECS=$LAST_SECS
if "$PY" -c "import bigmodel._C" >>"$BUILD_LOG" 2>&1; then B_NOTE="bigmodel._C imports"
else B_NOTE="bigmodel._C does NOT import (C++ paths will fail)"; B_STATUS=FAIL; fi
record build "$B_STATUS" "$B_SECS" "$B_NOTE"

# ---- 2. the autotuners' picks per target shape, beside their static facts ---------------------
PICKS=$OUTDIR/picks.md
if [ $DRY -eq 1 ]; then
    run_stage picks $T_PICKS "$BUILD_LOG" "$PY" -m bench.picks --dry-run --out "$PICKS"
    record picks "$LAST_STATUS" "$LAST_SECS" "dry run: candidates and static facts, no timings"
else
    run_stage picks $T_PICKS "$BUILD_LOG" "$PY" -m bench.picks --time-limit $(( T_PICKS - 35 )) --out "$PICKS"
    record picks "$LAST_STATUS" "$LAST_SECS" "$(grep -c '^| attention\|^| linear_relu' "$PICKS" 2>/dev/null) kernels in picks.md"
fi

# ---- 3. the CUDA-marked tests (on CPU they are collected and skip) ---------------------------
TESTS_LOG=$OUTDIR/tests.log
: >"$TESTS_LOG"
run_stage tests $T_TESTS "$TESTS_LOG" "$PY" -m pytest -m cuda tests -q -p no:cacheprovider -rfE
T_NOTE=$(grep -E "(passed|failed|skipped|error|deselected|no tests ran)" "$TESTS_LOG" | tail -1 | sed 's/=//g; s/^ *//')
[ "$LAST_STATUS" = "FAIL(5)" ] && LAST_STATUS=ok  # 5 = no tests collected
record tests "$LAST_STATUS" "$LAST_SECS" "${T_NOTE:-see tests.log}"

# ---- 4. compute-sanitizer memcheck over both ops at small sizes ------------------------------
MEM_LOG=$OUTDIR/memcheck.log
: >"$MEM_LOG"
if [ $DRY -eq 1 ]; then
    run_stage memcheck $T_MEMCHECK "$MEM_LOG" "$PY" -m bench.memcheck_snippet cpu
    record memcheck "$LAST_STATUS" "$LAST_SECS" "dry run: snippet on CPU, no sanitizer"
else
    SAN=$(command -v compute-sanitizer || true)
    for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
        [ -z "$SAN" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && SAN=$d/bin/compute-sanitizer
    done
    # Compile and autotune first, without the sanitizer (cached on disk), so under it each
    # kernel launches once rather than once per benchmarked config.
    run_stage warmup 45 "$MEM_LOG" "$PY" -m bench.memcheck_snippet cuda
    if [ -z "$SAN" ]; then
        record memcheck SKIP 0 "compute-sanitizer not found"
    else
        left=$(( T_MEMCHECK - LAST_SECS )); [ $left -lt 30 ] && left=30
        run_stage memcheck $left "$MEM_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck \
            --error-exitcode 3 --target-processes all "$PY" -m bench.memcheck_snippet cuda
        M_NOTE=$(grep -E "ERROR SUMMARY" "$MEM_LOG" | tail -1 | sed 's/^=* *//')
        record memcheck "$LAST_STATUS" "$LAST_SECS" "${M_NOTE:-see memcheck.log}"
        # Shared-memory races in the Triton kernels (same snippet, same log file).
        run_stage racecheck $T_RACECHECK "$MEM_LOG" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" \
            --tool racecheck --racecheck-report hazard --error-exitcode 3 --target-processes all \
            "$PY" -m bench.memcheck_snippet cuda
        R_NOTE=$(grep -E "RACECHECK SUMMARY|ERROR SUMMARY" "$MEM_LOG" | tail -1 | sed 's/^=* *//')
        record racecheck "$LAST_STATUS" "$LAST_SECS" "${R_NOTE:-see memcheck.log}"
    fi
fi

# ---- 5. the quick bench ----------------------------------------------------------------------
BENCH_LOG=$OUTDIR/bench.log
: >"$BENCH_LOG"
# --time-limit stops starting cases early enough that the reports are always written.
if [ $DRY -eq 1 ]; then
    BENCH_ARGS=(--quick --device cpu --time-limit 40)
else
    BENCH_ARGS=(--quick --time-limit $(( T_BENCH - 40 )))
fi
run_stage bench $T_BENCH "$BENCH_LOG" "$PY" -m bench "${BENCH_ARGS[@]}" --out "$WORK/results" --no-progress
BE_STATUS=$LAST_STATUS BE_SECS=$LAST_SECS
CSV=$(ls "$WORK"/results/*.csv 2>/dev/null | head -1)
if [ -n "$CSV" ]; then
    cp "$CSV" "${CSV%.csv}_summary.md" "$OUTDIR"/ 2>/dev/null
    PLOT=$(ls "$WORK"/results/*_attention_*.png "$WORK"/results/*.png 2>/dev/null | head -1)
    [ -n "$PLOT" ] && cp "$PLOT" "$OUTDIR"/
    record bench "$BE_STATUS" "$BE_SECS" "$(grep '^bench: .* rows' "$BENCH_LOG" | tail -1 | sed 's/^bench: //; s/; wrote.*//')"
else
    record bench "$BE_STATUS" "$BE_SECS" "no CSV written (see bench.log)"
fi
rm -rf "$WORK"

# ---- the short tables, last --------------------------------------------------------------------
echo
echo "autotuner picks (bf16; static facts from bench/results/sm90_static.md):"
[ -f "$PICKS" ] && cut -c1-230 "$PICKS" | head -40
echo
echo "bench (best bigmodel vs best torch per case):"
sed -n '/^op  *mode  *dtype/,/^$\|^bench: /p' "$BENCH_LOG" | grep -v '^bench: ' | head -40
sed -n "/^the issues' speed targets/,\$p" "$BENCH_LOG" | grep '^|' | grep -v -e '---' | cut -c1-160
echo
echo "device_check $( [ $DRY -eq 1 ] && echo '(dry run) ')in $(( $(date +%s) - START ))s; files in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
printf '%-9s %-8s %6s  %s\n' stage status time note
for s in "${STAGES[@]}"; do echo "$s"; done
for s in "${STAGES[@]}"; do
    case "$s" in *" ok "*|*" SKIP "*) ;; *) exit 1 ;; esac
done
exit 0
