"""The chunk update of hope/memory.py with a hand-written backward that recomputes inside the chunk.

Autograd through `memory._chunk_update` stores every C x C coefficient matrix of every chunk and
launches one kernel per op; this module saves only the chunk's inputs and, in the backward,
recomputes the chunk and applies its vector-Jacobian product (each line the adjoint of one forward
line). Both directions are plain tensor code with no autograd and no triangular solve, so
torch.compile fuses each into a handful of kernels (`memory_kernel: compiled`, the CUDA default).
The same math, line for line, is in the Triton kernels of hope/triton_chunk.py
(`memory_kernel: triton`, experimental), which these functions are the tests' reference for.

Scope: no inner momentum (the default; momentum keeps the autograd path). Notation as in
memory.py: k, vhat, q [..., C, d]; eta, la (log alpha) [..., C]; W1 [..., d, m]; W2 [..., m, d].
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .config import MEMORY_PRECISIONS
from .memory import activation


def second_derivative(name: str):
    """s'' of the memory activation (u = s'(a) * p needs it in the backward)."""
    if name == "silu":
        def dd_silu(a):
            sig = torch.sigmoid(a)
            return sig * (1 - sig) * (2 + a * (1 - 2 * sig))
        return dd_silu
    if name == "gelu":
        def dd_gelu(a):
            pdf = torch.exp(-0.5 * a * a) / (2 * torch.pi) ** 0.5
            return pdf * (2 - a * a)
        return dd_gelu
    if name == "tanh":
        return lambda a: -2 * torch.tanh(a) * (1 - torch.tanh(a) ** 2)
    raise ValueError(f"unknown memory activation {name!r}")


def _masks(C: int, device):
    lower = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    return lower, lower.tril(-1)


def _gates(la: torch.Tensor):
    """lg = cumsum(la); G[t,j] = exp(lg_t - lg_j) (j<=t); Gp[t,j] = exp(lg_{t-1} - lg_j) (j<t)."""
    C = la.shape[-1]
    lower, strict = _masks(C, la.device)
    lg = torch.cumsum(la, dim=-1)
    lgp = lg - la
    zero = torch.zeros((), dtype=la.dtype, device=la.device)
    G = torch.where(lower, (lg.unsqueeze(-1) - lg.unsqueeze(-2)).where(lower, zero).exp(), zero)
    Gp = torch.where(strict, (lgp.unsqueeze(-1) - lg.unsqueeze(-2)).where(strict, zero).exp(), zero)
    return lg, lgp, G, Gp


def unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """(I + L)^-1 for strictly lower triangular L [..., C, C], by doubling 2x2 block inversions.

    [[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]], from 1x1 blocks up: log2(C) levels of
    two batched matmuls, every product one of true inverse blocks (no cancellation, unlike a
    Neumann series). Batched triangular solves are slow on GPUs for many small matrices; this is
    matmuls only. C is padded to a power of two with zeros (identity rows).
    """
    C = L.shape[-1]
    P = 1 << max(0, (C - 1).bit_length())
    if P != C:
        L = F.pad(L, (0, P - C, 0, P - C))
    lead = L.shape[:-2]
    T = torch.ones(*lead, P, 1, 1, dtype=L.dtype, device=L.device)  # the 1x1 diagonal blocks
    s = 1
    while s < P:
        nb = P // (2 * s)  # diagonal blocks of the next level: [..., nb, 2s, 2s]
        blocks = L.reshape(*lead, nb, 2 * s, nb, 2 * s).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
        T11, T22 = T[..., 0::2, :, :], T[..., 1::2, :, :]
        T21 = -(T22 @ blocks[..., s:, :s] @ T11)
        T = torch.cat([torch.cat([T11, torch.zeros_like(T11)], dim=-1), torch.cat([T21, T22], dim=-1)], dim=-2)
        s *= 2
    return T[..., 0, :C, :C]


def chunk_forward(W1, W2, k, vhat, eta, la, q, dgd: bool, act_name: str = "silu"):
    """(W1_new, W2_new, o or None): the same values as memory._chunk_update without momentum."""
    s, ds = activation(act_name)
    lg, lgp, G, Gp = _gates(la)
    a = k @ W2.transpose(-1, -2)
    h = s(a)
    r = k + h @ W1.transpose(-1, -2) - vhat
    u = ds(a) * (r @ W1)
    D = G * eta.unsqueeze(-2)
    g = lg.exp()
    E = None
    if dgd:
        kk = k @ k.transpose(-1, -2)
        rhs = -eta.unsqueeze(-1) * (lgp.exp().unsqueeze(-1) * a - ((Gp * eta.unsqueeze(-2) * kk) @ u))
        E = unit_lower_inverse(eta.unsqueeze(-1) * Gp * kk) @ rhs
    gC = g[..., -1, None, None]
    W1n = gC * W1 - (r * D[..., -1, :, None]).transpose(-1, -2) @ h
    coef2 = -D[..., -1, :, None] * u
    if E is not None:
        coef2 = coef2 + G[..., -1, :, None] * E
    W2n = gC * W2 + coef2.transpose(-1, -2) @ k
    if q is None:
        return W1n, W2n, None
    qk = q @ k.transpose(-1, -2)
    z = g.unsqueeze(-1) * (q @ W2.transpose(-1, -2)) - (D * qk) @ u
    if E is not None:
        z = z + (G * qk) @ E
    hq = s(z)
    read = g.unsqueeze(-1) * (hq @ W1.transpose(-1, -2)) - (D * (hq @ h.transpose(-1, -2))) @ r
    return W1n, W2n, q + read


def chunk_backward(W1, W2, k, vhat, eta, la, q, dgd: bool, dW1n, dW2n, do, act_name: str = "silu"):
    """Gradients (dW1, dW2, dk, dvhat, deta, dla, dq or None) of chunk_forward, recomputing it.

    Each line below is the adjoint of one forward line, in reverse order (docs/MEMORY_MATH.md).
    """
    s, ds = activation(act_name)
    dds = second_derivative(act_name)
    T = lambda x: x.transpose(-1, -2)  # noqa: E731
    rowsum = lambda x: x.sum(-1)  # noqa: E731
    colsum = lambda x: x.sum(-2)  # noqa: E731

    # ---- recompute the forward
    lg, lgp, G, Gp = _gates(la)
    g, gp = lg.exp(), lgp.exp()
    a = k @ T(W2)
    h, sp = s(a), ds(a)
    r = k + h @ T(W1) - vhat
    p = r @ W1
    u = sp * p
    eta_col, eta_row = eta.unsqueeze(-2), eta.unsqueeze(-1)
    D = G * eta_col
    D_C, G_C, gC = D[..., -1, :], G[..., -1, :], g[..., -1]
    if dgd:
        kk = k @ T(k)
        Dp = Gp * eta_col
        inner = gp.unsqueeze(-1) * a - (Dp * kk) @ u
        L = eta_row * Gp * kk
        Ti = unit_lower_inverse(L)
        E = Ti @ (-eta_row * inner)

    dG = torch.zeros_like(G)
    dD = torch.zeros_like(D)
    dg = torch.zeros_like(g)
    dk = torch.zeros_like(k)
    dh = torch.zeros_like(h)
    da = torch.zeros_like(a)
    du = torch.zeros_like(u)
    dr = torch.zeros_like(r)
    deta = torch.zeros_like(eta)
    dE = torch.zeros_like(E) if dgd else None
    dq = None

    # ---- dual-form read-out o = q + g*(hq W1^T) - (D*(hq h^T)) r
    dW1 = gC[..., None, None] * dW1n
    dW2 = gC[..., None, None] * dW2n
    if q is not None:
        qk = q @ T(k)
        Y = q @ T(W2)
        z = g.unsqueeze(-1) * Y - (D * qk) @ u
        if dgd:
            z = z + (G * qk) @ E
        hq = s(z)
        hh = hq @ T(h)
        dq = do.clone()
        X1 = g.unsqueeze(-1) * do
        dg += rowsum(do * (hq @ T(W1)))
        dhq = X1 @ W1
        dW1 += T(X1) @ hq
        dP = -do @ T(r)
        dr -= T(D * hh) @ do
        dD += dP * hh
        dhh = dP * D
        dhq += dhh @ h
        dh += T(dhh) @ hq
        dz = dhq * ds(z)
        dg += rowsum(dz * Y)
        dY = g.unsqueeze(-1) * dz
        dq += dY @ W2
        dW2 += T(dY) @ q
        dB1 = -dz @ T(u)
        du -= T(D * qk) @ dz
        dD += dB1 * qk
        dqk = dB1 * D
        if dgd:
            dB2 = dz @ T(E)
            dE += T(G * qk) @ dz
            dG += dB2 * qk
            dqk += dB2 * G
        dq += dqk @ k
        dk += T(dqk) @ q

    # ---- chunk-end state: W2n = gC W2 + coef2^T k ; W1n = gC W1 - (r*D_C)^T h
    dgC = (dW2n * W2).sum((-1, -2)) + (dW1n * W1).sum((-1, -2))
    coef2 = -D_C.unsqueeze(-1) * u
    if dgd:
        coef2 = coef2 + G_C.unsqueeze(-1) * E
    dcoef2 = k @ T(dW2n)
    dk += coef2 @ dW2n
    du -= D_C.unsqueeze(-1) * dcoef2
    dD_C = -rowsum(dcoef2 * u)
    if dgd:
        dE += G_C.unsqueeze(-1) * dcoef2
        dG[..., -1, :] += rowsum(dcoef2 * E)
    dR = -h @ T(dW1n)
    dh -= (r * D_C.unsqueeze(-1)) @ dW1n
    dr += D_C.unsqueeze(-1) * dR
    dD_C = dD_C + rowsum(dR * r)
    dD[..., -1, :] += dD_C
    dg[..., -1] += dgC

    # ---- gated delta rule: E = (I + L)^-1 rhs, rhs = -eta * inner
    if dgd:
        drhs = T(Ti) @ dE
        dL = torch.tril(-drhs @ T(E), -1)
        deta += rowsum(dL * Gp * kk)
        dGp = dL * eta_row * kk
        dkk = dL * eta_row * Gp
        deta -= rowsum(drhs * inner)
        dinner = -eta_row * drhs
        dgp = rowsum(dinner * a)
        da += gp.unsqueeze(-1) * dinner
        dB3 = -dinner @ T(u)
        du -= T(Dp * kk) @ dinner
        dDp = dB3 * kk
        dkk += dB3 * Dp
        dGp += dDp * eta_col
        deta += colsum(dDp * Gp)
        dk += (dkk + T(dkk)) @ k

    # ---- D = G * eta_j ; gates from lg = cumsum(la)
    dG += dD * eta_col
    deta += colsum(dD * G)
    dGG = dG * G
    dlg = rowsum(dGG) - colsum(dGG) + dg * g
    if dgd:
        dGpGp = dGp * Gp
        dlgp = rowsum(dGpGp) + dgp * gp
        dlg = dlg - colsum(dGpGp) + dlgp
        dla = -dlgp
    else:
        dla = torch.zeros_like(la)
    dla = dla + dlg.flip(-1).cumsum(-1).flip(-1)

    # ---- inner gradients at the chunk-start state
    dp = sp * du
    da += p * dds(a) * du
    dr += dp @ T(W1)
    dW1 += T(r) @ dp
    dk += dr
    dvhat = -dr
    dh += dr @ W1
    dW1 += T(dr) @ h
    da += dh * sp
    dk += da @ W2
    dW2 += T(da) @ k
    return dW1, dW2, dk, dvhat, deta, dla, dq


# ---------------------------------------------------------------------------------------------
# The autograd op: one chunk, forward and recomputing backward, eager or compiled.

def targets_forward(W1, W2, v, act_name: str = "silu"):
    """Self-generated targets vhat = M(v) = v + W1 s(W2 v) under the chunk-start state."""
    s, _ = activation(act_name)
    return v + s(v @ W2.transpose(-1, -2)) @ W1.transpose(-1, -2)


def targets_backward(W1, W2, v, dvhat, dW1, dW2, act_name: str = "silu"):
    """Adds the targets' share to dW1, dW2 (in place) and returns dv."""
    s, ds = activation(act_name)
    a = v @ W2.transpose(-1, -2)
    dW1 += dvhat.transpose(-1, -2) @ s(a)
    da = (dvhat @ W1) * ds(a)
    dW2 += da.transpose(-1, -2) @ v
    return dvhat + da @ W2


def write_forward(W1, W2, k, v, eta, la, q, dgd: bool, act_name: str, targets: bool):
    """(W1_new, W2_new, o or None) of one chunk's writes of v, or with `targets` of M(v)."""
    vhat = targets_forward(W1, W2, v, act_name) if targets else v
    return chunk_forward(W1, W2, k, vhat, eta, la, q, dgd, act_name)


def write_backward(W1, W2, k, v, eta, la, q, dgd: bool, dW1n, dW2n, do, act_name: str, targets: bool):
    """[dW1, dW2, dk, dv, deta, dla, dq or None] of write_forward, recomputing it."""
    vhat = targets_forward(W1, W2, v, act_name) if targets else v
    grads = list(chunk_backward(W1, W2, k, vhat, eta, la, q, dgd, dW1n, dW2n, do, act_name))
    if targets:  # grads: dW1, dW2, dk, dvhat, ... -> dv, and the targets' share of dW1, dW2
        grads[3] = targets_backward(W1, W2, v, grads[3], grads[0], grads[1], act_name)
    return grads


class Backend(NamedTuple):
    forward: Callable  # write_forward's arguments -> (W1_new, W2_new, o, *kept for the backward)
    backward: Callable  # write_backward's arguments, then *kept -> its gradients


_COMPILED: list[Backend] = []


def _implementation(backend: str, precision: str = "tf32") -> Backend:
    """The chunk update's functions: eager, torch.compile'd once per process (shapes specialise),
    or the Triton kernels, multiplying at `precision` (the others run in the inputs' dtype)."""
    if backend == "torch":
        return Backend(write_forward, write_backward)
    if backend == "triton":
        return Backend(partial(_triton_forward, precision=precision), partial(_triton_backward, precision=precision))
    if backend != "compiled":
        raise ValueError(f"unknown chunk backend {backend!r}")
    if not _COMPILED:
        _COMPILED.append(Backend(*(torch.compile(f, dynamic=False) for f in (write_forward, write_backward))))
    return _COMPILED[0]


def triton_options(precision: str) -> dict:
    """The launch options of every Triton kernel of hope/, multiplying at `precision` (the model
    field memory_precision): "tf32" (the default); "bf16" (bf16 operands, fp32 accumulation, fp32
    states: a third to a half of tf32's shared memory per program, so every kernel holds 2 or more
    programs per SM; ~1e-2 relative error on a layer's outputs and gradients); "tf32x3" (~fp32);
    "ieee" (exact fp32) is for the interpreter: compiled for a GPU it unrolls into scalar code that
    takes minutes to build. Triton's interpreter multiplies bf16 tiles wrongly (3.9), so there
    "bf16" rounds the operands to bf16 in fp32 instead. Programs run 4 warps (memory_pass.LAUNCH
    sets other launch options for the memory pass's kernels, for bench_chunk.py --pass --launch to time)."""
    if precision not in MEMORY_PRECISIONS:
        raise ValueError(f"memory_precision: expected one of {list(MEMORY_PRECISIONS)}, got {precision!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return dict(PREC="bf16-emulated" if precision == "bf16" and interpreted else precision)


def _shared_inputs(*tensors, share: bool = True):
    """The tensors without the lead dims they are all broadcast along, and the kernels' (SX, SH).

    The projection memories share k, v, eta, alpha: views broadcast along the memory dim. The
    kernels read one tile per group (triton_chunk._offsets) instead of a copy per memory, if the
    shared dims are one run (P, SX, SH) of the lead dims; otherwise (or not `share`) every memory
    gets its own copy.
    """
    lead = tensors[0].shape[:-2]  # the first is a [..., C, d] tile
    shared = [share and n > 1 and all(t.stride(i) == 0 for t in tensors) for i, n in enumerate(lead)]
    dims = [i for i, is_shared in enumerate(shared) if is_shared]
    if not dims or dims != list(range(dims[0], dims[-1] + 1)):
        return (*(t.contiguous() for t in tensors), 1, 1)
    one = tuple(slice(0, 1) if is_shared else slice(None) for is_shared in shared)
    return (*(t[one].contiguous() for t in tensors), math.prod(lead[dims[0]:dims[-1] + 1]),
            math.prod(lead[dims[-1] + 1:]))


def _delta_rule_inverse(k, eta, la, precision: str):
    """T = (I + L)^-1 of the chunk, one launch (contiguous inputs): the kernels take it as an input
    (it needs no memory state). The same doubling as unit_lower_inverse, ~60 small launches here."""
    from .triton_chunk import delta_rule_inverse_kernel
    C, d = k.shape[-2], k.shape[-1]
    T = torch.empty(*k.shape[:-1], C, dtype=k.dtype, device=k.device)
    delta_rule_inverse_kernel[(k.numel() // (C * d),)](k, eta, la, T, C=C, D=d, LOG2C=C.bit_length() - 1,
                                                       **triton_options(precision))
    return T


def _triton_forward(W1, W2, k, v, eta, la, q, dgd, act_name, targets, precision: str):
    from .triton_chunk import chunk_fwd_kernel
    C, d, m = k.shape[-2], k.shape[-1], W1.shape[-1]
    k, v, eta, la, SX, SH = _shared_inputs(k, v, eta, la, share=q is None)  # every memory reads its q out
    Ti = _delta_rule_inverse(k, eta, la, precision) if dgd else None
    W1, W2 = W1.contiguous(), W2.contiguous()
    q = None if q is None else q.contiguous()
    W1n, W2n = torch.empty_like(W1), torch.empty_like(W2)
    o = torch.empty_like(q) if q is not None else None
    chunk_fwd_kernel[(W1.numel() // (d * m),)](
        W1, W2, k, v, eta, la, k if q is None else q, k if Ti is None else Ti, W1n, W2n, k if o is None else o,
        SX, SH, C=C, D=d, M=m, DGD=dgd, HAS_Q=q is not None, TARGETS=targets, **triton_options(precision))  # k: a placeholder, never read
    return W1n, W2n, o, Ti  # T is kept for the backward (C x C per memory) instead of recomputed


def _triton_backward(W1, W2, k, v, eta, la, q, dgd, dW1n, dW2n, do, act_name, targets, Ti=None, *, precision: str):
    from .triton_chunk import (chunk_bwd_readout1_kernel, chunk_bwd_readout2_kernel, chunk_bwd_state_kernel,
                               state_kernel_options, targets_bwd_kernel)
    C, d, m = k.shape[-2], k.shape[-1], W1.shape[-1]
    shape_k, shape_eta = k.shape, eta.shape  # the gradients are per memory; autograd sums shared ones
    k, v, eta, la, SX, SH = _shared_inputs(k, v, eta, la, share=q is None)
    W1, W2, dW1n, dW2n = (t.contiguous() for t in (W1, W2, dW1n, dW2n))
    n = W1.numel() // (d * m)
    Ti = k if Ti is None else Ti  # without DGD the kernels never read it
    shapes = dict(SX=SX, SH=SH, C=C, D=d, M=m, DGD=dgd, TARGETS=targets, **triton_options(precision))
    dq = None
    partials = (k,) * 9  # placeholders: without a read-out the state kernel never reads them
    if q is not None:  # partial adjoints of the read-out, for the state kernel (every memory reads q out:
        # groups of one, SX = SH = 1)
        q, do = q.contiguous(), do.contiguous()
        dq, dkp, drp = (torch.empty_like(q) for _ in range(3))
        dW1p, dW2p = torch.empty_like(W1), torch.empty_like(W2)
        dhp, dup, dEp, dz = (q.new_empty(*q.shape[:-1], m) for _ in range(4))
        detap, dlgp = (q.new_empty(q.shape[:-1]) for _ in range(2))
        one_chunk = dict(sW=0, sK=0, sG=0)  # (memory_pass launches them over all chunks at once)
        chunk_bwd_readout1_kernel[(n,)](W1, W2, k, v, eta, la, q, Ti, do, dz, dW1p, drp, dhp, detap, dlgp,
                                        **one_chunk, **shapes)
        chunk_bwd_readout2_kernel[(n,)](W1, W2, k, v, eta, la, q, Ti, do, dz, dq, dW2p, dkp, dup, dEp, detap, dlgp,
                                        **one_chunk, **shapes)
        partials = (dW1p, dW2p, dkp, drp, dhp, dup, dEp, detap, dlgp)
    dW1, dW2 = torch.empty_like(W1), torch.empty_like(W2)
    dk, dvhat = (torch.empty(shape_k, dtype=k.dtype, device=k.device) for _ in range(2))
    deta, dla = (torch.empty(shape_eta, dtype=eta.dtype, device=eta.device) for _ in range(2))
    chunk_bwd_state_kernel[(n,)](W1, W2, k, v, eta, la, Ti, dW1n, dW2n, *partials,
                                 dW1, dW2, dk, dvhat, deta, dla, iP=0, HAS_Q=q is not None, **shapes,
                                 **state_kernel_options(shapes["PREC"]))
    dv = dvhat
    if targets:  # vhat = M(v): dv, and the targets' share added to dW1, dW2
        dv = torch.empty_like(dvhat)
        targets_bwd_kernel[(n,)](W1, W2, v, dvhat, dW1, dW2, dv, SX, SH, C=C, D=d, M=m, PREC=shapes["PREC"])
    return dW1, dW2, dk, dv, deta, dla, dq


class ChunkUpdate(torch.autograd.Function):
    """(W1, W2, k, vhat or v, eta, la, q) -> (W1_new, W2_new, o): saves the inputs only.

    With `targets`, the fourth input is v and the values are the self-generated targets
    vhat = M(v) under the chunk-start state, computed (and in the backward recomputed) inside.
    """

    @staticmethod
    def forward(ctx, W1, W2, k, vhat, eta, la, q, dgd, backend, act_name, targets, precision):
        inputs = (W1, W2, k, vhat, eta, la, q)
        ctx.shapes = [None if x is None else x.shape for x in inputs]
        # Broadcast every input to the full batch of memories (views), so that the hand-written
        # backward accumulates in place; its gradients are summed back to the input shapes.
        tails = (2, 2, 2, 2, 1, 1, 2)  # trailing non-batch dims: matrices, then eta and la [..., C]
        lead = torch.broadcast_shapes(*(x.shape[:x.ndim - t] for x, t in zip(inputs, tails) if x is not None))
        inputs = [None if x is None else x.expand(*lead, *x.shape[x.ndim - t:]) for x, t in zip(inputs, tails)]
        ctx.dgd, ctx.backend, ctx.act_name, ctx.targets, ctx.precision = dgd, backend, act_name, targets, precision
        W1n, W2n, o, *kept = _implementation(backend, precision).forward(*inputs, dgd, act_name, targets)  # Triton keeps T
        ctx.save_for_backward(*inputs, *kept)
        return W1n, W2n, o

    @staticmethod
    def backward(ctx, dW1n, dW2n, do):
        W1, W2, k, v, eta, la, q, *kept = ctx.saved_tensors
        if q is not None and do is None:
            do = torch.zeros_like(q)
        grads = list(_implementation(ctx.backend, ctx.precision).backward(
            W1, W2, k, v, eta, la, q, ctx.dgd, dW1n, dW2n, do, ctx.act_name, ctx.targets, *kept))
        grads = [None if g is None else g.sum_to_size(shape) for g, shape in zip(grads, ctx.shapes)]
        return (*grads, None, None, None, None, None)


def padded_length(C: int, backend: str) -> int:
    """The chunk length the backend runs: tl.dot wants power-of-two sides >= 16."""
    return max(16, 1 << (C - 1).bit_length()) if backend == "triton" else C


def fused_chunk_update(W1, W2, k, vhat, eta, la, q=None, *, dgd: bool, backend: str = "torch", act_name: str = "silu",
                       targets: bool = False, precision: str = "tf32"):
    """One chunk's writes (and read-out if q is given) with a recomputing backward; no momentum.

    Inputs broadcast like memory._chunk_update's (the projection memories share k, v, eta, alpha);
    gradients are summed back to each input's shape. backend: "torch", "compiled" or "triton"
    (hope/triton_chunk.py: SiLU, head and memory widths powers of two >= 16). targets=True: the
    fourth input is v, and the values written are the self-generated targets M(v) at the
    chunk-start state (memory_forward), computed inside the op rather than by autograd around it.
    precision: the Triton kernels' matmuls (config.MEMORY_PRECISIONS).
    """
    C = k.shape[-2]
    padded = padded_length(C, backend)
    if padded != C:  # tl.dot wants power-of-two sides >= 16. Tokens with eta = 0 and alpha = 1 write
        # nothing and later tokens never affect earlier ones, so zero padding at the end is exact.
        pad = padded - C
        k, vhat, eta, la = F.pad(k, (0, 0, 0, pad)), F.pad(vhat, (0, 0, 0, pad)), F.pad(eta, (0, pad)), F.pad(la, (0, pad))
        q = None if q is None else F.pad(q, (0, 0, 0, pad))
    W1n, W2n, o = ChunkUpdate.apply(W1, W2, k, vhat, eta, la, q, dgd, backend, act_name, targets, precision)
    return W1n, W2n, (None if o is None else o[..., :C, :])
