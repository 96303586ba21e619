"""Profile one forward+backward of HOPE (few layers of a shipped size) and list the costliest ops.

    python tools/profile_hope.py --size 340M --layers 2 --seq 2048 --batch 4 --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hope import HopeConfig, HopeForCausalLM  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="340M")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="HOPE config override")
    p.add_argument("--no-profile", action="store_true", help="only time the step")
    args = p.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in (args.size, f"transformer-{args.size}"):
        cfg = HopeConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs/model" / f"{name}.yaml",
                                   num_layers=args.layers, **({} if "transformer" in name else
                                                              {"chunk_size": args.chunk, "projection_chunk_size": args.chunk, **overrides}))
        model = HopeForCausalLM(cfg).to(device=device, dtype=dtype)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)

        def step():
            model(ids, labels=ids).loss.backward()

        for _ in range(2):
            step()
        torch.cuda.synchronize() if device.type == "cuda" else None
        t = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize() if device.type == "cuda" else None
        dt = (time.perf_counter() - t) / 3
        print(f"{name} x {args.layers} layers: {dt * 1e3:.1f} ms/step, {args.batch * args.seq / dt:,.0f} tokens/s", flush=True)
        if "transformer" not in name and not args.no_profile:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                step()
                torch.cuda.synchronize() if device.type == "cuda" else None
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=50), flush=True)


if __name__ == "__main__":
    main()
