"""Optimizers for hope-train: AdamW, Muon and M3 as one DeepSpeed client optimizer.

The trainer calls, in this order:
    opt = build_optimizer(model, cfg.optimizer, ds_config, tokens_per_step)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    attach_engine(engine)        # tells the optimizer where ZeRO put each matrix
"""

from train.optim.build import attach_engine, build_optimizer
from train.optim.config import (GroupOverride, M3Config, MatrixConfig, OptimizerConfig,
                                OptimizerConfigError)
from train.optim.hope_optimizer import HopeOptimizer
from train.optim.layout import OptimizerSetupError

__all__ = ["OptimizerConfig", "MatrixConfig", "M3Config", "GroupOverride", "OptimizerConfigError",
           "OptimizerSetupError", "HopeOptimizer", "build_optimizer", "attach_engine"]
