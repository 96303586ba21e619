"""HopeConfig: one configuration class for HOPE, its ablations and its baselines.

The same code builds every model of HOPE_SPEC.md section 4; what differs is only this config:
- HOPE:           mixer="titans", all five projection memories adaptive, DGD, self-generated
                  targets, several CMS levels.
- titans-lmm:     mixer="titans", adaptive=[], dgd=False, self_generated_targets=False,
                  inner_momentum=True, one MLP level.
- Transformer++:  mixer="attention", one MLP level (RoPE, SwiGLU, RMSNorm, causal attention).
The open choices and their reasons are in docs/DESIGN_CHOICES.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from transformers import PretrainedConfig

PROJECTION_MEMORIES = ("k", "v", "q", "eta", "alpha")
# How the chunk update runs: "reference" = autograd through hope/memory.py (stores every chunk's
# intermediates); "torch" = hope/chunk_grad.py (saves inputs, recomputes in the backward), with
# each projection chunk one op (hope/projection_step.py); "compiled" = the same under torch.compile;
# "triton" = hope/triton_chunk.py and hope/triton_projection.py (experimental: proven under Triton's
# interpreter, not yet timed on a GPU); "auto" = compiled when training on CUDA without inner
# momentum, else reference.
MEMORY_KERNELS = ("auto", "reference", "torch", "compiled", "triton")
# How the Triton kernels multiply (hope/chunk_grad.py: triton_options): tf32, bf16 operands with fp32
# accumulation, ~fp32 in three tf32 products, or exact fp32 (for the interpreter).
MEMORY_PRECISIONS = ("tf32", "bf16", "tf32x3", "ieee")
MIXERS = ("titans", "attention")
ACTIVATIONS = ("silu", "gelu", "tanh")


class ModelConfigError(ValueError):
    """A model configuration value is invalid. `key` names the field."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.message, self.source = key, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}model.{key}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Sizes that must be positive integers. Checked first as the config is built: transformers' own
# validation (PretrainedConfig.__init__) reads the head_dim property, hidden_size // num_heads,
# which would fail with a traceback on a size like 'abc' or 0 before our message could name it.
POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "chunk_size",
                       "projection_chunk_size", "conv_size", "max_position_embeddings")


def check_positive_ints(values: dict[str, Any], source: str | None = None) -> None:
    """Raise ModelConfigError naming the first of POSITIVE_INT_FIELDS in `values` that is not one."""
    for key in POSITIVE_INT_FIELDS:
        value = values[key]
        if not _is_int(value) or value <= 0:
            raise ModelConfigError(key, f"expected a positive integer, got {value!r}", source)


class HopeConfig(PretrainedConfig):
    model_type = "hope"
    # Fields that choose how the same model is computed, not what it is: a checkpoint made with one
    # value resumes (or exports) with another.
    execution_fields = frozenset({
        "memory_kernel", "memory_cuda_graphs", "memory_precision",  # the same memories, other kernels
        "gradient_checkpointing_layers",  # recompute in the backward instead of storing
        "max_position_embeddings",  # no weights (RoPE): the context the export announces
    })

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_layers: int = 24,
        num_heads: int = 16,
        mixer: str = "titans",
        # --- self-modifying Titans (HOPE_SPEC.md section 2) ---
        memory_hidden_size: int | None = None,  # m, the inner width of every memory MLP; None = head dim
        memory_activation: str = "silu",
        adaptive: tuple[str, ...] | list[str] = PROJECTION_MEMORIES,  # which of k,v,q,eta,alpha are memories
        self_generated_targets: bool = True,
        dgd: bool = True,
        inner_momentum: bool = False,  # docs/DESIGN_CHOICES.md #3
        decay: bool = True,
        chunk_size: int = 64,  # main memory
        projection_chunk_size: int = 64,  # the k, v, q, eta, alpha memories
        conv_size: int = 4,
        normalize_v: bool = True,  # L2-normalise v per head, like q and k (keeps self-generated targets bounded)
        eta_init: float = 0.1,  # initial inner learning rate (eta_max * sigmoid(bias))
        eta_max: float = 1.0,
        alpha_init: float = 0.98,  # initial retention (1 = no decay)
        momentum_init: float = 0.9,
        output_gate: bool = True,
        memory_kernel: str = "auto",  # auto | reference | torch | compiled | triton (MEMORY_KERNELS above)
        memory_cuda_graphs: bool = False,  # triton: each layer's chunk loops as CUDA graphs (hope/memory_pass.py)
        memory_precision: str = "tf32",  # triton: the kernels' matmuls, tf32 | bf16 | tf32x3 | ieee (hope/chunk_grad.py)
        # --- continuum memory system (section 3): one residual SwiGLU MLP per level ---
        cms_hidden_sizes: tuple[int, ...] | list[int] = (2816,),
        cms_periods: tuple[int, ...] | list[int] = (0,),  # tokens between updates; 0 = every step
        # --- attention (Transformer++ baseline and Hope-Attention) ---
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        # --- common ---
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        gradient_checkpointing_layers: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mixer = mixer
        self.memory_hidden_size = memory_hidden_size
        self.memory_activation = memory_activation
        self.adaptive = list(adaptive)
        self.self_generated_targets = self_generated_targets
        self.dgd = dgd
        self.inner_momentum = inner_momentum
        self.decay = decay
        self.chunk_size = chunk_size
        self.projection_chunk_size = projection_chunk_size
        self.conv_size = conv_size
        self.normalize_v = normalize_v
        self.eta_init = eta_init
        self.eta_max = eta_max
        self.alpha_init = alpha_init
        self.momentum_init = momentum_init
        self.output_gate = output_gate
        self.memory_kernel = memory_kernel
        self.memory_cuda_graphs = memory_cuda_graphs
        self.memory_precision = memory_precision
        self.cms_hidden_sizes = list(cms_hidden_sizes)
        self.cms_periods = list(cms_periods)
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.gradient_checkpointing_layers = gradient_checkpointing_layers
        check_positive_ints({key: getattr(self, key) for key in POSITIVE_INT_FIELDS})  # before head_dim is read
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def resolved_memory_kernel(self, on_cuda: bool, training: bool) -> str:
        """What memory_kernel 'auto' means for a forward on this device, with or without autograd."""
        if self.memory_kernel != "auto":
            return self.memory_kernel
        # Training on CUDA: the fused op (memory-light, compiled). Inference keeps the closed form:
        # no backward to save for, and no compilation for every new prompt length.
        return "compiled" if on_cuda and training and not self.inner_momentum else "reference"

    @property
    def memory_width(self) -> int:
        return self.memory_hidden_size or self.head_dim

    @property
    def num_hidden_layers(self) -> int:  # the name transformers' utilities look for
        return self.num_layers

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    # ------------------------------------------------------------------ validation
    def validate(self, source: str | None = None) -> "HopeConfig":
        def fail(key: str, message: str):
            raise ModelConfigError(key, message, source)

        check_positive_ints({key: getattr(self, key) for key in POSITIVE_INT_FIELDS}, source)
        if self.mixer not in MIXERS:
            fail("mixer", f"expected one of {list(MIXERS)}, got {self.mixer!r}")
        if self.hidden_size % self.num_heads:
            fail("num_heads", f"must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        if self.memory_hidden_size is not None and (not _is_int(self.memory_hidden_size) or self.memory_hidden_size <= 0):
            fail("memory_hidden_size", f"expected a positive integer or null, got {self.memory_hidden_size!r}")
        if self.memory_activation not in ACTIVATIONS:
            fail("memory_activation", f"expected one of {list(ACTIVATIONS)}, got {self.memory_activation!r}")
        if self.memory_kernel not in MEMORY_KERNELS:
            fail("memory_kernel", f"expected one of {list(MEMORY_KERNELS)}, got {self.memory_kernel!r}")
        if self.memory_precision not in MEMORY_PRECISIONS:
            fail("memory_precision", f"expected one of {list(MEMORY_PRECISIONS)}, got {self.memory_precision!r}")
        if self.memory_kernel in ("torch", "compiled", "triton") and self.inner_momentum:
            fail("memory_kernel", f"{self.memory_kernel!r} has no inner momentum; use 'reference' or 'auto' with inner_momentum")
        if self.memory_kernel == "triton":
            pow2 = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
            if self.memory_activation != "silu":
                fail("memory_kernel", f"the Triton kernels implement silu only, got memory_activation={self.memory_activation!r}")
            if not (pow2(self.head_dim) and pow2(self.memory_width)):
                fail("memory_kernel", f"the Triton kernels need head_dim and memory width that are powers of two >= 16, "
                     f"got {self.head_dim} and {self.memory_width}")
        if self.memory_cuda_graphs and (self.memory_kernel != "triton" or self.chunk_size != self.projection_chunk_size
                                        or list(self.adaptive) != list(PROJECTION_MEMORIES)):
            fail("memory_cuda_graphs", "the chunk loops run as CUDA graphs with memory_kernel: triton, chunk_size equal "
                 f"to projection_chunk_size and all of {list(PROJECTION_MEMORIES)} adaptive; got memory_kernel="
                 f"{self.memory_kernel!r}, chunk sizes {self.chunk_size}/{self.projection_chunk_size}, "
                 f"adaptive={self.adaptive!r}")
        unknown = [a for a in self.adaptive if a not in PROJECTION_MEMORIES]
        if unknown or len(set(self.adaptive)) != len(self.adaptive):
            fail("adaptive", f"expected distinct names from {list(PROJECTION_MEMORIES)}, got {self.adaptive!r}")
        big, small = max(self.chunk_size, self.projection_chunk_size), min(self.chunk_size, self.projection_chunk_size)
        if big % small:
            fail("projection_chunk_size", f"chunk sizes must divide each other, got chunk_size={self.chunk_size} "
                 f"and projection_chunk_size={self.projection_chunk_size}")
        for key in ("eta_init", "momentum_init"):
            if not 0.0 < float(getattr(self, key)) < 1.0:
                fail(key, f"expected a value in (0, 1), got {getattr(self, key)!r}")
        if not 0.0 < float(self.alpha_init) < 1.0:
            fail("alpha_init", f"expected a value in (0, 1), got {self.alpha_init!r}")
        if not 0.0 < float(self.eta_max) <= 2.0:
            fail("eta_max", f"expected a value in (0, 2] (the delta rule needs eta*|k|^2 <= 2), got {self.eta_max!r}")
        if not self.cms_hidden_sizes:
            fail("cms_hidden_sizes", "expected at least one level")
        if len(self.cms_periods) != len(self.cms_hidden_sizes):
            fail("cms_periods", f"expected one period per level ({len(self.cms_hidden_sizes)}), got {self.cms_periods!r}")
        for i, (hidden, period) in enumerate(zip(self.cms_hidden_sizes, self.cms_periods)):
            if not _is_int(hidden) or hidden <= 0:
                fail(f"cms_hidden_sizes[{i}]", f"expected a positive integer, got {hidden!r}")
            if not _is_int(period) or period < 0:
                fail(f"cms_periods[{i}]", f"expected a non-negative integer (tokens), got {period!r}")
        if list(self.cms_periods) != sorted(self.cms_periods):
            fail("cms_periods", f"levels go fastest first (periods non-decreasing), got {self.cms_periods!r}")
        if self.mixer == "attention" and self.head_dim % 2:
            fail("num_heads", f"rotary embeddings need an even head dim, got {self.head_dim}")
        return self

    # ------------------------------------------------------------------ YAML
    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "HopeConfig":
        """Load configs/model/NAME.yaml; unknown keys and bad values name the file and key."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ModelConfigError("config", "file not found", str(path)) from None
        except yaml.YAMLError as error:
            raise ModelConfigError("config", f"not valid YAML: {error}", str(path)) from None
        if not isinstance(data, dict):
            raise ModelConfigError("config", f"expected a mapping of fields, got {type(data).__name__}", str(path))
        data.update(overrides)
        return cls.from_fields(data, source=str(path))

    @classmethod
    def from_fields(cls, fields: dict, source: str | None = None) -> "HopeConfig":
        defaults = cls()
        known = set(defaults.to_dict())
        for key, value in fields.items():
            if key not in known:
                raise ModelConfigError(key, "unknown key", source)
            default = getattr(defaults, key, None)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ModelConfigError(key, f"expected true or false, got {value!r}", source)
            elif isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ModelConfigError(key, f"expected a number, got {value!r}", source)
            elif isinstance(default, list) and not isinstance(value, (list, tuple)):
                raise ModelConfigError(key, f"expected a list, got {value!r}", source)
        try:
            config = cls(**fields)
        except ModelConfigError as error:  # the sizes, checked as the config is built
            raise ModelConfigError(error.key, error.message, source) from None
        return config.validate(source)

    # ------------------------------------------------------------------ FLOPs (docs/FLOPS.md)
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), memory updates included."""
        return 3.0 * self.forward_flops_per_token(seq_len)

    def forward_flops_per_token(self, seq_len: int) -> float:
        D, L, H = self.hidden_size, self.num_layers, self.num_heads
        dh, m = self.head_dim, self.memory_width
        dense = 2 * self.vocab_size * D  # LM head
        dense += sum(2 * 3 * D * hidden for hidden in self.cms_hidden_sizes) * L
        if self.mixer == "attention":
            dense += L * 2 * 4 * D * D
            # causal attention: QK^T and AV over on average seq_len/2 keys
            mixing = L * 2 * 2 * D * (seq_len / 2)
            return dense + mixing
        dense += L * 2 * D * D * (5 + 1 + int(self.output_gate))  # 5 input projections, output, gate
        n_adaptive = len(self.adaptive)
        mem_mlp = 4 * m * dh  # one memory MLP evaluation on one vector: W2 z then W1 h
        C = self.chunk_size
        per_head = 0.0
        # projection memories: output on their input, target M(v), prediction M(k), W1^T r, state update
        per_head += n_adaptive * (3 * mem_mlp + 2 * m * dh + 4 * m * dh)
        # main memory: target, prediction, W1^T r, state update, then the dual-form read-out:
        per_head += 3 * mem_mlp + 2 * m * dh + 4 * m * dh
        # q through the chunk-start states plus intra-chunk attention-like terms (C/2 keys on average,
        # k.q and k.k Gram matrices, the triangular solve, E/U/R weighted sums)
        per_head += 2 * 2 * m * dh + (C / 2) * 2 * (2 * dh + 4 * m + 2 * dh) + C * m
        return dense + L * H * per_head
