"""Metrics: one line every log_every steps, RUN_DIR/metrics.jsonl, Weights & Biases, MFU.

MFU = (tokens/s per device x training FLOPs per token) / peak FLOP/s of the device. FLOPs per
token come from the model config (HopeConfig.flops_per_token: forward + backward, the memory
updates of self-modifying Titans included; the formula is in docs/TRAINING.md). The peak is the
dense bf16 tensor-core figure of known GPUs, or train.peak_tflops; on CPU MFU is not reported.
"""
from __future__ import annotations

import json
import math
import resource
import secrets
import sys
from pathlib import Path

import torch

# Dense bf16 peak (no sparsity) by device name fragment, in FLOP/s.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def duration(seconds: float) -> str:
    """42s, 5m12s, 2h13m, 3d04h: the two largest units."""
    s = int(round(seconds))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s % 60:02d}s" if minutes else f"{s}s"


def amount(n: float) -> str:
    """5,120, 512.0M, 15.0B: counts of tokens for people."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def format_line(record: dict) -> str:
    """`step 10 | loss 5.1234 | grad 1.23 | lr 3.0e-04 | tok/s 12,345 | mfu 41.2% | mem 12.3 GiB | eta 2h13m`.

    Memory is in GiB (2**30 bytes), as is `peak_mem_gb` in metrics.jsonl (a name kept for scripts).
    """
    parts = [f"step {record['step']}", f"loss {record['loss']:.4f}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad {record['grad_norm']:.3f}")
    parts += [f"lr {record['lr']:.2e}", f"tok/s {record['tokens_per_s']:,.0f}"]
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    parts.append(f"mem {record['peak_mem_gb']:.2f} GiB")
    if record.get("eta_s"):
        parts.append(f"eta {duration(record['eta_s'])}")
    if record.get("val_loss") is not None:
        each = [f"{key[len('val_loss/'):]} {value:.4f}" for key, value in record.items()
                if key.startswith("val_loss/") and value is not None]  # a mixture's datasets
        parts.append(f"val {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f}{'; ' if each else ''}{', '.join(each)})")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    if record.get("data_epoch"):  # from the first repeated sample on (a mixture: its most-read dataset)
        parts.append(f"data epoch {record['data_epoch']}")
    return " | ".join(parts)


class MetricsSink:
    """Rank 0 only: appends to metrics.jsonl, prints the line, and forwards to W&B."""

    def __init__(self, run_dir: Path, wandb_mode: str, project: str, name: str | None,
                 wandb_id: str | None, config: dict, progress_write=None):
        self.path = run_dir / "metrics.jsonl"
        self.write_line = progress_write or (lambda text: print(text, file=sys.stderr, flush=True))
        self.wandb_run = None
        self.wandb_id = wandb_id
        if wandb_mode != "disabled":
            import wandb

            self.wandb_id = wandb_id or secrets.token_hex(4)  # kept in every checkpoint
            self.wandb_run = wandb.init(mode=wandb_mode, project=project, name=name, id=self.wandb_id,
                                        resume="allow", dir=str(run_dir), config=config)

    def log(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) if k != "loss" else v
                  for k, v in record.items()}
        with open(self.path, "a") as f:  # one line per record: a crash loses at most the line in flight
            f.write(json.dumps(record) + "\n")
            f.flush()
        self.write_line(format_line(record))
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if v is not None and k != "step"},
                               step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
