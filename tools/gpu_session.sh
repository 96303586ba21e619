#!/usr/bin/env bash
# Issue 8's GPU checks and measurements as ONE device call. A session that is lent a GPU has 15
# minutes of device time, the machine's start (a minute or two) included, and no machine starts with
# under 4 left: one call of at most 10 minutes, no second. So:
#
#   bash tools/gpu_session.sh wheels   # here, once: the wheels the GPU image lacks, into .whl/ (ignored)
#   bash tools/gpu_session.sh          # there: device tool, carry [".whl"], timeout_s 600
#
# The parts, in the order of what issue 8 needs most; each has its own limit, so one that hangs or
# runs out of memory does not cost the others, and none runs past the call's deadline, 560 s after
# it starts (a part with under 30 s left is skipped, not cut):
#   kernels   the GPU tests of the Triton kernels and the CUDA graphs against float64 (the torch.compile
#             op's and the tf32x3 variants left out), 16 processes, and beside them one HOPE-340M step:
#             Triton compiles a kernel variant at its first launch, one at a time per process, and
#             these fill its cache for the benchmarks
#   340M-2K   bench_throughput, HOPE-340M (Triton kernels, CUDA graphs, bf16 operands) against
#             Transformer++-340M, 4 x 2048, with --profile: the ratio and where HOPE's step goes; if
#             HOPE gives no figure (an error, or out of memory: each layer's graphs hold their own
#             buffers), again without the CUDA graphs, and so every part after
#   1.3B-4K   1.3B at 1 x 4096 with PyTorch's allocator capped at 78.5 GiB: whether HOPE-1.3B fits an
#             80 GB H100 (this machine has 141 GB), and the ratio; run again with layer checkpointing
#             if HOPE ran out of memory without it
#   340M-4K   340M at 2 x 4096; 1.3B-2K: 1.3B at 2 x 2048 (the same tokens per step as above)
#   340M-2K-compiled  340M-2K again with every block of both models under torch.compile (--compile,
#             as train.compile): HOPE's dense work fused around its memory loops, against the
#             compiled Transformer++ (the issue's 159K tokens/s row)
#   memory-pass  one layer's memory pass per precision, with every kernel capped at 168 registers
#             (3 programs per SM instead of 2: the six writes in one wave at 340M, 4 x 2K), with the
#             state kernel's REMAT on (the default at tf32 only) and with it at 8 warps, each eager
#             Triton row profiled (bench_chunk --pass): what to work on next, and the launch options
#             to keep (hope.memory_pass.LAUNCH)
# Everything lands in $OUT (8 files at most come back): summary.txt (the device, then each part's exit
# status and the tail of its log), a log per part (340M-2K-compiled in 340M-2K.log), and results.json
# (every bench_throughput report).
#
# The image's Triton is 3.6 (this machine's venv: 3.9): `triton_resources.py` under a Triton 3.6
# venv compiles every kernel for sm_90 too (docs/PERFORMANCE.md). The image has torch, triton and
# numpy but no deepspeed and no network, hence the wheels (Python 3.12).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = wheels ]; then
    rm -rf .whl && mkdir -p .whl
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d .whl \
        hjson pydantic pydantic_core annotated_types typing_extensions typing_inspection py-cpuinfo \
        msgpack ninja psutil tqdm einops fsspec pytest pluggy iniconfig pytest-timeout pytest-xdist execnet
    ls .whl
    exit 0
fi

OUT="${OUT:-$PWD/gpu-out}"
rm -rf /tmp/bench && mkdir -p "$OUT" /tmp/bench  # results.json holds this call's reports only
DEADLINE=$((SECONDS + ${GPU_SESSION_SECONDS:-560}))
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONWARNINGS=ignore  # the image's 9.0a breaks DeepSpeed's op builder
export PYTHONUNBUFFERED=1  # a part killed at its limit keeps everything it printed
export TRITON_CACHE_DIR=/tmp/triton-cache  # shared by every part: the kernels part's compiles serve the rest
collect_results() {  # every bench_throughput report, in one file
    python3 -c 'import json, sys; print(json.dumps([json.load(open(p)) for p in sys.argv[1:]], indent=1))' \
        /tmp/bench/*.json > "$OUT/results.json" 2>/dev/null
}
trap collect_results EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"

part() {  # part NAME SECONDS COMMAND...: at most SECONDS, and never past the call's DEADLINE; its log
    # $OUT/NAME.log, or $OUT/$LOG.log when LOG is set (8 files at most come back from $OUT)
    local name=$1 log="$OUT/${LOG:-$1}.log" limit=$(( $2 < DEADLINE - SECONDS ? $2 : DEADLINE - SECONDS ))
    shift 2
    if [ "$limit" -lt 30 ]; then
        echo "== $name: skipped, $limit s left of the call's time" | tee -a "$OUT/summary.txt"
        return
    fi
    echo "== $name, at most $limit s ($*)" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 40 "$log" | tee -a "$OUT/summary.txt"
}

GRAPHS=true
bench() {  # bench SIZE SEQ MICRO_BATCH [FLAGS...]: HOPE on the Triton kernels (+ CUDA graphs), bf16 operands
    local size=$1 seq=$2 micro=$3
    shift 3
    echo python3 tools/bench_throughput.py --sizes "$size" --seqs "$seq" --micro-batch "$micro" --steps 3 --warmup 2 \
        --set memory_kernel=triton --set memory_cuda_graphs=$GRAPHS --set memory_precision=bf16 \
        --json "/tmp/bench/$size-$seq-$(date +%s%N).json" "$@"
}

# Beside the tests, one HOPE-340M step at the benchmarks' dtypes and shapes compiles the variants
# the benchmarks launch (Triton specialises on dtypes and on integers divisible by 16), so the first
# benchmark does not spend its minutes compiling them one after the other; its time means nothing.
WARM_UP="python3 tools/bench_model.py --size 340M --seq 2048 --batch 4 --device cuda --dtype bf16 --steps 1 \
    --warmup 1 --set memory_kernel=triton --set memory_precision=bf16 2>&1 | sed 's/^/[warm-up, not a time] /'"
TESTS='python3 -m pytest -v -n 16 -m gpu -k "not compiled and not tf32x3" -p no:cacheprovider --timeout 140 \
    tests/test_kernels.py tests/test_projection_step.py'
part kernels 150 bash -c "$WARM_UP & $TESTS; status=\$?; wait; exit \$status"
part 340M-2K 120 $(bench 340M 2048 4 --checkpoint-layers off --profile)
if ! grep -Eqs '^ +HOPE .* tokens/s' "$OUT/340M-2K.log"; then  # no HOPE figure: again, and on, without the graphs
    GRAPHS=false
    part 340M-2K 100 $(bench 340M 2048 4 --checkpoint-layers off --profile)
fi
part 1.3B-4K 110 $(bench 1.3B 4096 1 --checkpoint-layers off --memory-limit-gib 78.5)
if grep -Eqs '^ +HOPE +OOM' "$OUT/1.3B-4K.log"; then  # the fit is what counts here: again, checkpointing
    part 1.3B-4K 90 $(bench 1.3B 4096 1 --checkpoint-layers auto --memory-limit-gib 78.5)
fi
part 340M-4K 70 $(bench 340M 4096 2 --checkpoint-layers off)
part 1.3B-2K 70 $(bench 1.3B 2048 2 --checkpoint-layers off)
LOG=340M-2K part 340M-2K-compiled 100 $(bench 340M 2048 4 --checkpoint-layers off --compile)
part memory-pass 90 python3 tools/bench_chunk.py --size 340M --batch 4 --pass --precisions bf16,tf32 --reps 5 \
    --launch all:maxnreg=168 --launch chunk_bwd_state_kernel:REMAT=1 --launch chunk_bwd_state_kernel:num_warps=8
