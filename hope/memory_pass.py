"""Both passes of a HOPE layer's self-modifying memories over a whole sequence, as one autograd op.

hope/titans.py runs the projection pass and then the main pass, one autograd op per chunk. When
both passes chunk alike (chunk_size == projection_chunk_size, dividing the sequence), chunk i of
the main memory writes exactly the k, v, eta, alpha that chunk i of the projection pass read out.
This op then walks the chunks once:
    forward, chunk i:  read k, v, q, eta, alpha (projection_step's read); the five projection
                       memories write them; the main memory writes them and reads q out.
    backward, i = n-1 .. 0: the main memory's write and read-out, then the projection writes, then
                       the read, carrying each memory's state gradient to chunk i - 1.
The same values as the per-chunk ops, with no autograd node, Python wrapper or gradient sum per
chunk, and one gated-delta-rule inverse T per chunk for all six memories (it depends on k, eta,
alpha only). Every call is a backend function of hope/chunk_grad.py and hope/projection_step.py,
so the torch, compiled and Triton backends all run here.
"""
from __future__ import annotations

import torch

from . import chunk_grad
from .projection_step import ReadSpec, _read_implementation, _shared


class MemoryPass(torch.autograd.Function):
    """(z [B, 5, H, T, d], projection states W1p, W2p [B, 5, H, ...], main states W1m, W2m
    [B, 1, H, ...], readout [2, H, d + 1]) -> the main memory's read-out o [B, T, H, d]."""

    @staticmethod
    def forward(ctx, z, W1p, W2p, W1m, W2m, readout, spec: ReadSpec, backend: str, C: int):
        read, write = _read_implementation(backend), chunk_grad._implementation(backend)
        B, _, H, T, d = z.shape
        saved, outputs = [], []
        for s in range(0, T, C):
            k, v, q, eta, la = read.forward(z[:, :, :, s:s + C], W1p, W2p, readout, spec, C)
            W1p_next, W2p_next, _, *kept = write.forward(W1p, W2p, *_shared(W1p, k, v, eta, la), None,
                                                        spec.dgd, spec.act_name, spec.targets)
            main = [t.unsqueeze(1) for t in (k, v, eta, la, q)]
            W1m_next, W2m_next, o, *_ = write.forward(W1m, W2m, *main, spec.dgd, spec.act_name, spec.targets, *kept)
            saved += [W1p, W2p, W1m, W2m, k, v, q, eta, la, *kept]
            outputs.append(o)
            W1p, W2p, W1m, W2m = W1p_next, W2p_next, W1m_next, W2m_next
        ctx.save_for_backward(z, readout, *saved)
        ctx.spec, ctx.backend, ctx.C = spec, backend, C
        o = z.new_empty(B, T, H, d)  # token-major, as the layer's output norm wants it
        o.view(B, T // C, C, H, d).copy_(torch.cat(outputs, dim=1).transpose(2, 3))
        return o

    @staticmethod
    def backward(ctx, do):
        z, readout, *saved = ctx.saved_tensors
        spec, C = ctx.spec, ctx.C
        read, write = _read_implementation(ctx.backend), chunk_grad._implementation(ctx.backend)
        B, X, H, T, d = z.shape
        n = T // C
        per_chunk = len(saved) // n
        do = do.reshape(B, n, C, H, d).permute(1, 0, 3, 2, 4).contiguous()  # [n, B, H, C, d]: chunk-major
        dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        dreadout = torch.empty(n, B, *readout.shape, dtype=z.dtype, device=z.device)
        dW1p = dW2p = dW1m = dW2m = None
        for i in reversed(range(n)):
            W1p, W2p, W1m, W2m, k, v, q, eta, la, *kept = saved[i * per_chunk:(i + 1) * per_chunk]
            if dW1p is None:  # the states after the last chunk are not used
                dW1p, dW2p, dW1m, dW2m = (torch.zeros_like(t) for t in (W1p, W2p, W1m, W2m))
            main = [t.unsqueeze(1) for t in (k, v, eta, la, q)]
            dW1m, dW2m, dk, dv, deta, dla, dq = write.backward(W1m, W2m, *main, spec.dgd, dW1m, dW2m, do[i].unsqueeze(1),
                                                               spec.act_name, spec.targets, *kept)
            dW1p, dW2p, *written = write.backward(W1p, W2p, *_shared(W1p, k, v, eta, la), None, spec.dgd, dW1p, dW2p,
                                                  None, spec.act_name, spec.targets, *kept)
            main_grads = [g.squeeze(1) for g in (dk, dv, dq, deta, dla)]
            read.backward(z[:, :, :, i * C:(i + 1) * C], W1p, W2p, readout, main_grads, written[:4], dW1p, dW2p,
                          spec, dz[:, :, :, i * C:(i + 1) * C], dreadout[i])
        return dz, dW1p, dW2p, dW1m, dW2m, dreadout.sum((0, 1)), None, None, None


def memory_pass(z, W1p, W2p, W1m, W2m, readout, spec: ReadSpec, backend: str, chunk_size: int) -> torch.Tensor:
    """The main memory's read-out o [B, T, H, d] of a layer, both passes in one op (T % chunk_size == 0)."""
    if z.shape[3] % chunk_size or chunk_grad.padded_length(chunk_size, backend) != chunk_size:
        raise ValueError(f"memory_pass needs the sequence ({z.shape[3]}) to be a multiple of the chunk ({chunk_size}), "
                         f"and the {backend!r} backend to run that chunk unpadded")
    return MemoryPass.apply(z, W1p, W2p, W1m, W2m, readout, spec, backend, chunk_size)
