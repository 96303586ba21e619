"""The `optimizer:` section of a training YAML, as typed dataclasses.

Every field has a default and the reason for it (the Nested Learning paper gives no M3
hyperparameters, so the defaults come from Muon / Moonlight / AdaMuon practice). The trainer's
loader fills these from YAML; `validate()` rejects bad values with one message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPTIMIZER_NAMES = ("adamw", "muon", "m3")
NS_DTYPES = ("auto", "float32", "bfloat16")


class OptimizerConfigError(ValueError):
    """A value in the `optimizer:` section (or a parameter tag) is not what we expect."""


@dataclass
class MatrixConfig:
    """Settings of the Newton-Schulz path (2-D matrices and 3-D per-head stacks), muon and m3."""

    # Multiplies the base lr for matrices. 1.0 because the update is rescaled to `update_rms`,
    # which puts it on AdamW's scale (Moonlight, arXiv:2502.16982), so one lr serves both paths.
    lr_scale: float = 1.0
    # Fast momentum (M1). 0.95 is Muon's default.
    momentum: float = 0.95
    # Nesterov look-ahead for muon (orthogonalise lerp(g, M1, momentum)); Muon's default.
    nesterov: bool = True
    # Newton-Schulz iterations. 5 with the quintic coefficients lands singular values in ~[0.7, 1.2].
    ns_steps: int = 5
    # "auto": bf16 on CUDA (Muon practice, tensor cores), fp32 elsewhere (CPU bf16 matmul is slow).
    ns_dtype: str = "auto"
    # RMS of each matrix's update before lr. 0.2 matches AdamW's typical update RMS (Moonlight).
    update_rms: float = 0.2


@dataclass
class M3Config:
    """The extra state of M3 (HOPE_SPEC.md section 8): second moment and slow momentum."""

    # Second moment V of the gradient (EMA, bias-corrected). 0.95 as in AdaMuon / Adam-mini
    # practice for LLMs; the paper prints a running sum, which never forgets.
    beta_v: float = 0.95
    # Slow momentum M2 decay, applied once per `slow_every` steps to the summed gradient.
    slow_beta: float = 0.9
    # f in Algorithm 1: the slow momentum updates every f optimizer steps. 16 ~ a CMS-like
    # slower clock that still updates a few hundred times in a short run.
    slow_every: int = 16
    # alpha: weight of the slow orthogonalised momentum O2 next to O1.
    slow_alpha: float = 0.5


@dataclass
class GroupOverride:
    """Per-group settings: parameters whose name matches the glob `match` (fnmatch) get these."""

    match: str = ""
    lr_scale: float | None = None
    weight_decay: float | None = None


@dataclass
class OptimizerConfig:
    # "adamw" everywhere, or "muon" / "m3" for matrices with an AdamW path for the rest.
    name: str = "adamw"
    # Base lr; the trainer's schedule multiplies it into group["lr"] (times group["lr_scale"]).
    lr: float = 3e-4
    # Decoupled weight decay. 0.1 is the usual LLM pretraining value (GPT-3, OLMo, Llama).
    weight_decay: float = 0.1
    # AdamW betas. 0.95 for beta2 is the LLM-pretraining choice (stabler than 0.999 at scale).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Norm gains, biases and other 1-D parameters get no weight decay (standard practice).
    decay_1d: bool = False
    # Multiplies the base lr for the AdamW path when name is muon or m3.
    adamw_lr_scale: float = 1.0
    matrix: MatrixConfig = field(default_factory=MatrixConfig)
    m3: M3Config = field(default_factory=M3Config)
    groups: list[GroupOverride] = field(default_factory=list)

    def validate(self) -> None:
        """Raise OptimizerConfigError naming the first field that is out of range."""

        def bad(key: str, value, expected: str) -> OptimizerConfigError:
            return OptimizerConfigError(f"optimizer.{key} = {value!r}: expected {expected}")

        if self.name not in OPTIMIZER_NAMES:
            raise bad("name", self.name, f"one of {', '.join(OPTIMIZER_NAMES)}")
        if not self.lr > 0:
            raise bad("lr", self.lr, "a number > 0")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", self.weight_decay, "a number >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", self.betas, "two numbers in [0, 1)")
        if not self.eps > 0:
            raise bad("eps", self.eps, "a number > 0")
        if not self.adamw_lr_scale > 0:
            raise bad("adamw_lr_scale", self.adamw_lr_scale, "a number > 0")
        m = self.matrix
        if not m.lr_scale > 0:
            raise bad("matrix.lr_scale", m.lr_scale, "a number > 0")
        if not 0 <= m.momentum < 1:
            raise bad("matrix.momentum", m.momentum, "a number in [0, 1)")
        if not m.ns_steps >= 1:
            raise bad("matrix.ns_steps", m.ns_steps, "an integer >= 1")
        if m.ns_dtype not in NS_DTYPES:
            raise bad("matrix.ns_dtype", m.ns_dtype, f"one of {', '.join(NS_DTYPES)}")
        if not m.update_rms > 0:
            raise bad("matrix.update_rms", m.update_rms, "a number > 0")
        s = self.m3
        if not 0 <= s.beta_v < 1:
            raise bad("m3.beta_v", s.beta_v, "a number in [0, 1)")
        if not 0 <= s.slow_beta < 1:
            raise bad("m3.slow_beta", s.slow_beta, "a number in [0, 1)")
        if not s.slow_every >= 1:
            raise bad("m3.slow_every", s.slow_every, "an integer >= 1")
        if not s.slow_alpha >= 0:
            raise bad("m3.slow_alpha", s.slow_alpha, "a number >= 0")
        for i, g in enumerate(self.groups):
            if not g.match:
                raise bad(f"groups[{i}].match", g.match, "a non-empty name glob")
            if g.lr_scale is not None and not g.lr_scale > 0:
                raise bad(f"groups[{i}].lr_scale", g.lr_scale, "a number > 0")
            if g.weight_decay is not None and not g.weight_decay >= 0:
                raise bad(f"groups[{i}].weight_decay", g.weight_decay, "a number >= 0")
