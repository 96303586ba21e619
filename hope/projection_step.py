"""One chunk of the projection pass as one autograd op: the five projection memories' reads, the
k, v, q, eta, alpha derived from them, and the memories' writes of that chunk.

In the model's own terms (hope/titans.py, SelfModifyingTitans.forward, pass 1), per chunk:
    read_X = M_X(z_X) under the chunk-start states, X in (k, v, q, eta, alpha)
    k, q (and v) = read / |read|;  eta = eta_max sigmoid(read_eta . w + b);  log alpha = log sigmoid(...)
    every memory writes the chunk: fused_chunk_update(W_X, k, v, eta, log alpha)
Left to autograd that is ~60 small kernels per chunk, most of them in the backward, where each
memory's gradients for the shared k, v, eta, alpha are summed and added to the main pass's. This op
saves its inputs and outputs, and its backward runs the writes' backward (hope/chunk_grad.py), then
the read's adjoint, which does the summing too. `read_forward` and `read_backward` are the
PyTorch version (the "torch" and "compiled" backends) and the reference for the Triton kernels
(hope/triton_projection.py). Scope: all five projection memories adaptive, no inner momentum.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from . import chunk_grad
from .chunk_grad import padded_length
from .layers import unit_rows_backward, unit_rows_forward
from .memory import activation


class ReadSpec(NamedTuple):
    """What the model makes of the reads, and how the memories write (HopeConfig's fields)."""
    eta_max: float
    decay: bool
    normalize_v: bool
    dgd: bool
    targets: bool  # self-generated targets
    act_name: str = "silu"
    eps: float = 1e-12  # unit rows: F.normalize's
    precision: str = "tf32"  # the Triton kernels' matmuls (memory_precision)

    @classmethod
    def of(cls, cfg) -> "ReadSpec":
        """The spec of a HopeConfig's layers."""
        return cls(cfg.eta_max, cfg.decay, cfg.normalize_v, cfg.dgd, cfg.self_generated_targets,
                   cfg.memory_activation, precision=cfg.memory_precision)


def _unit_backward(x: torch.Tensor, dy: torch.Tensor, eps: float):
    """dx of unit rows of x, recomputing them from x."""
    return unit_rows_backward(*unit_rows_forward(x, eps), dy, eps)


def _gate_logits(read: torch.Tensor, readout: torch.Tensor):
    """s_j = read_j . w_j + b_j for j = eta, alpha: read [B, 5, H, C, d], readout [2, H, d + 1]."""
    w, bias = readout[..., :-1], readout[..., -1]
    return (read[:, 3:] * w[:, :, None]).sum(-1) + bias[:, :, None]  # [B, 2, H, C]


def read_forward(z, W1, W2, readout, spec: ReadSpec, rows: int):
    """k, v, q [B, H, rows, d] and eta, log alpha [B, H, rows] of the chunk z [B, 5, H, C, d] under
    the states W1 [B, 5, H, d, m], W2 [B, 5, H, m, d] (or [B, 6, H, ...]: the main memory's after
    them, not read). Rows past C are padding: z = 0 there, and eta = log alpha = 0, so that they
    write nothing."""
    s, _ = activation(spec.act_name)
    W1, W2 = W1[:, :5], W2[:, :5]
    valid = z.shape[-2]
    if rows > valid:
        z = F.pad(z, (0, 0, 0, rows - valid))
    read = z + s(z @ W2.transpose(-1, -2)) @ W1.transpose(-1, -2)
    k, v, q = (unit_rows_forward(t, spec.eps)[0] for t in read[:, :3].unbind(1))
    if not spec.normalize_v:
        v = read[:, 1]
    logits = _gate_logits(read, readout)
    eta = spec.eta_max * torch.sigmoid(logits[:, 0])
    la = F.logsigmoid(logits[:, 1]) if spec.decay else torch.zeros_like(eta)
    if valid < rows:
        eta, la = (t.masked_fill(torch.arange(rows, device=t.device) >= valid, 0.0) for t in (eta, la))
    return k, v, q, eta, la


def read_backward(z, W1, W2, readout, main_grads, write_grads, dW1, dW2, spec: ReadSpec, dz, dreadout):
    """The adjoint of read_forward, into dz [B, 5, H, C, d] (any strides) and dreadout [B, 2, H, d + 1]
    (per batch row); the read's share of dW1, dW2 is added in place.

    main_grads: dk, dv, dq [B, H, rows, d], deta, dla [B, H, rows] from the main pass (dk, dv, deta,
    dla may be None: when the main memory is among the writes); write_grads: dk, dv, deta, dla per
    memory [B, 5 or 6, H, rows(, d)] from the writes.
    """
    s, ds = activation(spec.act_name)
    W1, W2, dW1, dW2 = W1[:, :5], W2[:, :5], dW1[:, :5], dW2[:, :5]
    valid, rows = z.shape[-2], write_grads[-1].shape[-1]
    if rows > valid:
        z = F.pad(z, (0, 0, 0, rows - valid))
    a = z @ W2.transpose(-1, -2)
    h = s(a)
    read = z + h @ W1.transpose(-1, -2)
    dq = main_grads[2]
    dk, dv, deta, dla = (w.sum(1) if g is None else g + w.sum(1) for g, w in zip(main_grads[:2] + main_grads[3:], write_grads))
    dread = torch.empty_like(read)
    dread[:, 0] = _unit_backward(read[:, 0], dk, spec.eps)
    dread[:, 1] = _unit_backward(read[:, 1], dv, spec.eps) if spec.normalize_v else dv
    dread[:, 2] = _unit_backward(read[:, 2], dq, spec.eps)
    sig = torch.sigmoid(_gate_logits(read, readout))
    dlogits = torch.stack([deta * spec.eta_max * sig[:, 0] * (1 - sig[:, 0]),
                           dla * (1 - sig[:, 1]) if spec.decay else torch.zeros_like(dla)], dim=1)
    if valid < rows:
        dlogits = dlogits.masked_fill(torch.arange(rows, device=z.device) >= valid, 0.0)
    dread[:, 3:] = dlogits[..., None] * readout[:, :, None, :-1]
    dreadout.copy_(torch.cat([(dlogits[..., None] * read[:, 3:]).sum(3), dlogits.sum(3)[..., None]], dim=-1))
    dW1 += dread.transpose(-1, -2) @ h
    da = (dread @ W1) * ds(a)
    dW2 += da.transpose(-1, -2) @ z
    dz.copy_((dread + da @ W2)[..., :valid, :])


def _triton_read_forward(z, W1, W2, readout, spec: ReadSpec, rows: int):
    from .triton_projection import projection_read_fwd_kernel
    B, X, H, valid, d = z.shape
    C = rows
    m = W1.shape[-1]
    z = z if z.stride(-1) == 1 else z.contiguous()
    W1, W2, readout = W1.contiguous(), W2.contiguous(), readout.contiguous()
    kvq = torch.empty(3, B, H, C, d, dtype=z.dtype, device=z.device)
    gates = torch.empty(2, B, H, C, dtype=z.dtype, device=z.device)
    projection_read_fwd_kernel[(B * X * H,)](
        z, W1, W2, readout, kvq, gates, *z.stride()[:4], B, H, valid, spec.eta_max, spec.eps,
        C=C, D=d, M=m, NS=W1.shape[1], UNIT_V=spec.normalize_v, DECAY=spec.decay,
        **chunk_grad.triton_options(spec.precision))
    return (*kvq.unbind(0), *gates.unbind(0))


def _triton_read_backward(z, W1, W2, readout, main_grads, write_grads, dW1, dW2, spec: ReadSpec, dz, dreadout):
    from .triton_projection import projection_read_bwd_kernel
    B, X, H, valid, d = z.shape
    C = write_grads[-1].shape[-1]
    m = W1.shape[-1]
    z = z if z.stride(-1) == 1 else z.contiguous()
    W1, W2, readout = W1.contiguous(), W2.contiguous(), readout.contiguous()
    main = [g if g is None else g.contiguous() for g in main_grads]
    has_main = main[0] is not None
    if not has_main:  # the main memory is among the writes: only dq (the others: placeholders, never read)
        main = [main[2]] * 5
    grads = [*main, *(g.contiguous() for g in write_grads)]
    assert dz.stride(-1) == 1 and dreadout.is_contiguous()
    projection_read_bwd_kernel[(B * X * H,)](
        z, W1, W2, readout, *grads, dW1, dW2, dz, dreadout, *z.stride()[:4], *dz.stride()[:4], B, H, valid,
        spec.eta_max, spec.eps, C=C, D=d, M=m, NS=W1.shape[1], WRITES=write_grads[0].shape[1], HAS_MAIN=has_main,
        UNIT_V=spec.normalize_v, DECAY=spec.decay, **chunk_grad.triton_options(spec.precision))


class ReadBackend(NamedTuple):
    forward: Callable
    backward: Callable


_COMPILED: list[ReadBackend] = []


def _read_implementation(backend: str) -> ReadBackend:
    if backend == "torch":
        return ReadBackend(read_forward, read_backward)
    if backend == "triton":
        return ReadBackend(_triton_read_forward, _triton_read_backward)
    if backend != "compiled":
        raise ValueError(f"unknown projection backend {backend!r}")
    if not _COMPILED:  # one graph per shape and spec, reused by every chunk and layer
        _COMPILED.append(ReadBackend(*(torch.compile(f, dynamic=False) for f in (read_forward, read_backward))))
    return _COMPILED[0]


class ProjectionStep(torch.autograd.Function):
    """(z, W1, W2, readout) -> (W1_new, W2_new, k, v, q, eta, log alpha); saves inputs and outputs."""

    @staticmethod
    def forward(ctx, z, W1, W2, readout, spec: ReadSpec, backend: str):
        C = z.shape[-2]
        P = padded_length(C, backend)  # Triton: tokens C..P-1 are padding that writes nothing
        k, v, q, eta, la = _read_implementation(backend).forward(z, W1, W2, readout, spec, P)
        W1n, W2n, _, *kept = chunk_grad._implementation(backend, spec.precision).forward(
            W1, W2, *_shared(W1, k, v, eta, la), None, spec.dgd, spec.act_name, spec.targets)
        ctx.save_for_backward(z, W1, W2, readout, k, v, eta, la, *kept)
        ctx.spec, ctx.backend = spec, backend
        return (W1n, W2n, *(t[..., :C, :] for t in (k, v, q)), *(t[..., :C] for t in (eta, la)))

    @staticmethod
    def backward(ctx, dW1n, dW2n, dk, dv, dq, deta, dla):
        z, W1, W2, readout, k, v, eta, la, *kept = ctx.saved_tensors
        spec, backend = ctx.spec, ctx.backend
        C, P = z.shape[-2], k.shape[-2]
        if P != C:
            dk, dv, dq = (F.pad(g, (0, 0, 0, P - C)) for g in (dk, dv, dq))
            deta, dla = (F.pad(g, (0, P - C)) for g in (deta, dla))
        dW1, dW2, dk_w, dv_w, deta_w, dla_w, _ = chunk_grad._implementation(backend, spec.precision).backward(
            W1, W2, *_shared(W1, k, v, eta, la), None, spec.dgd, dW1n, dW2n, None, spec.act_name, spec.targets, *kept)
        dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        dreadout = torch.empty(z.shape[0], *readout.shape, dtype=z.dtype, device=z.device)  # per batch row
        _read_implementation(backend).backward(z, W1, W2, readout, (dk, dv, dq, deta, dla), (dk_w, dv_w, deta_w, dla_w),
                                               dW1, dW2, spec, dz, dreadout)
        return dz, dW1, dW2, dreadout.sum(0), None, None


def _shared(W1, *tensors):
    """k, v, eta, la [B, H, ...] as views broadcast along the memory dim (the writes share them)."""
    B, X = W1.shape[:2]
    return [t.unsqueeze(1).expand(B, X, *t.shape[1:]) for t in tensors]


def projection_step(z, W1, W2, readout, spec: ReadSpec, backend: str = "torch"):
    """One projection chunk: z [B, 5, H, C, d] (the static projections of k, v, q, eta, alpha inputs,
    any strides), chunk-start states W1 [B, 5, H, d, m], W2 [B, 5, H, m, d], read-out weights and
    biases of eta and alpha as readout [2, H, d + 1]. Returns the states after the chunk, k, v, q
    [B, H, C, d] and eta, log alpha [B, H, C]. backend: "torch", "compiled" or "triton"."""
    return ProjectionStep.apply(z, W1, W2, readout, spec, backend)
