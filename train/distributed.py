"""Process-group plumbing: one process, torchrun, or the `deepspeed` launcher, CPU or CUDA.

Every launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a bare
`hope-train` run has none of them and becomes a world of one (we fill in a free local port).
CPU runs use gloo, CUDA runs NCCL (DeepSpeed picks the backend from its accelerator).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

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
    """`deepspeed.init_distributed`, then drop the names of DeepSpeed's CPU shared-memory buffers.

    On CPU each rank maps a 64 MiB all-reduce buffer at /dev/shm/deepspeed_allreduce_buffer_*
    and DeepSpeed never unlinks it, so every multi-rank CPU run leaks RAM (/dev/shm is tmpfs)
    until a machine that runs many of them, a CI runner say, has none left. Once every rank has
    mapped its peers' buffers (init returned everywhere: the barrier), the names are not needed;
    unlinking them keeps the mappings until the processes exit, SIGKILL included.
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, **kwargs)
    if backend == "gloo":
        dist.barrier()
        name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                         os.environ.get("MASTER_PORT", ""), str(dist.get_rank())])
        (Path("/dev/shm") / name).unlink(missing_ok=True)


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
