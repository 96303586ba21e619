"""Benchmark train.optim: step time of AdamW / Muon / M3 and Newton-Schulz quality.

  python tools/bench_optim.py                     # CPU, CI-sized: 1 layer of each model shape
  python tools/bench_optim.py --device cuda --layers 24 --steps 20   # the H100 figure

Shapes are the matrices of one HOPE block (4 d x d projections, SwiGLU CMS level d->mlp (x2) and
mlp->d, two norms) at the 340M (d=1024, mlp=2816) and 1.3B (d=2048, mlp=5632) sizes. Timing is
optimizer.step() alone on fixed random gradients, single process. `--simulate-ranks` prints, for
W data-parallel ranks, the Newton-Schulz time of the busiest rank's share (the exchange assigns
whole matrices by cost) and the bytes each rank moves for the gather + exchange: the part of the
step that changes with the number of ranks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from train.optim import OptimizerConfig, build_optimizer
from train.optim.layout import Exchange, ns_cost
from train.optim.newton_schulz import newton_schulz

SHAPES = {"340M": (1024, 2816), "1.3B": (2048, 5632)}


class Blocks(nn.Module):
    def __init__(self, layers: int, dim: int, mlp: int):
        super().__init__()
        self.weights = nn.ParameterList()
        for _ in range(layers):
            for shape in [(dim, dim)] * 4 + [(mlp, dim), (mlp, dim), (dim, mlp), (dim,), (dim,)]:
                self.weights.append(nn.Parameter(torch.randn(shape) * 0.02))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(name: str, layers: int, dim: int, mlp: int, steps: int, device: torch.device) -> float:
    """Median seconds of one optimizer.step()."""
    torch.manual_seed(0)
    model = Blocks(layers, dim, mlp).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = build_optimizer(model, OptimizerConfig(name=name), {}, tokens_per_step=1)
    opt.step()  # allocate state
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ns_quality(dim: int, mlp: int, device: torch.device) -> list[str]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in [(dim, dim), (dim, mlp)]:
        # Gaussian (the usual Muon benchmark; a square one has singular values near 0, which
        # 5 steps cannot lift) and a gradient-like input (rank 64 plus 10% noise).
        gaussian = torch.randn(shape, device=device, generator=gen)
        low_rank = torch.randn(shape[0], 64, device=device, generator=gen) @ torch.randn(64, shape[1], device=device, generator=gen)
        low_rank = low_rank / low_rank.std() + 0.1 * torch.randn(shape, device=device, generator=gen)
        for kind, g in (("gaussian", gaussian), ("rank64+noise", low_rank)):
          for dtype in (torch.float32, torch.bfloat16):
            s = torch.linalg.svdvals(newton_schulz(g, 5, dtype).double().cpu())
            dev = (s - 1).abs()
            inside = ((s > 0.7) & (s < 1.3)).double().mean().item()
            rows.append(f"  {str(shape):14s} {kind:13s} {str(dtype).split('.')[-1]:9s} max|s-1| {dev.max():.3f}  "
                        f"mean|s-1| {dev.mean():.3f}  in [0.7,1.3]: {inside:6.1%}  s range [{s.min():.3f}, {s.max():.3f}]")
    return rows


def simulate_ranks(layers: int, dim: int, mlp: int, world_sizes: list[int], device: torch.device,
                   inputs: int, outputs: int) -> list[str]:
    shapes = [(dim, dim)] * 4 + [(mlp, dim), (mlp, dim), (dim, mlp)]
    shapes = shapes * layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mats = {s: torch.randn(s, device=device) for s in set(shapes)}
    per_shape = {}
    for s, m in mats.items():
        newton_schulz(m, 5, dtype)
        _sync(device)
        start = time.perf_counter()
        newton_schulz(m, 5, dtype)
        _sync(device)
        per_shape[s] = time.perf_counter() - start
    numel = sum(a * b for a, b in shapes)
    rows = []
    for world in world_sizes:
        owners = Exchange.assign([ns_cost(s) for s in shapes], world).owners
        busiest = max(sum(per_shape[s] for s, o in zip(shapes, owners) if o == r) for r in range(world))
        gather = 0 if world == 1 else inputs * numel * 4 * (world - 1) / world
        exchange = 0 if world == 1 else 2 * outputs * numel * 4 * (world - 1) / world
        rows.append(f"  W={world:4d}  NS busiest rank {busiest * 1e3:9.1f} ms   gather {gather / 2**20:9.1f} MiB"
                    f"   exchange {exchange / 2**20:9.1f} MiB per rank")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--sizes", default="340M,1.3B")
    parser.add_argument("--simulate-ranks", default="1,2,8,64")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ranks = [int(w) for w in args.simulate_ranks.split(",") if w]
    for size in args.sizes.split(","):
        dim, mlp = SHAPES[size]
        print(f"== {size}: d={dim}, mlp={mlp}, {args.layers} layer(s), device {device}")
        t = {name: time_steps(name, args.layers, dim, mlp, args.steps, device) for name in ("adamw", "muon", "m3")}
        print("  step time: " + "  ".join(f"{n} {v * 1e3:.1f} ms" for n, v in t.items())
              + f"   ratio muon/adamw {t['muon'] / t['adamw']:.1f}  m3/adamw {t['m3'] / t['adamw']:.1f}"
              + f"  m3/muon {t['m3'] / t['muon']:.2f}")
        if ranks:
            print("  rank split, muon (1 input, 1 output per matrix):")
            for row in simulate_ranks(args.layers, dim, mlp, ranks, device, 1, 1):
                print(row)
            print("  rank split, m3 (3 inputs, 1 output; +1 each on slow steps):")
            for row in simulate_ranks(args.layers, dim, mlp, ranks, device, 3, 1):
                print(row)
        if not args.skip_quality:
            print("  Newton-Schulz quality (5 quintic steps), singular values of the output:")
            for row in ns_quality(dim, mlp, device):
                print(row)


if __name__ == "__main__":
    main()
