#!/usr/bin/env bash
# One GPU session's checks and measurements of the chunk kernels (issue 8), as one script that
# fits one device call (10 minutes):
#
#   bash tools/gpu_session.sh wheels      # here, once: wheels the GPU image lacks, into .whl/
#   bash tools/gpu_session.sh             # there (device tool, carry [".whl"]): one layer's memory pass
#                                         # per backend and precision (bench_chunk --pass), then the GPU
#                                         # tests in 8 processes (Triton compiles each kernel variant at
#                                         # its first launch, one at a time per process); results in $OUT
#   bash tools/gpu_session.sh throughput  # there, a second call: bench_throughput at 340M, 2K with
#                                         # Triton + CUDA graphs at tf32 and at bf16, then HOPE-1.3B at 4K,
#                                         # micro-batch 1 (issue 8's memory bound) at the faster precision
#
# The image's Triton is 3.6 (this machine's venv: 3.9): `triton_resources.py` under a Triton 3.6
# venv compiles every kernel for sm_90 too (docs/PERFORMANCE.md).
# The GPU image has torch, triton and numpy but no deepspeed and no network, hence the wheels
# (Python 3.12). Each part has its own time limit, so one that hangs or runs out of memory does not
# cost the others; every part's full output is in $OUT/<part>.log, its tail on stdout.
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($*)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.log"
}

throughput() {  # throughput MICRO_BATCH: bench_throughput's command at 340M, 2K
    echo python3 tools/bench_throughput.py --sizes 340M --seqs 2048 --micro-batch "$1" --checkpoint-layers off \
        --steps 3 --warmup 2
}
graphs() {  # the HOPE settings of the Triton path with CUDA graphs, at precision $1
    echo --set memory_kernel=triton --set memory_cuda_graphs=true --set memory_precision="$1"
}
if [ "${1:-}" = throughput ]; then
    for precision in tf32 bf16; do
        part "throughput-graphs-$precision" 170 $(throughput 4) $(graphs $precision) --json "$OUT/graphs-$precision.json"
    done
    best=$(python3 - "$OUT"/graphs-*.json <<'PY'  # the precision of the faster HOPE (tf32 if neither ran)
import json, sys
def hope_tokens_per_s(path):
    try:
        return max(r.get("tokens_per_s", 0) for r in json.load(open(path))["results"] if r["model"] == "HOPE")
    except (OSError, ValueError):
        return 0
best = max(sys.argv[1:], key=hope_tokens_per_s)
print(best.rsplit("graphs-", 1)[1].removesuffix(".json") if hope_tokens_per_s(best) else "tf32")
PY
)
    part "throughput-1.3B-4K-$best" 220 python3 tools/bench_throughput.py --sizes 1.3B --seqs 4096 --micro-batch 1 \
        --checkpoint-layers off --steps 3 --warmup 2 $(graphs "$best") --json "$OUT/1.3B-4K-$best.json"
    exit 0
fi
part memory-pass 300 python3 tools/bench_chunk.py --size 340M --batch 4 --pass --precisions tf32,bf16 --reps 5
part gpu-tests 250 python3 -m pytest -q -n 8 -m gpu tests/test_kernels.py tests/test_projection_step.py \
    -p no:cacheprovider
