#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a CUDA machine (bench/README.md, "GPU checks").
#
#   bench/gpu.sh [PART ...]    PART: tests kernels dlm dit var var-bench cp (default: the first four)
#   SMALL=1 bench/gpu.sh       the same parts at smoke sizes: runs on a CPU in a few minutes
#
# Each part has its own time limit, so that the whole stays under 10 minutes and what finished
# is kept. Logs go to $OUT (the device tool's folder that comes back) or out/gpu, one per part:
#   tests    pytest -m gpu: every native Triton kernel against its torch reference
#   kernels  bench/kernel_speed.py: each kernel vs its torch backend at Wan2.1-1.3B / LLaDA-8B sizes
#   dlm      bench/dlm.py: LLaDA and Dream at 12 x 1024, gen 256, block 32 (bf16), + llada-arith
#   dit      bench/dit_step_cache.py: Wan2.1-1.3B (random weights) at 480x832x17, 10 steps, bf16
#   var      only the VAR KV kernels (kv_compact, window_scores), at Infinity-2B geometry: their
#            native tests, then their kernel_speed.py rows (part of tests and kernels as well)
#   var-bench  bench/var.py: the full grid (var-digits, VAR-d16 / d30 and Infinity-2B with random
#            weights; 6 KV methods x 50/30/10% budgets; 3 rounds), table in $OUT/var-bench/var.md
#   cp       context parallel (needs 2 GPUs): torchrun over NCCL, Ulysses degree 2 (float32), then
#            ring degree 2 (cuDNN attention, bfloat16: ring merges the log-sum-exp that only
#            half-precision GPU backends return), every method's bundled plan on wan2.1-tiny and
#            flux-tiny; each rank equals one process with the same attention and dtype (Stats
#            equal, media within 1e-4; 5e-2 in bfloat16, where two attention kernels differed
#            by up to 3e-2 on flux-tiny in one CPU process); the CPU run of the Ulysses check
#            is tests/test_context_parallel.py
# Python packages the machine lacks (diffusers) travel as wheels in .whl/ (see the README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! (cd /tmp && python3 -c "import diffcache.pipelines, diffusers") 2>/dev/null; then
    # a bare machine: the carried wheels and this checkout into one folder on the path
    wheels=()
    [ -d .whl ] && wheels=(.whl/*.whl)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --target /tmp/site "${wheels[@]}" . \
        || { echo "gpu.sh: could not install the wheels in .whl/ and this checkout"; exit 1; }
    (cd /tmp && PYTHONPATH=/tmp/site python3 -c "import diffusers") 2>/dev/null \
        || { echo "gpu.sh: no diffusers here: carry its wheel in .whl/ (bench/README.md)"; exit 1; }
    export PYTHONPATH=/tmp/site  # -P below keeps the checkout's diffcache/ from shadowing it
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD  # the tests package

if [ -n "${SMALL:-}" ]; then
    DLM=(--small --families llada --repeats 1 --arith-gen 16)
    DIT=(--models wan2.1-tiny --repeats 1 --profile-models "")
    KER=(--small --min-time 0.05)
    VAR=(--models var-tiny,var-digits --seeds 1 --rounds 1)
else
    DLM=(--repeats 3 --arith-gen 16)  # gen 64 on llada-arith: a CPU run
    DIT=(--models wan2.1-1.3b-random --size 480x832x17 --dtype bfloat16 --repeats 3
         --profile-models "")
    KER=()
    VAR=(--rounds 3 --seeds 8)
fi

run() {  # run PART SECONDS COMMAND...: one part, its log, its exit status
    local part=$1 limit=$2
    shift 2
    echo "== $part (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$part.log"
    local rc=${PIPESTATUS[0]}
    echo "== $part: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$part.log"
    status=$((status | (rc != 0)))
}

status=0
python3 -P -m diffcache.cli info 2>&1 | tee "$OUT/info.log"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/info.log"
fi
for part in "${@:-tests kernels dlm dit}"; do
    for p in $part; do
        case $p in
            tests) run tests 120 env TRITON_INTERPRET=0 python3 -P -m pytest -m gpu -q tests/kernels ;;
            kernels) run kernels 90 python3 bench/kernel_speed.py "${KER[@]}" ;;
            dlm) run dlm 180 python3 bench/dlm.py "${DLM[@]}" ;;
            dit) run dit 180 python3 bench/dit_step_cache.py "${DIT[@]}" ;;
            var)
                run var-tests 90 env TRITON_INTERPRET=0 python3 -P -m pytest -m gpu -q \
                    tests/kernels/test_kv_compact.py tests/kernels/test_window_scores.py
                run var-kernels 60 python3 bench/kernel_speed.py "${KER[@]}" \
                    --ops kv_compact,window_scores ;;
            var-bench) run var-bench 540 python3 bench/var.py "${VAR[@]}" --out "$OUT/var-bench" ;;
            cp)
                for m in wan2.1-tiny flux-tiny; do
                    cmd=(env PYTHONSAFEPATH=1 python3 -m torch.distributed.run --nproc_per_node 2
                         -m diffcache.testing.context_parallel --model "$m" --plan none)
                    for suffix in "" -ertacache -invardiff -hyca; do
                        cmd+=(--plan "$m$suffix.yaml")
                    done
                    run "cp-$m" 140 "${cmd[@]}" --ulysses 2 --out "$OUT/cp-$m" --check 1e-4
                    run "cp-ring-$m" 140 "${cmd[@]}" --ring 2 --attention-backend _native_cudnn \
                        --dtype bfloat16 --out "$OUT/cp-ring-$m" --check 5e-2
                done ;;
            *) echo "gpu.sh: unknown part '$p' (tests, kernels, dlm, dit, var, var-bench, cp)"
               exit 2 ;;
        esac
    done
done
exit $status
