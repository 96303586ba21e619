"""Process-group plumbing: one process, torchrun, or the `deepspeed` launcher, CPU or CUDA.

Every launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a bare
`hope-train` run has none of them and becomes a world of one (we fill in a free local port).
CPU runs use gloo, CUDA runs NCCL (DeepSpeed picks the backend from its accelerator).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process_group(backend: str, **kwargs) -> None:
    """`deepspeed.init_distributed`; on CPU (gloo) without DeepSpeed's shared-memory all-reduce op.

    That op serves only inference's tensor-parallel all-reduce, never training's collectives, and
    would cost a g++ build on each machine's first run (~40 s on 2 cores) and a 64 MiB buffer per
    rank in /dev/shm that DeepSpeed never unlinks (tmpfs: RAM leaked by every CPU run).
    """
    import deepspeed

    if backend == "gloo":  # DeepSpeed probes its ops once and keeps edits to the dict it made
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, **kwargs)


def init_world(device: torch.device | None = None) -> World:
    """Start (or join) the process group and pick this rank's device (CUDA when there is one,
    unless `device` says otherwise)."""
    if "RANK" not in os.environ:  # a plain single-process run
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Ranks sharing a CPU must not each spread over every core: they would fight for them.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        if "OMP_NUM_THREADS" not in os.environ and local_ranks > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if not dist.is_initialized():
        start_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), local_rank, dist.get_world_size(), device)


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum a few floats over all ranks (float64, so counts stay exact)."""
    device = world.device if world.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world.size > 1:
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if `flag` is true on any rank."""
    return all_reduce_sum([1.0 if flag else 0.0], world)[0] > 0


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
