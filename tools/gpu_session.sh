#!/usr/bin/env bash
# One GPU session's checks and measurements of the chunk kernels (issue 8), as one script that
# fits one device call (10 minutes):
#
#   bash tools/gpu_session.sh wheels      # here, once: wheels the GPU image lacks, into .whl/
#   bash tools/gpu_session.sh             # there (device tool, carry [".whl"]): one layer's memory pass
#                                         # per backend and precision, and with the state kernel at 8
#                                         # warps, each profiled (bench_chunk --pass), then the GPU
#                                         # tests in 8 processes (Triton compiles each kernel variant at
#                                         # its first launch, one at a time per process); results in $OUT
#   bash tools/gpu_session.sh throughput  # there, a second call: bench_throughput at 340M, 2K with
#                                         # Triton + CUDA graphs at tf32 and at bf16, then at the faster
#                                         # precision HOPE-1.3B at 4K, micro-batch 1 (issue 8's memory
#                                         # bound), 340M at 4K and 1.3B at 2K, as many as its time allows
#   bash tools/gpu_session.sh rest bf16   # there, a third call if time is left: 340M at 4K and 1.3B at 2K
#                                         # at that precision (the pairs the second call had no time for)
#
# Between calls: rm -rf .triton-cache && cp -r <files_at>/triton-cache .triton-cache, and carry
# [".whl", ".triton-cache"]. At most 8 files come back: the logs, device.txt and the cache's parts.
#
# The image's Triton is 3.6 (this machine's venv: 3.9): `triton_resources.py` under a Triton 3.6
# venv compiles every kernel for sm_90 too (docs/PERFORMANCE.md).
# The GPU image has torch, triton and numpy but no deepspeed and no network, hence the wheels
# (Python 3.12). Each part has its own time limit, so one that hangs or runs out of memory does not
# cost the others, and no part runs past the call's deadline, 520 s after it starts (of the device's
# 600: the wheels' install and the Triton cache's restore and save need the rest, or the cache is
# lost); a part with under 30 s left is skipped. Every part's full output is in $OUT/<part>.log,
# its tail on stdout.
# Device time counts from each machine's start (a minute or two, every call that finds none warm):
# two full calls and a shorter third fit a session's 30 minutes, so the second call runs every pair
# it can and the third is for what it had no time for.
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
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONWARNINGS=ignore  # the image's 9.0a breaks DeepSpeed's op builder
export PYTHONUNBUFFERED=1  # a part killed at its limit keeps everything it printed
DEADLINE=$((SECONDS + ${GPU_SESSION_SECONDS:-520}))
# Triton compiles each kernel variant at its first launch (~1-2 minutes for all, one at a time),
# and a machine left idle for 30 s goes back bare: the compiled kernels travel from call to call.
# Each call leaves them in $OUT/triton-cache/ (parts of 15 MiB: the device returns files of 16 MiB
# at most); copy that folder to .triton-cache/ (ignored) and carry it too.
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -d .triton-cache ]; then cat .triton-cache/part-* | tar -xz -C "$TRITON_CACHE_DIR"; fi
save_triton_cache() {
    mkdir -p "$OUT/triton-cache"
    tar -cz -C "$TRITON_CACHE_DIR" . | split -b 15M -d - "$OUT/triton-cache/part-"
}
trap save_triton_cache EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

part() {  # part NAME SECONDS COMMAND...: at most SECONDS, and never past the call's DEADLINE
    local name=$1 limit=$(( $2 < DEADLINE - SECONDS ? $2 : DEADLINE - SECONDS ))
    shift 2
    if [ "$limit" -lt 30 ]; then
        echo "== $name: skipped, $limit s left of the call's time"
        return
    fi
    echo "== $name, at most $limit s ($*)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 45 "$OUT/$name.log"
}

bench() {  # bench SIZE SEQ MICRO_BATCH PRECISION: bench_throughput, HOPE on the Triton kernels + CUDA graphs
    echo python3 tools/bench_throughput.py --sizes "$1" --seqs "$2" --micro-batch "$3" --checkpoint-layers off \
        --steps 3 --warmup 2 --set memory_kernel=triton --set memory_cuda_graphs=true --set memory_precision="$4" \
        --json "/tmp/bench/$1-$2-$4.json"
}
case "${1:-}" in
throughput)
    for precision in tf32 bf16; do
        part "340M-2K-$precision" 160 $(bench 340M 2048 4 $precision)
    done
    best=$(python3 - /tmp/bench/340M-2048-*.json <<'PY'  # the precision of the faster HOPE (tf32 if neither ran)
import json, sys
def hope_tokens_per_s(path):
    try:
        return max(r.get("tokens_per_s", 0) for r in json.load(open(path))["results"] if r["model"] == "HOPE")
    except (OSError, ValueError):
        return 0
best = max(sys.argv[1:], key=hope_tokens_per_s)
print(best.removesuffix(".json").rsplit("-", 1)[1] if hope_tokens_per_s(best) else "tf32")
PY
)
    part "1.3B-4K-$best" 200 $(bench 1.3B 4096 1 "$best")
    part "340M-4K-$best" 160 $(bench 340M 4096 2 "$best")  # 8K tokens per step, like 4 x 2K
    part "1.3B-2K-$best" 160 $(bench 1.3B 2048 2 "$best")  # 4K tokens per step, like 1 x 4K
    exit 0 ;;
rest)  # rest PRECISION: the other two pairs, 8K tokens per step at 340M, 4K at 1.3B
    part "340M-4K-$2" 250 $(bench 340M 4096 2 "$2")
    part "1.3B-2K-$2" 250 $(bench 1.3B 2048 2 "$2")
    exit 0 ;;
esac
part memory-pass 300 python3 tools/bench_chunk.py --size 340M --batch 4 --pass --precisions tf32,bf16 --reps 5 \
    --warps chunk_bwd_state_kernel=8
part gpu-tests 220 python3 -m pytest -q -n 8 -m gpu tests/test_kernels.py tests/test_projection_step.py \
    -p no:cacheprovider
