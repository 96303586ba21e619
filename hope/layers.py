"""Building blocks shared by every variant: RMSNorm, unit rows, SwiGLU MLP, rotary attention, causal conv."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # flash-attn is used when importable on CUDA; PyTorch SDPA otherwise
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def reset_parameters(self):
        self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # bf16 inputs are normalised in fp32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.to(x.dtype)).to(dtype)


def unit_rows_forward(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, n): the rows of x scaled to unit length, y = x / n, and their norms n clamped to eps."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
    return x / n, n


def unit_rows_backward(y: torch.Tensor, n: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    """dx of y = x / n (unit_rows_forward); rows clamped to eps are x / eps, without the radial term."""
    radial = (dy * y).sum(-1, keepdim=True).masked_fill_(n <= eps, 0.0)
    return (dy - y * radial) / n


class _UnitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        y, n = unit_rows_forward(x, eps)
        ctx.save_for_backward(y, n)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, n = ctx.saved_tensors
        return unit_rows_backward(y, n, dy, ctx.eps), None


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize(x, dim=-1), with a backward of 7 ops instead of autograd's ~12: the projection
    pass normalises k, v, q once per chunk, so its launches count (docs/PERFORMANCE.md)."""
    return _UnitRows.apply(x, eps)


class SwiGLU(nn.Module):
    """The MLP of Transformer++ and of every CMS level."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CausalDepthwiseConv(nn.Module):
    """Causal depthwise convolution over time (Titans applies one to q, k, v inputs).

    Decoding keeps the last (width - 1) inputs as state so one token at a time gives the same
    result as the whole sequence at once.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.zeros(channels, width))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):  # start as the identity: the last tap is 1
        self.weight.zero_()
        self.weight[:, -1] = 1.0

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """x: [B, T, C]; state: [B, width-1, C] of earlier inputs (zeros at the start)."""
        B, T, C = x.shape
        if state is None:
            state = x.new_zeros(B, self.width - 1, C)
        padded = torch.cat([state, x], dim=1)  # [B, T + w - 1, C]
        out = F.conv1d(padded.transpose(1, 2), self.weight.unsqueeze(1).to(x.dtype), groups=C)
        return out.transpose(1, 2), padded[:, -(self.width - 1):] if self.width > 1 else state


def rotary_tables(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, dh] with rotate-half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE (Transformer++ and Hope-Attention)."""

    def __init__(self, dim: int, num_heads: int, rope_theta: float):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_theta = num_heads, dim // num_heads, rope_theta
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None = None):
        """state (decoding): {"k": [B,H,S,dh], "v": ...} of earlier positions, grown in place."""
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        start = 0 if state is None or "k" not in state else state["k"].shape[2]
        cos, sin = rotary_tables(torch.arange(start, start + T, device=x.device), self.head_dim, self.rope_theta, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
            state["k"], state["v"] = k, v
        causal = start == 0  # with a cache, new queries see every cached key (T == 1 when decoding)
        if flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and (causal or T == 1):
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            out = out.reshape(B, T, D)
        else:
            mask = None
            if not causal and T > 1:  # several new tokens after a cache: query i sees keys <= start + i
                S = k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            out = out.transpose(1, 2).reshape(B, T, D)
        return self.o_proj(out)
