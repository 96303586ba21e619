#!/usr/bin/env bash
# hope-train under DeepSpeed's launcher.
#
#   launch/train.sh [--nproc N] [--hostfile FILE] [--cpu] [--master-port P] CONFIG.yaml --run-dir DIR [--set k=v ...]
#
#   one node, all its GPUs:   launch/train.sh configs/train/340M.yaml --run-dir runs/340M
#   several nodes:            launch/train.sh --hostfile launch/hostfile.example configs/... --run-dir ...
#   CPU (gloo), N processes:  launch/train.sh --cpu --nproc 2 configs/train/tiny-cpu.yaml --run-dir runs/tiny
#
# --nproc is processes per node (default: every GPU, or 1 on CPU). With a hostfile the slots
# come from the file, and the variables listed in .deepspeed_env (KEY=VALUE lines, in the
# current directory or $HOME) are exported on every node by the launcher.
# Run it again with the same --run-dir to resume from the latest checkpoint.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPROC="" HOSTFILE="" CPU=0 PORT="${MASTER_PORT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc) NPROC="$2"; shift 2 ;;
        --hostfile) HOSTFILE="$2"; shift 2 ;;
        --cpu) CPU=1; shift ;;
        --master-port) PORT="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
USER_NPROC="$NPROC"
if [ $# -lt 1 ]; then
    echo "usage: launch/train.sh [--nproc N] [--hostfile FILE] [--cpu] CONFIG.yaml --run-dir DIR [--set k=v ...]" >&2
    exit 2
fi
if [ -n "$HOSTFILE" ] && [ ! -f "$HOSTFILE" ]; then
    echo "launch/train.sh: hostfile $HOSTFILE: no such file" >&2
    exit 2
fi
if [ "$CPU" = 1 ] || ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu  # gloo backend; DeepSpeed builds a small shm op with g++ on first use
    NPROC="${NPROC:-1}"
    # Without this each rank would spread over every core and they would fight for them.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
else
    NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
fi
# A random free-ish port, so that two runs on one machine do not collide.
PORT="${PORT:-$(( 20000 + RANDOM % 20000 ))}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
if [ -n "$HOSTFILE" ]; then
    # Several nodes: DeepSpeed's runner reaches every host of the file (pdsh/ssh) and exports
    # the KEY=VALUE lines of .deepspeed_env there.
    ARGS=(--master_port "$PORT" --hostfile "$HOSTFILE")
    [ -n "$USER_NPROC" ] && ARGS+=(--num_gpus "$USER_NPROC")  # else: the slots of the hostfile
    exec "$PYTHON" -m deepspeed.launcher.runner "${ARGS[@]}" --module train.cli "$@"
fi
# One node: DeepSpeed's per-node launcher directly (what the runner would start, a few seconds sooner).
RANKS="$(seq -s, 0 $((NPROC - 1)))"
WORLD_INFO="$(printf '{"localhost": [%s]}' "$RANKS" | base64 | tr -d '\n')"
exec "$PYTHON" -u -m deepspeed.launcher.launch --world_info="$WORLD_INFO" --master_addr=127.0.0.1 \
    --master_port="$PORT" --module train.cli "$@"
