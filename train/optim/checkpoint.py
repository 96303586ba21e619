"""A checkpoint of the optimizer that does not depend on the number of ranks or the ZeRO stage.

DeepSpeed's own checkpoints (engine.save_checkpoint / load_checkpoint) save our state exactly,
but only reload on the same number of ranks; its universal-checkpoint converter knows only Adam's
state keys (fp32, exp_avg, exp_avg_sq). So next to DeepSpeed's files we write one file with, for
every parameter by name, the full fp32 master weight and every optimizer state tensor (momenta,
second moments, CMS gradient sums, ...) in the parameter's own shape, plus the step counters.
Loading cuts each tensor to whatever this rank holds under the current stage and world size, and
writes the model's (bf16 or fp32) weights from the fp32 masters.

Cost: rank 0 holds the full fp32 state on CPU while writing (about 4-7 copies of the model).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from train.optim.hope_optimizer import HopeOptimizer
from train.optim.layout import TensorLayout

FORMAT_VERSION = 1
MASTER_KEY = "fp32"


class OptimizerCheckpointError(ValueError):
    """The portable optimizer checkpoint does not match the model being restored."""


def _base_optimizer(engine) -> HopeOptimizer:
    opt = engine.optimizer
    opt = getattr(opt, "optimizer", opt)
    if not isinstance(opt, HopeOptimizer):
        raise TypeError(f"expected a HopeOptimizer inside the engine, got {type(opt).__name__}")
    return opt


def _gather(local: torch.Tensor, layout: TensorLayout, opt: HopeOptimizer) -> list[torch.Tensor]:
    group, world_size, _ = opt.world
    local = local.detach().reshape(-1).float()
    if layout.replicated or world_size == 1:
        return [local] * len(layout.pieces_by_rank)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local, group=group)
    return parts


def _assemble(layout: TensorLayout, parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for m, info in enumerate(layout.infos):
        full = torch.empty(info.shape, dtype=torch.float32).view(-1)
        for rank, pc in layout.pieces_of(m):
            full[pc.start:pc.start + pc.length] = parts[rank][pc.offset:pc.offset + pc.length].cpu()
        out[info.name] = full.view(info.shape)
    return out


def portable_state(engine) -> dict | None:
    """Collective: every rank must call. Returns the full state on rank 0, None elsewhere."""
    opt = _base_optimizer(engine)
    _, world_size, rank = opt.world
    params: dict[str, dict[str, torch.Tensor]] = {}
    counters: dict[str, dict[str, int]] = {}
    for tensor, _ in opt.stepped_tensors:
        layout = opt.layout_for(tensor)
        state = opt.state.get(tensor, {})
        keys = [MASTER_KEY] + sorted(k for k, v in state.items() if torch.is_tensor(v))
        for key in keys:
            local = tensor if key == MASTER_KEY else state[key]
            parts = _gather(local, layout, opt)  # collective: every rank, every key
            full = _assemble(layout, parts) if rank == 0 else {}
            for name, value in full.items():
                params.setdefault(name, {})[key] = value
        for info in layout.infos:
            counters[info.name] = {k: int(v) for k, v in state.items() if not torch.is_tensor(v)}
    if rank != 0:
        return None
    return {"format": FORMAT_VERSION, "saved_world_size": world_size, "params": params, "counters": counters}


def save_portable_state(engine, path: str) -> None:
    """Collective. Rank 0 writes `path` atomically (temp name, fsync, rename)."""
    payload = portable_state(engine)
    if payload is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def load_portable_state(engine, path: str) -> None:
    """Every rank reads `path` and takes its own pieces; the model weights are rewritten from fp32."""
    if not os.path.exists(path):
        raise OptimizerCheckpointError(f"{path}: no portable optimizer state there")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise OptimizerCheckpointError(f"{path}: format {payload.get('format')!r}, expected {FORMAT_VERSION}")
    opt = _base_optimizer(engine)
    _, _, rank = opt.world
    params = payload["params"]
    for tensor, _ in opt.stepped_tensors:
        layout = opt.layout_for(tensor)
        names = [info.name for info in layout.infos]
        missing = [n for n in names if n not in params]
        if missing:
            raise OptimizerCheckpointError(f"{path}: no saved state for parameter {missing[0]}")
        keys = set(params[names[0]])
        for name in names:
            if set(params[name]) != keys:
                raise OptimizerCheckpointError(f"{path}: parameter {name} has state {sorted(params[name])}, "
                                               f"expected {sorted(keys)} like {names[0]}")
        state = opt.state[tensor]
        for key in sorted(keys):
            if key == MASTER_KEY:
                dest = tensor.data
            else:
                if key not in state:
                    state[key] = torch.zeros_like(tensor, dtype=torch.float32)
                dest = state[key]
            flat = dest.view(-1)
            for pc in layout.pieces_by_rank[rank]:
                info = layout.infos[pc.matrix]
                src = params[info.name][key]
                if tuple(src.shape) != info.shape:
                    raise OptimizerCheckpointError(f"{path}: {info.name}/{key} has shape {tuple(src.shape)}, "
                                                   f"the model has {info.shape}")
                flat[pc.offset:pc.offset + pc.length] = src.view(-1)[pc.start:pc.start + pc.length].to(flat.device)
        state.update(payload["counters"][names[0]])
    _write_model_weights(engine, params)


def _write_model_weights(engine, params: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy the fp32 masters into the module's own weights (which may be bf16, or ZeRO-3 shards)."""
    _, _, rank = _base_optimizer(engine).world
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            if name not in params:
                continue
            master = params[name][MASTER_KEY]
            if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's shard only
                shard = param.ds_tensor.view(-1)
                size = shard.numel()
                piece = master.view(-1)[rank * size:(rank + 1) * size]
                shard[:piece.numel()] = piece.to(shard.dtype)
            else:
                param.data.copy_(master.to(param.dtype))
