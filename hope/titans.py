"""Self-modifying Titans: the fastest level of a HOPE block (HOPE_SPEC.md section 2).

Per layer, five projection memories (k, v, q, eta, alpha; each adaptive or a static projection,
by config) and the main memory, all residual MLPs per head whose meta-learned initial states are
parameters. A sequence is processed in two chunked passes:
1. the projection memories, chunk by chunk (projection_chunk_size): a chunk's k, v, q, eta, alpha
   come from the chunk-start states, then every projection memory writes the chunk;
2. the main memory, chunk by chunk (chunk_size): writes and the dual-form read-out o_t = M(q_t).
Outer gradients flow through every write (plain autograd over the chunk loop).
`step()` does the same one token at a time with carried state, for decoding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PROJECTION_MEMORIES, HopeConfig
from .layers import CausalDepthwiseConv, RMSNorm, unit_rows
from .chunk_grad import fused_chunk_update, padded_length
from .memory_pass import CudaGraphs, chunk_major, memory_pass, token_major
from .projection_step import ReadSpec, projection_step
from .memory import MemoryState, activation, chunk_update, memory_forward, token_update

CONV_INPUTS = ("k", "v", "q")  # Titans: a causal depthwise conv after the q, k, v projections


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class _TokenMajor(torch.autograd.Function):
    """Read-out chunks [n, B, H, C, d] -> [B, n * C, H, d], one copy. Its backward is one copy the
    other way, so each chunk's op gets a contiguous gradient (a slice of [B, H, T, d] is not, and
    the fused op would copy it, once per chunk)."""

    @staticmethod
    def forward(ctx, chunks: torch.Tensor) -> torch.Tensor:
        ctx.chunk = chunks.shape[3]
        return token_major(chunks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return chunk_major(grad, ctx.chunk)


class SelfModifyingTitans(nn.Module):
    def __init__(self, config: HopeConfig):
        super().__init__()
        self.config = config
        D, H, d, m = config.hidden_size, config.num_heads, config.head_dim, config.memory_width
        self.num_heads, self.head_dim = H, d
        self.adaptive = [name for name in PROJECTION_MEMORIES if name in config.adaptive]
        # The read-outs normalise k, q (and v). When they are adjacent memories, one call does all.
        unit_names = ("k", "v", "q") if config.normalize_v else ("k", "q")
        where = sorted(self.adaptive.index(n) for n in unit_names if n in self.adaptive)
        self.unit_run = (where[0], where[-1] + 1) if len(where) > 1 and where[-1] - where[0] == len(where) - 1 else None
        self.act = activation(config.memory_activation)

        # Static input projections (one per projection memory) and the convs on q, k, v.
        self.in_proj = nn.ModuleDict({name: nn.Linear(D, D, bias=False) for name in PROJECTION_MEMORIES})
        self.conv = nn.ModuleDict({name: CausalDepthwiseConv(D, config.conv_size) for name in CONV_INPUTS})
        # Meta-learned initial states W1_0 [H, d, m], W2_0 [H, m, d] of every memory.
        self.init_W1 = nn.ParameterDict({n: nn.Parameter(torch.empty(H, d, m)) for n in self.adaptive + ["memory"]})
        self.init_W2 = nn.ParameterDict({n: nn.Parameter(torch.empty(H, m, d)) for n in self.adaptive + ["memory"]})
        # eta_t, alpha_t: per-head scalars read out of their memories' outputs (or projections).
        self.eta_readout = nn.Parameter(torch.empty(H, d))
        self.eta_bias = nn.Parameter(torch.empty(H))
        self.alpha_readout = nn.Parameter(torch.empty(H, d))
        self.alpha_bias = nn.Parameter(torch.empty(H))
        if config.inner_momentum:  # Titans: data-dependent momentum mu_t = sigmoid(W_mu x_t + b)
            self.momentum_proj = nn.Linear(D, H, bias=False)
            self.momentum_bias = nn.Parameter(torch.empty(H))
        self.out_norm = RMSNorm(d, config.rms_norm_eps)
        self.gate_proj = nn.Linear(D, D, bias=False) if config.output_gate else None
        self.o_proj = nn.Linear(D, D, bias=False)
        self.cuda_graphs = CudaGraphs() if config.memory_cuda_graphs else None  # captured at first use

    @torch.no_grad()
    def reset_parameters(self):
        """Initialise the parameters this module owns directly (its Linears are the model's job)."""
        cfg = self.config
        for name in self.init_W1:
            self.init_W1[name].normal_(0.0, cfg.initializer_range)
            self.init_W2[name].normal_(0.0, 1.0 / math.sqrt(self.head_dim))
        self.eta_readout.zero_()
        self.eta_bias.fill_(_logit(cfg.eta_init / cfg.eta_max))
        self.alpha_readout.zero_()
        self.alpha_bias.fill_(_logit(cfg.alpha_init))
        if cfg.inner_momentum:
            self.momentum_bias.fill_(_logit(cfg.momentum_init))

    # ------------------------------------------------------------------ helpers
    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, d]
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _initial_state(self, names: list[str], batch: int, dtype) -> MemoryState:
        """States [B, X, H, ...] for memories `names`, copied from the meta-learned parameters."""
        W1 = torch.stack([self.init_W1[n] for n in names]).to(dtype)
        W2 = torch.stack([self.init_W2[n] for n in names]).to(dtype)
        W1 = W1.unsqueeze(0).expand(batch, *W1.shape)
        W2 = W2.unsqueeze(0).expand(batch, *W2.shape)
        if not self.config.inner_momentum:
            return MemoryState(W1, W2)
        return MemoryState(W1, W2, torch.zeros_like(W1), torch.zeros_like(W2))

    @staticmethod
    def _memory_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype

    def _kernel(self, x: torch.Tensor) -> str:
        """The chunk-update implementation for this input: config.memory_kernel, 'auto' resolved."""
        return self.config.resolved_memory_kernel(x.is_cuda, torch.is_grad_enabled())

    def _update(self, kernel: str, state: MemoryState, k, v, eta, log_alpha, log_mu, q=None):
        """One chunk's writes of values v (and read-out with q): the reference closed form, with the
        targets computed around it, or the fused op, which computes them inside."""
        if kernel == "reference":
            vhat = self._targets(v, state)
            return chunk_update(state, k, vhat, eta, log_alpha, log_mu, self.act, self.config.dgd, q=q)
        W1, W2, o = fused_chunk_update(state.W1, state.W2, k, v, eta, log_alpha, q, dgd=self.config.dgd,
                                       backend=kernel, act_name=self.config.memory_activation,
                                       targets=self.config.self_generated_targets,
                                       precision=self.config.memory_precision)
        return MemoryState(W1, W2), o

    def _readouts(self, z: dict[str, torch.Tensor], unit: tuple[str, ...] = ()):
        """k, v, q, eta, log_alpha from the projection outputs z [B, H, T, d] (or [B, H, d]);
        the names in `unit` are normalised already."""
        k = z["k"] if "k" in unit else unit_rows(z["k"])
        q = z["q"] if "q" in unit else unit_rows(z["q"])
        eta = self.config.eta_max * torch.sigmoid((z["eta"] * self.eta_readout[:, None]).sum(-1) + self.eta_bias[:, None])
        if self.config.decay:
            log_alpha = F.logsigmoid((z["alpha"] * self.alpha_readout[:, None]).sum(-1) + self.alpha_bias[:, None])
        else:
            log_alpha = torch.zeros_like(eta)
        v = unit_rows(z["v"]) if self.config.normalize_v and "v" not in unit else z["v"]
        return k, v, q, eta, log_alpha

    def _targets(self, v: torch.Tensor, state: MemoryState) -> torch.Tensor:
        """Self-generated targets vhat_X = M_X(v) under each memory's current state; else v."""
        if self.config.self_generated_targets:
            return memory_forward(v, state.W1, state.W2, self.act[0])
        return v.expand(*state.W1.shape[:-2], *v.shape[-2:])

    def _readout_table(self, dtype) -> torch.Tensor:
        """The eta and alpha read-outs as one [2, H, d + 1] tensor of weights and biases."""
        return torch.stack([torch.cat([w, b[:, None]], dim=-1) for w, b in
                            ((self.eta_readout, self.eta_bias), (self.alpha_readout, self.alpha_bias))]).to(dtype)

    def _inputs(self, x: torch.Tensor, conv_state: dict | None):
        z = {}
        for name in PROJECTION_MEMORIES:
            proj = self.in_proj[name](x)
            if name in CONV_INPUTS:
                proj, new = self.conv[name](proj, None if conv_state is None else conv_state.get(name))
                if conv_state is not None:
                    conv_state[name] = new
            z[name] = self._heads(proj)
        return z

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o: [B, T, H, d], the memory's read-out per token and head."""
        B, T, H, d = o.shape
        o = self.out_norm(o).reshape(B, T, H * d)
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x))
        return self.o_proj(o)

    def _projection_chunk(self, kernel: str, stacked, zc: dict, state: MemoryState, log_mu):
        """One projection chunk op by op: the adaptive memories' reads of `stacked` [B, X, H, C, d],
        the read-outs (static ones from zc), then the writes. ((k, v, q, eta, log_alpha), new state)."""
        read = memory_forward(stacked, state.W1, state.W2, self.act[0])  # [B, X, H, C, d]
        i0, i1 = self.unit_run or (0, 0)
        before, run, after = read.split([i0, i1 - i0, len(self.adaptive) - i1], dim=1)  # backward: one cat
        unit = self.adaptive[i0:i1]
        reads = [*before.unbind(1), *(unit_rows(run).unbind(1) if unit else ()), *after.unbind(1)]
        k, v, q, eta, log_alpha = self._readouts({**zc, **dict(zip(self.adaptive, reads))}, unit)
        state, _ = self._update(kernel, state, k.unsqueeze(1), v.unsqueeze(1), eta.unsqueeze(1),
                                log_alpha.unsqueeze(1), log_mu)
        return (k, v, q, eta, log_alpha), state

    @staticmethod
    def _chunks(t: torch.Tensor, C: int) -> tuple[torch.Tensor, ...]:
        """[B, H, T, ...] -> chunks [B, 1 memory, H, C, ...]. Contiguous when C divides T (one copy
        for all chunks, so the fused op copies none of them on each call); split views otherwise."""
        T = t.shape[2]
        if T % C:
            return t.unsqueeze(1).split(C, dim=3)
        return t.unflatten(2, (T // C, C)).movedim(2, 0).unsqueeze(2).contiguous().unbind(0)

    # ------------------------------------------------------------------ parallel forward
    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """x: [B, T, D]. With `cache` (a dict), the decoding state is written into it."""
        if cache is not None and cache:
            return self._forward_recurrent(x, cache)
        cfg = self.config
        B, T, _ = x.shape
        conv_state = {} if cache is not None else None
        # The memory math runs in fp32 under bf16/fp16 weights: fast-weight states accumulate
        # over the whole sequence and feed themselves (self-generated targets).
        dtype = self._memory_dtype(x)
        z = self._inputs(x, conv_state)
        # The adaptive memories' inputs as one [B, X, H, T, d] tensor (under compile, one kernel
        # writes it from the projections), the static projections' apart.
        stacked = torch.stack([z.pop(n) for n in self.adaptive], dim=1).to(dtype) if self.adaptive else None
        static = {n: t.to(dtype) for n, t in z.items()}
        mu_log = F.logsigmoid(self.momentum_proj(x).to(dtype) + self.momentum_bias).transpose(1, 2) if cfg.inner_momentum else None  # [B, H, T]
        o = self._memories(stacked, static, mu_log, self._kernel(x), cache, conv_state)
        return self._output(o.to(x.dtype), x)

    # Under torch.compile (train.compile) the dense work around it fuses; the memories' chunk loops
    # stay out of the graph: their kernels are fused already, and traced they would unroll T / C chunks.
    @torch.compiler.disable
    def _memories(self, stacked: torch.Tensor | None, static: dict, mu_log, kernel: str, cache: dict | None,
                  conv_state: dict | None) -> torch.Tensor:
        """Both passes over the projection inputs (fp32 under bf16 weights: `stacked` [B, X, H, T, d]
        of the adaptive memories, `static` {name: [B, H, T, d]} of the others): the main memory's
        read-out o [B, T, H, d]. With `cache`, the decoding state is written into it."""
        cfg = self.config
        z = {**static, **dict(zip(self.adaptive, stacked.unbind(1)))} if self.adaptive else static
        B, _, T, _ = z["k"].shape
        dtype = z["k"].dtype
        Cp, Cm = cfg.projection_chunk_size, cfg.chunk_size
        # All five projection memories adaptive (HOPE's configs): a fused op per projection chunk,
        # or, when both passes chunk alike, one op for both passes (hope/memory_pass.py).
        fused = kernel != "reference" and self.adaptive == list(PROJECTION_MEMORIES)
        if fused and cache is None and Cp == Cm and T % Cm == 0 and padded_length(Cm, kernel) == Cm:
            six = self._initial_state(self.adaptive + ["memory"], B, dtype)
            graphs = self.cuda_graphs if stacked.is_cuda and torch.is_grad_enabled() else None
            return memory_pass(stacked, six.W1, six.W2, self._readout_table(dtype), ReadSpec.of(self.config),
                               kernel, Cm, graphs)

        # Pass 1: the projection memories, chunk by chunk: k, v, q, eta, log alpha of each chunk.
        # Inputs are split into chunks once, up front: split's backward is one concatenation, where
        # per-chunk slicing would build a full-length zero gradient per chunk and add them up.
        proj_state = proj_start = self._initial_state(self.adaptive, B, dtype) if self.adaptive else None
        proj_pos, per_chunk = 0, None
        if not self.adaptive:  # static projections: read out once, for the whole sequence
            k, v, q, eta, log_alpha = self._readouts(z)
        else:
            per_chunk = []
            chunks_in = stacked.split(Cp, dim=3)
            if fused:
                readout, spec = self._readout_table(dtype), ReadSpec.of(self.config)
            else:  # the static projections' chunks, for the read-outs of memories that are not adaptive
                z_chunks = {name: z[name].split(Cp, dim=2) for name in PROJECTION_MEMORIES}
                mu_chunks = None if mu_log is None else mu_log.split(Cp, dim=-1)
            for i, zc in enumerate(chunks_in):
                proj_start = proj_state
                if fused:
                    W1, W2, *five = projection_step(zc, proj_state.W1, proj_state.W2, readout, spec, kernel)
                    proj_state = MemoryState(W1, W2)
                else:
                    five, proj_state = self._projection_chunk(kernel, zc, {n: t[i] for n, t in z_chunks.items()},
                                                              proj_state, None if mu_chunks is None else mu_chunks[i][:, None])
                per_chunk.append(five)
                proj_pos = zc.shape[3]

        # Pass 2: the main memory, chunk by chunk, reading after each token's write.
        names = ("k", "v", "q", "eta", "log_alpha")
        if per_chunk is not None and Cp == Cm:  # the projection chunks are the main chunks
            split = {name: [five[j].unsqueeze(1) for five in per_chunk] for j, name in enumerate(names)}
        else:
            if per_chunk is not None:
                k, v, q, eta, log_alpha = (torch.cat(parts, dim=2) for parts in zip(*per_chunk))
            split = {name: self._chunks(t, Cm) for name, t in zip(names, (k, v, q, eta, log_alpha))}
        if mu_log is not None:
            split["mu"] = self._chunks(mu_log, Cm)
        state = self._initial_state(["memory"], B, dtype)
        chunks, main_start, main_pos = [], state, 0
        for i, s in enumerate(range(0, T, Cm)):
            c = {name: chunks_of[i] for name, chunks_of in split.items()}
            main_start = state
            state, o = self._update(kernel, state, c["k"], c["v"], c["eta"], c["log_alpha"], c.get("mu"), q=c["q"])
            chunks.append(o.squeeze(1))
            main_pos = min(s + Cm, T) - s
        if T % Cm == 0:
            o = _TokenMajor.apply(torch.stack(chunks))
        else:
            o = torch.cat(chunks, dim=2).transpose(1, 2)

        if cache is not None:  # hand the decoding state over: chunk-start and current states
            cache.update(conv=conv_state, main=(main_start, state, main_pos % Cm),
                         proj=(proj_start, proj_state, proj_pos % Cp) if self.adaptive else None)
            if main_pos % Cm == 0:
                cache["main"] = (state, state, 0)
            if self.adaptive and proj_pos % Cp == 0:
                cache["proj"] = (proj_state, proj_state, 0)
        return o

    # ------------------------------------------------------------------ decoding
    def _forward_recurrent(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        return torch.cat([self.step(x[:, t:t + 1], cache) for t in range(x.shape[1])], dim=1)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token x: [B, 1, D] with carried state in `cache` (filled by forward or by step)."""
        cfg = self.config
        B = x.shape[0]
        dtype = self._memory_dtype(x)
        if not cache:
            cache.update(conv={}, main=(self._initial_state(["memory"], B, dtype),) * 2 + (0,),
                         proj=((self._initial_state(self.adaptive, B, dtype),) * 2 + (0,)) if self.adaptive else None)
        z = {n: t.to(dtype) for n, t in self._inputs(x, cache["conv"]).items()}  # [B, H, 1, d] each
        mu = torch.sigmoid(self.momentum_proj(x[:, 0]).to(dtype) + self.momentum_bias)[:, None] if cfg.inner_momentum else None  # [B, 1, H]

        if self.adaptive:
            start, current, pos = cache["proj"]
            stacked = torch.stack([z[n] for n in self.adaptive], dim=1)  # [B, X, H, 1, d]
            read = memory_forward(stacked, start.W1, start.W2, self.act[0])
            for i, n in enumerate(self.adaptive):
                z[n] = read[:, i]
        k, v, q, eta, log_alpha = self._readouts(z)  # [B, H, 1, d] and [B, H, 1]
        k_tok, eta_tok, alpha_tok = k[:, None, :, 0], eta[:, None, :, 0], log_alpha[:, None, :, 0].exp()
        if self.adaptive:
            vhat = self._targets(v[:, None], start).squeeze(-2)
            current = token_update(current, start, k_tok, vhat, eta_tok, alpha_tok, mu, self.act, cfg.dgd)
            pos += 1
            cache["proj"] = (current, current, 0) if pos == cfg.projection_chunk_size else (start, current, pos)

        start, current, pos = cache["main"]
        vhat = self._targets(v[:, None], start).squeeze(-2)
        current = token_update(current, start, k_tok, vhat, eta_tok, alpha_tok, mu, self.act, cfg.dgd)
        o = memory_forward(q[:, None], current.W1, current.W2, self.act[0])[:, 0].to(x.dtype).transpose(1, 2)  # [B, 1, H, d]
        pos += 1
        cache["main"] = (current, current, 0) if pos == cfg.chunk_size else (start, current, pos)
        return self._output(o, x)
