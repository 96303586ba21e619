"""Time one chunk update (forward + backward) per implementation, at the shapes of a model size.

    python tools/bench_chunk.py --size 340M --batch 4 --device cuda
    python tools/bench_chunk.py --size 340M --layer     # + launches of a whole layer per chunk step
    python tools/bench_chunk.py --size 340M --host      # + the host work around those launches
    python tools/bench_chunk.py --size 340M --pass --precisions tf32,bf16   # + one layer's memory pass

Rows: the reference closed form under autograd (hope/memory.py) and the recomputing hand-written
backward (hope/chunk_grad.py), eager, under torch.compile and as Triton kernels
(tf32 matmuls; on CPU they run in Triton's interpreter and are
counted, not timed). Two shapes: the projection pass (batch x 5 memories x heads, sharing k, eta
and alpha) and the main memory with its read-out (batch x heads). A layer runs seq/C chunk steps
of each, sequentially, so besides time each row counts its launches per chunk step: PyTorch ops
that run a kernel (views and allocations left out) plus Triton kernels. At ~5-10 us of host time
each, launches bound these small steps on a GPU. The compiled row is timed only (inductor's
kernels do not pass through the dispatcher).

--pass times what a layer's memories cost in training: hope/memory_pass.py, both passes over a
whole sequence, forward + backward, for each backend (compiled; Triton at each of --precisions,
eagerly and as CUDA graphs), and prints the tokens/s that this part alone would allow a model of
--size (all its layers). Under each eager Triton row, its kernels' GPU time from torch.profiler,
per kernel and in all: against the row's time, how much of the loop waits on the host. On CPU it
runs the tiny config under the interpreter, to check the code.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():  # the Triton row runs in Triton's interpreter (read at its import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # the project, and bench_model when imported by a test
from hope import HopeConfig  # noqa: E402
from hope import chunk_grad  # noqa: E402
from hope.config import MEMORY_PRECISIONS  # noqa: E402
from hope.memory import MemoryState, _chunk_update, activation, memory_forward  # noqa: E402
from bench_model import format_breakdown, kernel_breakdown  # noqa: E402


def inputs(lead, C, d, m, device, with_q, shared_dim=None):
    """Random chunk inputs; k, v, eta, alpha of size 1 along `shared_dim` (the projection memories')."""
    W1, W2 = 0.02 * torch.randn(*lead, d, m, device=device), torch.randn(*lead, m, d, device=device) / d ** 0.5
    kl = list(lead)
    if shared_dim is not None:
        kl[shared_dim] = 1
    k = torch.nn.functional.normalize(torch.randn(*kl, C, d, device=device), dim=-1)
    v = torch.randn(*kl, C, d, device=device)
    eta, la = 0.1 * torch.rand(*kl, C, device=device), -0.02 * torch.rand(*kl, C, device=device)
    q = torch.randn(*lead, C, d, device=device) if with_q else None
    xs = [t.requires_grad_(True) for t in (W1, W2, k, v, eta, la)]
    return xs + [None if q is None else q.requires_grad_(True)]


def fwd_bwd(fn, xs):
    outs = [o for o in fn(*xs) if o is not None]
    if xs:
        torch.autograd.grad(outs, [x for x in xs if x is not None], [torch.ones_like(o) for o in outs])
    else:  # a model: backward into its parameters
        sum(o.sum() for o in outs).backward()


class LaunchCounter(TorchDispatchMode):
    """Counts the PyTorch ops that run a kernel, and (via `triton_kernel`) Triton launches."""

    NOT_KERNELS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.aten = self.triton = 0
        self.inside_triton = False  # the interpreter's own tensor traffic is not a launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_triton and not func.is_view and name not in self.NOT_KERNELS:
            self.aten += 1
        return func(*args, **(kwargs or {}))

    def triton_kernel(self, run):
        def counted(*args, **kwargs):
            self.triton += 1
            self.inside_triton = True
            try:
                return run(*args, **kwargs)
            finally:
                self.inside_triton = False
        return counted


def triton_kernels() -> list:
    """Every Triton kernel of hope/ (their `run` is what a launch calls)."""
    from hope import triton_chunk, triton_projection
    return [getattr(module, n) for module in (triton_chunk, triton_projection) for n in dir(module)
            if n.endswith("_kernel")]


def count_launches(fn, xs) -> tuple[int, int]:
    kernels = triton_kernels()
    counter = LaunchCounter()
    for kernel in kernels:
        kernel.run = counter.triton_kernel(type(kernel).run.__get__(kernel))
    try:
        with counter:
            outs = [o for o in fn(*xs) if o is not None]
        if not xs:  # a model: backward into its parameters
            loss = sum(o.sum() for o in outs)
            with counter:
                loss.backward()
        else:  # gradients returned, not added into .grad (that would count an add per input)
            ones = [torch.ones_like(o) for o in outs]  # the upstream gradients are not the op's launches
            with counter:
                torch.autograd.grad(outs, [x for x in xs if x is not None], ones)
    finally:
        for kernel in kernels:
            del kernel.run
    return counter.aten, counter.triton


def layer_launches_per_chunk(size: str | HopeConfig, kernel: str) -> float:
    """Launches of one HOPE layer's forward + backward (loss included) per chunk step of both
    passes: the difference between 4 and 2 chunks of sequence, halved (batch 1, CPU)."""
    from hope import HopeForCausalLM
    counts = []
    for chunks in (2, 4):
        cfg = HopeConfig.from_yaml(ROOT / "configs/model" / f"{size}.yaml") if isinstance(size, str) else copy.deepcopy(size)
        cfg.num_layers, cfg.vocab_size, cfg.memory_kernel = 1, 256, kernel
        model = HopeForCausalLM(cfg)
        ids = torch.randint(0, 256, (1, chunks * cfg.chunk_size))
        counts.append(sum(count_launches(lambda: (model(ids, labels=ids).loss,), [])))
    return (counts[1] - counts[0]) / 2


def host_us_per_chunk_step(cfg: HopeConfig, reps: int = 5) -> float:
    """Host time per chunk step of a layer's memory op (hope/memory_pass.py, Triton path), forward
    and backward, with every Triton launch replaced by a no-op: the Python and PyTorch work this
    code adds around its launches (the launches' own host cost is Triton's and the driver's). It
    does not depend on the shapes; tiny ones (one head of 16) keep CPU arithmetic out of it."""
    from hope.memory_pass import memory_pass
    from hope.projection_step import ReadSpec
    batch, H, d, m, C = 1, 1, 16, 16, 16
    spec = ReadSpec.of(cfg)
    kernels = triton_kernels()
    for kernel in kernels:
        kernel.run = lambda *args, **kwargs: None
    try:
        times = []
        for chunks in (4, 36):
            z = torch.zeros(batch, 5, H, chunks * C, d, requires_grad=True)
            W1, W2 = (torch.zeros(batch, 6, H, *shape, requires_grad=True) for shape in ((d, m), (m, d)))
            readout = torch.zeros(2, H, d + 1, requires_grad=True)
            best = float("inf")
            for _ in range(reps):
                start = time.perf_counter()
                memory_pass(z, W1, W2, readout, spec, "triton", C).sum().backward()
                best = min(best, time.perf_counter() - start)
            times.append(best)
    finally:
        for kernel in kernels:
            del kernel.run
    return (times[1] - times[0]) / 32 * 1e6


def time_memory_pass(cfg: HopeConfig, batch: int, seq: int, device: str, precisions: list[str], reps: int,
                     launches: list[tuple[str, dict]] = ()):
    """Rows (name, us per layer forward + backward, kernel_breakdown of the eager Triton variants
    or None) of hope/memory_pass.py at the shapes of `cfg`. Each of `launches` (its name, and a
    hope.memory_pass.LAUNCH table: kernel name -> launch options) adds an eager Triton variant per
    precision."""
    from hope import memory_pass as memory_pass_module
    from hope.memory_pass import CudaGraphs, memory_pass
    from hope.projection_step import ReadSpec
    H, d, m, C = cfg.num_heads, cfg.head_dim, cfg.memory_width, cfg.chunk_size
    spec = ReadSpec.of(cfg)
    z = torch.nn.functional.normalize(torch.randn(batch, 5, H, seq, d, device=device), dim=-1).requires_grad_(True)
    W1 = (0.02 * torch.randn(batch, 6, H, d, m, device=device)).requires_grad_(True)
    W2 = (torch.randn(batch, 6, H, m, d, device=device) / d ** 0.5).requires_grad_(True)
    readout = (0.1 * torch.randn(2, H, d + 1, device=device)).requires_grad_(True)
    variants = []  # Triton first: on a GPU the compiled op's first call compiles for a minute or two
    for precision in precisions:
        variants.append((f"triton {precision}", "triton", precision, False, {}))
        if device == "cuda":
            variants.append((f"triton {precision} + CUDA graphs", "triton", precision, True, {}))
        variants += [(f"triton {precision}, {label}", "triton", precision, False, table) for label, table in launches]
    variants += [("compiled", "compiled", None, False, {})] if device == "cuda" else [("torch", "torch", None, False, {})]
    rows = []
    for name, backend, precision, graphed, table in variants:
        memory_pass_module.LAUNCH.clear()
        memory_pass_module.LAUNCH.update(table)
        graphs = CudaGraphs() if graphed else None
        fn = lambda *xs: (memory_pass(*xs, spec._replace(precision=precision or "tf32"), backend, C, graphs),)  # noqa: E731
        xs, profiled = [z, W1, W2, readout], backend == "triton" and not graphed
        # a variant that fails (out of memory, a compile error) leaves the others, a failed profile its time
        try:
            if profiled and device == "cpu":  # interpreted: one profiled run checks the code, its time means little
                us, profile = kernel_breakdown(lambda: fwd_bwd(fn, xs), device)
            else:
                us, profile = time_it(fn, xs, device, reps, warmup=0 if device == "cpu" else 3), None
        except Exception as e:
            rows.append((name, failure(e), None))
            continue
        if profiled and profile is None:
            try:
                profile = kernel_breakdown(lambda: fwd_bwd(fn, xs), device)[1]
            except Exception as e:
                profile = [(f"profile {failure(e)}", 1, 0.0)]
        rows.append((name, us, profile))
    memory_pass_module.LAUNCH.clear()
    return rows


def failure(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def time_it(fn, xs, device, reps: int, warmup: int = 3) -> float:
    def once():
        fwd_bwd(fn, xs)
    for _ in range(warmup):
        once()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    sync()
    return (time.perf_counter() - t) / reps * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="340M")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="also the compiled op on CPU (always on CUDA)")
    p.add_argument("--layer", action="store_true", help="also count a whole layer's launches per chunk step")
    p.add_argument("--host", action="store_true", help="also time the host work per chunk step, launches stubbed out")
    p.add_argument("--pass", dest="memory_pass", action="store_true",
                   help="time one layer's memory pass (hope/memory_pass.py) over a sequence instead")
    p.add_argument("--seq", type=int, default=2048, help="--pass: sequence length")
    p.add_argument("--precisions", default="tf32,bf16", help="--pass: memory_precision values to time")
    p.add_argument("--launch", action="append", default=[], metavar="KERNEL:OPTION=N[,...]",
                   help="--pass: one more eager Triton variant per precision with these launch options "
                        "(hope.memory_pass.LAUNCH; OPTION num_warps, maxnreg or the state kernel's REMAT, KERNEL "
                        "a kernel's name or `all`), e.g. chunk_bwd_state_kernel:num_warps=8 or all:maxnreg=168; "
                        "may be repeated")
    args = p.parse_args()
    if args.memory_pass:
        return main_memory_pass(args)
    cfg = HopeConfig.from_yaml(ROOT / "configs/model" / f"{args.size}.yaml")
    C, d, m, H = cfg.chunk_size, cfg.head_dim, cfg.memory_width, cfg.num_heads
    act = activation(cfg.memory_activation)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'} | torch {torch.__version__} | "
          f"{args.size}: C={C} d={d} m={m} | batch {args.batch}")

    targets = cfg.self_generated_targets  # the values written are M(v), as in the model

    def reference(W1, W2, k, v, eta, la, q):
        vhat = memory_forward(v, W1, W2, act[0]) if targets else v
        state, o = _chunk_update(MemoryState(W1, W2), k, vhat, eta, la, None, act, cfg.dgd, q=q)
        return state.W1, state.W2, o

    def fused(backend):
        return lambda *xs: chunk_grad.fused_chunk_update(*xs, dgd=cfg.dgd, backend=backend, targets=targets)

    for label, lead, with_q, shared in (("projection pass", (args.batch, len(cfg.adaptive), H), False, 1),
                                        ("main memory + read-out", (args.batch, H), True, None)):
        xs = inputs(lead, C, d, m, args.device, with_q, shared)
        print(f"{label}: {int(torch.tensor(lead).prod())} memories, {cfg.num_layers} layers x "
              f"{2048 // C} chunks per 2K sequence")
        rows = [("reference (autograd)", reference), ("recompute, eager", fused("torch"))]
        if args.device == "cuda" or args.compile:
            rows.append(("recompute, compiled", fused("compiled")))
        rows.append(("triton kernels (tf32)", fused("triton")))
        for name, fn in rows:
            counted = "compiled" not in name
            interpreted = name.startswith("triton") and args.device != "cuda"
            launches = "%4d PyTorch ops + %d Triton kernels" % count_launches(fn, xs) if counted else ""
            us = "interpreted" if interpreted else f"{time_it(fn, xs, args.device, args.reps):9.1f} us"
            print(f"  {name:28s} {us:>12s} per chunk fwd+bwd  {launches}", flush=True)

    if args.layer:
        print("one layer, forward + backward, per chunk step of both passes (CPU, batch 1):")
        for kernel in ("reference", "torch", "triton"):
            print(f"  {kernel:28s} {layer_launches_per_chunk(args.size, kernel):6.0f} launches", flush=True)
    if args.host:
        us = host_us_per_chunk_step(cfg)
        print(f"host work per chunk step of a layer around its 6 launches (hope/memory_pass.py, Triton launches "
              f"stubbed out): {us:.0f} us; x {cfg.num_layers} layers x {2048 // C} chunks = "
              f"{us * cfg.num_layers * 2048 / C / 1e3:.0f} ms per step of 2K sequences", flush=True)


LAUNCH_OPTIONS = {"num_warps": (1, 2, 4, 8, 16), "maxnreg": range(16, 256), "REMAT": (0, 1)}
OPTION_OF_ONE_KERNEL = {"REMAT": "chunk_bwd_state_kernel"}  # a constexpr of that kernel alone


def parse_launch(spec: str) -> tuple[str, dict[str, dict[str, int]]]:
    """'chunk_bwd_state_kernel:num_warps=8,all:maxnreg=168' -> (its label, {kernel name: {option: N}});
    `all` stands for every kernel of hope/'s Triton modules."""
    from hope import triton_chunk, triton_projection
    kernels = sorted(name for name in dir(triton_chunk) + dir(triton_projection) if name.endswith("_kernel"))
    table = {}
    for item in spec.split(","):
        name, _, option = item.partition(":")
        option, _, n = option.partition("=")
        if (name not in kernels and name != "all") or option not in LAUNCH_OPTIONS \
                or not n.isdigit() or int(n) not in LAUNCH_OPTIONS[option] \
                or OPTION_OF_ONE_KERNEL.get(option, name) != name:
            raise SystemExit(f"--launch: {item!r} is not KERNEL:OPTION=N with OPTION num_warps (N 1, 2, 4, 8 or 16), "
                             f"maxnreg (N 16 to 255) or, for chunk_bwd_state_kernel, REMAT (0 or 1), and KERNEL "
                             f"`all` or one of {', '.join(kernels)}")
        for kernel in kernels if name == "all" else [name]:
            table.setdefault(kernel, {})[option] = int(n)
    return spec.replace("_kernel", ""), table


def main_memory_pass(args):
    size = args.size if args.device == "cuda" else "tiny"  # the interpreter: a check of the code, not a time
    cfg = HopeConfig.from_yaml(ROOT / "configs/model" / f"{size}.yaml")
    seq = args.seq if args.device == "cuda" else 2 * cfg.chunk_size
    precisions = args.precisions.split(",")
    bad = [x for x in precisions if x not in MEMORY_PRECISIONS]
    if bad:
        raise SystemExit(f"--precisions: {bad} not among {', '.join(MEMORY_PRECISIONS)}")
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU (Triton interpreted)'} | "
          f"torch {torch.__version__} | {size}: one layer's memory pass (both passes), batch {args.batch} x {seq}, "
          f"H={cfg.num_heads} d={cfg.head_dim} m={cfg.memory_width} C={cfg.chunk_size}, forward + backward")
    launches = [parse_launch(spec) for spec in getattr(args, "launch", [])]
    for name, us, breakdown in time_memory_pass(cfg, args.batch, seq, args.device, precisions, args.reps, launches):
        if isinstance(us, str):
            print(f"  {name:44s} {us}", flush=True)
            continue
        bound = args.batch * seq / (us * 1e-6 * cfg.num_layers)
        print(f"  {name:44s} {us / 1e3:9.2f} ms per layer  -> {bound:10,.0f} tokens/s for the memories "
              f"of all {cfg.num_layers} layers alone", flush=True)
        if breakdown:  # the kernels of one profiled forward + backward, against the row's time
            print("\n".join(format_breakdown(us, breakdown, on_cuda=args.device == "cuda")), flush=True)


if __name__ == "__main__":
    main()
