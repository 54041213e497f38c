#!/usr/bin/env bash
# One prepared GPU call (docs/gpu-runbook.md): the GPU tests, the compiled-code report checked
# on the real GPU, and the timing rows of every performance target, in one command that fits
# in 8 minutes on an H100/H200 and leaves everything under one folder.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--only STEP,STEP] [--budget SECONDS]
#
# Output folder: $OUT when set (the device tool's), else ./gpu-out. What lands there (the
# device tool brings back at most 8 files, at most two folders down):
#   summary.tsv                      one line per step: status, exit code, wall time, budget, estimate
#   gpu_check.log                    everything the steps printed, in order
#   logs.tar.gz                      per-step logs, pytest junit XML, both kernel-report JSONs,
#                                    the bench plots (repacked after every step: a kill keeps them)
#   targets.md                       the measured target rows (ratios), for the README
#   benchmarks/results/<gpu>.json    `adaptkern bench` results (+ <gpu>-cudagraph.json): commit these
# A CPU (dry) run writes its smoke results to benchmarks/results-cpu-smoke/ instead: never commit them.
#
# Steps, in the order they run, with the budget (the step's timeout) and the GPU estimate:
#   env                 15 s /   5 s  adaptkern info, torch/triton versions, nvidia-smi
#   bench              250 s / 170 s  adaptkern bench --suite all --quick (every suite's baselines but
#                                     torch.compile): LoRA r=16 and sequential bottleneck R=256 at M=8192
#                                     fwd and fwd+bwd; mixed decode M=64 S=32, M=256 S=1 and S=128,
#                                     prefill M=8192 S=8; QLoRA NF4 M=8192 fwd+bwd and decode M=16;
#                                     DoRA M=8192 fwd+bwd; norm-fused seq_bn (BERT) M=8192 fwd and
#                                     fwd+bwd; q/k/v decode M=64 S=32 with the CUDA-graph replay;
#                                     bf16 matmul and copy ceilings first. Cost: ~6 s of ceilings,
#                                     ~45 Triton compiles (~1.5 s each), 11 float64 checks, ~60 timed
#                                     impl x mode rows (~1 s each: warm-up, L2 flushes, repetitions,
#                                     peak memory), ~10 s importing peft and bitsandbytes
#   bench-graph         90 s /  35 s  the mixed quick cases as CUDA-graph replays (decode targets)
#   results             20 s /   3 s  results JSONs -> $OUT/benchmarks/results/, targets.md
#   kernel-report-cpu  150 s /  40 s  benchmarks/kernel_report.py (compiled offline for sm_90a, no
#                                     GPU used) for the 11 bf16 scenarios gpu_check.py reproduces, one
#                                     process per scenario in parallel (gpu_check.py cpu-report); in
#                                     the background, beside gpu-tests (CPU cores only)
#   gpu-tests          210 s / 130 s  pytest -m gpu tests (every op's, the new ones included) without the interpreter: kernels at GPU
#                                     shapes, CUDA-graph replay with a new mapping, the native CUDA op
#                                     (its nvcc build ~40 s of it); per-test timeout 150 s
#   kernel-report-gpu  100 s /  40 s  gpu_check.py compiled: the report's scenarios run on the GPU
#                                     through the public API; registers, local memory, shared memory,
#                                     occupancy read from the driver, MMA kind from the loaded cubin,
#                                     each compared with the CPU report's row
# Estimated total on an H200: ~6.5 min. The whole run also stops at --budget (default 450 s):
# a step gets min(its budget, time left); a step with under 20 s left is skipped ("out of time").
# Order: timings first, on a quiet machine (nothing else runs beside them), so the results file
# exists even if a later step hangs; the CPU-only report overlaps the GPU tests.
#
# Every step logs wall time and exit status to summary.tsv; a failing step does not stop the
# later ones; the exit status is 1 when any step failed or timed out, 2 on bad usage or when no
# GPU is visible without --dry-run.
#
# --dry-run: what a CPU can run: env, bench (the CPU smoke test), results (plumbing),
# kernel-report-cpu, and gpu-tests as --collect-only; bench-graph and kernel-report-gpu are
# skipped with a line saying so.
# --only: run these steps alone (a rerun), env always included; results brings bench and
# bench-graph with it, and kernel-report-gpu brings kernel-report-cpu.
#
# Environment: PYTHON (default python3), OUT, ADAPTKERN_COMMIT (the device's copy of the tree
# has no .git: pass the commit), GPU_CHECK_BUDGET_S, GPU_CHECK_SCENARIOS (comma-separated
# report scenarios for both kernel-report steps; default: all 11 of gpu_check.py's SCENARIOS),
# GPU_CHECK_REPORT_ARGS (extra arguments of kernel_report.py), GPU_CHECK_PYTEST_ARGS (extra
# arguments of the gpu-tests pytest).
# The project runs from this tree (PYTHONPATH), nothing is installed; TRITON_INTERPRET is unset.

set -uo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
ONLY=""
BUDGET=${GPU_CHECK_BUDGET_S:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY=${2:-}; shift ;;
        --only=*) ONLY=${1#--only=} ;;
        --budget) BUDGET=${2:-}; shift ;;
        --budget=*) BUDGET=${1#--budget=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

STEPS="env bench bench-graph results kernel-report-cpu gpu-tests kernel-report-gpu"
if [ -n "$ONLY" ]; then
    for s in ${ONLY//,/ }; do
        case " $STEPS " in *" $s "*) ;; *) echo "gpu_check.sh: unknown step '$s' (steps: $STEPS)" >&2; exit 2 ;; esac
    done
    case ",$ONLY," in *,results,*) ONLY="$ONLY,bench,bench-graph" ;; esac
    case ",$ONLY," in *,kernel-report-gpu,*) ONLY="$ONLY,kernel-report-cpu" ;; esac
fi
# A dry run gets longer: its compiled-code report shares two or so CPU cores with the smoke test.
if [ -z "$BUDGET" ]; then BUDGET=$([ "$DRY" = 1 ] && echo 420 || echo 450); fi
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$REPO/gpu-out}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
if [ -z "${OUT:-}" ] && [ ! -e "$OUTDIR/.gitignore" ]; then echo '*' > "$OUTDIR/.gitignore"; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
mkdir -p "$WORK/logs"
SUMMARY=$OUTDIR/summary.tsv
LOG=$OUTDIR/gpu_check.log
: > "$LOG"
printf 'step\tstatus\trc\twall_s\tbudget_s\test_gpu_s\tnote\n' > "$SUMMARY"

unset TRITON_INTERPRET
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export MPLBACKEND=Agg
if [ -z "${ADAPTKERN_COMMIT:-}" ] && command -v git >/dev/null && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    ADAPTKERN_COMMIT=$(git -C "$REPO" rev-parse HEAD)
    [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ] && ADAPTKERN_COMMIT="$ADAPTKERN_COMMIT+dirty"
fi
[ -n "${ADAPTKERN_COMMIT:-}" ] && export ADAPTKERN_COMMIT
export GPU_CHECK_WORK=$WORK GPU_CHECK_OUT=$OUTDIR GPU_CHECK_DRY=$DRY GPU_CHECK_PY=$PY

say() { echo "$@" | tee -a "$LOG"; }
START=$(date +%s)
DEADLINE=$((START + BUDGET))
FAILED=""

pack() {  # everything of the work folder worth keeping, in one file (the tool returns 8 at most)
    local rc
    (cd "$WORK" && tar -czf "$OUTDIR/logs.tar.gz.tmp" --exclude='*.tmp' --exclude='./triton-cache' . 2>/dev/null)
    rc=$?  # 1: a file changed while read (the background report writing): the archive is still whole
    if [ "$rc" -le 1 ]; then mv "$OUTDIR/logs.tar.gz.tmp" "$OUTDIR/logs.tar.gz"; else rm -f "$OUTDIR/logs.tar.gz.tmp"; fi
}

record() {  # record NAME STATUS RC WALL BUDGET EST NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$SUMMARY"
    case "$2" in FAIL|TIMEOUT) FAILED="$FAILED $1" ;; esac
    if [ "$2" = skipped ]; then
        say "== $1: SKIPPED - $7"
    else
        say "== $1: $2 (exit $3, ${4} s of ${5} s budget; GPU estimate ${6} s)${7:+ - $7}"
    fi
    pack
}

selected() { [ -z "$ONLY" ] || [ "$1" = env ] || case ",$ONLY," in *,"$1",*) return 0 ;; *) return 1 ;; esac; }

# Decide whether step NAME runs; sets TMO (its timeout) or records why it is skipped.
plan() {  # plan NAME BUDGET EST GPU_ONLY(1/0) [DRY_NOTE]
    local left
    if ! selected "$1"; then record "$1" skipped - 0 "$2" "$3" "not selected (--only $ONLY)"; return 1; fi
    if [ "$DRY" = 1 ] && [ "$4" = 1 ]; then
        record "$1" skipped - 0 "$2" "$3" "GPU-only step, skipped in the dry run${5:+: $5}"; return 1
    fi
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then record "$1" skipped - 0 "$2" "$3" "out of time (--budget $BUDGET s spent)"; return 1; fi
    TMO=$(( $2 < left ? $2 : left ))
    return 0
}

status_of() {  # status_of RC
    case "$1" in 0) echo ok ;; 124|137) echo TIMEOUT ;; *) echo FAIL ;; esac
}

# step NAME BUDGET EST GPU_ONLY NOTE -- COMMAND...: run in the foreground under a timeout
# (timeout kills the command's whole process group), output to the console, the log and its own file.
step() {
    local name=$1 budget=$2 est=$3 gpu=$4 note=$5; shift 6
    plan "$name" "$budget" "$est" "$gpu" || return 0
    say ""
    say "== $name: $* (timeout ${TMO} s)"
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$TMO" "$@" 2>&1 | tee "$WORK/logs/$name.log" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out after ${TMO} s${note:+; $note}"
    record "$name" "$(status_of "$rc")" "$rc" $(($(date +%s) - t0)) "$budget" "$est" "$note"
}

# A CPU-only step in the background: bg_start NAME BUDGET EST -- COMMAND...; bg_join NAME
bg_start() {
    local name=$1 budget=$2 est=$3; shift 4
    BG_NAME=""
    plan "$name" "$budget" "$est" 0 || return 0
    say ""
    say "== $name: started in the background: $* (timeout ${TMO} s)"
    BG_NAME=$name BG_BUDGET=$budget BG_EST=$est
    (
        t0=$(date +%s)
        timeout --kill-after=10 "$TMO" "$@" > "$WORK/logs/$name.log" 2>&1
        echo "$? $(($(date +%s) - t0))" > "$WORK/$name.rc"
    ) &
    BG_PID=$!
}

bg_join() {
    [ -n "${BG_NAME:-}" ] || return 0
    local t0=$(date +%s) rc wall note="ran in the background"
    wait "$BG_PID"
    read -r rc wall < "$WORK/$BG_NAME.rc" || { rc=1; wall=0; }
    [ $(($(date +%s) - t0)) -gt 0 ] && note="$note; waited $(($(date +%s) - t0)) s for it"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out; $note"
    say ""
    say "== $BG_NAME: its log (the console shows the last 25 lines; gpu_check.log and logs.tar.gz hold all)"
    cat "$WORK/logs/$BG_NAME.log" >> "$LOG"
    tail -n 25 "$WORK/logs/$BG_NAME.log"
    record "$BG_NAME" "$(status_of "$rc")" "$rc" "$wall" "$BG_BUDGET" "$BG_EST" "$note"
    BG_NAME=""
}

# -- the steps ---------------------------------------------------------------------------------

env_step() {
    echo "adaptkern commit: ${ADAPTKERN_COMMIT:-unknown (set ADAPTKERN_COMMIT)}; python: $(command -v "$GPU_CHECK_PY")"
    "$GPU_CHECK_PY" -m adaptkern info || return 1
    "$GPU_CHECK_PY" -c 'import torch, triton
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs", f"sm_{p.major}{p.minor}")' \
        || return 1
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used \
            --format=csv || true
    else
        echo "nvidia-smi: not on this machine"
    fi
}
export -f env_step

# Is there a GPU? Without one, only the dry run makes sense.
HAVE_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
say "gpu_check.sh: $([ "$DRY" = 1 ] && echo "DRY RUN (CPU steps only)" || echo "GPU run"); out $OUTDIR; work $WORK;" \
    "budget ${BUDGET} s; steps: ${ONLY:-all}; commit ${ADAPTKERN_COMMIT:-unknown}"
if [ "$DRY" = 0 ] && [ "$HAVE_GPU" != 1 ]; then
    say "gpu_check.sh: no CUDA GPU visible to $PY: run with --dry-run on a machine without one"
    printf 'setup\tFAIL\t2\t0\t0\t0\tno CUDA GPU visible (use --dry-run)\n' >> "$SUMMARY"
    exit 2
fi

# The report gets its own Triton cache (TRITON_CACHE_DIR below), so the JIT on the GPU compiles
# every kernel itself instead of loading the report's cubins: the cross-check compares two compiles.
REPORT_ARGS=${GPU_CHECK_REPORT_ARGS:-}
SCENARIOS=${GPU_CHECK_SCENARIOS:-}
PYTEST_TIMEOUT=""
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST_TIMEOUT="--timeout=150"

step env 15 5 0 "" -- bash -c env_step

# In a dry run the CPU report starts now (nothing is timed); on a GPU after the timings.
[ "$DRY" = 1 ] && bg_start kernel-report-cpu 300 40 -- \
    env TRITON_CACHE_DIR="$WORK/triton-cache" "$PY" benchmarks/gpu_check.py cpu-report \
    --json "$WORK/kernel-report-cpu.json" --scenarios "$SCENARIOS" --report-args="$REPORT_ARGS"

step bench 250 170 0 "" -- \
    "$PY" -m adaptkern bench --suite all --quick \
    --impls fused,eager,peft,base_linear,dequant,lora,vllm,delta,graph_replay --out "$WORK/bench"
step bench-graph 90 35 1 "decode targets as CUDA-graph replays" -- \
    "$PY" -m adaptkern bench --suite mixed --quick --impls fused,eager,base_linear --cuda-graph --out "$WORK/bench-graph"
step results 20 3 0 "" -- \
    "$PY" benchmarks/gpu_check.py results --bench "$WORK/bench" --graph "$WORK/bench-graph" --out "$OUTDIR"

[ "$DRY" = 0 ] && bg_start kernel-report-cpu 150 40 -- \
    env TRITON_CACHE_DIR="$WORK/triton-cache" "$PY" benchmarks/gpu_check.py cpu-report \
    --json "$WORK/kernel-report-cpu.json" --scenarios "$SCENARIOS" --report-args="$REPORT_ARGS"

if [ "$DRY" = 1 ]; then
    step gpu-tests 60 130 0 "dry run: --collect-only (the GPU subset is selected, not run)" -- \
        "$PY" -m pytest tests -m gpu --collect-only -q -p no:cacheprovider
else
    # shellcheck disable=SC2086
    step gpu-tests 210 130 0 "" -- \
        "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rfEs --durations=15 $PYTEST_TIMEOUT \
        --junitxml="$WORK/logs/gpu-tests.xml" ${GPU_CHECK_PYTEST_ARGS:-}
fi

bg_join
# ADAPTKERN_NO_NATIVE=1: the row alignment runs its PyTorch form, as in the CPU report's capture
# (and no nvcc build can land in this step's budget).
step kernel-report-gpu 100 40 1 "compiles through the real driver" -- \
    env ADAPTKERN_NO_NATIVE=1 "$PY" benchmarks/gpu_check.py compiled --cpu-report "$WORK/kernel-report-cpu.json" \
    --json "$WORK/kernel-report-gpu.json" --scenarios "$SCENARIOS"

# -- summary -------------------------------------------------------------------------------------
TOTAL=$(($(date +%s) - START))
printf '# total\t%s\t-\t%s\t%s\t-\t%s\n' "$([ -z "$FAILED" ] && echo ok || echo FAIL)" "$TOTAL" "$BUDGET" \
    "$([ "$DRY" = 1 ] && echo "dry run" || echo "GPU run")${FAILED:+; failed:$FAILED}" >> "$SUMMARY"
pack
say ""
say "== summary ($SUMMARY)"
if command -v column >/dev/null; then column -t -s "$(printf '\t')" "$SUMMARY"; else cat "$SUMMARY"; fi | tee -a "$LOG"
[ -f "$OUTDIR/targets.md" ] && { say ""; say "== targets ($OUTDIR/targets.md)"; tee -a "$LOG" < "$OUTDIR/targets.md"; }
say ""
say "gpu_check.sh: ${TOTAL} s;$([ -z "$FAILED" ] && echo " every step ok or skipped" || echo " FAILED:$FAILED"); files in $OUTDIR:"
(cd "$OUTDIR" && find . -type f ! -name '.gitignore' | sort | sed 's/^/  /') | tee -a "$LOG"
rm -rf "$WORK"
[ -z "$FAILED" ]
