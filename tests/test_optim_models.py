"""Tiny modules with the shapes and tags of HOPE's parameters, for the optimizer tests (no tests here)."""

from __future__ import annotations

import torch
from torch import nn


class TinyHopeLike(nn.Module):
    """Embedding, a 2-D projection, a 3-D per-head stack, a norm, a bias, a slow CMS level, a head."""

    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, cms_period_tokens: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)  # 2-D weight + 1-D bias
        self.memory_init = nn.Parameter(torch.randn(heads, dim // heads, dim // heads) * 0.3)  # 3-D stack
        self.norm = nn.LayerNorm(dim)
        self.cms_up = nn.Linear(dim, 2 * dim, bias=False)
        self.cms_down = nn.Linear(2 * dim, dim, bias=False)
        for p in (self.cms_up.weight, self.cms_down.weight):
            p.update_period_tokens = cms_period_tokens
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.heads = heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # [batch, seq, dim]
        b, s, d = x.shape
        h = torch.tanh(self.proj(x)).view(b, s, self.heads, d // self.heads)
        x = x + torch.einsum("bshi,hij->bshj", h, self.memory_init).reshape(b, s, d)
        x = self.norm(x)
        x = x + self.cms_down(torch.relu(self.cms_up(x)))
        logits = self.lm_head(x)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def make_batches(steps: int, batch: int, seq: int, vocab: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(steps)]
