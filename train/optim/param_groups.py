"""Sort a model's parameters into optimizer groups: which path (Newton-Schulz or AdamW), which
CMS update period, which lr scale and weight decay.

Rules (from the model contract; the trainer knows nothing of HOPE):
  * 2-D parameters are matrices, orthogonalised by Newton-Schulz under muon/m3 -- except the
    token embedding and the LM head (names containing "embed" or "lm_head"), which take AdamW.
  * 3-D parameters are stacks of per-head matrices [heads, rows, cols]: each slice is orthogonalised.
  * 1-D parameters (norms, biases, per-head scalars) take AdamW, without weight decay by default.
  * A parameter tagged `update_period_tokens: int > 0` (a CMS level) is updated once per that many
    training tokens, i.e. every period/tokens_per_step optimizer steps, with summed gradients.
Each group is homogeneous (one path, one period), which is what lets ZeRO's flat partitions of a
group be treated as one unit.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from train.optim.config import OptimizerConfig, OptimizerConfigError

NOT_MATRIX_NAME_PARTS = ("embed", "lm_head")


@dataclass(frozen=True)
class ParamInfo:
    """What the optimizer needs to know about a parameter once ZeRO has hidden its shape."""

    name: str
    shape: tuple[int, ...]
    is_matrix: bool  # takes the Newton-Schulz path under muon/m3
    period_steps: int


def is_matrix_param(name: str, param: torch.Tensor) -> bool:
    if param.ndim not in (2, 3):
        return False
    return not any(part in name for part in NOT_MATRIX_NAME_PARTS)


def period_in_steps(name: str, param: torch.Tensor, tokens_per_step: int) -> int:
    """Convert a parameter's `update_period_tokens` tag into optimizer steps (1 = every step)."""
    period_tokens = int(getattr(param, "update_period_tokens", 0) or 0)
    if period_tokens < 0:
        raise OptimizerConfigError(f"parameter {name}: update_period_tokens = {period_tokens}: expected >= 0")
    if period_tokens == 0:
        return 1
    if tokens_per_step <= 0:
        raise OptimizerConfigError(f"tokens_per_step = {tokens_per_step}: expected > 0")
    if period_tokens % tokens_per_step != 0:
        raise OptimizerConfigError(
            f"parameter {name}: update_period_tokens = {period_tokens} is not a multiple of the "
            f"{tokens_per_step} tokens per optimizer step (global batch x sequence length); "
            f"choose a period or batch size that divides evenly")
    return period_tokens // tokens_per_step


def _override_for(name: str, cfg: OptimizerConfig):
    """The first `groups:` entry whose glob matches the name, or None."""
    for override in cfg.groups:
        if fnmatch.fnmatchcase(name, override.match):
            return override
    return None


def build_param_groups(model: nn.Module, cfg: OptimizerConfig,
                       tokens_per_step: int) -> tuple[list[dict], dict[int, ParamInfo]]:
    """Return (param groups for HopeOptimizer, ParamInfo keyed by id(param))."""
    uses_matrices = cfg.name in ("muon", "m3")
    groups: dict[tuple, dict] = {}
    infos: dict[int, ParamInfo] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if getattr(param, "use_muon", False):
            # DeepSpeed would then run its own Muon inside ZeRO on top of ours.
            raise OptimizerConfigError(f"parameter {name} carries use_muon=True; train.optim does its own "
                                       f"Newton-Schulz, remove the flag")
        if param.ndim > 3 and uses_matrices:
            raise OptimizerConfigError(f"parameter {name} has shape {tuple(param.shape)}: {cfg.name} handles "
                                       f"1-D, 2-D and 3-D [heads, rows, cols] parameters only")
        is_matrix = uses_matrices and is_matrix_param(name, param)
        period = period_in_steps(name, param, tokens_per_step)
        algo = cfg.name if is_matrix else "adamw"
        if is_matrix:
            lr_scale, weight_decay = cfg.matrix.lr_scale, cfg.weight_decay
        else:
            lr_scale = cfg.adamw_lr_scale if uses_matrices else 1.0
            weight_decay = cfg.weight_decay if (param.ndim >= 2 or cfg.decay_1d) else 0.0
        override = _override_for(name, cfg)
        if override is not None:
            lr_scale = override.lr_scale if override.lr_scale is not None else lr_scale
            weight_decay = override.weight_decay if override.weight_decay is not None else weight_decay
        key = (algo, period, lr_scale, weight_decay)
        if key not in groups:
            groups[key] = {"params": [], "algo": algo, "period": period, "lr_scale": lr_scale,
                           "lr": cfg.lr * lr_scale, "weight_decay": weight_decay}
        groups[key]["params"].append(param)
        infos[id(param)] = ParamInfo(name, tuple(param.shape), is_matrix, period)
    if not groups:
        raise OptimizerConfigError("the model has no trainable parameters")
    return list(groups.values()), infos
