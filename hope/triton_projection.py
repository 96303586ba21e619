"""Triton kernels of the projection read (`memory_kernel: triton`): the five projection memories'
reads of one chunk and what the model derives from them, forward and recomputing backward.

One program per memory (batch x memory x head, memories in the order k, v, q, eta, alpha). It reads
M_c(z) = z + W1 silu(W2 z) of its chunk z [C, d] under the chunk-start state, then by its memory:
k, v, q: rows normalised to unit length (v only with normalize_v); eta: eta_max * sigmoid(read .
w_eta + b_eta); alpha: log sigmoid(read . w_alpha + b_alpha) (0 without decay). eta and alpha of the
padding tokens (rows >= VALID) are 0: they write nothing. hope/projection_step.py has the same math
in PyTorch (`read_forward`, `read_backward`), the reference these kernels are tested against.

The backward sums, per memory, the gradients that reach k, v, eta, alpha from the writes (per
memory: the five, or six with the main memory's, summed here instead of by PyTorch ops) and
from the main pass, differentiates the read-out, then the read (its share of dW1, dW2 is added in
place), and writes dz and the read-out weights' per-batch partial gradients. The states may hold
the main memory as a sixth (NS = 6): hope/memory_pass.py runs all six memories' writes as one.
"""
from __future__ import annotations

from .triton_chunk import _dot, tl, triton

MEMORIES = tl.constexpr(5) if tl is not None else 5  # k, v, q, eta, alpha (a global a kernel may read)


@triton.jit
def _program(Z, sZb, sZx, sZh, sZc, W1, W2, H, VALID, C: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
             NS: tl.constexpr, PREC: tl.constexpr):
    """Program n's (b, x, h), its chunk z (rows >= VALID read as 0), the index of its state in
    W1, W2 [B, NS, H, ...] (the five memories, then the main memory if NS = 6), and the read M_c(z)."""
    n = tl.program_id(0).to(tl.int64)
    h, x, b = n % H, (n // H) % MEMORIES, n // (MEMORIES * H)
    ns = (b * NS + x) * H + h
    rc, rd, rm = tl.arange(0, C), tl.arange(0, D), tl.arange(0, M)
    z = tl.load(Z + b * sZb + x * sZx + h * sZh + rc[:, None] * sZc + rd[None, :], mask=rc[:, None] < VALID, other=0.0)
    w1 = tl.load(W1 + ns * D * M + rd[:, None] * M + rm[None, :])
    w2 = tl.load(W2 + ns * M * D + rm[:, None] * D + rd[None, :])
    a = _dot(z, tl.trans(w2), PREC)
    sa = tl.sigmoid(a)
    read = z + _dot(a * sa, tl.trans(w1), PREC)
    return ns, h, x, b, rc, rd, rm, z, w1, w2, a, sa, read


@triton.jit
def projection_read_fwd_kernel(Z, W1, W2, RO, KVQ, GATES, sZb, sZx, sZh, sZc, B, H, VALID, ETA_MAX, EPS,
                               C: tl.constexpr, D: tl.constexpr, M: tl.constexpr, NS: tl.constexpr,
                               UNIT_V: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr):
    """KVQ [3, B, H, C, D]: k, v, q; GATES [2, B, H, C]: eta, log alpha."""
    ns, h, x, b, rc, rd, rm, z, w1, w2, a, sa, read = _program(Z, sZb, sZx, sZh, sZc, W1, W2, H, VALID, C, D, M, NS,
                                                               PREC)
    if x < 3:
        y = read / tl.maximum(tl.sqrt(tl.sum(read * read, 1)), EPS)[:, None]
        if not UNIT_V:
            y = tl.where(x == 1, read, y)
        tl.store(KVQ + ((x * B + b) * H + h) * C * D + rc[:, None] * D + rd[None, :], y)
    else:
        j = x - 3
        w = tl.load(RO + (j * H + h) * (D + 1) + rd)
        s = tl.sum(read * w[None, :], 1) + tl.load(RO + (j * H + h) * (D + 1) + D)
        if x == 3:
            gate = ETA_MAX * tl.sigmoid(s)
        else:
            gate = tl.minimum(s, 0.0) - tl.log(1 + tl.exp(-tl.abs(s)))  # log sigmoid, stably
            if not DECAY:
                gate = gate * 0.0
        tl.store(GATES + ((j * B + b) * H + h) * C + rc, tl.where(rc < VALID, gate, 0.0))


@triton.jit
def _add_gradients(total, MAIN, main, WRITTEN, written, H, cols, C: tl.constexpr, WIDTH: tl.constexpr,
                   HAS_MAIN: tl.constexpr, WRITES: tl.constexpr):
    """total + the gradient that reaches one read-out from the main pass (with HAS_MAIN, at offsets
    `main`) and from each of the WRITES memories' writes: rows of WIDTH elements, memory i's first
    row `written + i * H * C`, columns `cols`."""
    if HAS_MAIN:
        total += tl.load(MAIN + main)
    for i in tl.static_range(WRITES):
        total += tl.load(WRITTEN + (written + i * H * C) * WIDTH + cols)
    return total


@triton.jit
def projection_read_bwd_kernel(Z, W1, W2, RO, DK, DV, DQ, DETA, DLA, DK_W, DV_W, DETA_W, DLA_W, DW1, DW2, DZ, DRO,
                               sZb, sZx, sZh, sZc, sDb, sDx, sDh, sDc, B, H, VALID, ETA_MAX, EPS,
                               C: tl.constexpr, D: tl.constexpr, M: tl.constexpr, NS: tl.constexpr,
                               WRITES: tl.constexpr, HAS_MAIN: tl.constexpr, UNIT_V: tl.constexpr,
                               DECAY: tl.constexpr, PREC: tl.constexpr):
    """DK_W, DV_W, DETA_W, DLA_W [B, WRITES, H, C(, D)]: the gradients from the memories' writes,
    per memory; with HAS_MAIN also DK, DV, DETA, DLA [B, H, C(, D)] from the main pass; DQ [B, H,
    C, D]. DW1, DW2: the writes' state gradients, to which the read's share is added. Out: DZ
    [B, 5, H, VALID, D] (strides sD*); DRO [B, 2, H, D + 1]."""
    ns, h, x, b, rc, rd, rm, z, w1, w2, a, sa, read = _program(Z, sZb, sZx, sZh, sZc, W1, W2, H, VALID, C, D, M, NS,
                                                               PREC)
    cd = rc[:, None] * D + rd[None, :]
    bh = b * H + h
    written = (b * WRITES * H + h) * C  # row offset of memory 0's writes of (b, h); memory i: + i * H * C
    dread = tl.zeros([C, D], dtype=tl.float32)
    if x < 3:  # k, v, q: unit rows y = read / |read| (v: optionally)
        dy = tl.zeros([C, D], dtype=tl.float32)
        if x == 0:
            dy = _add_gradients(dy, DK, bh * C * D + cd, DK_W, written, H, cd, C, D, HAS_MAIN, WRITES)
        if x == 1:
            dy = _add_gradients(dy, DV, bh * C * D + cd, DV_W, written, H, cd, C, D, HAS_MAIN, WRITES)
        if x == 2:
            dy += tl.load(DQ + bh * C * D + cd)
        norm = tl.sqrt(tl.sum(read * read, 1))
        clamped = tl.maximum(norm, EPS)
        y = read / clamped[:, None]
        radial = tl.where(norm <= EPS, 0.0, tl.sum(dy * y, 1))  # rows clamped to EPS: read / EPS
        dread = (dy - y * radial[:, None]) / clamped[:, None]
        if not UNIT_V:
            dread = tl.where(x == 1, dy, dread)
    else:  # eta, alpha: a gate of s = read . w + b
        j = x - 3
        ro = RO + (j * H + h) * (D + 1)
        w = tl.load(ro + rd)
        sg = tl.sigmoid(tl.sum(read * w[None, :], 1) + tl.load(ro + D))
        dgate = tl.zeros([C], dtype=tl.float32)
        if x == 3:
            dgate = _add_gradients(dgate, DETA, bh * C + rc, DETA_W, written, H, rc, C, 1, HAS_MAIN, WRITES)
            ds = dgate * ETA_MAX * sg * (1 - sg)
        else:
            dgate = _add_gradients(dgate, DLA, bh * C + rc, DLA_W, written, H, rc, C, 1, HAS_MAIN, WRITES)
            ds = dgate * (1 - sg)
            if not DECAY:
                ds = ds * 0.0
        ds = tl.where(rc < VALID, ds, 0.0)  # padding tokens' gates are constants
        dread = ds[:, None] * w[None, :]
        dro = DRO + ((b * 2 + j) * H + h) * (D + 1)
        tl.store(dro + rd, tl.sum(ds[:, None] * read, 0))
        tl.store(dro + D, tl.sum(ds, 0))

    # the read M_c(z) = z + W1 silu(W2 z)
    dm = ns * D * M + rd[:, None] * M + rm[None, :]
    md = ns * M * D + rm[:, None] * D + rd[None, :]
    tl.store(DW1 + dm, tl.load(DW1 + dm) + _dot(tl.trans(dread), a * sa, PREC))
    da = _dot(dread, w1, PREC) * (sa * (1 + a * (1 - sa)))
    tl.store(DW2 + md, tl.load(DW2 + md) + _dot(tl.trans(da), z, PREC))
    tl.store(DZ + b * sDb + x * sDx + h * sDh + rc[:, None] * sDc + rd[None, :], dread + _dot(da, w2, PREC),
             mask=rc[:, None] < VALID)
