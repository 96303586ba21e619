"""Both passes of a HOPE layer's self-modifying memories over a whole sequence, as one autograd op.

hope/titans.py runs the projection pass and then the main pass, one autograd op per chunk. When
both passes chunk alike (chunk_size == projection_chunk_size, dividing the sequence), chunk i of
the main memory writes exactly the k, v, eta, alpha that chunk i of the projection pass read out,
so the main memory is a sixth memory of the same write, the one that also reads q out:
    forward, chunk i:  read k, v, q, eta, alpha (projection_step's read) under the five
                       projection memories' states; all six memories write the chunk; the main
                       memory reads q out.
    backward, i = n-1 .. 0: the six writes (and the read-out), then the read, carrying the state
                       gradients to chunk i - 1.
The same values as the per-chunk ops, with no autograd node or gradient sum per chunk. The
Triton loops (`_triton_forward_loop`, `_triton_backward_loop`) call the kernels directly on buffers
allocated once per pass: a chunk step is 3 launches forward (read, gated-delta-rule inverse, the six
writes) and 3 backward (the six writes' adjoint, the targets', the read's), each for all six memories:
the main memory's programs run in the same waves as the projection memories' instead of a fraction
of the GPU on their own. The main memory's read-out, and its adjoint, need each chunk's start state
and no state gradient, so they leave the chunk loop: one launch per pass (two backward) over all
chunks, B x H x n programs. `CudaGraphs` captures those loops and replays them
(`memory_cuda_graphs`). The PyTorch backends (torch, compiled) go through hope/chunk_grad.py's
functions, the five memories and the main memory as two calls.
"""
from __future__ import annotations

import functools
import weakref

import torch

from . import chunk_grad
from .projection_step import ReadSpec, _read_implementation, _shared


def token_major(chunks: torch.Tensor) -> torch.Tensor:
    """Read-out chunks [n, B, H, C, d] -> [B, n * C, H, d], as the layer's output norm wants it (one copy)."""
    n, B, H, C, d = chunks.shape
    out = chunks.new_empty(B, n * C, H, d)
    out.view(B, n, C, H, d).copy_(chunks.permute(1, 0, 3, 2, 4))
    return out


def chunk_major(o: torch.Tensor, C: int) -> torch.Tensor:
    """token_major's inverse: [B, T, H, d] -> contiguous [T / C, B, H, C, d] (one copy)."""
    B, T, H, d = o.shape
    return o.reshape(B, T // C, C, H, d).permute(1, 0, 3, 2, 4).contiguous()


def _write(backend: str, W1, W2, k, v, eta, la, q, spec: ReadSpec):
    """All six memories (W [B, 6, H, ...]) write k, v, eta, la; the last reads q out, with the
    PyTorch backends: the five and the main memory as two calls. -> (W1_new, W2_new, o [B, 1, H, C, d])"""
    write = chunk_grad._implementation(backend, spec.precision)
    args = (spec.dgd, spec.act_name, spec.targets)
    five = write.forward(W1[:, :5], W2[:, :5], *_shared(W1[:, :5], k, v, eta, la), None, *args)
    main = write.forward(W1[:, 5:], W2[:, 5:], *(t.unsqueeze(1) for t in (k, v, eta, la, q)), *args)
    return torch.cat([five[0], main[0]], dim=1), torch.cat([five[1], main[1]], dim=1), main[2]


def _write_backward(backend: str, W1, W2, k, v, eta, la, q, spec: ReadSpec, dW1n, dW2n, do):
    """[dW1, dW2, dk, dv, deta, dla (per memory, [B, 6, H, ...]), dq [B, 1, H, C, d]] of _write."""
    write = chunk_grad._implementation(backend, spec.precision)
    five = write.backward(W1[:, :5], W2[:, :5], *_shared(W1[:, :5], k, v, eta, la), None, spec.dgd,
                          dW1n[:, :5], dW2n[:, :5], None, spec.act_name, spec.targets)
    main = write.backward(W1[:, 5:], W2[:, 5:], *(t.unsqueeze(1) for t in (k, v, eta, la, q)), spec.dgd,
                          dW1n[:, 5:], dW2n[:, 5:], do, spec.act_name, spec.targets)
    return [torch.cat([a, b], dim=1) for a, b in zip(five[:6], main[:6])] + [main[6]]


# Launch options of the Triton kernels of a pass, by kernel name: num_warps (4 unless set) and
# maxnreg (the registers a thread may use: the compiler's choice, up to 255, unless set). A tuning
# table, swept on the GPU by tools/bench_chunk.py --pass --launch. The loop's kernels have no loops
# of their own, so programs per SM hide their latency: at 255 registers an SM holds 2 programs of 4
# warps, at 168 it holds 3 (with more spilled: tools/triton_resources.py --maxnreg), and at 340M with
# micro-batch 4 x 2K the six writes' 384 programs then run in one wave of 396 instead of two of 264.
# A kernel whose programs hold a whole SM (shared memory) hides latency only with more warps; one
# that fits 2 programs per SM at 4 warps fits 1 at 8, the same warps per SM in twice the waves.
LAUNCH: dict[str, dict[str, int]] = {}


def _launch(kernel, grid: tuple, **defaults):
    """kernel[grid] with its launch options: LAUNCH's, over `defaults` and 4 warps."""
    return functools.partial(kernel[grid], **{"num_warps": 4, **defaults, **LAUNCH.get(kernel.__name__, {})})


def _triton_forward_loop(z, W1, W2, readout, spec: ReadSpec, C: int):
    """_forward_loop with the Triton kernels called directly: every chunk's tensors are slices of
    buffers allocated once, so a chunk step is its 3 launches and little else on the host. (Through
    projection_step's read wrappers, with their checks and conversions, the host work per chunk step
    was ~2x: `bench_chunk.py --host` 191-227 us against 88-131 us on the 2-core CPU.) The main
    memory's read-out needs only each chunk's start state: one launch after the loop reads out all
    chunks, B x H x n programs, instead of a part of every chunk step's."""
    from .triton_chunk import chunk_fwd_kernel, chunk_readout_kernel, delta_rule_inverse_kernel
    from .triton_projection import projection_read_fwd_kernel
    B, X, H, T, d = z.shape
    n, m, options = T // C, W1.shape[-1], chunk_grad.triton_options(spec.precision)
    W1s, W2s = W1.new_empty(n + 1, *W1.shape), W2.new_empty(n + 1, *W2.shape)  # the state before chunk i
    W1s[0], W2s[0] = W1, W2
    kvq, gates = z.new_empty(n, 3, B, H, C, d), z.new_empty(n, 2, B, H, C)  # k, v, q; eta, log alpha
    Ti = z.new_empty(n, B, H, C, C)
    o = z.new_empty(n, B, H, C, d)
    shapes = dict(C=C, D=d, M=m, **options)
    for i in range(n):
        zc = z[:, :, :, i * C:(i + 1) * C]
        _launch(projection_read_fwd_kernel, (B * X * H,))(
            zc, W1s[i], W2s[i], readout, kvq[i], gates[i], *zc.stride()[:4], B, H, C, spec.eta_max, spec.eps,
            NS=6, UNIT_V=spec.normalize_v, DECAY=spec.decay, **shapes)
        k, v, q = kvq[i]
        eta, la = gates[i]
        if spec.dgd:
            _launch(delta_rule_inverse_kernel, (B * H,))(
                k, eta, la, Ti[i], LOG2C=C.bit_length() - 1, C=C, D=d, **options)
        _launch(chunk_fwd_kernel, (B * 6 * H,))(
            W1s[i], W2s[i], k, v, eta, la, q, Ti[i], W1s[i + 1], W2s[i + 1], o[i], 6, H,
            DGD=spec.dgd, HAS_Q=False, TARGETS=spec.targets, **shapes)
    k, v, q = kvq[0]
    eta, la = gates[0]
    _launch(chunk_readout_kernel, (B * H, n))(
        W1s, W2s, k, v, eta, la, q, Ti, o, 6, H, *_chunk_strides(W1s, kvq, gates),
        DGD=spec.dgd, TARGETS=spec.targets, **shapes)
    return token_major(o), [W1s, W2s, kvq, gates, Ti]


def _chunk_strides(W1s, kvq, gates) -> tuple[int, int, int]:
    """Elements from one chunk to the next in the states, in k, v, q and in the gates (sW, sK, sG of
    the read-out kernels launched over all chunks: triton_chunk._chunk_of_pass)."""
    return W1s.stride(0), kvq.stride(0), gates.stride(0)


def _triton_backward_loop(z, readout, saved, do, spec: ReadSpec, C: int):
    """_backward_loop with the Triton kernels called directly, on work buffers allocated once."""
    from .triton_chunk import (chunk_bwd_readout1_kernel, chunk_bwd_readout2_kernel, chunk_bwd_state_kernel,
                               state_kernel_options, targets_bwd_kernel)
    from .triton_projection import projection_read_bwd_kernel
    W1s, W2s, kvq, gates, Ti = saved
    B, X, H, T, d = z.shape
    n, m = T // C, W1s.shape[-1]
    shapes = dict(C=C, D=d, M=m, DGD=spec.dgd, TARGETS=spec.targets, **chunk_grad.triton_options(spec.precision))
    do = chunk_major(do, C)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    dreadout = z.new_empty(n, B, *readout.shape)
    # state gradients after / before the chunk (swapped each step) and the per-memory gradients of
    # the writes: reused by every chunk
    dW1, dW2 = W1s.new_zeros(2, *W1s.shape[1:]), W2s.new_zeros(2, *W2s.shape[1:])
    dk, dvhat, dv = (z.new_empty(B, 6, H, C, d) for _ in range(3))
    deta, dla = z.new_empty(B, 6, H, C), z.new_empty(B, 6, H, C)
    # The read-out's adjoint needs no state gradient: its partial adjoints for every chunk come first,
    # two launches of B x H x n programs, and each chunk step of the loop reads its own.
    dW1p, dW2p = z.new_empty(n, B * H, d, m), z.new_empty(n, B * H, m, d)
    dkp, drp, dq = (z.new_empty(n, B, H, C, d) for _ in range(3))
    dhp, dup, dEp, dzr = (z.new_empty(n, B, H, C, m) for _ in range(4))
    detap, dlgp = z.new_empty(n, B, H, C), z.new_empty(n, B, H, C)
    k, v, q = kvq[0]
    eta, la = gates[0]
    inputs = (W1s, W2s, k, v, eta, la, q, Ti, do)
    strides = _chunk_strides(W1s, kvq, gates)
    _launch(chunk_bwd_readout1_kernel, (B * H, n))(
        *inputs, dzr, dW1p, drp, dhp, detap, dlgp, 6, H, *strides, **shapes)
    _launch(chunk_bwd_readout2_kernel, (B * H, n))(
        *inputs, dzr, dq, dW2p, dkp, dup, dEp, detap, dlgp, 6, H, *strides, **shapes)
    partials = (dW1p, dW2p, dkp, drp, dhp, dup, dEp, detap, dlgp)  # the state kernel finds chunk i's (i B H):
    # a view per partial and chunk cost more host time than the launches (bench_chunk.py --host)
    state_options = state_kernel_options(shapes["PREC"])
    for i in reversed(range(n)):
        after, before = (n - 1 - i) % 2, (n - i) % 2
        k, v, q = kvq[i]
        eta, la = gates[i]
        _launch(chunk_bwd_state_kernel, (B * 6 * H,), **state_options)(
            W1s[i], W2s[i], k, v, eta, la, Ti[i], dW1[after], dW2[after], *partials,
            dW1[before], dW2[before], dk, dvhat, deta, dla, 6, H, i * B * H, HAS_Q=True, **shapes)
        if spec.targets:
            _launch(targets_bwd_kernel, (B * 6 * H,))(
                W1s[i], W2s[i], v, dvhat, dW1[before], dW2[before], dv, 6, H, C=C, D=d, M=m, PREC=shapes["PREC"])
        zc, dzc = z[:, :, :, i * C:(i + 1) * C], dz[:, :, :, i * C:(i + 1) * C]
        _launch(projection_read_bwd_kernel, (B * X * H,))(
            zc, W1s[i], W2s[i], readout, *(dq[i],) * 5, dk, dv if spec.targets else dvhat, deta, dla,
            dW1[before], dW2[before], dzc, dreadout[i], *zc.stride()[:4], *dzc.stride()[:4], B, H, C, spec.eta_max,
            spec.eps, C=C, D=d, M=m, NS=6, WRITES=6, HAS_MAIN=False, UNIT_V=spec.normalize_v, DECAY=spec.decay,
            PREC=shapes["PREC"])
    return dz, dW1[n % 2], dW2[n % 2], dreadout.sum((0, 1))


def _forward_loop(z, W1, W2, readout, spec: ReadSpec, backend: str, C: int):
    """(o [B, T, H, d], the tensors the backward needs) of both passes over the chunks."""
    if backend == "triton":
        return _triton_forward_loop(z, W1, W2, readout.contiguous(), spec, C)
    read = _read_implementation(backend)
    saved, outputs = [], []
    for s in range(0, z.shape[3], C):
        k, v, q, eta, la = read.forward(z[:, :, :, s:s + C], W1, W2, readout, spec, C)
        W1n, W2n, o = _write(backend, W1, W2, k, v, eta, la, q, spec)
        saved += [W1, W2, k, v, q, eta, la]
        outputs.append(o.squeeze(1))
        W1, W2 = W1n, W2n
    return token_major(torch.stack(outputs)), saved


def _backward_loop(z, readout, saved, do, spec: ReadSpec, backend: str, C: int):
    """(dz, dW1, dW2, dreadout): the chunks in reverse, the state gradients carried by hand."""
    if backend == "triton":
        return _triton_backward_loop(z, readout, saved, do, spec, C)
    read = _read_implementation(backend)
    B, n = z.shape[0], z.shape[3] // C
    per_chunk = len(saved) // n
    do = chunk_major(do, C)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    dreadout = torch.empty(n, B, *readout.shape, dtype=z.dtype, device=z.device)
    dW1 = dW2 = None
    for i in reversed(range(n)):
        W1, W2, k, v, q, eta, la = saved[i * per_chunk:(i + 1) * per_chunk]
        if dW1 is None:  # the states after the last chunk are not used
            dW1, dW2 = torch.zeros_like(W1), torch.zeros_like(W2)
        dW1, dW2, dk, dv, deta, dla, dq = _write_backward(backend, W1, W2, k, v, eta, la, q, spec, dW1, dW2,
                                                          do[i].unsqueeze(1))
        chunk = slice(i * C, (i + 1) * C)
        read.backward(z[:, :, :, chunk], W1, W2, readout, (None, None, dq.squeeze(1), None, None),
                      (dk, dv, deta, dla), dW1, dW2, spec, dz[:, :, :, chunk], dreadout[i])
    return dz, dW1, dW2, dreadout.sum((0, 1))


class CudaGraphs:
    """CUDA graphs of one layer's memory pass, forward and backward, one pair per input shape
    (`memory_cuda_graphs`, with the Triton kernels, while training on CUDA).

    The chunk loops are a fixed sequence of launches on tensors whose shapes follow the input's,
    so each loop is captured once and then replayed: one launch of the graph instead of the host
    work of 6 launches per chunk step (bench_chunk.py --host). Inputs are copied into the graph's
    own tensors and outputs cloned out of them: the next replay overwrites them. The forward's
    saved tensors stay in the graph's memory between steps, a pool per layer. The backward graphs
    of all layers share one pool: each replays alone and its outputs are cloned out at once, so
    the work buffers of its loop (the read-out's partial adjoints for all chunks, the state
    gradients: ~380 MB per layer at 340M with 4 x 2K, or 1.3B with 1 x 4K) are needed by one
    layer at a time, not held 24 times. A capture shares the pool of the last backward graph
    captured while that graph lives (a pool must not be shared once its last graph is gone).
    """
    last_backward = weakref.WeakValueDictionary()  # device -> the backward graph captured last

    def __init__(self):
        self.graphs: dict = {}

    def forward(self, z, W1, W2, readout, spec: ReadSpec, C: int):
        key = (tuple(z.shape), tuple(W1.shape), tuple(W2.shape), z.device, spec, C)
        if key not in self.graphs:
            self.graphs[key] = self._capture(z, W1, W2, readout, spec, C)
        graphed = self.graphs[key]
        for static, x in zip(graphed["inputs"], (z, W1, W2, readout)):
            static.copy_(x)
        graphed["forward"].replay()
        return graphed["o"].clone(), key

    def backward(self, key, do):
        graphed = self.graphs[key]
        graphed["do"].copy_(do)
        graphed["backward"].replay()
        return [g.clone() for g in graphed["grads"]]

    @staticmethod
    def _capture(z, W1, W2, readout, spec: ReadSpec, C: int) -> dict:
        inputs = [x.detach().clone(memory_format=torch.contiguous_format) for x in (z, W1, W2, readout)]
        # One eager run first, on a side stream as torch.cuda.graph asks: Triton compiles at first launch.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            o, saved = _forward_loop(*inputs, spec, "triton", C)
            _backward_loop(inputs[0], inputs[3], saved, torch.ones_like(o), spec, "triton", C)
        torch.cuda.current_stream().wait_stream(side)
        del o, saved
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a data loader pinning memory, say) do not void
        # the capture, as they would under the default "global" mode
        with torch.cuda.graph(forward, capture_error_mode="thread_local"):
            o, saved = _forward_loop(*inputs, spec, "triton", C)
        do = torch.empty_like(o)
        last = CudaGraphs.last_backward.get(z.device)
        pool = last.pool() if last is not None else None
        with torch.cuda.graph(backward, pool=pool, capture_error_mode="thread_local"):
            grads = _backward_loop(inputs[0], inputs[3], saved, do, spec, "triton", C)
        CudaGraphs.last_backward[z.device] = backward
        return dict(inputs=inputs, forward=forward, o=o, saved=saved, do=do, backward=backward, grads=grads)


class MemoryPass(torch.autograd.Function):
    """(z [B, 5, H, T, d], states W1, W2 [B, 6, H, ...] (the five projection memories', then the
    main memory's), readout [2, H, d + 1]) -> the main memory's read-out o [B, T, H, d]."""

    @staticmethod
    def forward(ctx, z, W1, W2, readout, spec: ReadSpec, backend: str, C: int, graphs: CudaGraphs | None):
        ctx.spec, ctx.backend, ctx.C, ctx.graphs = spec, backend, C, graphs
        if graphs is not None:
            o, ctx.key = graphs.forward(z, W1, W2, readout, spec, C)
            return o
        o, saved = _forward_loop(z, W1, W2, readout, spec, backend, C)
        ctx.save_for_backward(z, readout, *saved)
        return o

    @staticmethod
    def backward(ctx, do):
        if ctx.graphs is not None:
            grads = ctx.graphs.backward(ctx.key, do)
        else:
            z, readout, *saved = ctx.saved_tensors
            grads = _backward_loop(z, readout, saved, do, ctx.spec, ctx.backend, ctx.C)
        return (*grads, None, None, None, None)


def memory_pass(z, W1, W2, readout, spec: ReadSpec, backend: str, chunk_size: int,
                graphs: CudaGraphs | None = None) -> torch.Tensor:
    """The main memory's read-out o [B, T, H, d] of a layer, both passes in one op; with `graphs`
    (Triton on CUDA), its loops run as CUDA graphs."""
    if z.shape[3] % chunk_size or chunk_grad.padded_length(chunk_size, backend) != chunk_size:
        raise ValueError(f"memory_pass needs the sequence ({z.shape[3]}) to be a multiple of the chunk ({chunk_size}), "
                         f"and the {backend!r} backend to run that chunk unpadded")
    if graphs is not None and not (backend == "triton" and z.is_cuda):
        raise ValueError(f"CUDA graphs of the memory pass need the Triton kernels on CUDA, got {backend!r} on {z.device}")
    return MemoryPass.apply(z, W1, W2, readout, spec, backend, chunk_size, graphs)
