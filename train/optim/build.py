"""The two calls the trainer makes: build_optimizer before deepspeed.initialize, attach_engine after."""

from __future__ import annotations

import torch
from torch import nn

from train.optim.config import OptimizerConfig, OptimizerConfigError
from train.optim.hope_optimizer import HopeOptimizer
from train.optim.param_groups import build_param_groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, ds_config: dict,
                    tokens_per_step: int) -> torch.optim.Optimizer:
    """Build the optimizer for `model`; adjusts `ds_config` in place as follows.

    * sets "zero_allow_untested_optimizer": true -- DeepSpeed refuses client optimizers it does
      not know under ZeRO otherwise; this one is tested under ZeRO 0-3 (tests/test_optim_zero.py).
    * refuses (OptimizerConfigError) ZeRO optimizer offload: our step would see CPU fragments.
    * refuses bf16/fp16 with ZeRO stage 0: DeepSpeed then wraps the optimizer in
      FP16_UnfusedOptimizer, which calls step() once at construction with zero gradients (a
      spurious weight decay, and every CMS period and bias correction off by one). Use stage >= 1
      (DeepSpeedZeroOptimizer), which costs nothing on one GPU.
    Every param group carries "lr" (= cfg.lr * lr_scale) and "lr_scale" for the trainer's schedule.
    """
    cfg.validate()
    zero = ds_config.get("zero_optimization", {}) or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none"):
        raise OptimizerConfigError(f"zero_optimization.offload_optimizer.device = {offload!r}: train.optim "
                                   f"supports no optimizer offload; expected 'none'")
    stage = int(zero.get("stage", 0))
    for half in ("bf16", "fp16"):
        if stage == 0 and (ds_config.get(half) or {}).get("enabled", False):
            raise OptimizerConfigError(f"deepspeed {half}.enabled with zero_optimization.stage = 0: train.optim "
                                       f"needs stage 1, 2 or 3 with {half} (stage 0 steps the optimizer once "
                                       f"with zero gradients at start-up)")
    if stage > 0:
        ds_config["zero_allow_untested_optimizer"] = True
    groups, infos = build_param_groups(model, cfg, tokens_per_step)
    return HopeOptimizer(groups, infos, cfg)


def attach_engine(engine) -> None:
    """Tell the optimizer inside `engine` where ZeRO put each matrix (call after deepspeed.initialize)."""
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(base, HopeOptimizer):
        raise TypeError(f"attach_engine: the engine's optimizer is {type(base).__name__}, not a HopeOptimizer")
    base.attach(engine)
