"""Triton kernels of one chunk update (`memory_kernel: triton`, experimental): forward, and a
backward in three kernels that recompute the chunk.

One program per memory (batch x memory x head): it loads the chunk-start state W1 [d, m],
W2 [m, d], the chunk's k, v, q [C, d], eta, log alpha [C] and T = (I + L)^-1 [C, C] (the
gated-delta-rule inverse: it depends on k, eta, alpha only, so `delta_rule_inverse_kernel`
computes it first and the backward reuses it), and does the whole chunk on chip. The values
written are v, or with TARGETS the self-generated targets M_c(v), which each kernel recomputes
(`_values`). Memories that share k, v, eta, alpha (the projection memories) read one copy of them
and of T (`_offsets`). hope/chunk_grad.py is the same math in PyTorch, line for line, and the
reference these kernels are tested against (under TRITON_INTERPRET=1 on CPU). SiLU only; fp32 in
and out; the matmuls run at `PREC` ("ieee" exact fp32, "tf32x3" ~fp32, "tf32", or "bf16": bf16
operands, fp32 accumulation; hope/chunk_grad.py's triton_options picks it).

The backward is split because one kernel holding every adjoint needed 385 KB of shared memory
on the H100 (limit 227 KB) and minutes to compile. The backward differentiates the
dual-form read-out in two halves (`chunk_bwd_readout1_kernel` up to dz = d(W2_t q_t), then
`chunk_bwd_readout2_kernel`), which hand partial adjoints (7 tiles, and the gate adjoints
already reduced to two vectors) to `chunk_bwd_state_kernel`: the chunk-end state, the delta rule,
the gates and the inner gradients; with TARGETS, `targets_bwd_kernel` takes d vhat on to v. Each kernel recomputes the forward quantities it needs
(`_recompute`). hope/memory_pass.py runs the read-out apart from the writes: `chunk_readout_kernel`
(the forward's read-out alone) and the two read-out adjoint kernels, each once over all chunks of a
pass (`_chunk_of_pass`). tools/triton_resources.py compiles them for sm_90 without a GPU and
prints their shared memory, registers and spills.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs and exported models never launch these kernels
    class triton:  # noqa: N801  a stand-in so that the definitions below still parse
        jit = staticmethod(lambda fn: fn)
    tl = None


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    if PREC == "bf16":  # bf16 operands, fp32 accumulation (the states stay fp32 between chunks)
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PREC == "bf16-emulated":  # the interpreter's bf16 dot is wrong (Triton 3.9): same rounding, in fp32
        c = tl.dot(_round_to_bf16(a), _round_to_bf16(b), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _round_to_bf16(x):
    """x rounded to the nearest bf16 (ties to even), kept in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_if(PTR, offsets, reads):
    """PTR[offsets] if `reads` (1, a flag of the whole program), zeros without reading if 0."""
    return tl.load(PTR + offsets, mask=offsets * 0 + reads != 0, other=0.0)


@triton.jit
def _gates(la, rc, C: tl.constexpr):
    """lg = cumsum(la), lgp = lg - la; G, Gp as in chunk_grad._gates; last-row values."""
    lg = tl.cumsum(la, 0)
    lgp = lg - la
    lower = rc[:, None] >= rc[None, :]
    strict = rc[:, None] > rc[None, :]
    G = tl.where(lower, tl.exp(tl.where(lower, lg[:, None] - lg[None, :], 0.0)), 0.0)
    Gp = tl.where(strict, tl.exp(tl.where(strict, lgp[:, None] - lg[None, :], 0.0)), 0.0)
    lgC = tl.sum(la, 0)
    return lg, lgp, G, Gp, lgC, strict


@triton.jit
def _offsets(n, SX, SH, C: tl.constexpr, D: tl.constexpr, M: tl.constexpr):
    """Program n's element offsets: tokens rc, tiles [C, d], [C, m], [d, m], [m, d], vectors [C];
    then the tile [C, d], vector [C] and index of the k, eta, alpha (and T) that program n reads.

    Memories may share k, eta, alpha (the projection memories do): with the programs laid out as
    (P, SX, SH), the SX memories of a group read one tile, number p * SH + h. SX = SH = 1: n's own.
    """
    rc, rd, rm = tl.arange(0, C), tl.arange(0, D), tl.arange(0, M)
    cd = n * C * D + rc[:, None] * D + rd[None, :]
    cm = n * C * M + rc[:, None] * M + rm[None, :]
    dm = n * D * M + rd[:, None] * M + rm[None, :]
    md = n * M * D + rm[:, None] * D + rd[None, :]
    nk = (n // (SX * SH)) * SH + n % SH
    return rc, cd, cm, dm, md, n * C + rc, nk * C * D + rc[:, None] * D + rd[None, :], nk * C + rc, nk


@triton.jit
def _reader(W1, W2, K, ETA, SX, SH, C: tl.constexpr, D: tl.constexpr, M: tl.constexpr):
    """Read-out kernels run one program per group of memories sharing k (p = program_id(0), as nk):
    the group's last memory reads q out (groups of one: every memory). Its index n, offsets, the
    offsets of the group's [C, m], [d, m], [m, d] tiles (the partial adjoints), and its chunk-start
    state w1, w2, k and eta."""
    p = tl.program_id(0).to(tl.int64)
    n = ((p // SH) * SX + SX - 1) * SH + p % SH
    rc, cd, cm, dm, md, cv, kcd, kcv, nk = _offsets(n, SX, SH, C, D, M)
    _, _, gcm, gdm, gmd, _, _, _, _ = _offsets(p, 1, 1, C, D, M)
    w1 = tl.load(W1 + dm)
    w2 = tl.load(W2 + md)
    return n, rc, kcd, kcv, nk, gcm, gdm, gmd, w1, w2, tl.load(K + kcd), tl.load(ETA + kcv)


@triton.jit
def _recompute(w1, w2, k, vh, eta, la, TI, nk, rc, C: tl.constexpr, DGD: tl.constexpr, PREC: tl.constexpr):
    """The forward quantities of a chunk, from its start state (every kernel starts here)."""
    lg, lgp, G, Gp, lgC, strict = _gates(la, rc, C)
    a = _dot(k, tl.trans(w2), PREC)
    sig = tl.sigmoid(a)
    h = a * sig
    sp = sig * (1 + a * (1 - sig))
    r = k + _dot(h, tl.trans(w1), PREC) - vh
    p = _dot(r, w1, PREC)
    u = sp * p
    if DGD:
        Ti = tl.load(TI + nk * C * C + rc[:, None] * C + rc[None, :])
        kk = _dot(k, tl.trans(k), PREC)
        inner = tl.exp(lgp)[:, None] * a - _dot(Gp * eta[None, :] * kk, u, PREC)
        E = _dot(Ti, -eta[:, None] * inner, PREC)
    else:
        Ti, kk, inner, E = G, G, a, a  # unused without DGD
    return lg, lgp, G, Gp, lgC, strict, a, sig, h, sp, r, p, u, Ti, kk, inner, E


@triton.jit
def _readout_z(q, k, w2, u, E, G, Dm, g, DGD: tl.constexpr, PREC: tl.constexpr):
    """z = W2_t q_t of the dual form, with its pieces qk = q k^T and Y = q W2_c^T."""
    qk = _dot(q, tl.trans(k), PREC)
    Y = _dot(q, tl.trans(w2), PREC)
    z = g[:, None] * Y - _dot(Dm * qk, u, PREC)
    if DGD:
        z += _dot(G * qk, E, PREC)
    return qk, Y, z


@triton.jit
def delta_rule_inverse_kernel(K, ETA, LA, TI, C: tl.constexpr, D: tl.constexpr, LOG2C: tl.constexpr,
                              PREC: tl.constexpr):
    """T = (I + L)^-1 with L = diag(eta) (Gp * k k^T), one memory per program: the ~60 small
    PyTorch ops of chunk_grad.unit_lower_inverse and its inputs in one launch, same doubling.

    Level s makes the inverses of the s x s diagonal blocks into those of the 2s x 2s blocks,
    [[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]: with X block-diagonal (the level's
    inverses) and B' the lower-left s x s blocks of L inside each 2s block, X <- X - X B' X.
    """
    n = tl.program_id(0).to(tl.int64)
    rc, rd = tl.arange(0, C), tl.arange(0, D)
    k = tl.load(K + n * C * D + rc[:, None] * D + rd[None, :])
    eta = tl.load(ETA + n * C + rc)
    _, _, _, Gp, _, _ = _gates(tl.load(LA + n * C + rc), rc, C)
    L = eta[:, None] * Gp * _dot(k, tl.trans(k), PREC)
    X = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)
    for level in tl.static_range(LOG2C):
        # s = 2^level: same 2s block, row in its lower half, column in its upper half
        same_block = rc[:, None] >> (level + 1) == rc[None, :] >> (level + 1)
        lower_left = same_block & ((rc[:, None] >> level) & 1 == 1) & ((rc[None, :] >> level) & 1 == 0)
        X = X - _dot(_dot(X, tl.where(lower_left, L, 0.0), PREC), X, PREC)
    tl.store(TI + n * C * C + rc[:, None] * C + rc[None, :], X)


@triton.jit
def _values(v, w1, w2, TARGETS: tl.constexpr, PREC: tl.constexpr):
    """The values the chunk writes: v, or with TARGETS the self-generated targets
    vhat = M_c(v) = v + W1 silu(W2 v) under the chunk-start state (recomputed where needed)."""
    if TARGETS:
        av = _dot(v, tl.trans(w2), PREC)
        v = v + _dot(av * tl.sigmoid(av), tl.trans(w1), PREC)
    return v


@triton.jit
def targets_bwd_kernel(W1, W2, V, DVH, DW1, DW2, DV, SX, SH, C: tl.constexpr, D: tl.constexpr,
                       M: tl.constexpr, PREC: tl.constexpr):
    """The targets' adjoint: dv, and their share added to dW1, dW2 in place."""
    n = tl.program_id(0).to(tl.int64)
    rc, cd, cm, dm, md, cv, kcd, kcv, nk = _offsets(n, SX, SH, C, D, M)
    v = tl.load(V + kcd)
    w2 = tl.load(W2 + md)
    dvh = tl.load(DVH + cd)
    av = _dot(v, tl.trans(w2), PREC)
    sig = tl.sigmoid(av)
    tl.store(DW1 + dm, tl.load(DW1 + dm) + _dot(tl.trans(dvh), av * sig, PREC))
    dav = _dot(dvh, tl.load(W1 + dm), PREC) * (sig * (1 + av * (1 - sig)))
    tl.store(DW2 + md, tl.load(DW2 + md) + _dot(tl.trans(dav), v, PREC))
    tl.store(DV + cd, dvh + _dot(dav, w2, PREC))


@triton.jit
def chunk_fwd_kernel(W1, W2, K, V, ETA, LA, Q, TI, W1N, W2N, O,
                     SX, SH, C: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
                     DGD: tl.constexpr, HAS_Q: tl.constexpr, TARGETS: tl.constexpr, PREC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rc, cd, cm, dm, md, cv, kcd, kcv, nk = _offsets(n, SX, SH, C, D, M)
    w1 = tl.load(W1 + dm)
    w2 = tl.load(W2 + md)
    k = tl.load(K + kcd)
    eta = tl.load(ETA + kcv)
    lg, lgp, G, Gp, lgC, strict, a, sig, h, sp, r, p, u, Ti, kk, inner, E = _recompute(
        w1, w2, k, _values(tl.load(V + kcd), w1, w2, TARGETS, PREC), eta, tl.load(LA + kcv), TI, nk, rc, C, DGD, PREC)
    gC = tl.exp(lgC)
    GC = tl.exp(lgC - lg)  # last rows of G and D
    DC = GC * eta
    coef2 = -DC[:, None] * u
    if DGD:
        coef2 += GC[:, None] * E
    tl.store(W1N + dm, gC * w1 - _dot(tl.trans(r * DC[:, None]), h, PREC))
    tl.store(W2N + md, gC * w2 + _dot(tl.trans(coef2), k, PREC))

    if HAS_Q:  # the group's last memory reads q out (groups of one: every memory)
        if (n // SH) % SX == SX - 1:
            tl.store(O + kcd, _readout_o(tl.load(Q + kcd), k, w1, w2, h, r, u, E, G, lg, eta, DGD, PREC))


@triton.jit
def _readout_o(q, k, w1, w2, h, r, u, E, G, lg, eta, DGD: tl.constexpr, PREC: tl.constexpr):
    """o = q + M_t(q), the dual-form read-out of every token t of the chunk under its own state."""
    g = tl.exp(lg)
    Dm = G * eta[None, :]
    qk, Y, z = _readout_z(q, k, w2, u, E, G, Dm, g, DGD, PREC)
    hq = z * tl.sigmoid(z)
    return q + g[:, None] * _dot(hq, tl.trans(w1), PREC) - _dot(Dm * _dot(hq, tl.trans(h), PREC), r, PREC)


@triton.jit
def _chunk_of_pass(W1, W2, K, V, Q, ETA, LA, TI, sW, sK, sG, C: tl.constexpr):
    """The read-out kernels' inputs at chunk i = program_id(1), for a launch over every chunk of a
    pass (hope/memory_pass.py; one chunk otherwise, i = 0): the states [n + 1, B, X, H, ...] are sW
    apart, the k, v, q [n, 3, B, H, C, d] sK, the gates [n, 2, B, H, C] sG; and iP = i * P, for the
    tensors [n, P, ...] that hold P = num_programs(0) tiles per chunk (T, the outputs)."""
    i = tl.program_id(1).to(tl.int64)
    oW, oK, oG, iP = i * sW, i * sK, i * sG, i * tl.num_programs(0)
    return W1 + oW, W2 + oW, K + oK, V + oK, Q + oK, ETA + oG, LA + oG, TI + iP * C * C, iP


@triton.jit
def chunk_readout_kernel(W1, W2, K, V, ETA, LA, Q, TI, O, SX, SH, sW, sK, sG,
                         C: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
                         DGD: tl.constexpr, TARGETS: tl.constexpr, PREC: tl.constexpr):
    """chunk_fwd_kernel's read-out alone, for all chunks of a pass in one launch (grid: groups x
    chunks): it needs only each chunk's start state, so it leaves the chunk-to-chunk loop."""
    W1, W2, K, V, Q, ETA, LA, TI, iP = _chunk_of_pass(W1, W2, K, V, Q, ETA, LA, TI, sW, sK, sG, C)
    n, rc, kcd, kcv, nk, gcm, gdm, gmd, w1, w2, k, eta = _reader(W1, W2, K, ETA, SX, SH, C, D, M)
    lg, lgp, G, Gp, lgC, strict, a, sig, h, sp, r, p, u, Ti, kk, inner, E = _recompute(
        w1, w2, k, _values(tl.load(V + kcd), w1, w2, TARGETS, PREC), eta, tl.load(LA + kcv), TI, nk, rc, C, DGD, PREC)
    tl.store(O + iP * C * D + kcd, _readout_o(tl.load(Q + kcd), k, w1, w2, h, r, u, E, G, lg, eta, DGD, PREC))


@triton.jit
def chunk_bwd_readout1_kernel(W1, W2, K, V, ETA, LA, Q, TI, DO,
                              DZ, DW1P, DRP, DHP, DETAP, DLGP,
                              SX, SH, sW, sK, sG, C: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
                              DGD: tl.constexpr, TARGETS: tl.constexpr, PREC: tl.constexpr):
    """Read-out adjoint, first half: o = q + g*(hq W1^T) - (D*(hq h^T)) r back to dz = d(W2_t q_t).
    It needs no state gradient, so memory_pass runs it for all chunks in one launch (_chunk_of_pass)."""
    W1, W2, K, V, Q, ETA, LA, TI, iP = _chunk_of_pass(W1, W2, K, V, Q, ETA, LA, TI, sW, sK, sG, C)
    DO, DZ, DW1P, DRP, DHP = DO + iP * C * D, DZ + iP * C * M, DW1P + iP * D * M, DRP + iP * C * D, DHP + iP * C * M
    DETAP, DLGP = DETAP + iP * C, DLGP + iP * C
    n, rc, kcd, kcv, nk, gcm, gdm, gmd, w1, w2, k, eta = _reader(W1, W2, K, ETA, SX, SH, C, D, M)
    lg, lgp, G, Gp, lgC, strict, a, sig, h, sp, r, p, u, Ti, kk, inner, E = _recompute(
        w1, w2, k, _values(tl.load(V + kcd), w1, w2, TARGETS, PREC), eta, tl.load(LA + kcv), TI, nk, rc, C, DGD, PREC)
    g = tl.exp(lg)
    Dm = G * eta[None, :]
    qk, Y, z = _readout_z(tl.load(Q + kcd), k, w2, u, E, G, Dm, g, DGD, PREC)
    sz = tl.sigmoid(z)
    hq = z * sz
    do = tl.load(DO + kcd)
    X1 = g[:, None] * do
    dg = tl.sum(do * _dot(hq, tl.trans(w1), PREC), 1)
    dhq = _dot(X1, w1, PREC)
    tl.store(DW1P + gdm, _dot(tl.trans(X1), hq, PREC))
    hh = _dot(hq, tl.trans(h), PREC)
    dP = -_dot(do, tl.trans(r), PREC)
    tl.store(DRP + kcd, -_dot(tl.trans(Dm * hh), do, PREC))
    dD = dP * hh
    dhh = dP * Dm
    dhq += _dot(dhh, h, PREC)
    tl.store(DHP + gcm, _dot(tl.trans(dhh), hq, PREC))
    tl.store(DZ + gcm, dhq * (sz * (1 + z * (1 - sz))))
    # D = G * eta_j, G = exp(lg_t - lg_j): this half's gate adjoints, reduced to vectors
    dGG = dD * eta[None, :] * G
    tl.store(DETAP + kcv, tl.sum(dD * G, 0))
    tl.store(DLGP + kcv, tl.sum(dGG, 1) - tl.sum(dGG, 0) + dg * g)


@triton.jit
def chunk_bwd_readout2_kernel(W1, W2, K, V, ETA, LA, Q, TI, DO, DZ,
                              DQ, DW2P, DKP, DUP, DEP, DETAP, DLGP,
                              SX, SH, sW, sK, sG, C: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
                              DGD: tl.constexpr, TARGETS: tl.constexpr, PREC: tl.constexpr):
    """Read-out adjoint, second half: dz back through z = g*(q W2^T) - (D*qk) u + (G*qk) E."""
    W1, W2, K, V, Q, ETA, LA, TI, iP = _chunk_of_pass(W1, W2, K, V, Q, ETA, LA, TI, sW, sK, sG, C)
    DO, DZ, DQ, DW2P, DKP = DO + iP * C * D, DZ + iP * C * M, DQ + iP * C * D, DW2P + iP * M * D, DKP + iP * C * D
    DUP, DEP, DETAP, DLGP = DUP + iP * C * M, DEP + iP * C * M, DETAP + iP * C, DLGP + iP * C
    n, rc, kcd, kcv, nk, gcm, gdm, gmd, w1, w2, k, eta = _reader(W1, W2, K, ETA, SX, SH, C, D, M)
    lg, lgp, G, Gp, lgC, strict, a, sig, h, sp, r, p, u, Ti, kk, inner, E = _recompute(
        w1, w2, k, _values(tl.load(V + kcd), w1, w2, TARGETS, PREC), eta, tl.load(LA + kcv), TI, nk, rc, C, DGD, PREC)
    g = tl.exp(lg)
    Dm = G * eta[None, :]
    q = tl.load(Q + kcd)
    qk = _dot(q, tl.trans(k), PREC)
    Y = _dot(q, tl.trans(w2), PREC)
    dz = tl.load(DZ + gcm)
    dg = tl.sum(dz * Y, 1)
    dY = g[:, None] * dz
    dq = tl.load(DO + kcd) + _dot(dY, w2, PREC)
    tl.store(DW2P + gmd, _dot(tl.trans(dY), q, PREC))
    dB1 = -_dot(dz, tl.trans(u), PREC)
    tl.store(DUP + gcm, -_dot(tl.trans(Dm * qk), dz, PREC))
    dD = dB1 * qk
    dqk = dB1 * Dm
    if DGD:
        dB2 = _dot(dz, tl.trans(E), PREC)
        tl.store(DEP + gcm, _dot(tl.trans(G * qk), dz, PREC))
        dG = dB2 * qk
        dqk += dB2 * G
    else:
        tl.store(DEP + gcm, tl.zeros([C, M], dtype=tl.float32))
        dG = tl.zeros([C, C], dtype=tl.float32)
    tl.store(DQ + kcd, dq + _dot(dqk, k, PREC))
    tl.store(DKP + kcd, _dot(tl.trans(dqk), q, PREC))
    dG += dD * eta[None, :]
    dGG = dG * G
    # add this half's gate adjoints to the first half's
    tl.store(DETAP + kcv, tl.load(DETAP + kcv) + tl.sum(dD * G, 0))
    tl.store(DLGP + kcv, tl.load(DLGP + kcv) + tl.sum(dGG, 1) - tl.sum(dGG, 0) + dg * g)


def state_kernel_options(PREC: str) -> dict:
    """chunk_bwd_state_kernel's REMAT: on where fp32 operand tiles make shared memory bound its
    programs per SM; off at bf16, where registers bound them (2 per SM either way) and rematerializing
    only adds instructions (tools/triton_resources.py --remat 0|1 under the GPU's Triton 3.6, sm_90,
    bf16: 4,408 -> 4,504 B spilled, 13,280 -> 15,248 instructions; tf32: 4,752 -> 4,520 B spilled,
    1 -> 2 programs per SM). hope.memory_pass.LAUNCH may set it otherwise, for the GPU to decide."""
    return {"REMAT": not PREC.startswith("bf16")}


@triton.jit
def chunk_bwd_state_kernel(W1, W2, K, V, ETA, LA, TI, DW1N, DW2N,
                           DW1P, DW2P, DKP, DRP, DHP, DUP, DEP, DETAP, DLGP,
                           DW1, DW2, DK, DVH, DETA, DLA,
                           SX, SH, iP, C: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
                           DGD: tl.constexpr, HAS_Q: tl.constexpr, TARGETS: tl.constexpr, PREC: tl.constexpr,
                           REMAT: tl.constexpr):
    """Adjoint of the chunk-end state, the delta rule, the gates and the inner gradients.

    Ordered to keep few tiles live at once (each [64, 64] fp32 tile is 32 registers per thread of
    4 warps, and a thread has 255): the read-out's partial adjoints are loaded where they are added,
    dW1n and dW2n where they are used (and again at the end), W2's half of the chunk-end adjoint
    before the delta rule and W1's after it, the activation's derivatives where they are used
    (tools/triton_resources.py prints the bytes spilled: 4,152 -> 3,440 per thread at tf32, Triton 3.9)."""
    n = tl.program_id(0).to(tl.int64)
    rc, cd, cm, dm, md, cv, kcd, kcv, nk = _offsets(n, SX, SH, C, D, M)
    last = rc == C - 1
    w1 = tl.load(W1 + dm)
    w2 = tl.load(W2 + md)
    k = tl.load(K + kcd)
    eta = tl.load(ETA + kcv)
    lg, lgp, G, Gp, lgC, strict, a, sig, h, sp, r, p, u, Ti, kk, inner, E = _recompute(
        w1, w2, k, _values(tl.load(V + kcd), w1, w2, TARGETS, PREC), eta, tl.load(LA + kcv), TI, nk, rc, C, DGD, PREC)
    gp = tl.exp(lgp)
    gC = tl.exp(lgC)
    GC = tl.exp(lgC - lg)  # last rows of G and D
    DC = GC * eta
    # the read-out's partial adjoints, for the memory of the group that reads q out (offsets: the
    # group's; iP: this chunk's first group when they are held for all chunks, [n, P, ...])
    reads = ((n // SH) % SX == SX - 1).to(tl.int32) if HAS_Q else 0
    _, _, gcm, gdm, gmd, _, _, _, _ = _offsets(nk, 1, 1, C, D, M)
    iP = tl.cast(iP, tl.int64)  # (an argument equal to 1 may arrive as a constant)
    DW1P, DW2P, DKP, DRP = DW1P + iP * D * M, DW2P + iP * M * D, DKP + iP * C * D, DRP + iP * C * D
    DHP, DUP, DEP, DETAP, DLGP = DHP + iP * C * M, DUP + iP * C * M, DEP + iP * C * M, DETAP + iP * C, DLGP + iP * C
    deta = _load_if(DETAP, kcv, reads)
    dlg = _load_if(DLGP, kcv, reads)

    # ---- chunk-end state, W2's half: W2n = gC W2 + coef2^T k
    dw2n = tl.load(DW2N + md)
    coef2 = -DC[:, None] * u
    if DGD:
        coef2 += GC[:, None] * E
    dgC = tl.sum(tl.sum(dw2n * w2, 1), 0)
    dcoef2 = _dot(k, tl.trans(dw2n), PREC)
    dk = _dot(coef2, dw2n, PREC) + _load_if(DKP, kcd, reads)
    du = _load_if(DUP, gcm, reads) - DC[:, None] * dcoef2
    dDC = -tl.sum(dcoef2 * u, 1)
    dGlast = tl.zeros([C], dtype=tl.float32)
    if DGD:
        dE = _load_if(DEP, gcm, reads) + GC[:, None] * dcoef2
        dGlast += tl.sum(dcoef2 * E, 1)

    # ---- gated delta rule: E = T rhs, rhs = -eta * inner
    if DGD:
        drhs = _dot(tl.trans(Ti), dE, PREC)
        dL = tl.where(strict, -_dot(drhs, tl.trans(E), PREC), 0.0)
        deta += tl.sum(dL * Gp * kk, 1)
        dGp = dL * eta[:, None] * kk
        dkk = dL * eta[:, None] * Gp
        deta -= tl.sum(drhs * inner, 1)
        dinner = -eta[:, None] * drhs
        dgp = tl.sum(dinner * a, 1)
        da = gp[:, None] * dinner
        Dp = Gp * eta[None, :]
        dB3 = -_dot(dinner, tl.trans(u), PREC)
        du -= _dot(tl.trans(Dp * kk), dinner, PREC)
        dDp = dB3 * kk
        dkk += dB3 * Dp
        dGp += dDp * eta[None, :]
        deta += tl.sum(dDp * Gp, 0)
        dk += _dot(dkk + tl.trans(dkk), k, PREC)
        dGpGp = dGp * Gp
        dlgp = tl.sum(dGpGp, 1) + dgp * gp
        dlg = dlg - tl.sum(dGpGp, 0) + dlgp
    else:
        da = tl.zeros([C, M], dtype=tl.float32)
        dlgp = tl.zeros([C], dtype=tl.float32)

    # ---- chunk-end state, W1's half: W1n = gC W1 - (r*D_C)^T h
    if REMAT:  # the forward's a, h, r, p again from the state reloaded (volatile: a plain load would
        # be merged with the first), so that they are not held through the delta rule: their dots'
        # operands take 115 KB of shared memory instead of 180 at tf32, 2 programs per SM instead of 1
        w1, w2, k = tl.load(W1 + dm, volatile=True), tl.load(W2 + md, volatile=True), tl.load(K + kcd, volatile=True)
        a = _dot(k, tl.trans(w2), PREC)
        h = a * tl.sigmoid(a)
        r = k + _dot(h, tl.trans(w1), PREC) - _values(tl.load(V + kcd, volatile=True), w1, w2, TARGETS, PREC)
        p = _dot(r, w1, PREC)
    dw1n = tl.load(DW1N + dm)
    dgC += tl.sum(tl.sum(dw1n * w1, 1), 0)
    dR = -_dot(h, tl.trans(dw1n), PREC)
    dh = _load_if(DHP, gcm, reads) - _dot(r * DC[:, None], dw1n, PREC)
    dr = _load_if(DRP, kcd, reads) + DC[:, None] * dR
    dDC += tl.sum(dR * r, 1)
    # last rows of D and G (as vectors over j), and gC = g_{C-1}
    dGlast += dDC * eta
    deta += dDC * GC
    v = dGlast * GC
    dlg += tl.where(last, tl.sum(v, 0) + dgC * gC, 0.0) - v
    dla = tl.cumsum(dlg, 0, reverse=True) - dlgp

    # ---- inner gradients at the chunk-start state
    sig = tl.sigmoid(a)
    sp = sig * (1 + a * (1 - sig))
    dp = sp * du
    da += p * (sig * (1 - sig) * (2 + a * (1 - 2 * sig))) * du
    dr += _dot(dp, tl.trans(w1), PREC)
    dw1 = gC * tl.load(DW1N + dm) + _load_if(DW1P, gdm, reads)
    dw1 += _dot(tl.trans(r), dp, PREC)
    dk += dr
    dh += _dot(dr, w1, PREC)
    dw1 += _dot(tl.trans(dr), h, PREC)
    da += dh * sp
    dk += _dot(da, w2, PREC)
    dw2 = gC * tl.load(DW2N + md) + _load_if(DW2P, gmd, reads)
    dw2 += _dot(tl.trans(da), k, PREC)

    tl.store(DW1 + dm, dw1)
    tl.store(DW2 + md, dw2)
    tl.store(DK + cd, dk)
    tl.store(DVH + cd, -dr)  # with TARGETS, targets_bwd_kernel takes d vhat on to v (here it would
    # take 16 KB more shared memory than the H100 has)
    tl.store(DETA + cv, deta)
    tl.store(DLA + cv, dla)
