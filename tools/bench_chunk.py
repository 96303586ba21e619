"""Time one chunk update (forward + backward) per implementation, at the shapes of a model size.

    python tools/bench_chunk.py --size 340M --batch 4 --device cuda

Rows: the reference closed form under autograd (hope/memory.py) and the recomputing hand-written
backward (hope/chunk_grad.py), eager, under torch.compile and as Triton kernels (CUDA only;
HOPE_TRITON_PRECISION=tf32x3 for ~fp32 matmuls). Two shapes:
the projection pass (batch x 5 memories x heads) and the main memory with its read-out
(batch x heads). A layer runs seq/C chunk steps of each, sequentially.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hope import HopeConfig  # noqa: E402
from hope import chunk_grad  # noqa: E402
from hope.memory import MemoryState, _chunk_update, activation  # noqa: E402


def inputs(lead, C, d, m, device, with_q):
    W1, W2 = 0.02 * torch.randn(*lead, d, m, device=device), torch.randn(*lead, m, d, device=device) / d ** 0.5
    k = torch.nn.functional.normalize(torch.randn(*lead, C, d, device=device), dim=-1)
    vhat = torch.randn(*lead, C, d, device=device)
    eta, la = 0.1 * torch.rand(*lead, C, device=device), -0.02 * torch.rand(*lead, C, device=device)
    q = torch.randn(*lead, C, d, device=device) if with_q else None
    xs = [t.requires_grad_(True) for t in (W1, W2, k, vhat, eta, la)]
    return xs + [None if q is None else q.requires_grad_(True)]


def time_it(fn, xs, device, reps: int) -> float:
    def once():
        outs = [o for o in fn(*xs) if o is not None]
        torch.autograd.grad(outs, [x for x in xs if x is not None], [torch.ones_like(o) for o in outs])
    for _ in range(3):
        once()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    sync()
    return (time.perf_counter() - t) / reps * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="340M")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="also the compiled op on CPU (always on CUDA)")
    args = p.parse_args()
    cfg = HopeConfig.from_yaml(ROOT / "configs/model" / f"{args.size}.yaml")
    C, d, m, H = cfg.chunk_size, cfg.head_dim, cfg.memory_width, cfg.num_heads
    act = activation(cfg.memory_activation)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'} | torch {torch.__version__} | "
          f"{args.size}: C={C} d={d} m={m} | batch {args.batch}")

    def reference(W1, W2, k, vhat, eta, la, q):
        state, o = _chunk_update(MemoryState(W1, W2), k, vhat, eta, la, None, act, cfg.dgd, q=q)
        return state.W1, state.W2, o

    def fused(backend):
        return lambda *xs: chunk_grad.fused_chunk_update(*xs, dgd=cfg.dgd, backend=backend)

    for label, lead, with_q in (("projection pass", (args.batch, len(cfg.adaptive), H), False),
                                ("main memory + read-out", (args.batch, H), True)):
        xs = inputs(lead, C, d, m, args.device, with_q)
        print(f"{label}: {int(torch.tensor(lead).prod())} memories, {cfg.num_layers} layers x "
              f"{2048 // C} chunks per 2K sequence")
        rows = [("reference (autograd)", reference), ("recompute, eager", fused("torch"))]
        if args.device == "cuda" or args.compile:
            rows.append(("recompute, compiled", fused("compiled")))
        if args.device == "cuda":
            rows.append((f"triton kernels ({chunk_grad.TRITON_PRECISION})", fused("triton")))
        for name, fn in rows:
            us = time_it(fn, xs, args.device, args.reps)
            print(f"  {name:28s} {us:9.1f} us per chunk fwd+bwd", flush=True)


if __name__ == "__main__":
    main()
