"""Naive reference of the self-modifying Titans memory: a per-token loop over the exact recurrences.

Written to be obviously right, not fast (HOPE_SPEC.md section 6): every inner gradient comes from
autograd on the inner loss 1/2 |M(k_t; W) - vhat_t|^2 at the chunk-start state (torch.func.grad,
so the outer gradient still flows through it), and every update is the literal DGD matrix product
W2 (alpha I - eta k k^T). The chunk-parallel closed form in hope/memory.py must equal this, in
float64, outputs and outer gradients alike (tests/test_hope_reference.py). It shares with the
fast path only what is not memory math: the static projections, convolutions and read-outs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad

from .config import PROJECTION_MEMORIES
from .titans import SelfModifyingTitans


def _mlp(z, W1, W2, act):
    """M(z) = z + W1 s(W2 z) for one vector per (batch, head): z [B, H, d]."""
    return z + torch.einsum("bhdm,bhm->bhd", W1, act(torch.einsum("bhmd,bhd->bhm", W2, z)))


def _inner_grads(W1, W2, k, vhat, act):
    def loss(W1_, W2_):
        return 0.5 * (_mlp(k, W1_, W2_, act) - vhat).pow(2).sum()

    return grad(loss, argnums=(0, 1))(W1, W2)


class _Memory:
    """One memory's fast weights for a batch: W1 [B, H, d, m], W2 [B, H, m, d], momenta, chunk start."""

    def __init__(self, W1, W2):
        self.W1, self.W2 = W1, W2
        self.S1, self.S2 = torch.zeros_like(W1), torch.zeros_like(W2)
        self.start = (W1, W2)

    def write(self, k, vhat, eta, alpha, mu, act, dgd: bool):
        g1, g2 = _inner_grads(*self.start, k, vhat, act)
        self.S1 = (0 if mu is None else mu[..., None, None] * self.S1) + g1
        self.S2 = (0 if mu is None else mu[..., None, None] * self.S2) + g2
        e, a = eta[..., None, None], alpha[..., None, None]
        d = k.shape[-1]
        eye = torch.eye(d, dtype=k.dtype, device=k.device)
        transition = a * eye - (e * k[..., :, None] * k[..., None, :] if dgd else 0)
        self.W2 = self.W2 @ transition - e * self.S2
        self.W1 = a * self.W1 - e * self.S1


def reference_forward(layer: SelfModifyingTitans, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for x [B, T, D], computed one token at a time."""
    cfg = layer.config
    act = layer.act[0]
    B, T, _ = x.shape
    z_all = layer._inputs(x, None)  # static projections (+ conv), [B, H, T, d] each
    mu_all = torch.sigmoid(layer.momentum_proj(x) + layer.momentum_bias) if cfg.inner_momentum else None  # [B, T, H]
    expand = lambda p: p.unsqueeze(0).expand(B, *p.shape)  # noqa: E731
    memories = {n: _Memory(expand(layer.init_W1[n]), expand(layer.init_W2[n])) for n in layer.adaptive + ["memory"]}

    outputs = []
    for t in range(T):
        if t % cfg.projection_chunk_size == 0:
            for n in layer.adaptive:
                memories[n].start = (memories[n].W1, memories[n].W2)
        if t % cfg.chunk_size == 0:
            memories["memory"].start = (memories["memory"].W1, memories["memory"].W2)
        z = {n: z_all[n][:, :, t] for n in PROJECTION_MEMORIES}
        for n in layer.adaptive:
            z[n] = _mlp(z[n], *memories[n].start, act)
        k = F.normalize(z["k"], dim=-1)
        q = F.normalize(z["q"], dim=-1)
        v = F.normalize(z["v"], dim=-1) if cfg.normalize_v else z["v"]
        eta = cfg.eta_max * torch.sigmoid((z["eta"] * layer.eta_readout).sum(-1) + layer.eta_bias)
        alpha = torch.sigmoid((z["alpha"] * layer.alpha_readout).sum(-1) + layer.alpha_bias) if cfg.decay else torch.ones_like(eta)
        mu = None if mu_all is None else mu_all[:, t]
        for n, memory in memories.items():
            vhat = _mlp(v, *memory.start, act) if cfg.self_generated_targets else v
            memory.write(k, vhat, eta, alpha, mu, act, cfg.dgd)
        main = memories["memory"]
        outputs.append(_mlp(q, main.W1, main.W2, act))
    o = torch.stack(outputs, dim=1)  # [B, T, H, d]
    return layer._output(o, x)
