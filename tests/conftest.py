"""Session-wide test setup."""
import os

import torch

# Without CUDA, Triton kernels run in Triton's interpreter. Triton reads this once, when it is
# first imported (which torch or DeepSpeed may do during collection), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _sweep_leaked_deepspeed_buffers(min_age_s: float = 600.0) -> None:
    """Remove DeepSpeed CPU all-reduce buffers that earlier runs leaked into /dev/shm.

    DeepSpeed (0.19) never unlinks them, 64 MiB per rank per run, and /dev/shm is RAM: a machine
    that ran DeepSpeed's launcher on CPU often enough (this suite before train.distributed dropped
    the names, say) has too little memory left to compile an op. Only buffers no live process maps
    and older than ten minutes go, so a job starting beside the suite is not touched.
    """
    import time
    from pathlib import Path

    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split()[-1] for line in maps.read_text().splitlines() if "deepspeed_allreduce" in line)
        except OSError:  # the process ended, or is not ours to read
            continue
    for path in shm.glob("deepspeed_allreduce_buffer_*"):
        try:
            if str(path) not in mapped and time.time() - path.stat().st_mtime > min_age_s:
                path.unlink()
        except OSError:
            continue


_sweep_leaked_deepspeed_buffers()
