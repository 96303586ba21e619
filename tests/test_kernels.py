"""The fused chunk update (hope/chunk_grad.py): the hand-written recomputing backward, eager,
compiled and as Triton kernels (hope/triton_chunk.py), against autograd through the closed form
and the per-token float64 reference. Without CUDA the Triton kernels run in Triton's interpreter.
"""
from __future__ import annotations

import argparse
import os
import re

import pytest
import torch

from hope import HopeConfig, HopeForCausalLM  # TRITON_INTERPRET without CUDA: tests/conftest.py
from hope.chunk_grad import fused_chunk_update, unit_lower_inverse
from hope.memory import MemoryState, _chunk_update, activation, memory_forward
from hope.reference import reference_forward
from test_hope_model import VARIANTS, rel_err, tiny_layer

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# Triton on CPU tensors: only in the interpreter, which conftest.py turns on where there is no CUDA;
# on a GPU machine the kernels compile for the GPU and refuse CPU tensors (the gpu tests cover them)
interpreted = pytest.mark.skipif(CUDA, reason="Triton's interpreter on CPU tensors (no CUDA)")


def chunk_inputs(lead, C, d, m, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    W1, W2 = rnd(*lead, d, m) * 0.5, rnd(*lead, m, d) * 0.5
    k = torch.nn.functional.normalize(rnd(*lead, C, d), dim=-1)
    vhat, q = rnd(*lead, C, d), rnd(*lead, C, d)
    eta = torch.rand(*lead, C, generator=g, dtype=dtype)
    la = -0.3 * torch.rand(*lead, C, generator=g, dtype=dtype)
    return [t.to(device) for t in (W1, W2, k, vhat, eta, la, q)]


def outputs_and_grads(fn, inputs, with_q: bool, seed: int = 1):
    xs = [t.clone().requires_grad_(True) for t in inputs]
    if not with_q:
        xs[6] = None
    outs = [o for o in fn(*xs) if o is not None]
    g = torch.Generator().manual_seed(seed)
    # drawn in float64 whatever the dtype: float32 and float64 draws differ for the same seed
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return outs, [x.grad for x in xs if x is not None]


def worst(a_list, b_list) -> float:
    return max(rel_err(a, b) for a, b in zip(a_list, b_list))


def closed_form(act_name, dgd):
    def run(W1, W2, k, vhat, eta, la, q):
        state, o = _chunk_update(MemoryState(W1, W2), k, vhat, eta, la, None, activation(act_name), dgd, q=q)
        return state.W1, state.W2, o
    return run


def fused(backend, dgd, act_name="silu", targets=False, precision="tf32"):
    return lambda *xs: fused_chunk_update(*xs, dgd=dgd, backend=backend, act_name=act_name, targets=targets,
                                          precision=precision)


def with_targets(fn, act_name="silu"):
    """fn over values v: the self-generated targets M(v) at the chunk-start state, by autograd."""
    def run(W1, W2, k, v, eta, la, q):
        return fn(W1, W2, k, memory_forward(v, W1, W2, activation(act_name)[0]), eta, la, q)
    return run


@pytest.mark.parametrize("act_name", ["silu", "gelu", "tanh"])
@pytest.mark.parametrize("dgd", [True, False])
@pytest.mark.parametrize("with_q", [True, False])
def test_manual_backward_equals_autograd_float64(act_name, dgd, with_q):
    inputs = chunk_inputs((3,), 8, 5, 6, dtype=torch.float64)
    ref_out, ref_grad = outputs_and_grads(closed_form(act_name, dgd), inputs, with_q)
    out, grad = outputs_and_grads(fused("torch", dgd, act_name=act_name), inputs, with_q)
    assert worst(out, ref_out) < 1e-12
    assert worst(grad, ref_grad) < 1e-12


def test_manual_backward_handles_broadcast_gates():
    """Projection memories share k, eta, alpha across the memory dim: gradients sum over it."""
    W1, W2, k, vhat, eta, la, q = chunk_inputs((2, 3, 2), 8, 5, 6, dtype=torch.float64)
    inputs = [W1, W2, k[:, :1], vhat, eta[:, :1], la[:, :1], q]
    ref_out, ref_grad = outputs_and_grads(closed_form("silu", True), inputs, False)
    out, grad = outputs_and_grads(fused("torch", True), inputs, False)
    assert [g.shape for g in grad] == [t.shape for t in inputs[:6]]
    assert worst(out, ref_out) < 1e-12 and worst(grad, ref_grad) < 1e-12


@pytest.mark.parametrize("act_name", ["silu", "gelu"])
@pytest.mark.parametrize("with_q", [True, False])
def test_targets_inside_the_op_equal_autograd_float64(act_name, with_q):
    """targets=True: the op computes vhat = M(v) itself, forward and backward; v shared by the
    memories as in the projection pass (broadcast), or per memory."""
    W1, W2, k, v, eta, la, q = chunk_inputs((2, 3), 7, 5, 6, dtype=torch.float64)
    for inputs in ([W1, W2, k, v, eta, la, q], [W1, W2, k[:, :1], v[:, :1], eta[:, :1], la[:, :1], q]):
        ref_out, ref_grad = outputs_and_grads(with_targets(closed_form(act_name, True), act_name), inputs, with_q)
        out, grad = outputs_and_grads(fused("torch", True, act_name, targets=True), inputs, with_q)
        assert [g.shape for g in grad[:6]] == [t.shape for t in inputs[:6]]
        assert worst(out, ref_out) < 1e-12 and worst(grad, ref_grad) < 1e-12


@pytest.mark.parametrize("C", [1, 5, 16, 64])
def test_unit_lower_inverse(C):
    L = 0.3 * torch.randn(3, 2, C, C, dtype=torch.float64).tril(-1)
    eye = torch.eye(C, dtype=torch.float64)
    assert (unit_lower_inverse(L) @ (eye + L) - eye).abs().max() < 1e-12
    # the worst case of the delta rule (eta = 1, one key repeated): exact in fp32, no cancellation
    ones = torch.ones(C, C).tril(-1)
    assert (unit_lower_inverse(ones) @ (torch.eye(C) + ones) - torch.eye(C)).abs().max() < 1e-5


@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if v != "momentum"))
def test_fused_torch_path_equals_per_token_reference(variant):
    """The recomputing backward inside the model, against HOPE_SPEC.md's float64 reference."""
    layer = tiny_layer(chunk_size=4, projection_chunk_size=8, memory_kernel="torch", **VARIANTS[variant])
    x = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    fast, ref = layer(x), reference_forward(layer, x)
    assert rel_err(fast, ref) < 1e-6
    w = torch.randn_like(ref)
    params = [x] + [p for p in layer.parameters()]
    g_fast = torch.autograd.grad((fast * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        if b is not None and b.abs().sum() > 0:
            assert rel_err(a, b) < 1e-6


def small_hope(kernel: str, **overrides) -> HopeForCausalLM:
    torch.manual_seed(0)
    fields = dict(vocab_size=97, hidden_size=32, num_layers=1, num_heads=2, chunk_size=8, projection_chunk_size=8,
                  cms_hidden_sizes=[64], cms_periods=[0], memory_kernel=kernel)
    fields.update(overrides)
    return HopeForCausalLM(HopeConfig(**fields).validate())


def count_memory_passes(monkeypatch) -> list:
    """The calls of hope/memory_pass.py's op that the model makes from now on."""
    from hope import titans
    calls = []
    real = titans.memory_pass
    monkeypatch.setattr(titans, "memory_pass", lambda *a: calls.append(a) or real(*a))
    return calls


def loss_and_grads(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("length", [21, 24])
def test_model_with_fused_op_equals_reference(length, monkeypatch):
    """21 tokens: an op per chunk and pass (the last chunk short); 24: both passes in one op
    (hope/memory_pass.py)."""
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = loss_and_grads(small_hope("reference"), ids)
    passes = count_memory_passes(monkeypatch)
    loss, grads = loss_and_grads(small_hope("torch"), ids)
    assert len(passes) == (length % 8 == 0)
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-12, name


def test_config_refuses_momentum_with_the_fused_op():
    from hope.config import ModelConfigError
    for kernel in ("torch", "compiled"):
        with pytest.raises(ModelConfigError, match="memory_kernel"):
            HopeConfig(memory_kernel=kernel, inner_momentum=True).validate()
    with pytest.raises(ModelConfigError, match="silu"):
        HopeConfig(memory_kernel="triton", memory_activation="gelu").validate()
    with pytest.raises(ModelConfigError, match="powers of two"):
        HopeConfig(hidden_size=48, num_heads=4, memory_kernel="triton").validate()


def test_config_refuses_an_unknown_memory_precision():
    from hope.config import ModelConfigError
    with pytest.raises(ModelConfigError, match=r"memory_precision.*\['tf32', 'bf16', 'tf32x3', 'ieee'\].*'fp8'"):
        HopeConfig(memory_kernel="triton", memory_precision="fp8").validate()


def test_cuda_graphs_need_the_triton_memory_pass():
    from hope.config import ModelConfigError
    from hope.memory_pass import CudaGraphs, memory_pass
    from hope.projection_step import ReadSpec
    for fields in (dict(memory_kernel="compiled"), dict(memory_kernel="triton", projection_chunk_size=32),
                   dict(memory_kernel="triton", adaptive=["k", "v"])):
        with pytest.raises(ModelConfigError, match="memory_cuda_graphs"):
            HopeConfig(memory_cuda_graphs=True, **fields).validate()
    HopeConfig(memory_cuda_graphs=True, memory_kernel="triton").validate()
    z, W = torch.zeros(1, 5, 1, 32, 16), torch.zeros(1, 6, 1, 16, 16)
    with pytest.raises(ValueError, match="CUDA graphs"):
        memory_pass(z, W, W, torch.zeros(2, 1, 17), ReadSpec(1.0, True, True, True, True), "triton", 16, CudaGraphs())


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton (pip install triton)")


def load_tool(name: str):
    """A script of tools/ as a module."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_triton
@pytest.mark.parametrize("C,d,m", [(16, 16, 16), (16, 32, 16), (32, 16, 32), (11, 16, 16)])
@pytest.mark.parametrize("dgd", [True, False])
@pytest.mark.parametrize("with_q", [True, False])
def test_triton_kernels_equal_pytorch(C, d, m, dgd, with_q):
    """C=11 is padded to 16 inside fused_chunk_update (tokens that write nothing)."""
    device = "cuda" if CUDA else "cpu"
    inputs = chunk_inputs((2, 3), C, d, m, device=device)
    ref_out, ref_grad = outputs_and_grads(fused("torch", dgd), inputs, with_q)
    out, grad = outputs_and_grads(fused("triton", dgd), inputs, with_q)
    tol = 1e-5 if not CUDA else 3e-2  # the interpreter multiplies in exact fp32; tf32 on a GPU
    assert worst(out, ref_out) < tol
    assert worst(grad, ref_grad) < tol


@needs_triton
@pytest.mark.parametrize("C,d", [(16, 16), (32, 64), (64, 16)])
def test_triton_delta_rule_inverse_equals_pytorch(C, d):
    """The kernel's T = (I + diag(eta)(Gp * k k^T))^-1 against unit_lower_inverse, including the
    delta rule's worst case (eta = 1, no decay, one key repeated: L all ones below the diagonal)."""
    from hope.chunk_grad import _delta_rule_inverse, _gates
    device = "cuda" if CUDA else "cpu"
    k = torch.randn(2, 3, C, d, device=device) / d ** 0.5
    eta = torch.rand(2, 3, C, device=device)
    la = -torch.rand(2, 3, C, device=device)
    one_key = torch.zeros(1, 1, C, d, device=device)
    one_key[..., 0] = 1
    cases = [(k, eta, la), (one_key, torch.ones(1, 1, C, device=device), torch.zeros(1, 1, C, device=device))]
    tol = 1e-5 if not CUDA else 3e-2
    for k, eta, la in cases:
        L = eta.unsqueeze(-1) * _gates(la)[3] * (k @ k.transpose(-1, -2))
        T = _delta_rule_inverse(k.contiguous(), eta.contiguous(), la.contiguous(), "tf32")
        assert (T - unit_lower_inverse(L)).abs().max() < tol
        eye = torch.eye(C, device=device)
        assert (T @ (eye + L) - eye).abs().max() < tol


@needs_triton
@pytest.mark.parametrize("with_q,targets", [(False, False), (True, False), (False, True), (True, True)])
def test_triton_kernels_handle_shared_keys_and_gates(with_q, targets):
    """The projection pass: memories [batch, 5, heads] share k, v, eta, alpha (broadcast along the
    memory dim). The kernels read one copy per (batch, head) and T is computed once for the 5;
    with targets, the values written are M(v) per memory, computed by the targets kernels."""
    from hope.chunk_grad import _shared_inputs
    device = "cuda" if CUDA else "cpu"
    W1, W2, k, v, eta, la, q = chunk_inputs((2, 5, 3), 16, 16, 16, device=device)
    inputs = [W1, W2, k[:, :1], v[:, :1] if targets else v, eta[:, :1], la[:, :1], q]
    lead = (2, 5, 3)
    *_, SX, SH = _shared_inputs(*(t.expand(*lead, *t.shape[3:]) for t in (k[:, :1], eta[:, :1], la[:, :1])))
    assert (SX, SH) == (5, 3)
    ref_out, ref_grad = outputs_and_grads(fused("torch", True, targets=targets), inputs, with_q)
    out, grad = outputs_and_grads(fused("triton", True, targets=targets), inputs, with_q)
    assert [g.shape for g in grad[:6]] == [t.shape for t in inputs[:6]]
    tol = 1e-5 if not CUDA else 3e-2
    assert worst(out, ref_out) < tol and worst(grad, ref_grad) < tol


@needs_triton
def test_triton_path_launches_a_handful_of_kernels_per_chunk_step():
    """Launches, not FLOPs, bound these small chunk steps on a GPU (docs/PERFORMANCE.md): the
    Triton op stays a few launches: its kernels, and no copies of inputs the memories share."""
    bench = load_tool("bench_chunk")
    device = "cuda" if CUDA else "cpu"
    main = bench.inputs((2, 3), 16, 16, 16, device, with_q=True)
    projection = bench.inputs((2, 5, 3), 16, 16, 16, device, with_q=False, shared_dim=1)
    aten, kernels = bench.count_launches(fused("triton", True, targets=True), main)
    assert kernels == 6 and aten == 0, (aten, kernels)  # inverse, forward; 3 backward, targets'
    aten, kernels = bench.count_launches(fused("triton", True, targets=True), projection)
    assert kernels == 4 and aten <= 4, (aten, kernels)  # no read-out: 2 backward kernels fewer; 4 sums of
    # the shared inputs' gradients (the model's projection step sums them in its read's backward)
    aten, kernels = bench.count_launches(fused("torch", True), main)
    assert kernels == 0 and aten > 100, aten  # the counter sees PyTorch ops


@needs_triton
@interpreted
def test_bench_chunk_times_the_memory_pass_per_precision(capsys):
    """`bench_chunk.py --pass` on CPU: the tiny config's memory pass, PyTorch and Triton (interpreted),
    the Triton rows with their profile (on CUDA their kernels, here their heaviest ops), one of them
    with the state kernel at 8 warps and every kernel at 168 registers (hope.memory_pass.LAUNCH, the
    table emptied after)."""
    from hope import memory_pass
    bench = load_tool("bench_chunk")
    args = dict(size="340M", device="cpu", seq=2048, batch=1, reps=1)
    bench.main_memory_pass(argparse.Namespace(**args, precisions="tf32",
                                              launch=["chunk_bwd_state_kernel:num_warps=8,all:maxnreg=168"]))
    lines = capsys.readouterr().out.splitlines()[1:]
    rows = [line.split() for line in lines if not line.startswith("    ")]
    assert [row[0] for row in rows] == ["triton", "triton", "torch"], rows
    assert rows[0][1:4:2] == ["tf32", "ms"] and rows[2][2] == "ms", rows  # times, not "failed: ..."
    assert rows[1][1:3] == ["tf32,", "chunk_bwd_state:num_warps=8,all:maxnreg=168"] and rows[1][4] == "ms", rows
    profiles = [i for i, line in enumerate(lines) if line.startswith("    CPU ops")]
    assert [lines[i - 1].split()[0] for i in profiles] == ["triton", "triton"], lines
    assert any("MemoryPassBackward" in line for line in lines[profiles[0]:profiles[1]]), lines
    assert memory_pass.LAUNCH == {}
    with pytest.raises(SystemExit, match="fp8"):
        bench.main_memory_pass(argparse.Namespace(**args, precisions="fp8", launch=[]))
    for bad in ("state:num_warps=8", "all:num_warps=3", "all:maxnreg=256", "all:registers=168", "all=8",
                "all:REMAT=1", "chunk_fwd_kernel:REMAT=1", "chunk_bwd_state_kernel:REMAT=2"):
        with pytest.raises(SystemExit, match="KERNEL:OPTION=N"):
            bench.main_memory_pass(argparse.Namespace(**args, precisions="tf32", launch=[bad]))
    label, table = bench.parse_launch("all:maxnreg=168,chunk_bwd_state_kernel:num_warps=8,"
                                      "chunk_bwd_state_kernel:REMAT=0")
    assert label == "all:maxnreg=168,chunk_bwd_state:num_warps=8,chunk_bwd_state:REMAT=0", label
    assert table["chunk_bwd_state_kernel"] == {"maxnreg": 168, "num_warps": 8, "REMAT": 0}, table
    assert table["chunk_fwd_kernel"] == {"maxnreg": 168} and len(table) >= 9, table


def test_memory_pass_launches_each_kernel_with_the_options_of_its_table(monkeypatch):
    """hope.memory_pass.LAUNCH sets a kernel's launch options (4 warps and no register cap otherwise),
    over the defaults of its launch (the state kernel's REMAT)."""
    from hope import memory_pass
    launches = []

    class Kernel:
        def __init__(self, name):
            self.__name__ = name

        def __getitem__(self, grid):
            return lambda *args, **options: launches.append((self.__name__, grid, options))

    monkeypatch.setitem(memory_pass.LAUNCH, "chunk_bwd_state_kernel", {"num_warps": 8, "maxnreg": 168, "REMAT": 0})
    monkeypatch.setitem(memory_pass.LAUNCH, "targets_bwd_kernel", {"maxnreg": 128})
    for name in ("chunk_bwd_state_kernel", "targets_bwd_kernel", "chunk_fwd_kernel"):
        memory_pass._launch(Kernel(name), (6,), REMAT=1)(1, 2)
    assert launches == [("chunk_bwd_state_kernel", (6,), {"num_warps": 8, "maxnreg": 168, "REMAT": 0}),
                        ("targets_bwd_kernel", (6,), {"num_warps": 4, "maxnreg": 128, "REMAT": 1}),
                        ("chunk_fwd_kernel", (6,), {"num_warps": 4, "REMAT": 1})], launches


@needs_triton
@interpreted
def test_triton_layer_launches_per_chunk_step():
    """A whole HOPE layer, forward and backward, per chunk step of both passes: the read, one
    inverse, and the write kernels (state, targets) once for all six memories; the read-out's
    kernels run once per pass over all chunks, outside the chunk steps (hope/memory_pass.py)."""
    bench = load_tool("bench_chunk")
    cfg = small_hope("triton", chunk_size=16, projection_chunk_size=16).config  # (launches do not depend on widths)
    launches = bench.layer_launches_per_chunk(cfg, "triton")
    assert launches == 6, launches
    assert bench.layer_launches_per_chunk(cfg, "reference") > 300  # the counter sees the ops


@needs_triton
@interpreted
def test_memory_precision_reaches_every_triton_launch(monkeypatch):
    """The model field memory_precision, through the per-chunk ops (projection_step and the chunk
    op; memory_pass takes the same read spec), to every Triton launch, forward and backward."""
    from hope import chunk_grad
    seen, real = [], chunk_grad.triton_options
    monkeypatch.setattr(chunk_grad, "triton_options", lambda precision: seen.append(precision) or real(precision))
    model = small_hope("triton", chunk_size=16, projection_chunk_size=8, memory_precision="bf16")
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    assert len(seen) > 5 and set(seen) == {"bf16"}, seen


@needs_triton
@interpreted
@pytest.mark.parametrize("length,chunk,remat", [(21, 8, None), (32, 16, None), (32, 16, 0)])
def test_model_with_triton_kernels_equals_reference(length, chunk, remat, monkeypatch):
    """Chunks of 8 run padded to 16, one op per chunk and pass; 2 chunks of 16: both passes in one op.
    tf32 rematerializes in the state kernel (triton_chunk.state_kernel_options); LAUNCH turns it off."""
    from hope import memory_pass
    if remat is not None:
        monkeypatch.setitem(memory_pass.LAUNCH, "chunk_bwd_state_kernel", {"REMAT": remat})
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = loss_and_grads(small_hope("reference", chunk_size=chunk, projection_chunk_size=chunk), ids)
    passes = count_memory_passes(monkeypatch)
    loss, grads = loss_and_grads(small_hope("triton", chunk_size=chunk, projection_chunk_size=chunk), ids)
    assert len(passes) == (chunk == 16)
    assert abs(loss - ref_loss) < 1e-5
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-12, name


# --------------------------------------------------------------------------- GPU only
@gpu
@needs_cuda
@pytest.mark.parametrize("C,d,m", [(64, 64, 64), (32, 64, 128), (64, 128, 64), (11, 64, 32)])
@pytest.mark.parametrize("with_q", [True, False])
def test_compiled_op_on_gpu_against_float64(C, d, m, with_q):
    """The compiled op in fp32 (full fp32 matmuls) against the float64 closed form."""
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = chunk_inputs((4, 5), C, d, m, device="cuda")
    ref_out, ref_grad = outputs_and_grads(closed_form("silu", True), [t.double() for t in inputs], with_q)
    out, grad = outputs_and_grads(fused("compiled", True), inputs, with_q)
    errors = [rel_err(a.double(), b) for a, b in zip(out + grad, ref_out + ref_grad)]
    assert max(errors) < 1e-4, errors


@gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["compiled", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("length", [200, 256])
def test_bf16_model_with_fused_kernels_tracks_reference(kernel, length):
    """200 tokens: an op per chunk and pass; 256: both passes in one op (hope/memory_pass.py)."""
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(0)).cuda()
    fields = dict(hidden_size=128, num_heads=2, chunk_size=64, projection_chunk_size=64)
    ref = small_hope("reference", **fields).cuda().to(torch.bfloat16)
    fast = small_hope(kernel, **fields).cuda().to(torch.bfloat16)
    ref_loss, ref_grads = loss_and_grads(ref, ids)
    loss, grads = loss_and_grads(fast, ids)
    assert abs(loss.float() - ref_loss.float()) < 1e-2
    for name, g in ref_grads.items():
        assert (grads[name].float() - g.float()).norm() <= 5e-2 * g.float().norm() + 1e-6, name


def assert_same_steps(reference, model, loss_tol: float, grad_tol: float, steps: int = 3) -> None:
    """`model` computes what `reference` does (CUDA, 2 x 256 tokens): the same loss and gradients on
    `steps` batches, one after the other (the optimizer is not involved)."""
    for step in range(steps):
        ids = torch.randint(0, 97, (2, 256), generator=torch.Generator().manual_seed(step)).cuda()
        for m in (reference, model):
            m.zero_grad(set_to_none=True)
        loss, grads = loss_and_grads(reference, ids)
        model_loss, model_grads = loss_and_grads(model, ids)
        assert abs(model_loss - loss) < loss_tol, step
        for name, g in grads.items():
            assert (model_grads[name] - g).norm() <= grad_tol * g.norm() + 1e-9, (step, name)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_graphs_replay_the_memory_pass(checkpointing):
    """memory_cuda_graphs: captured at the first step, replayed after; the same loss and gradients
    as the eager Triton loops, step after step (with layer checkpointing too)."""
    fields = dict(hidden_size=128, num_heads=2, num_layers=2, chunk_size=64, projection_chunk_size=64,
                  gradient_checkpointing_layers=checkpointing)
    eager = small_hope("triton", **fields).cuda().train()
    graphed = small_hope("triton", memory_cuda_graphs=True, **fields).cuda().train()
    assert_same_steps(eager, graphed, loss_tol=1e-6, grad_tol=1e-5)
    captured = [next(iter(layer.mixer.cuda_graphs.graphs.values())) for layer in graphed.model.layers]
    assert all(len(layer.mixer.cuda_graphs.graphs) == 1 for layer in graphed.model.layers)
    # the layers' backward graphs share one memory pool, their forward graphs keep one each
    assert len({graph["backward"].pool() for graph in captured}) == 1
    assert len({graph["forward"].pool() for graph in captured}) == len(captured)


@gpu
@needs_cuda
@needs_triton
def test_blocks_under_torch_compile_around_the_graphed_triton_memory_pass():
    """train.compile: every block compiled, its memory pass (Triton, CUDA graphs) left out of the
    graph; the same loss and gradients as the eager model, step after step."""
    from train.compile import compile_blocks

    fields = dict(hidden_size=128, num_heads=2, num_layers=2, chunk_size=64, projection_chunk_size=64,
                  memory_cuda_graphs=True)
    eager = small_hope("triton", **fields).cuda().train()
    compiled = small_hope("triton", **fields).cuda().train()
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    assert compile_blocks(compiled) == 2
    assert_same_steps(eager, compiled, loss_tol=1e-5, grad_tol=1e-4)  # compiled: fused fp32 rounding
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile, around the memory pass


@needs_triton
@pytest.mark.slow
def test_triton_kernels_fit_the_h100_shared_memory():
    """Compiled for sm_90 without a GPU (Triton ships ptxas): a kernel over the 227 KB of shared
    memory per block would fail only at its first launch on the H100."""
    lines, stdout = triton_resources("--arch", "90", "--precision", "tf32")
    assert len(lines) == 9, stdout
    assert all(" fits " in line for line in lines), stdout


def triton_resources(*args: str) -> tuple[list[str], str]:
    """tools/triton_resources.py's per-kernel lines and its whole output (it compiles for a GPU, so
    it runs without the interpreter, in a process of its own)."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "triton_resources.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if "shared" in line], out.stdout


@needs_triton
@pytest.mark.slow
def test_triton_kernels_compile_with_integer_arguments_equal_to_one():
    """At a launch Triton turns an integer argument equal to 1 into a constant (a Python int):
    `x.to(...)` on one fails to compile then. The kernels with such offsets, compiled that way."""
    kernels = "chunk_bwd_state_kernel,chunk_readout_kernel,chunk_bwd_readout2_kernel"
    lines, stdout = triton_resources("--precision", "bf16", "--ones", "--kernels", kernels)
    assert len(lines) == 3, stdout


@needs_triton
def test_a_register_cap_lets_an_sm_hold_three_programs():
    """--maxnreg 168 (what hope.memory_pass.LAUNCH's maxnreg sets at a launch) reaches the compiled
    binary: targets_bwd_kernel, ~250 registers and nothing spilled uncapped (249 under Triton 3.9, 253
    under the GPU image's 3.6; 2 programs of 4 warps per SM), keeps to 168 registers and spills the
    rest, and an SM holds 3 of its programs."""
    lines, stdout = triton_resources("--precision", "bf16", "--kernels", "targets_bwd_kernel", "--maxnreg", "168")
    found = re.search(r"registers +(\d+) +spilled +([\d,]+) B +programs/SM (\d)", lines[0])
    assert found and int(found[1]) <= 168 and int(found[2].replace(",", "")) > 0 and found[3] == "3", stdout
    assert "at most 168 registers" in stdout, stdout


@needs_triton
@pytest.mark.slow
def test_rematerializing_lets_an_sm_hold_two_state_kernels_at_tf32():
    """The state kernel's REMAT (on at tf32: triton_chunk.state_kernel_options) recomputes four tiles
    instead of holding them through the delta rule: their operands' shared memory no longer adds up,
    and an SM holds 2 of its programs instead of 1."""
    found = {}
    for remat in ("0", "1"):
        lines, stdout = triton_resources("--precision", "tf32", "--kernels", "chunk_bwd_state_kernel", "--remat", remat)
        found[remat] = re.search(r"shared +([\d,]+) B.*programs/SM (\d)", lines[0])
        assert found[remat] and f"REMAT={remat}" in stdout, stdout
    assert found["0"][2] == "1" and found["1"][2] == "2", (found["0"][0], found["1"][0])
    assert int(found["1"][1].replace(",", "")) < 0.7 * int(found["0"][1].replace(",", "")), found


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("precision,tol", [("tf32", 3e-2), ("tf32x3", 1e-4), ("bf16", 3e-2)])
@pytest.mark.parametrize("C,d,m", [(64, 64, 64), (32, 64, 128), (64, 128, 64), (11, 64, 32)])
def test_triton_kernels_on_gpu_against_float64(precision, tol, C, d, m):
    """The compiled Triton kernels at each GPU precision against the float64 closed form (bf16: up to
    8.4e-3 in the interpreter's emulation)."""
    inputs = chunk_inputs((4, 5), C, d, m, device="cuda")
    ref_out, ref_grad = outputs_and_grads(closed_form("silu", True), [t.double() for t in inputs], True)
    out, grad = outputs_and_grads(fused("triton", True, precision=precision), inputs, True)
    errors = [rel_err(a.double(), b) for a, b in zip(out + grad, ref_out + ref_grad)]
    assert max(errors) < tol, errors
