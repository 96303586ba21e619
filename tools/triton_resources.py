"""Compile the Triton kernels of hope/ for a GPU target without a GPU; print their resources.

    python tools/triton_resources.py [--arch 90] [--precision tf32] [--size 64] [--warps 4] [--maxnreg N]

A kernel that needs more shared memory than the device has fails only at its first launch on the
GPU; this catches it on any machine with Triton (which ships ptxas). H100 (sm_90): 227 KB per block.
Also printed, from the compiled binary (cuobjdump): registers per thread, the bytes per thread
spilled to local memory (the stack), how many programs one SM can hold at once (the least of
what its 228 KB of shared memory and 64K registers allow) and the instructions of the binary.
These kernels have no loops, so a program is one long chain of those instructions: programs per
SM is what hides their latency. --maxnreg caps the registers per thread as
hope.memory_pass.LAUNCH can (168 lets an SM hold 3 programs of 4 warps, against 2 at 255), the
rest spilled.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hope import triton_chunk, triton_projection  # noqa: E402

KERNELS = {  # kernel name -> (module, number of leading pointer arguments, constants as memory_pass sets them)
    "delta_rule_inverse_kernel": (triton_chunk, 4, {}),
    "targets_bwd_kernel": (triton_chunk, 7, {}),
    "chunk_fwd_kernel": (triton_chunk, 11, {"HAS_Q": False}),  # (the per-chunk op also reads q out inside it)
    "chunk_readout_kernel": (triton_chunk, 9, {}),
    "chunk_bwd_readout1_kernel": (triton_chunk, 15, {}),
    "chunk_bwd_readout2_kernel": (triton_chunk, 17, {}),
    "chunk_bwd_state_kernel": (triton_chunk, 24, {}),
    "projection_read_fwd_kernel": (triton_projection, 6, {}),
    "projection_read_bwd_kernel": (triton_projection, 17, {}),
}
SHARED_LIMIT = {90: 232448, 80: 166912}  # per block
SHARED_PER_SM = {90: 233472, 80: 167936}  # per SM; each block also takes 1 KB reserved
REGISTERS_PER_SM = 65536
# runtime integers: memories sharing k, eta, alpha; offsets, strides and sizes
INTEGERS = {"SX", "SH", "sW", "sK", "sG", "iP", "sZb", "sZx", "sZh", "sZc", "sDb", "sDx", "sDh", "sDc", "B", "H", "VALID"}


def compile_kernel(name: str, constants: dict, arch: int, warps: int, maxnreg: int | None = None):
    module, pointers, overrides = KERNELS[name]
    constants = {**constants, **overrides}
    kernel = getattr(module, name)
    names = list(kernel.arg_names)
    floats = {"ETA_MAX", "EPS"}
    signature = {arg: ("*fp32" if i < pointers else "i32" if arg in INTEGERS else "fp32" if arg in floats
                       else "constexpr") for i, arg in enumerate(names)}
    constexprs = {(names.index(key),): value for key, value in constants.items() if key in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def binary_resources(compiled) -> tuple[int, int, int]:
    """Registers per thread, stack (spill) bytes per thread and instructions, read from the cubin.
    The kernels have no loops, so each thread runs every instruction once."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, flags=re.M))
    return int(found[1]), int(found[2]), instructions


def programs_per_sm(shared: int, registers: int, warps: int, arch: int) -> int:
    by_shared = SHARED_PER_SM.get(arch, 0) // (shared + 1024)
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    return min(by_shared, REGISTERS_PER_SM // (per_warp * warps), 64 // warps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--precision", default="tf32", choices=("ieee", "tf32x3", "tf32", "bf16"))
    p.add_argument("--size", type=int, default=64, help="C = d = m")
    p.add_argument("--warps", type=int, default=4, choices=(4, 8))
    p.add_argument("--maxnreg", type=int, default=None, help="registers per thread at most (16-255; default: "
                   "the compiler's choice)")
    p.add_argument("--remat", type=int, choices=(0, 1), default=None, help="the state kernel's REMAT (default: "
                   "as hope.triton_chunk.state_kernel_options sets it for the precision)")
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--ones", action="store_true", help="every runtime integer argument equal to 1: at a launch "
                   "Triton makes such an argument a constant (a Python int, not a tensor), so they must compile so too")
    args = p.parse_args()
    n = args.size
    constants = dict(C=n, D=n, M=n, LOG2C=n.bit_length() - 1, DGD=True, HAS_Q=True, TARGETS=True, NS=6, WRITES=6, HAS_MAIN=False, UNIT_V=True, DECAY=True,
                     PREC=args.precision, **(dict.fromkeys(INTEGERS, 1) if args.ones else {}),
                     **triton_chunk.state_kernel_options(args.precision))
    if args.remat is not None:
        constants["REMAT"] = bool(args.remat)
    if args.maxnreg is not None and not 16 <= args.maxnreg <= 255:
        p.error(f"--maxnreg: expected 16 to 255 registers per thread, got {args.maxnreg}")
    limit = SHARED_LIMIT.get(args.arch)
    print(f"triton {triton.__version__} | sm_{args.arch} | C=d=m={n} | {args.precision} | {args.warps} warps"
          + (f" | at most {args.maxnreg} registers" if args.maxnreg else "") + f" | REMAT={int(constants['REMAT'])}")
    for name in args.kernels.split(","):
        start = time.perf_counter()
        compiled = compile_kernel(name, constants, args.arch, args.warps, args.maxnreg)
        seconds = time.perf_counter() - start
        shared = compiled.metadata.shared
        registers, stack, instructions = binary_resources(compiled)
        verdict = "" if limit is None else ("fits" if shared <= limit else f"EXCEEDS the {limit} B limit")
        print(f"  {name:26s} shared {shared:7,d} B {verdict:5s} registers {registers:3d}  spilled {stack:5,d} B"
              f"  programs/SM {programs_per_sm(shared, registers, args.warps, args.arch)}"
              f"  instructions {instructions:6,d}  compiled in {seconds:4.1f} s", flush=True)


if __name__ == "__main__":
    main()
