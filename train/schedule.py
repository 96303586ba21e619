"""Learning-rate schedules: a pure function step -> lr, applied by the trainer every step.

    cosine:   linear warmup to the peak, then cosine decay to min_lr_ratio * peak at max_steps
    wsd:      linear warmup, constant ("stable"), then a linear decay over the last
              decay_fraction of the run to min_lr_ratio * peak (warmup-stable-decay, MiniCPM)
    constant: linear warmup, then the peak

`step` counts optimizer steps from 0; the lr of step 0 is peak / warmup_steps (never 0, so the
first step already learns).
"""
from __future__ import annotations

import math


def lr_at(step: int, peak: float, max_steps: int, schedule: str = "cosine", warmup_steps: int = 0,
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = peak * min_lr_ratio
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(max_steps * decay_fraction))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return peak + (floor - peak) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def apply_lr(optimizer, lr: float) -> None:
    """Set every param group's lr to lr times the group's `lr_scale` (1 if absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
