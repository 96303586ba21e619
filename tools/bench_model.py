"""Forward+backward tokens/s of HOPE against the Transformer++ of the same size, in one run.

    python tools/bench_model.py --size tiny                      # CPU, seconds
    python tools/bench_model.py --size 340M --seq 2048 --batch 8 --device cuda --dtype bf16

Prints one line per model (tokens/s, ms/step, MFU where the peak is known, peak memory) and
ends with `ratio HOPE/Transformer++: X.XX`. Both models see the same random tokens; each is
warmed up, then timed over --steps steps with the device synchronised around the region.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hope import HopeConfig, HopeForCausalLM  # noqa: E402
from train.metrics import device_peak_flops  # noqa: E402  (dense bf16 datasheet peaks, for MFU)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    return device_peak_flops(device, None) if dtype == torch.bfloat16 else None


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_breakdown(run, device: torch.device | str, top: int = 10) -> tuple[float, list[tuple[str, int, float]]]:
    """(us, [(name, launches, us)]) of one call of `run` under torch.profiler, heaviest first: the
    GPU kernels on CUDA (their sum against the wall time tells whether the work waits on the host
    or on its kernels, and which kernel to work on); on CPU the heaviest ops (a check of the code)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        if on_cuda:
            torch.cuda.synchronize()
        us = (time.perf_counter() - start) * 1e6
    kind = DeviceType.CUDA if on_cuda else DeviceType.CPU
    rows = sorted(((e.key, e.count, e.self_device_time_total if on_cuda else e.self_cpu_time_total)
                   for e in prof.key_averages() if e.device_type == kind), key=lambda row: -row[2])
    return us, rows if on_cuda else rows[:top]


def format_breakdown(us: float, rows: list[tuple[str, int, float]], on_cuda: bool, top: int | None = None,
                     indent: str = "    ") -> list[str]:
    """kernel_breakdown's rows as lines: the busy time against the wall time, then one line a kernel."""
    busy = sum(row[2] for row in rows)
    what = "GPU kernels" if on_cuda else "CPU ops (the heaviest)"
    lines = [f"{indent}{what}: {busy / 1e3:.2f} ms of {us / 1e3:.2f} ms, {100 * busy / us:.0f}% busy"]
    for kernel, launches, kernel_us in rows[:top]:
        lines.append(f"{indent}  {kernel[:48]:48s} {launches:6d} x {kernel_us / launches:8.1f} us = "
                     f"{kernel_us / 1e3:8.2f} ms  {100 * kernel_us / max(busy, 1e-9):5.1f}%")
    return lines


def parse_overrides(items: list[str]) -> dict:
    """`--set key=value` items -> {key: value}, each value parsed as a YAML scalar."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    return overrides


def time_model(config: HopeConfig, args, device, dtype) -> dict:
    torch.manual_seed(0)
    model = HopeForCausalLM(config).to(device=device, dtype=dtype).train()
    n_params = sum(p.numel() for p in model.parameters())
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step():
        loss = step_fn(inputs, labels=targets, shift_labels=False).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = args.batch * args.seq
    result = {"params": n_params, "ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
              "flops_per_token": config.flops_per_token(args.seq)}
    peak = peak_flops(device, dtype)
    result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / peak if peak else None
    result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, step_fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", help="config suffix: tiny, 340M, 760M, 1.3B")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--compile-memory", action="store_true",
                        help="torch.compile HOPE's chunk update only (hope.memory.enable_compile)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the HOPE config (e.g. chunk_size=128)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 memory math may use TF32 tensor cores
    if args.compile_memory:
        from hope.memory import enable_compile
        enable_compile(True)
    overrides = parse_overrides(args.set)
    configs = {
        "HOPE": HopeConfig.from_yaml(CONFIGS / f"{args.size}.yaml", **overrides),
        "Transformer++": HopeConfig.from_yaml(CONFIGS / f"transformer-{args.size}.yaml"),
    }
    print(f"device: {device_name(device)} | torch {torch.__version__} | dtype {args.dtype} | "
          f"seq {args.seq} x batch {args.batch} | compile {args.compile} | compile memory {args.compile_memory}")
    print(f"command: python tools/bench_model.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    results = {}
    for name, config in configs.items():
        r = results[name] = time_model(config, args, device, dtype)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gb']:.1f} GiB" if r["peak_mem_gb"] is not None else "n/a"
        print(f"{name:14s} {r['params'] / 1e6:8.1f}M params  {r['tokens_per_s']:12,.0f} tokens/s  "
              f"{r['ms']:9.1f} ms/step  MFU {mfu:>6s}  peak mem {mem}", flush=True)
    ratio = results["HOPE"]["tokens_per_s"] / results["Transformer++"]["tokens_per_s"]
    print(f"ratio HOPE/Transformer++: {ratio:.2f}")
    return results


if __name__ == "__main__":
    main()
