"""Sharded checkpoints with the trainer's own state beside them, saved atomically.

Layout (the HF exporter reads it):
    RUN_DIR/checkpoints/step-00000100/       DeepSpeed's checkpoint (engine.save_checkpoint)
        trainer_state.json                   step, tokens seen, data-loader state, W&B id, world size
        rank_state/rank-00000.pt             per rank: RNG states and that rank's loader state
        optimizer_portable.pt                fp32 weights + optimizer state by name (any world size)
        config.yaml                          the fully resolved run config
        model_config.json                    HopeConfig.to_dict()
    RUN_DIR/checkpoints/latest               the tag of the newest COMPLETE checkpoint

A save goes into `.tmp-step-...`; once every rank reports success, rank 0 renames it, then
rewrites `latest` (temp file, fsync, os.replace). A crash at any moment leaves the previous
checkpoint and `latest` as they were; leftover `.tmp-*` directories are removed on the next start.

Resuming on a different number of ranks: DeepSpeed's ZeRO shards only reload on the same number
of ranks, and its universal-checkpoint converter knows only Adam's state keys, so every checkpoint
also holds `optimizer_portable.pt` (train.optim.checkpoint: fp32 weights and every optimizer state
tensor by parameter name). On a new world size the trainer loads that instead of the shards.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import World, any_rank, barrier
from .optim.checkpoint import load_portable_state, save_portable_state

LATEST = "latest"
PORTABLE = "optimizer_portable.pt"  # train.optim's rank-count-independent state
TAG_PATTERN = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the previous good one is untouched."""


@dataclass
class TrainerState:
    step: int = 0  # completed optimizer steps
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss
    world_size: int = 1
    wandb_id: str | None = None
    data_state: dict[str, Any] = field(default_factory=dict)  # rank 0's loader state


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(directory))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fault_in_save(step: int, world: World) -> None:
    """Test hooks (docs/TRAINING.md): fail a save on purpose, as a full disk or a crash would."""
    if os.environ.get("HOPE_FAULT_SAVE_ENOSPC_AT") == str(step) and world.is_main:
        raise OSError(errno.ENOSPC, "No space left on device (injected by HOPE_FAULT_SAVE_ENOSPC_AT)")
    if os.environ.get("HOPE_FAULT_CRASH_IN_SAVE_AT") == str(step):
        os._exit(17)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, world: World, keep: int, portable: bool = True):
        self.root = Path(run_dir) / "checkpoints"
        self.world, self.keep, self.portable = world, keep, portable

    # ------------------------------------------------------------------ reading
    def latest_tag(self) -> str | None:
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.root / tag / "trainer_state.json").is_file():
            raise CheckpointError(f"{path} names {tag!r}, which is not a complete checkpoint")
        return tag

    def clean_partial_saves(self) -> None:
        """Remove `.tmp-*` directories left by a save that crashed (rank 0, before any save)."""
        if self.world.is_main and self.root.is_dir():
            for path in self.root.glob(".tmp-*"):
                shutil.rmtree(path, ignore_errors=True)
        barrier(self.world)

    def read_trainer_state(self, tag: str) -> TrainerState:
        data = json.loads((self.root / tag / "trainer_state.json").read_text())
        return TrainerState(**data)

    def load(self, engine, tag: str) -> tuple[TrainerState, dict | None]:
        """Load engine + trainer state; returns this rank's saved rank state (None on a new world size)."""
        state = self.read_trainer_state(tag)
        if state.world_size == self.world.size:
            path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {self.root / tag}")
            rank_state = torch.load(self.root / tag / "rank_state" / f"rank-{self.world.rank:05d}.pt",
                                    weights_only=False)
            return state, rank_state
        portable = self.root / tag / PORTABLE
        if not portable.is_file():
            raise CheckpointError(f"{self.root / tag} was saved on {state.world_size} ranks without "
                                  f"{PORTABLE} (train.portable_checkpoint: false); resume it on "
                                  f"{state.world_size} ranks")
        load_portable_state(engine, str(portable))  # weights and optimizer state, resharded
        return state, None

    # ------------------------------------------------------------------ writing
    def save(self, engine, state: TrainerState, rank_state: dict, config_yaml: str, model_config: dict) -> Path:
        """Every rank calls this. Raises CheckpointError (on every rank) if any rank failed."""
        tag = tag_for(state.step)
        final = self.root / tag
        tmp_tag = f".tmp-{tag}"
        tmp = self.root / tmp_tag
        error: BaseException | None = None
        try:
            if self.world.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            error = e
        if any_rank(error is not None, self.world):
            raise self._failed(tag, error)
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
            if self.portable:  # collective; rank 0 writes the whole fp32 state by parameter name
                save_portable_state(engine, str(tmp / PORTABLE))
            rank_dir = tmp / "rank_state"
            rank_dir.mkdir(parents=True, exist_ok=True)
            torch.save(rank_state, rank_dir / f"rank-{self.world.rank:05d}.pt")
            _fault_in_save(state.step, self.world)
            if self.world.is_main:
                (tmp / "config.yaml").write_text(config_yaml)
                (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
                (tmp / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2))
        except OSError as e:
            error = e
        if any_rank(error is not None, self.world):  # the barrier: every rank has finished writing
            self._discard(tmp)
            raise self._failed(tag, error)
        try:
            if self.world.is_main:
                fsync_tree(tmp)
                if final.exists():  # the same step saved before (e.g. a preemption right after a save)
                    shutil.rmtree(tmp)
                else:
                    os.replace(tmp, final)
                write_atomic(self.root / LATEST, tag.encode())
                self._prune()
        except OSError as e:
            error = e
        if any_rank(error is not None, self.world):
            self._discard(tmp)
            raise self._failed(tag, error)
        return final

    def _discard(self, tmp: Path) -> None:
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.world)

    def _failed(self, tag: str, error: BaseException | None) -> CheckpointError:
        latest = self.root / LATEST
        previous = latest.read_text().strip() if latest.is_file() else "none yet"
        reason = f"{error}" if error is not None else "another rank failed to write its part"
        return CheckpointError(f"could not save checkpoint {self.root / tag}: {reason}. "
                               f"The previous checkpoint ({previous}) is intact.")

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints (and never the one `latest` names)."""
        latest = (self.root / LATEST).read_text().strip()
        tags = sorted(p.name for p in self.root.iterdir() if TAG_PATTERN.match(p.name))
        for tag in tags[:-self.keep]:
            if tag != latest:
                shutil.rmtree(self.root / tag, ignore_errors=True)
