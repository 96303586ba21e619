"""Compile the Triton kernels of hope/ for a GPU target without a GPU; print their resources.

    python tools/triton_resources.py [--arch 90] [--precision tf32] [--size 64]

A kernel that needs more shared memory than the device has fails only at its first launch on the
GPU; this catches it on any machine with Triton (which ships ptxas). H100 (sm_90): 227 KB per block.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hope import triton_chunk, triton_projection  # noqa: E402

KERNELS = {  # kernel name -> (module, number of leading pointer arguments)
    "delta_rule_inverse_kernel": (triton_chunk, 4),
    "targets_bwd_kernel": (triton_chunk, 7),
    "chunk_fwd_kernel": (triton_chunk, 11),
    "chunk_bwd_readout1_kernel": (triton_chunk, 15),
    "chunk_bwd_readout2_kernel": (triton_chunk, 17),
    "chunk_bwd_state_kernel": (triton_chunk, 24),
    "projection_read_fwd_kernel": (triton_projection, 6),
    "projection_read_bwd_kernel": (triton_projection, 17),
}
SHARED_LIMIT = {90: 232448, 80: 166912}


def compile_kernel(name: str, constants: dict, arch: int, warps: int):
    module, pointers = KERNELS[name]
    kernel = getattr(module, name)
    names = list(kernel.arg_names)
    # runtime scalars: memories sharing k, eta, alpha; strides and sizes; the read-outs' floats
    integers = {"SX", "SH", "sZb", "sZx", "sZh", "sZc", "sDb", "sDx", "sDh", "sDc", "B", "H", "VALID"}
    floats = {"ETA_MAX", "EPS"}
    signature = {arg: ("*fp32" if i < pointers else "i32" if arg in integers else "fp32" if arg in floats
                       else "constexpr") for i, arg in enumerate(names)}
    constexprs = {(names.index(key),): value for key, value in constants.items() if key in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--precision", default="tf32", choices=("ieee", "tf32x3", "tf32"))
    p.add_argument("--size", type=int, default=64, help="C = d = m")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--kernels", default=",".join(KERNELS))
    args = p.parse_args()
    n = args.size
    constants = dict(C=n, D=n, M=n, LOG2C=n.bit_length() - 1, DGD=True, HAS_Q=True, TARGETS=True, NS=6, WRITES=6, HAS_MAIN=False, UNIT_V=True, DECAY=True,
                     PREC=args.precision)
    limit = SHARED_LIMIT.get(args.arch)
    print(f"triton {triton.__version__} | sm_{args.arch} | C=d=m={n} | {args.precision} | {args.warps} warps")
    for name in args.kernels.split(","):
        start = time.perf_counter()
        compiled = compile_kernel(name, constants, args.arch, args.warps)
        shared = compiled.metadata.shared
        verdict = "" if limit is None else ("fits" if shared <= limit else f"EXCEEDS the {limit} B limit")
        print(f"  {name:26s} shared {shared:7,d} B  {verdict:24s} compiled in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
