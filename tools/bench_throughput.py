"""HOPE vs Transformer++ tokens/s through the real training step: DeepSpeed ZeRO-2 engine,
forward, backward and optimizer step, side by side in one process.

    python tools/bench_throughput.py --quick                          # CPU, tiny models, < 1 minute
    python tools/bench_throughput.py --sizes 340M,1.3B --seqs 2048,4096 --json runs/throughput.json

For every (size, seq) pair it builds HOPE (configs/model/SIZE.yaml) and Transformer++
(configs/model/transformer-SIZE.yaml) in turn, each in its own engine on the same random tokens,
times --steps steps after --warmup steps (device synchronised around each step) and prints
params, tokens/s, ms/step, MFU (HopeConfig.flops_per_token, docs/FLOPS.md) and peak memory.
A CUDA out-of-memory error is reported as OOM for that model and the run goes on. The last line
is `ratio HOPE/Transformer++: X.XX`, the smallest ratio over the pairs (an OOM of HOPE counts 0).
CUDA: bf16, ZeRO-2, fused AdamW. CPU: fp32, ZeRO-2 over gloo (one process).

--profile adds one step of each model under torch.profiler: its GPU kernels, heaviest first, and
how busy they kept the GPU. --memory-limit-gib caps PyTorch's allocator (CUDA graphs' pools
included), so a larger GPU tells whether a run fits a smaller one: 78.5 for an 80 GB H100, whose
79.6 GiB (81,559 MiB) hold the CUDA context too. --compile compiles every block of both models
as hope-train's `train.compile` does (the warmup steps compile; HOPE's memory loops stay eager).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # the project, and bench_model when imported by a test
from bench_model import device_name, format_breakdown, kernel_breakdown, parse_overrides, sync  # noqa: E402
from hope import HopeConfig, HopeForCausalLM  # noqa: E402
from train.compile import compile_blocks  # noqa: E402
from train.distributed import init_world  # noqa: E402
from train.metrics import device_peak_flops  # noqa: E402

CONFIGS = ROOT / "configs" / "model"
# Default tokens per step (micro-batch = this // seq): 8 x 2K for 340M like configs/train/transformer-340M-h100.yaml,
# half that for the larger models so HOPE-1.3B at 4K has a chance to fit one 80 GB GPU.
TOKENS_PER_STEP = {"tiny": 256, "340M": 16384, "760M": 8192, "1.3B": 8192}
QUICK = dict(sizes="tiny", seqs="128", steps=2, warmup=1)
PROFILE_ROWS = 25  # kernels kept per profiled step (JSON); the printout shows the first 12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="comma-separated sizes: tiny, 340M, 760M, 1.3B (default 340M,1.3B)")
    parser.add_argument("--seqs", help="comma-separated sequence lengths (default 2048,4096)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: TOKENS_PER_STEP[size] // seq)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the HOPE config (e.g. chunk_size=128); applied last")
    parser.add_argument("--checkpoint-layers", choices=("auto", "on", "off"), default="auto",
                        help="per-layer activation checkpointing; auto: HOPE on CUDA only, never Transformer++")
    parser.add_argument("--optimizer", choices=("fused-adamw", "adamw", "muon", "m3"), default="fused-adamw",
                        help="fused-adamw: torch.optim.AdamW(fused=True); others: train.optim as hope-train uses it")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every block of both models, as train.compile does (train/compile.py)")
    parser.add_argument("--profile", action="store_true", help="one more step of each model under torch.profiler")
    parser.add_argument("--memory-limit-gib", type=float,
                        help="cap PyTorch's CUDA allocator at this many GiB (78.5: an 80 GB GPU); CUDA only")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny vs transformer-tiny, seq 128, 2 steps")
    parser.add_argument("--json", type=Path, help="write every result to this file")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else dict(sizes="340M,1.3B", seqs="2048,4096", steps=5, warmup=2)
    for key, value in defaults.items():  # explicit flags win over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory_limit_gib is not None and args.memory_limit_gib <= 0:
        parser.error(f"--memory-limit-gib {args.memory_limit_gib}: expected a size in GiB above 0")
    args.sizes = args.sizes.split(",")
    args.seqs = [int(s) for s in args.seqs.split(",")]
    return args


def ds_config(micro_batch: int, device: torch.device) -> dict:
    """ZeRO-2 as in configs/train/340M-h100.yaml; bf16 only on CUDA (CPU bf16 matmuls are slow)."""
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "bf16": {"enabled": device.type == "cuda"},
            "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def client_optimizer(model: torch.nn.Module, name: str, config: dict, tokens: int) -> torch.optim.Optimizer:
    if name == "fused-adamw":  # the usual LLM recipe: no weight decay on gains and biases
        matrices = [p for p in model.parameters() if p.ndim >= 2]
        vectors = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)
    from train.optim import OptimizerConfig, build_optimizer

    return build_optimizer(model, OptimizerConfig(name=name), config, tokens)


def model_configs(size: str, args: argparse.Namespace, device: torch.device) -> dict[str, HopeConfig]:
    def checkpointing(is_hope: bool) -> bool:
        if args.checkpoint_layers == "auto":  # HOPE's chunk loop graph does not fit 80 GB without it
            return is_hope and device.type == "cuda"
        return args.checkpoint_layers == "on"

    return {
        "HOPE": HopeConfig.from_yaml(CONFIGS / f"{size}.yaml", gradient_checkpointing_layers=checkpointing(True),
                                     **parse_overrides(args.set)),
        "Transformer++": HopeConfig.from_yaml(CONFIGS / f"transformer-{size}.yaml",
                                              gradient_checkpointing_layers=checkpointing(False)),
    }


def measure(name: str, config: HopeConfig, seq: int, micro: int, args, device: torch.device) -> dict:
    """Build the engine, run warmup + timed steps; returns the figures of one model."""
    import deepspeed

    torch.manual_seed(0)  # both models see the same tokens
    ids = torch.randint(0, config.vocab_size, (micro, seq + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    model = HopeForCausalLM(config)
    if args.compile:  # the warmup steps compile (HOPE's memory loops stay eager: train/compile.py)
        compile_blocks(model)
    n_params = sum(p.numel() for p in model.parameters())
    ds = ds_config(micro, device)
    optimizer = client_optimizer(model, args.optimizer, ds, micro * seq)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    if args.optimizer != "fused-adamw":
        from train.optim import attach_engine

        attach_engine(engine)

    def step() -> torch.Tensor:
        loss = engine(inputs, labels=targets, shift_labels=False).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_s = micro * seq / seconds
    flops = config.flops_per_token(seq)
    peak = device_peak_flops(device, None)
    profile = None
    if args.profile:  # after the timed steps, so the profiler's overhead is in none of them
        try:  # a profiler that fails (CUPTI, graph replays) costs the profile, not the figures above
            us, kernels = kernel_breakdown(step, device)
            profile = {"ms": us / 1e3, "gpu": device.type == "cuda",
                       "kernels": [list(row) for row in kernels[:PROFILE_ROWS]]}
        except Exception as e:
            profile = {"ms": 0.0, "gpu": device.type == "cuda", "kernels": [],
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return {"status": "ok", "params": n_params, "tokens_per_s": tokens_per_s, "ms_per_step": seconds * 1e3,
            "profile": profile,
            "step_ms": [t * 1e3 for t in times], "flops_per_token": flops,
            "mfu": tokens_per_s * flops / peak if peak else None, "loss": loss.item(),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            # CUDA graphs replay in memory their capture freed back to their pool: allocated, not reserved,
            # misses it, so whether a run fits the GPU is the reserved peak
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None}


def limit_memory(gib: float | None, device: torch.device) -> tuple[float | None, str | None]:
    """Caps the CUDA allocator at `gib`: (the cap applied or None, the line that says so or None)."""
    if gib is None:
        return None, None
    if device.type != "cuda":
        return None, "memory limit: --memory-limit-gib applies to CUDA only, ignored on CPU"
    total = torch.cuda.get_device_properties(device).total_memory
    if gib * 2**30 > total:
        raise SystemExit(f"--memory-limit-gib {gib}: expected at most this GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)
    return gib, f"memory limit: PyTorch's allocator capped at {gib:.1f} GiB of the GPU's {total / 2**30:.1f}"


def free_memory(device: torch.device) -> None:
    gc.collect()  # DeepSpeed's hooks make reference cycles: the engine goes only with a collection
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_model(name: str, config: HopeConfig, size: str, seq: int, micro: int, args, device: torch.device) -> dict:
    result = {"model": name, "size": size, "seq": seq, "micro_batch": micro,
              "checkpointing": config.gradient_checkpointing_layers, "compiled": args.compile,
              # how HOPE's chunk update ran (docs/DESIGN_CHOICES.md #17)
              "memory_kernel": config.resolved_memory_kernel(device.type == "cuda", training=True)
              if config.mixer == "titans" else None}
    free_memory(device)
    try:
        result.update(measure(name, config, seq, micro, args, device))
    except torch.cuda.OutOfMemoryError:
        result["status"] = "OOM"
    free_memory(device)  # outside the except block: the traceback no longer holds the engine
    return result


def format_result(r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['model']:14s} {r['status']}"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = (f"{r['peak_mem_gib']:.1f} GiB (reserved {r['peak_reserved_gib']:.1f})" if r["peak_mem_gib"] is not None
           else "n/a")  # both figures on CUDA, neither on CPU
    notes = [n for n, on in (("layer checkpointing", r["checkpointing"]), ("compiled", r["compiled"])) if on]
    if r.get("memory_kernel"):
        notes.append(f"memory_kernel {r['memory_kernel']}")
    line = (f"  {r['model']:14s} {r['params'] / 1e6:8.1f}M params {r['tokens_per_s']:12,.0f} tokens/s "
            f"{r['ms_per_step']:10.1f} ms/step  MFU {mfu:>6s}  peak mem {mem}  loss {r['loss']:.3f}"
            + (f"  ({', '.join(notes)})" if notes else ""))
    if (r.get("profile") or {}).get("error"):
        line += f"\n    profile failed: {r['profile']['error']}"
    elif r.get("profile"):  # one step under the profiler: its own wall time, the profiler's overhead in it
        line += "\n" + "\n".join(format_breakdown(r["profile"]["ms"] * 1e3, r["profile"]["kernels"],
                                                   on_cuda=r["profile"]["gpu"], top=12))
    return line


def pair_ratio(hope: dict, transformer: dict) -> tuple[float | None, str]:
    """HOPE/Transformer++ tokens/s; an OOM of HOPE is 0, an OOM of Transformer++ leaves no ratio."""
    if hope["status"] == "OOM":
        return 0.0, "0.00 (HOPE OOM, counted as 0.00)"
    if transformer["status"] == "OOM":
        return None, "n/a (Transformer++ OOM, not counted)"
    ratio = hope["tokens_per_s"] / transformer["tokens_per_s"]
    return ratio, f"{ratio:.2f}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's per-engine INFO lines would bury the results
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 memory math may use TF32 tensor cores
    memory_limit, memory_limit_line = limit_memory(args.memory_limit_gib, device)
    init_world(device)  # a world of one: DeepSpeed's ZeRO optimizer needs a process group
    command = "python tools/bench_throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = {"device": device_name(device), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
              "dtype": "bf16" if use_cuda else "fp32", "zero_stage": 2, "optimizer": args.optimizer,
              "steps": args.steps, "warmup": args.warmup, "memory_limit_gib": memory_limit,
              "results": [], "pairs": []}
    print(f"device: {report['device']} | torch {report['torch']} | deepspeed {report['deepspeed']} | "
          f"{report['dtype']} | ZeRO-2 | {args.optimizer} | {report['date']}")
    if memory_limit_line:
        print(memory_limit_line)
    print(f"command: {command}", flush=True)
    for size in args.sizes:
        configs = model_configs(size, args, device)
        for seq in args.seqs:
            micro = args.micro_batch or max(1, TOKENS_PER_STEP.get(size, 16384) // seq)
            print(f"{size} seq {seq} micro-batch {micro} ({micro * seq:,} tokens/step), "
                  f"{args.warmup} warmup + {args.steps} timed steps", flush=True)
            pair = {}
            for name, config in configs.items():
                r = pair[name] = run_model(name, config, size, seq, micro, args, device)
                report["results"].append(r)
                print(format_result(r), flush=True)
            ratio, text = pair_ratio(pair["HOPE"], pair["Transformer++"])
            report["pairs"].append({"size": size, "seq": seq, "micro_batch": micro, "ratio": ratio})
            print(f"  {size} seq {seq}: HOPE/Transformer++ {text}", flush=True)
    ratios = [p["ratio"] for p in report["pairs"] if p["ratio"] is not None]
    report["ratio"] = min(ratios) if ratios else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"ratio HOPE/Transformer++: {report['ratio']:.2f}" if ratios else "ratio HOPE/Transformer++: n/a")
    return report


if __name__ == "__main__":
    main()
