"""Sharded checkpoints with the trainer's own state beside them, saved atomically.

Layout (the HF exporter reads it):
    RUN_DIR/checkpoints/step-00000100/       DeepSpeed's checkpoint (engine.save_checkpoint)
        trainer_state.json                   step, tokens seen, data-loader state, W&B id, world size
        rank_state/rank-00000.pt             per rank: RNG states and that rank's loader state
        optimizer_portable.pt                fp32 weights + optimizer state by name (any world size)
        config.yaml                          the fully resolved run config
        model_config.json                    HopeConfig.to_dict()
        checkpoint_files.json                every other file and its size (written last)
    RUN_DIR/checkpoints/latest               the tag of the newest COMPLETE checkpoint

A save goes into `.tmp-step-...`; once every rank reports success, rank 0 renames it, then
rewrites `latest` (temp file, fsync, os.replace). A crash at any moment leaves the previous
checkpoint and `latest` as they were; leftover `.tmp-*` directories are removed on the next start.

Resuming on a different number of ranks: DeepSpeed's ZeRO shards only reload on the same number
of ranks, and its universal-checkpoint converter knows only Adam's state keys, so every checkpoint
also holds `optimizer_portable.pt` (train.optim.checkpoint: fp32 weights and every optimizer state
tensor by parameter name). On a new world size (or ZeRO stage, or precision) the trainer loads
that instead of the shards.

Resuming reads nothing big before every rank has checked the checkpoint on the shared file system
(`find_resumable`: each file there at its saved size, the JSON and YAML readable) and the ranks have
agreed; loading begins with the checksums of the files it reads, shared out among the ranks. A
damaged checkpoint, or one that fails to load on any rank, stops every rank with the same one-line
ResumeError naming the file and the checkpoint to fall back on.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .distributed import World, any_rank, barrier
from .optim.checkpoint import load_portable_state, save_portable_state

LATEST = "latest"
PORTABLE = "optimizer_portable.pt"  # train.optim's rank-count-independent state
FILES = "checkpoint_files.json"  # {relative path: size} of every other file: finds deleted and truncated ones
TAG_PATTERN = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the previous good one is untouched."""


class ResumeError(CheckpointError):
    """The run cannot resume: its checkpoint is damaged, or the run's config differs in what the
    checkpoint fixes. Raised on every rank with the same message (hope-train prints it once, status 2)."""


class _Damaged(Exception):
    """What is wrong with one checkpoint directory (a clause naming the file)."""


@dataclass
class TrainerState:
    step: int = 0  # completed optimizer steps
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss
    world_size: int = 1
    wandb_id: str | None = None
    data_state: dict[str, Any] = field(default_factory=dict)  # rank 0's loader state


@dataclass
class Checkpoint:
    """A complete checkpoint, checked and read but for its tensors."""
    path: Path
    state: TrainerState
    config: dict  # its config.yaml: the run config it was saved with
    model_config: dict  # its model_config.json

    @property
    def tag(self) -> str:
        return self.path.name


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


def torch_file_damage(path: Path, part: int = 0, parts: int = 1) -> str | None:
    """What is wrong with a file torch.save wrote, or None. Its zip entries carry the CRC-32 of their
    bytes, which torch.load does not check: a file changed after it was saved (a copy cut short into a
    file of the right size, a flipped bit) loads silently with wrong values. Reads the entries numbered
    `part` modulo `parts` (all by default: ~0.75 s per 2 GiB from the page cache here). Entries saved
    without a checksum (CRC 0, written under torch.utils.serialization.config.save.compute_crc32 =
    False) are not checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist()[part::parts]:
                if entry.CRC == 0:
                    continue
                with archive.open(entry) as data:  # reading to the end compares the CRC-32
                    while data.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        if isinstance(error, zipfile.BadZipFile) and str(error).startswith("Bad CRC-32"):
            return f"altered since it was saved (its entry {entry.filename} fails the checksum saved with it)"
        return f"not a complete torch file (truncated or overwritten: {error})"
    return None


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


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------------- resuming on a changed config
# What a checkpoint fixes (docs/TRAINING.md, Checkpoints, "What a resume may change"): every field of
# the model and of the optimizer (their weights and state were made by them), train.seed (the data
# order) and data.seq_len (the loader's position counts sequences of that length;
# data.allow_changed_data lets it change). The model config names its fields that may change
# (`execution_fields`: how it is computed); of the optimizer, the lr may:
HF_BOOKKEEPING_KEYS = frozenset({"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"})
FREE_OPTIMIZER_KEYS = frozenset({"lr"})  # the schedule's peak: the trainer sets every group's lr at each step
# Everything else of `train` may change (steps, schedule, intervals, ...). Of `data` the loader checks the
# rest itself (its fingerprint: the datasets, mixture and shuffle window). Of `deepspeed` the batch may
# change (the trainer says so), and the ZeRO stage or precision (the portable state is loaded then).


def _normal(value):
    """`value` as it reads back from a checkpoint's JSON (tuples become lists, int keys strings)."""
    return json.loads(json.dumps(value))


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_changes(checkpoint: Checkpoint, config: dict, model_config: dict,
                   execution_fields: frozenset[str] = frozenset()) -> list[str]:
    """`key: old -> new` for every value the checkpoint fixes that `config` (RunConfig.to_dict()) and
    `model_config` (the model config's to_dict(); its `execution_fields` may change) change. Keys only
    one side has (saved by other code) are skipped."""
    changes: list[str] = []

    def compare(prefix: str, old: dict, new: dict, free=frozenset()):
        for key in [k for k in new if k in old and k not in free]:
            if isinstance(old[key], dict) and isinstance(new[key], dict):
                compare(f"{prefix}{key}.", old[key], new[key])
            elif old[key] != new[key]:
                changes.append(f"{prefix}{key}: {_show(old[key])} -> {_show(new[key])}")

    def only(section, key: str) -> dict:
        return {key: section[key]} if isinstance(section, dict) and key in section else {}

    saved, config = checkpoint.config, _normal(config)
    compare("model.", checkpoint.model_config, _normal(model_config), execution_fields | HF_BOOKKEEPING_KEYS)
    compare("optimizer.", saved.get("optimizer") or {}, config["optimizer"], FREE_OPTIMIZER_KEYS)
    compare("train.", only(saved.get("train"), "seed"), only(config["train"], "seed"))
    if not config["data"].get("allow_changed_data"):
        compare("data.", only(saved.get("data"), "seq_len"), only(config["data"], "seq_len"))
    return changes


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
        self.note = ""  # what the run should know about how its checkpoint was found

    # ------------------------------------------------------------------ reading
    def latest_tag(self) -> str | None:
        """The tag `latest` names; None for a new run. ResumeError if it names no complete checkpoint.
        Checkpoints without `latest` (a crash between a save's rename and writing `latest`): the newest
        one that reads, said in `self.note` (a new run there would save among them and prune them)."""
        path = self.root / LATEST
        if path.exists() and not path.is_file():
            raise ResumeError(f"{path} is not a file: expected a file naming the checkpoint to resume")
        if not path.exists():
            tag = self._newest_readable()
            if tag is not None:
                self.note = (f"warning: {path} is missing (a crash right after a save?): resuming from the newest "
                             f"complete checkpoint, {tag}")
                return tag
            if self._tags():
                raise ResumeError(f"{self.root} holds no complete checkpoint and no `latest`: start a new run "
                                  "with another --run-dir")
            return None
        try:
            tag = path.read_text().strip()
        except (OSError, ValueError) as error:
            raise ResumeError(f"{path} cannot be read ({error}). {self._way_back(None)}") from None
        if not tag or not (self.root / tag / "trainer_state.json").is_file():
            raise ResumeError(f"{path} names {tag!r}, which is not a complete checkpoint. {self._way_back(tag)}")
        return tag

    def clean_partial_saves(self) -> None:
        """Remove `.tmp-*` directories left by a save that crashed (rank 0, before any save)."""
        if self.world.is_main and self.root.is_dir():
            for path in self.root.glob(".tmp-*"):
                shutil.rmtree(path, ignore_errors=True)
        barrier(self.world)

    def read_trainer_state(self, tag: str) -> TrainerState:
        return self.open(tag).state

    def find_resumable(self) -> Checkpoint | None:
        """The checkpoint `latest` names, checked, or None for a new run. Every rank calls this.

        Each rank checks the checkpoint on the shared file system itself before anything big is
        read; if any rank finds a problem, every rank raises the same ResumeError (so no rank goes
        on to a collective that the others never reach)."""
        checkpoint, problem = None, None
        try:
            tag = self.latest_tag()
            if tag is not None:
                checkpoint = self.open(tag)
        except ResumeError as error:
            problem = str(error)
        except Exception as error:  # noqa: BLE001 - e.g. an unreadable directory: no rank may leave the others waiting
            problem = f"cannot read the checkpoints in {self.root}: {type(error).__name__}: {error}"
        self._raise_if_any(problem)
        return checkpoint

    def open(self, tag: str) -> Checkpoint:
        """The checkpoint `tag`, its files checked (ResumeError naming the file if one is not right)."""
        try:
            return self._read(self.root / tag)
        except _Damaged as damage:
            raise ResumeError(f"checkpoint {self.root / tag} is damaged: {damage}. {self._way_back(tag)}") from None

    def needs_portable(self, checkpoint: Checkpoint, ds_config: dict) -> bool:
        """Whether resuming with `ds_config` (this run's deepspeed section) reads optimizer_portable.pt
        instead of DeepSpeed's shards, which reload only on the number of ranks, ZeRO stage and
        precision they were saved with. ResumeError if it would and the checkpoint has none (the same
        answer on every rank: the files were checked by all)."""
        def stage_and_bf16(ds: dict) -> tuple[int, bool]:
            return (ds.get("zero_optimization") or {}).get("stage", 0), bool((ds.get("bf16") or {}).get("enabled"))

        saved = (checkpoint.state.world_size, *stage_and_bf16(checkpoint.config.get("deepspeed") or {}))
        now = (self.world.size, *stage_and_bf16(ds_config))
        if saved == now:
            return False
        if not (checkpoint.path / PORTABLE).is_file():
            def layout(world_size, stage, half):
                return f"{world_size} rank{'s' if world_size > 1 else ''}, ZeRO {stage}, {'bf16' if half else 'fp32'}"

            raise ResumeError(f"{checkpoint.path} was saved on {layout(*saved)} without {PORTABLE} "
                              f"(train.portable_checkpoint: false), and DeepSpeed's shards reload only on the same: "
                              f"resume it on {layout(*saved)} (this run: {layout(*now)})")
        return True

    def load(self, engine, checkpoint: Checkpoint, portable: bool) -> dict | None:
        """Load the weights and optimizer state into `engine` (every rank calls this); returns this rank's
        saved rank state (RNG, loader), None on another world size. A failure on any rank becomes the
        same ResumeError on every rank."""
        rank_state, problem = None, None
        try:
            self._check_contents(checkpoint, portable)
            if portable:  # weights and optimizer state, cut to this run's ranks and stage
                load_portable_state(engine, str(checkpoint.path / PORTABLE))
            else:
                path, _ = engine.load_checkpoint(str(self.root), tag=checkpoint.tag, load_lr_scheduler_states=False)
                if path is None:
                    raise CheckpointError("DeepSpeed found nothing to load")
            if checkpoint.state.world_size == self.world.size:
                rank_state = torch.load(checkpoint.path / "rank_state" / f"rank-{self.world.rank:05d}.pt",
                                        weights_only=False)
                if not (isinstance(rank_state, dict) and {"rng", "data"} <= set(rank_state)):
                    raise CheckpointError(f"rank_state/rank-{self.world.rank:05d}.pt holds no RNG and loader state")
        except _Damaged as damage:
            problem = f"checkpoint {checkpoint.path} is damaged: {damage}. {self._way_back(checkpoint.tag)}"
        except Exception as error:  # noqa: BLE001 - whatever failed, on whichever rank, must stop every rank
            first_line = (str(error).strip().splitlines() or [""])[0][:300].rstrip(".")
            problem = (f"could not load checkpoint {checkpoint.path}: {type(error).__name__}: {first_line}. "
                       f"{self._way_back(checkpoint.tag)}")
        self._raise_if_any(problem)
        return rank_state

    def _check_contents(self, checkpoint: Checkpoint, portable: bool) -> None:
        """Check the checksums of the torch files this resume reads (DeepSpeed's shards or the portable
        state, and the rank states), shared out entry by entry among the ranks, so that one big file
        (the portable state) is not one rank's work: one read of them in all. _Damaged if one fails."""
        def read(path: Path) -> bool:
            return path.parent.name == "rank_state" or (path.name == PORTABLE) == portable

        files = [path for path in sorted(checkpoint.path.rglob("*.pt")) if read(path)]
        for i, path in enumerate(files):  # entry j of file i to rank (i + j) % size: files alike spread too
            damage = torch_file_damage(path, (self.world.rank - i) % self.world.size, self.world.size)
            if damage is not None:
                raise _Damaged(f"{path.relative_to(checkpoint.path)}: {damage}")

    def _raise_if_any(self, problem: str | None) -> None:
        """Collective: ResumeError on every rank if any rank has a problem (the lowest such rank's message)."""
        problems = [problem]
        if self.world.size > 1:
            problems = [None] * self.world.size
            dist.all_gather_object(problems, problem)
        for rank, text in enumerate(problems):
            if text is not None:
                raise ResumeError(text if rank == 0 else f"{text} (found by rank {rank})")

    def _tags(self) -> list[str]:
        """The checkpoint directories there, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if TAG_PATTERN.match(p.name) and p.is_dir())

    def _read(self, directory: Path) -> Checkpoint:
        """Check and read one checkpoint directory; _Damaged names the first thing wrong."""
        def read_json(name: str):
            try:
                return json.loads((directory / name).read_text())
            except FileNotFoundError:
                raise _Damaged(f"{name} is missing") from None
            except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
                raise _Damaged(f"{name} is not readable JSON ({error})") from None

        data = read_json("trainer_state.json")
        try:
            state = TrainerState(**data)
        except TypeError:
            raise _Damaged(f"trainer_state.json: expected an object with keys "
                           f"{', '.join(TrainerState.__dataclass_fields__)}, got {str(data)[:200]}") from None
        for key, ok in (("step", _count(state.step)), ("tokens_seen", _count(state.tokens_seen)),
                        ("world_size", _count(state.world_size) and state.world_size > 0),
                        ("data_state", isinstance(state.data_state, dict))):
            if not ok:
                raise _Damaged(f"trainer_state.json: {key} is {getattr(state, key)!r}")
        if (directory / FILES).exists():
            files = read_json(FILES)
            if not (isinstance(files, dict) and all(_count(size) for size in files.values())):
                raise _Damaged(f"{FILES}: expected {{path: size}}, got {str(files)[:200]}")
        else:  # saved before the file list was written: the files every resume reads
            files = dict.fromkeys(["config.yaml", "model_config.json",
                                   *(f"rank_state/rank-{r:05d}.pt" for r in range(state.world_size))])
        for name, size in files.items():
            path = directory / name
            if not path.is_file():
                raise _Damaged(f"{name} is missing")
            if size is not None and path.stat().st_size != size:
                raise _Damaged(f"{name} has {path.stat().st_size:,} bytes, {size:,} when it was saved (truncated or "
                               "overwritten)")
        for path in sorted(directory.rglob("*.pt")):  # torch files are zip archives: a cut one has lost its end
            if not zipfile.is_zipfile(path):  # cheap: the index only (load() checks the contents)
                raise _Damaged(f"{path.relative_to(directory)} is not a complete torch file (truncated?)")
        try:
            config = yaml.safe_load((directory / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise _Damaged(f"config.yaml is not readable YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise _Damaged(f"config.yaml: expected the run config, got {str(config)[:200]}")
        model_config = read_json("model_config.json")
        if not isinstance(model_config, dict):
            raise _Damaged(f"model_config.json: expected an object, got {str(model_config)[:200]}")
        return Checkpoint(directory, state, config, model_config)

    def _newest_readable(self, bad: str | None = None) -> str | None:
        """The newest checkpoint that reads, before `bad` (a tag) when given."""
        for tag in reversed(self._tags()):
            if tag == bad or (bad is not None and TAG_PATTERN.match(bad) and tag > bad):
                continue
            try:
                self._read(self.root / tag)
            except _Damaged:
                continue
            return tag
        return None

    def _way_back(self, bad: str | None) -> str:
        """What the user can do about a bad checkpoint: name the newest one before it that reads."""
        tag = self._newest_readable(bad)
        if tag is not None:
            return f"To resume from the checkpoint before it: echo {tag} > {self.root / LATEST} and run again"
        return f"No other complete checkpoint is left in {self.root}: start a new run with another --run-dir"

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
                # every rank's files are written (the barrier above): list them, so that a resume finds
                # a file deleted or cut short since
                files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                (tmp / FILES).write_text(json.dumps(files, indent=1))
                fsync_tree(tmp)
                latest = self.root / LATEST
                if final.exists() and latest.is_file() and latest.read_text().strip() == tag:
                    shutil.rmtree(tmp)  # `latest` names this step's checkpoint already: it stays
                elif final.exists():  # left by a run later rolled back to an earlier checkpoint: replaced
                    stale = self.root / f".tmp-stale-{tag}"  # removed at the next start if we crash here
                    shutil.rmtree(stale, ignore_errors=True)
                    os.replace(final, stale)
                    os.replace(tmp, final)
                    shutil.rmtree(stale)
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
        """Keep the newest `keep` complete checkpoints up to the one `latest` names (never that one).
        Those after it were left by a run rolled back past them (`echo step-X > latest`): the steps
        after X are being trained again, so they go instead of counting as the newest."""
        latest = (self.root / LATEST).read_text().strip()
        tags = self._tags()
        kept = [tag for tag in tags if tag <= latest][-self.keep:]  # latest is the last of them
        for tag in tags:
            if tag not in kept:
                shutil.rmtree(self.root / tag, ignore_errors=True)
