"""torch.compile for training, block by block (`train.compile`, bench_throughput --compile).

Each repeated block of the model (the classes a Hugging Face model names in `_no_split_modules`) is
compiled in place, as torchtitan does: every layer runs the one graph compiled for the first (the
layers' parameters are graph inputs), layer checkpointing wraps compiled blocks, and the state
dict keeps its names. The model decides what stays out of the graph (`torch.compiler.disable`):
HOPE keeps its memories' chunk loops eager, so the dense work around them (projections, convs,
norms, gates, the CMS MLPs, residuals) is what fuses.
"""
from __future__ import annotations

import torch


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every block of `model` in place; returns how many. Compilation happens at the first
    forward of each input shape (and again for evaluation, under no_grad)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no blocks to compile (_no_split_modules: {sorted(names)})")
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_failure(error: BaseException) -> str | None:
    """The one line hope-train prints when the compiler fails (inductor without a C++ compiler on
    CPU, Triton's failing on GPU); None for any other error, also one raised inside a compiled block
    (a shape error in the model keeps its traceback)."""
    import torch._dynamo.exc

    if not isinstance(error, torch._dynamo.exc.BackendCompilerFailed):
        return None
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return f"torch.compile failed: {first[:300]}"
