"""The fast-weight memory math of self-modifying Titans, in closed form (HOPE_SPEC.md section 2).

Every memory is a residual two-layer MLP per head, M(z) = z + W1 s(W2 z), with W2: [m, d] (input
side) and W1: [d, m] (output side). Its inner loss on token t is 1/2 |M(k_t) - vhat_t|^2 and its
update is Delta Gradient Descent with decay and (optionally) momentum:

    S1_t = mu_t S1_{t-1} + dl/dW1                       S2_t = mu_t S2_{t-1} + dl/dW2
    W1_t = alpha_t W1_{t-1}                - eta_t S1_t
    W2_t = W2_{t-1}(alpha_t I - eta_t k_t k_t^T) - eta_t S2_t        (the DGD term; off = plain GD)

Without momentum S_t is just the gradient (mu = 0). Inside a chunk every gradient is taken at the
chunk-start state, so with a = W2_c k, h = s(a), r = M_c(k) - vhat, u = s'(a) * (W1_c^T r):
dl/dW1 = r h^T and dl/dW2 = u k^T. The chunk is then a linear recurrence whose solution is a few
matrix products: decayed linear attention for W1 and a gated delta rule (one unit-triangular solve,
the UT/WY form) for W2. No per-token loop and no autograd here; docs/MEMORY_MATH.md derives it.

Shapes: leading dims `...` are any batch of independent memories (batch x memory x head); C is
the chunk length, d the head width, m the memory's inner width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MemoryState:
    """Fast weights of a batch of memories: W1 [..., d, m], W2 [..., m, d], momenta alike (or None)."""

    W1: torch.Tensor
    W2: torch.Tensor
    S1: torch.Tensor | None = None
    S2: torch.Tensor | None = None

    def map(self, fn) -> "MemoryState":
        return MemoryState(*(None if t is None else fn(t) for t in (self.W1, self.W2, self.S1, self.S2)))


def activation(name: str):
    """The memory's inner activation s and its derivative s'."""
    if name == "silu":
        def d_silu(a):
            sig = torch.sigmoid(a)
            return sig * (1 + a * (1 - sig))
        return F.silu, d_silu
    if name == "gelu":
        def d_gelu(a):
            cdf = 0.5 * (1 + torch.erf(a / 2 ** 0.5))
            pdf = torch.exp(-0.5 * a * a) / (2 * torch.pi) ** 0.5
            return cdf + a * pdf
        return F.gelu, d_gelu
    if name == "tanh":
        return torch.tanh, lambda a: 1 - torch.tanh(a) ** 2
    raise ValueError(f"unknown memory activation {name!r}")


def memory_forward(z: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, act) -> torch.Tensor:
    """M(z) = z + W1 s(W2 z) for z [..., T, d] under states W1 [..., d, m], W2 [..., m, d]."""
    return z + act(z @ W2.transpose(-1, -2)) @ W1.transpose(-1, -2)


def _decay_matrix(log_cum: torch.Tensor) -> torch.Tensor:
    """G[t, j] = exp(lc_t - lc_j) for j <= t, else 0. log_cum: [..., C] -> [..., C, C]."""
    C = log_cum.shape[-1]
    diff = log_cum.unsqueeze(-1) - log_cum.unsqueeze(-2)
    mask = torch.ones(C, C, dtype=torch.bool, device=log_cum.device).tril()
    return torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()


def chunk_update(*args, **kwargs):
    """Advance memories over one chunk (see _chunk_update); compiled when enable_compile(True)."""
    return (_compiled_chunk_update or _chunk_update)(*args, **kwargs)


_compiled_chunk_update = None


def enable_compile(on: bool = True):
    """torch.compile the chunk update: one graph reused by every chunk and layer of the same shape.

    It fuses the many small elementwise kernels of the closed form and removes most of the Python
    and launch overhead of the chunk loop (docs/PERFORMANCE.md). Off by default; numerics equal the
    eager path within float rounding.
    """
    global _compiled_chunk_update
    _compiled_chunk_update = torch.compile(_chunk_update, dynamic=False) if on else None


def _chunk_update(
    state: MemoryState,
    k: torch.Tensor,
    vhat: torch.Tensor,
    eta: torch.Tensor,
    log_alpha: torch.Tensor,
    log_mu: torch.Tensor | None,
    act_pair,
    dgd: bool,
    q: torch.Tensor | None = None,
):
    """Advance `state` over one chunk of writes; optionally read M(q_t) after each token's write.

    k, vhat, q: [..., C, d]; eta, log_alpha, log_mu: [..., C] (broadcastable over the memory dims).
    Returns (new_state, outputs or None). Outputs o_t = M(q_t; W_t), W_t the state after token t.
    """
    act, d_act = act_pair
    W1c, W2c, S1c, S2c = state.W1, state.W2, state.S1, state.S2
    momentum = log_mu is not None

    # Closed-form inner gradients at the chunk-start state.
    a = k @ W2c.transpose(-1, -2)  # [..., C, m]   a_t = W2_c k_t
    h = act(a)
    r = k + h @ W1c.transpose(-1, -2) - vhat  # [..., C, d]  residual M_c(k_t) - vhat_t
    u = d_act(a) * (r @ W1c)  # [..., C, m]   s'(a) * W1_c^T r

    # Decay and momentum coefficients. G[t,j] = prod_{j<i<=t} alpha_i; D[t,j] is the weight of
    # gradient j in the accumulated step of W_t; c_t the weight of the chunk-start momentum.
    log_g = torch.cumsum(log_alpha, dim=-1)
    G = _decay_matrix(log_g)
    if momentum:
        log_M = torch.cumsum(log_mu, dim=-1)
        Dm = _decay_matrix(log_M)
        D = G @ (eta.unsqueeze(-1) * Dm)
        c = (G @ (eta * log_M.exp()).unsqueeze(-1)).squeeze(-1)
    else:
        Dm = None
        D = G * eta.unsqueeze(-2)
        c = None
    g = log_g.exp()  # [..., C]

    # W2: gated delta rule. e_t = -eta_t W2_{t-1} k_t solves (I + L) E = RHS (unit lower triangular).
    kk = k @ k.transpose(-1, -2)  # [..., C, C]
    if dgd:
        C = k.shape[-2]
        strict = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
        log_g_prev = log_g - log_alpha  # log g_{t-1}
        G_prev = torch.where(strict, (log_g_prev.unsqueeze(-1) - log_g.unsqueeze(-2)), torch.full_like(G, float("-inf"))).exp()
        D_prev = F.pad(D[..., :-1, :], (0, 0, 1, 0))  # row t holds D[t-1, :]
        rhs = log_g_prev.exp().unsqueeze(-1) * a - ((D_prev * kk) @ u)
        if momentum:
            c_prev = F.pad(c[..., :-1], (1, 0))
            rhs = rhs - c_prev.unsqueeze(-1) * (k @ S2c.transpose(-1, -2))
        rhs = -eta.unsqueeze(-1) * rhs
        L = eta.unsqueeze(-1) * G_prev * kk
        eye = torch.eye(C, dtype=k.dtype, device=k.device)
        E = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
    else:
        E = None

    # Chunk-end state (t = C).
    gC, D_C, G_C = g[..., -1], D[..., -1, :], G[..., -1, :]
    W1_new = gC[..., None, None] * W1c - (r * D_C.unsqueeze(-1)).transpose(-1, -2) @ h
    coef2 = -D_C.unsqueeze(-1) * u
    if E is not None:
        coef2 = coef2 + G_C.unsqueeze(-1) * E
    W2_new = gC[..., None, None] * W2c + coef2.transpose(-1, -2) @ k
    S1_new = S2_new = None
    if momentum:
        cC, Dm_C, M_C = c[..., -1], Dm[..., -1, :], log_M[..., -1].exp()
        W1_new = W1_new - cC[..., None, None] * S1c
        W2_new = W2_new - cC[..., None, None] * S2c
        S1_new = M_C[..., None, None] * S1c + (r * Dm_C.unsqueeze(-1)).transpose(-1, -2) @ h
        S2_new = M_C[..., None, None] * S2c + (u * Dm_C.unsqueeze(-1)).transpose(-1, -2) @ k
    new_state = MemoryState(W1_new, W2_new, S1_new, S2_new)
    if q is None:
        return new_state, None

    # Dual form: o_t = q_t + W1_t s(W2_t q_t), with W_t after token t's write.
    # W2_t q_t = g_t W2_c q_t + sum_{j<=t} [G e_j - D u_j] (k_j . q_t)
    qk = q @ k.transpose(-1, -2)
    z = g.unsqueeze(-1) * (q @ W2c.transpose(-1, -2)) - (D * qk) @ u
    if E is not None:
        z = z + (G * qk) @ E
    if momentum:
        z = z - c.unsqueeze(-1) * (q @ S2c.transpose(-1, -2))
    hq = act(z)
    read = g.unsqueeze(-1) * (hq @ W1c.transpose(-1, -2)) - (D * (hq @ h.transpose(-1, -2))) @ r
    if momentum:
        read = read - c.unsqueeze(-1) * (hq @ S1c.transpose(-1, -2))
    return new_state, q + read


def token_update(state: MemoryState, start: MemoryState, k, vhat, eta, alpha, mu, act_pair, dgd: bool) -> MemoryState:
    """One token's write (decoding): gradients at the chunk-start state `start`, applied to `state`.

    k, vhat: [..., d]; eta, alpha, mu: [...] (mu None without momentum).
    """
    act, d_act = act_pair
    a = (start.W2 @ k.unsqueeze(-1)).squeeze(-1)  # [..., m]
    h = act(a)
    r = k + (start.W1 @ h.unsqueeze(-1)).squeeze(-1) - vhat  # [..., d]
    u = d_act(a) * (start.W1.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
    g1 = r.unsqueeze(-1) * h.unsqueeze(-2)  # [..., d, m]
    g2 = u.unsqueeze(-1) * k.unsqueeze(-2)  # [..., m, d]
    if mu is not None:
        S1 = mu[..., None, None] * state.S1 + g1
        S2 = mu[..., None, None] * state.S2 + g2
    else:
        S1, S2 = g1, g2
    e, al = eta[..., None, None], alpha[..., None, None]
    W1 = al * state.W1 - e * S1
    W2 = al * state.W2 - e * S2
    if dgd:
        W2 = W2 - e * (state.W2 @ k.unsqueeze(-1)) * k.unsqueeze(-2)
    return MemoryState(W1, W2, S1 if mu is not None else None, S2 if mu is not None else None)
