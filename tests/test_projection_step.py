"""The fused projection step (hope/projection_step.py): the five projection memories' reads, the
k, v, q, eta, alpha read out of them, and their writes, as one op, against plain autograd through
the model's own functions; the Triton kernels (hope/triton_projection.py) against the PyTorch op.
Without CUDA the kernels run in Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hope.memory import MemoryState, _chunk_update, activation, memory_forward
from hope.projection_step import ReadSpec, projection_step
from test_hope_model import rel_err
from test_kernels import CUDA, gpu, interpreted, needs_cuda, needs_triton

SPECS = {  # eta_max, decay, normalize_v, dgd, targets: HOPE's, and each switch flipped
    "hope": ReadSpec(1.0, True, True, True, True),
    "no-decay": ReadSpec(0.5, False, True, True, True),
    "raw-v": ReadSpec(1.0, True, False, True, True),
    "plain": ReadSpec(0.3, True, True, False, False),
}


def step_inputs(B, H, C, d, m, dtype=torch.float64, device="cpu", seed=0):
    """z as the model passes it: a strided chunk of the stacked projections [B, 5, H, T, d]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    z = rnd(B, 5, H, C + 3, d)[:, :, :, 1:C + 1]
    W1, W2, readout = 0.5 * rnd(B, 5, H, d, m), 0.5 * rnd(B, 5, H, m, d), 0.3 * rnd(2, H, d + 1)
    return [t.to(device, dtype) for t in (z, W1, W2, readout)]


def autograd_step(z, W1, W2, readout, spec: ReadSpec):
    """The same chunk op by op, as hope/titans.py's reference path computes it."""
    act = activation(spec.act_name)
    k, v, q, read_eta, read_alpha = memory_forward(z, W1, W2, act[0]).unbind(1)
    k, q = F.normalize(k, dim=-1), F.normalize(q, dim=-1)
    v = F.normalize(v, dim=-1) if spec.normalize_v else v
    logit = lambda r, j: (r * readout[j, :, None, :-1]).sum(-1) + readout[j, :, None, -1]  # noqa: E731
    eta = spec.eta_max * torch.sigmoid(logit(read_eta, 0))
    la = F.logsigmoid(logit(read_alpha, 1)) if spec.decay else torch.zeros_like(eta)
    vhat = memory_forward(v[:, None], W1, W2, act[0]) if spec.targets else v[:, None]
    state, _ = _chunk_update(MemoryState(W1, W2), k[:, None], vhat, eta[:, None], la[:, None], None, act, spec.dgd)
    return state.W1, state.W2, k, v, q, eta, la


def outputs_and_grads(fn, inputs, seed=1):
    xs = [t.clone().requires_grad_(True) for t in inputs]
    outs = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return list(outs), [x.grad for x in xs]


def errors(fn, ref_fn, inputs, ref_inputs):
    out, grad = outputs_and_grads(fn, inputs)
    ref_out, ref_grad = outputs_and_grads(ref_fn, ref_inputs)
    assert [t.shape for t in out + grad] == [t.shape for t in ref_out + ref_grad]
    return [rel_err(a.double(), b.double()) for a, b in zip(out + grad, ref_out + ref_grad) if b.abs().sum() > 0]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_projection_step_equals_autograd_float64(name):
    spec = SPECS[name]
    inputs = step_inputs(2, 3, 7, 8, 12)
    errs = errors(lambda *x: projection_step(*x, spec, "torch"), lambda *x: autograd_step(*x, spec), inputs, inputs)
    assert max(errs) < 1e-12, errs


@needs_triton
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("C", [16, 11])
def test_triton_projection_step_equals_pytorch(name, C):
    """C=11 runs padded to 16: the padding tokens' eta and alpha are 0, so they write nothing."""
    device = "cuda" if CUDA else "cpu"
    spec = SPECS[name]
    inputs = step_inputs(2, 3, C, 16, 32, dtype=torch.float32, device=device)
    errs = errors(lambda *x: projection_step(*x, spec, "triton"), lambda *x: projection_step(*x, spec, "torch"),
                  inputs, [t.double() for t in inputs])
    tol = 1e-5 if not CUDA else 3e-2  # the interpreter multiplies in exact fp32; tf32 on a GPU
    assert max(errs) < tol, errs


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[needs_triton, interpreted])])
def test_memory_pass_equals_the_per_chunk_ops(name, backend):
    """hope/memory_pass.py (both passes, the main memory as a sixth memory of the writes; Triton:
    its own loops over preallocated buffers) against projection_step + the chunk op per chunk."""
    from hope.chunk_grad import fused_chunk_update
    from hope.memory_pass import memory_pass
    spec, C, chunks = SPECS[name], 16, 2
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, C * chunks, 16, generator=g)
    W1, W2 = 0.5 * torch.randn(2, 6, 3, 16, 16, generator=g), 0.5 * torch.randn(2, 6, 3, 16, 16, generator=g)
    readout = 0.3 * torch.randn(2, 3, 17, generator=g)

    def per_chunk(z, W1, W2, readout):
        Wp, Wm, outs = (W1[:, :5], W2[:, :5]), (W1[:, 5:], W2[:, 5:]), []
        for zc in z.split(C, dim=3):
            *Wp, k, v, q, eta, la = projection_step(zc, *Wp, readout, spec, "torch")
            *Wm, o = fused_chunk_update(*Wm, *(t.unsqueeze(1) for t in (k, v, eta, la, q)), dgd=spec.dgd,
                                        backend="torch", targets=spec.targets)
            outs.append(o.squeeze(1).transpose(1, 2))  # [B, C, H, d]
        return (torch.cat(outs, dim=1),)

    inputs = [z, W1, W2, readout] if backend == "triton" else [t.double() for t in (z, W1, W2, readout)]
    errs = errors(lambda *x: (memory_pass(*x, spec, backend, C),), per_chunk, inputs,
                  [t.double() for t in (z, W1, W2, readout)])
    assert max(errs) < (2e-5 if backend == "triton" else 1e-10), errs  # Triton: fp32 against float64


@needs_triton
@interpreted
def test_bf16_kernels_track_float64():
    """memory_precision: bf16 (on CPU: the interpreter rounds the operands to bf16 in fp32): the
    memory pass stays within bf16's error of float64 over the chunks, and that error is bf16's, not
    fp32's (the operands really are rounded)."""
    from hope.memory_pass import memory_pass
    spec, C, chunks = SPECS["hope"]._replace(precision="bf16"), 16, 3
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 5, 2, C * chunks, 16, generator=g)
    W1, W2 = 0.5 * torch.randn(1, 6, 2, 16, 16, generator=g), 0.5 * torch.randn(1, 6, 2, 16, 16, generator=g)
    readout = 0.3 * torch.randn(2, 2, 17, generator=g)
    inputs = [z, W1, W2, readout]
    errs = errors(lambda *x: (memory_pass(*x, spec, "triton", C),), lambda *x: (memory_pass(*x, spec, "torch", C),),
                  inputs, [t.double() for t in inputs])
    assert 1e-4 < min(errs) and max(errs) < 5e-2, errs


@needs_triton
@interpreted
def test_projection_step_is_a_handful_of_launches():
    """Forward: read, inverse, writes; backward: writes, targets', read (the targets are computed
    inside the writes' kernels); the read-out gradients' sum over the batch is the one PyTorch op."""
    from test_kernels import load_tool
    bench = load_tool("bench_chunk")
    spec = SPECS["hope"]
    inputs = [t.requires_grad_(True) for t in step_inputs(2, 3, 16, 16, 16, dtype=torch.float32)]
    aten, kernels = bench.count_launches(lambda *x: projection_step(*x, spec, "triton"), inputs)
    assert kernels == 6 and aten <= 1, (aten, kernels)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("precision,tol", [("tf32", 3e-2), ("tf32x3", 1e-4), ("bf16", 1e-1)])
@pytest.mark.parametrize("C", [64, 40])
def test_triton_projection_step_on_gpu_against_float64(precision, tol, C):
    """The compiled kernels at the 340M/1.3B shapes (d = m = 64) against float64 autograd (bf16: 5.5e-2
    at C = 40 in the interpreter's emulation)."""
    spec = SPECS["hope"]._replace(precision=precision)
    inputs = step_inputs(2, 4, C, 64, 64, dtype=torch.float32, device="cuda")
    errs = errors(lambda *x: projection_step(*x, spec, "triton"), lambda *x: autograd_step(*x, spec),
                  inputs, [t.double() for t in inputs])
    assert max(errs) < tol, errs
