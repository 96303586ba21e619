"""TokenLoader: the resumable, rank-sliced, prefetching stream of training samples.

The global sample stream is epoch 0's permutation of all samples, then epoch 1's (a new seeded
permutation), and so on; position p of the stream is sample perm(seed, p // N)(p % N). Global
batch g is positions [g*B, (g+1)*B); rank r of W gets the contiguous slice
[g*B + r*B/W, g*B + (r+1)*B/W). Ranks therefore read disjoint samples and never the whole dataset.

The state is {seed, epoch, samples_consumed, fingerprint} (and, for changes of data, phase_start
and each dataset's reads: below); samples_consumed counts global positions, so it does not depend on the world size: a run resumed on another number of ranks
with the same global batch size sees exactly the batches of an uninterrupted run.

A mixture of datasets ({directory: weight}) interleaves them by a fixed pattern
(data_pipeline/mixture.py): position p reads dataset s(p), which continues its own stream of
per-epoch permutations, so the state is the same one integer. Beside it the state keeps each
dataset's reads so far and where the current mixture took over (`phase_start`): a run resumed on
other weights (allow_changed_manifest) starts the new pattern there, every dataset going on from
its own next read, so none repeats or skips a sample of its epoch across the change.

With `shuffle_window_shards` K > 0 each dataset's epoch reads a window of K shards at a time
(data_pipeline/order.py, WindowedOrder) instead of drawing from all of it: a remote dataset's
local cache then holds the current window's shards, the previous one's and the next one's
(arriving in the background), not the whole dataset.

Background threads build the next `prefetch` batches while the trainer computes (numpy copies
out of memory-mapped shards release the GIL, and remote shards are cached locally).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import DataError
from data_pipeline.mixture import MixturePattern
from data_pipeline.order import EpochPermutation, WindowedOrder
from data_pipeline.packed import PackedSplit
from data_pipeline.shards import SPLITS, Manifest, read_manifest

STATE_KEYS = ("seed", "epoch", "samples_consumed", "fingerprint")  # required; "phase_start", "reads", "left" since 2026-12


def _key(location: str) -> str:
    """A dataset's name in the state's reads: '/data/a/', 'data/a' (from /data) and
    '/data/a/manifest.json' are one dataset; URLs as written."""
    text = str(location).rstrip("/")
    if text.endswith("manifest.json"):
        text = text[:-len("manifest.json")].rstrip("/") or "."
    return text if "://" in text else os.path.realpath(text)


def _entry(location: str, manifest: str, reads: int) -> dict:
    return {"dataset": _key(location), "manifest": manifest, "reads": int(reads)}


def _count(value) -> bool:
    """An int >= 0 that int64 positions hold (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _valid_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("dataset"), str) and isinstance(entry.get("manifest"), str)
            and _count(entry.get("reads")))


class _Dataset:
    """One dataset's split: its samples and its stream, read k = sample order(seed, k // N)(k % N),
    the order a permutation of the whole split or, with `window` > 0, of a window of shards at a time."""

    def __init__(self, location: str, split: str, width: int, seed: int, cache_dir, window: int = 0):
        self.location = location
        fs, directory, self.manifest = read_manifest(location)
        # in windows, each shard is packed on its own: a window's samples need no shard outside it
        self.samples = PackedSplit(fs, directory, self.manifest, split, width, cache_dir, per_shard=window > 0)
        self.num_samples: int = self.samples.num_samples
        self.seed, self.window = seed, window
        self._orders: dict[int, EpochPermutation | WindowedOrder] = {}
        self._lock = threading.Lock()
        self._window_read: tuple[int, int] | None = None  # (epoch, window) the latest batch read
        if not window:  # every batch may need any shard: copy them all, in manifest order
            self.samples.read_ahead(range(len(self.samples.shards)))

    def read(self, reads: np.ndarray) -> np.ndarray:
        """The tokens [len(reads), width] of this dataset's reads number `reads` (its own stream)."""
        epochs, within = np.divmod(reads, self.num_samples)
        samples = np.empty_like(reads)
        for epoch in np.unique(epochs).tolist():
            chosen = epochs == epoch
            samples[chosen] = self._order(epoch)(within[chosen])
        return self.samples.read(samples)

    def _order(self, epoch: int) -> EpochPermutation | WindowedOrder:
        order = self._orders.get(epoch)
        if order is None:  # keep the previous epoch's too: a batch may span both
            order = (WindowedOrder(self.samples.first_sample, self.window, self.seed, epoch) if self.window
                     else EpochPermutation(self.num_samples, self.seed, epoch))
            self._orders = {epoch: order} | {e: o for e, o in self._orders.items() if e >= epoch - 1}
        return order

    def follow(self, first: int, last: int) -> None:
        """Windows: the cache follows a global batch's reads `first`..`last` of this dataset (the same
        on every rank): it keeps the shards of their windows, of the window before (batches still
        being built) and of the next one, copied ahead. It moves forward only (threads building later
        batches may finish first); `rewind` lets it go back."""
        if not self.window:
            return
        first_window, last_window = self._window(first), self._window(last)
        with self._lock:  # quick: removing files and queueing copies
            if self._window_read is not None and last_window <= self._window_read:
                return
            self._window_read = last_window
            keep, ahead = self.window_cache(first_window, last_window)
            self.samples.keep_only(keep)
            self.samples.read_ahead(ahead)

    def _window(self, read: int) -> tuple[int, int]:
        """(epoch, window) of read number `read`."""
        epoch, position = divmod(read, self.num_samples)
        return epoch, int(self._order(epoch).window_of(position))

    def window_cache(self, first: tuple[int, int], last: tuple[int, int]) -> tuple[list[int], list[int]]:
        """(the shards kept, those copied ahead, in reading order) while a batch reads windows `first`
        to `last` ((epoch, window) each): from the window before the first to the next one after the
        last with a sample."""
        windows = [self._step(first, -1), first]
        while windows[-1] < last:
            windows.append(self._step(windows[-1], 1))
        after = self._step(last, 1)
        for _ in range(8):  # past windows whose shards have no sample
            if self._shards(after):
                break
            after = self._step(after, 1)
        now = [k for window in windows[1:] for k in self._shards(window)]
        return self._shards(windows[0]) + now + self._shards(after), now + self._shards(after)

    def _step(self, window: tuple[int, int], by: int) -> tuple[int, int]:
        """The window `by` = -1 or 1 away, into the epochs around; (-1, 0) before the first."""
        epoch, w = window[0], window[1] + by
        if epoch < 0 or w < 0:
            return (-1, 0) if epoch <= 0 else (epoch - 1, self._order(epoch - 1).num_windows - 1)
        return (epoch + 1, 0) if w >= self._order(epoch).num_windows else (epoch, w)

    def _shards(self, window: tuple[int, int]) -> list[int]:
        """The shards of a window that hold a sample, in reading order."""
        if window[0] < 0:
            return []
        first = self.samples.first_sample
        return [k for k in self._order(window[0]).shards(window[1]).tolist() if first[k + 1] > first[k]]

    def rewind(self) -> None:
        """The stream jumped back (a reset, a resume): let the cache follow from wherever it is read next."""
        with self._lock:
            self._window_read = None


class TokenLoader:
    """Yields this rank's [global_batch_size // world_size, seq_len + 1] slice of each global batch.

    `data_dir` is a dataset directory (or its manifest.json), or a mixture {directory: weight} of
    datasets made with one tokenizer."""

    def __init__(self, data_dir: str | Path | Mapping[str, float], seq_len: int, global_batch_size: int, rank: int,
                 world_size: int, seed: int, split: str = "train", num_workers: int = 1, prefetch: int = 4,
                 cache_dir: str | Path | None = None, expected_vocab_size: int | None = None,
                 shuffle_window_shards: int = 0):
        _check_arguments(seq_len, global_batch_size, rank, world_size, split, num_workers, prefetch,
                         shuffle_window_shards)
        weights = {str(k): w for k, w in data_dir.items()} if isinstance(data_dir, Mapping) else {str(data_dir): 1}
        self.pattern = MixturePattern(list(weights.values()))
        self.shuffle_window_shards = shuffle_window_shards
        self.datasets = [_Dataset(location, split, seq_len + 1, seed, cache_dir, shuffle_window_shards)
                         for location in weights]
        self.manifest = self.datasets[0].manifest
        check_same_tokenizer([(d.location, d.manifest) for d in self.datasets])
        self.data_dir = ", ".join(weights)
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.vocab_size: int = self.manifest.vocab_size
        self.fingerprint: str = _fingerprint(self.datasets, self.pattern, shuffle_window_shards)
        if expected_vocab_size is not None:
            self.check_model_vocab(expected_vocab_size)
        self.num_samples: int = sum(d.num_samples for d in self.datasets)
        self._samples_consumed = 0  # global positions handed to the trainer
        # The pattern runs from phase_start on, each dataset's reads counted from phase_reads: (0, 0)
        # but after a resume on changed data. Reads of datasets that left the mixture are kept.
        self._phase_start, self._phase_reads = 0, np.zeros(len(self.datasets), dtype=np.int64)
        self._left: list[dict] = []  # the entries (as in state_dict's reads) of datasets that left
        self.data_change: str | None = None  # set by load_state_dict on changed data: where each dataset went on
        self._prefetch = prefetch
        self._executor = ThreadPoolExecutor(num_workers, thread_name_prefix="hope-data") if num_workers else None
        self._pending: deque[tuple[int, Future]] = deque()  # (start position, batch being built)
        # batches are built from the first next() on: not before a load_state_dict moves the position

    # ------------------------------------------------------------ the stream
    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self._executor is None:
            batch = self._build(self._samples_consumed)
        else:
            self._fill_pending()
            start, future = self._pending.popleft()
            assert start == self._samples_consumed
            batch = future.result()
        self._samples_consumed += self.global_batch_size
        self._fill_pending()
        return torch.from_numpy(batch)

    def _fill_pending(self) -> None:
        """Keep `prefetch` batches being built ahead of the trainer."""
        if self._executor is None:
            return
        next_start = self._pending[-1][0] + self.global_batch_size if self._pending else self._samples_consumed
        while len(self._pending) < self._prefetch:
            self._pending.append((next_start, self._executor.submit(self._build, next_start)))
            next_start += self.global_batch_size

    def _build(self, start: int) -> np.ndarray:
        """This rank's slice of the global batch that begins at stream position `start`."""
        # each dataset's reads in the whole global batch: every rank of a node keeps the same shards
        for dataset, begin, end in zip(self.datasets, self._reads_before(start).tolist(),
                                       self._reads_before(start + self.global_batch_size).tolist()):
            if end > begin:
                dataset.follow(begin, end - 1)
        first = start + self.rank * self.local_batch_size
        positions = np.arange(first, first + self.local_batch_size, dtype=np.int64)
        which, reads = self.pattern.locate(positions - self._phase_start)
        reads += self._phase_reads[which]
        batch = np.empty((len(positions), self.seq_len + 1), dtype=np.int64)
        for s in np.unique(which).tolist():
            chosen = which == s
            batch[chosen] = self.datasets[s].read(reads[chosen])
        return batch

    # ------------------------------------------------------------ state
    @property
    def epochs(self) -> list[int]:
        """Each dataset's epoch at the current position (how many times it has been read through)."""
        return [int(r) // d.num_samples for r, d in zip(self._reads_before(self._samples_consumed), self.datasets)]

    def _reads_before(self, position: int) -> np.ndarray:
        """Each dataset's reads in the stream positions [0, position)."""
        return self._phase_reads + self.pattern.reads_before(max(position - self._phase_start, 0))

    def planned_epochs(self, position: int) -> list[float]:
        """How many times each dataset has been read through by stream position `position` (its reads
        so far, then the current mixture's), a fraction."""
        return [float(k) / d.num_samples for k, d in zip(self._reads_before(position), self.datasets)]

    @property
    def epoch(self) -> int:
        """The largest of `epochs`: > 0 once some data repeats."""
        return max(self.epochs)

    def state_dict(self) -> dict:
        reads = self._reads_before(self._samples_consumed)
        return {"seed": self.seed, "epoch": self.epoch, "samples_consumed": self._samples_consumed,
                "fingerprint": self.fingerprint, "phase_start": self._phase_start,
                "shuffle_window_shards": self.shuffle_window_shards,
                "reads": [_entry(d.location, d.manifest.fingerprint, k) for d, k in zip(self.datasets, reads)],
                "left": self._left}

    def load_state_dict(self, state: dict, allow_changed_manifest: bool = False) -> None:
        if not isinstance(state, dict):
            raise DataError(f"loader state: {type(state).__name__}, expected a mapping with keys {list(STATE_KEYS)}")
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"loader state: missing key {missing[0]!r} (expected keys {list(STATE_KEYS)})")
        if state["fingerprint"] != self.fingerprint and not allow_changed_manifest:
            window = state.get("shuffle_window_shards", 0)  # absent in states from before December 2026
            if window != self.shuffle_window_shards:  # the fingerprint changed with it: say so, not "the manifest"
                raise DataError(f"{self.data_dir}: shuffle_window_shards is {self.shuffle_window_shards}, the "
                                f"checkpoint's was {window!r} (hope-train: data.shuffle_window_shards); another window "
                                "is another order of the samples. Resume with the checkpoint's, or "
                                "allow_changed_manifest (hope-train: data.allow_changed_data: true) to go on in the "
                                "new order at the same position.")
            raise DataError(f"{self.data_dir}: the manifest {'or the mixture ' if len(self.datasets) > 1 else ''}"
                            f"changed since the checkpoint (fingerprint {state['fingerprint']}, now "
                            f"{self.fingerprint}); resuming would not continue the same token stream. To "
                            "continue at the same position pass allow_changed_manifest (hope-train: "
                            "data.allow_changed_data: true).")
        if state["seed"] != self.seed:
            raise DataError(f"loader state: seed {state['seed']} in the checkpoint, but this loader has seed "
                            f"{self.seed}; resume with the checkpoint's seed")
        consumed = state["samples_consumed"]
        if not _count(consumed):
            raise DataError(f"loader state: samples_consumed {consumed!r}, expected an int >= 0")
        phase_start, base, left, self.data_change = self._phase_from(state, consumed)
        self._drop_pending()
        for dataset in self.datasets:
            dataset.rewind()
        self._samples_consumed = consumed
        self._phase_start, self._phase_reads, self._left = phase_start, base, left

    def _phase_from(self, state: dict, consumed: int) -> tuple[int, np.ndarray, list[dict], str | None]:
        """(phase_start, each dataset's reads before it, the datasets that left the mixture, and on
        changed data a line saying where each dataset goes on) that continue `state` at `consumed`."""
        reads, left = state.get("reads", []), state.get("left", [])  # absent in states from before December 2026
        phase_start = state.get("phase_start", 0)
        for entries, key in ((reads, "reads"), (left, "left")):
            if not (isinstance(entries, list) and all(_valid_entry(e) for e in entries)):
                raise DataError(f"loader state: {key} {entries!r}, expected a list of "
                                "{'dataset': path, 'manifest': fingerprint, 'reads': int >= 0}")
        if not _count(phase_start) or phase_start > consumed:
            raise DataError(f"loader state: phase_start {phase_start!r}, expected an int in [0, samples_consumed]")
        zeros = np.zeros(len(self.datasets), dtype=np.int64)
        same = state["fingerprint"] == self.fingerprint
        if not reads:  # the position alone carries over (with changed data: each dataset at its pattern's read)
            return (phase_start if same else 0), zeros, [], None if same else "data changed: the position carries over"
        if same:  # the same datasets and shares, in order: the pattern goes on
            fits = len(reads) == len(self.datasets)
            base = np.array([e["reads"] for e in reads]) - self.pattern.reads_before(consumed - phase_start) if fits else None
            if not fits or (base < 0).any():
                raise DataError(f"loader state: reads {reads!r} do not fit samples_consumed {consumed} and "
                                f"phase_start {phase_start} of this mixture")
            return phase_start, base, left, None
        # changed data (allowed): the new pattern starts here, each dataset going on from its own reads,
        # found by its path, else by its manifest (moved), else as the one dataset replacing the one before
        unmatched, found = reads + left, [None] * len(self.datasets)
        rules = (lambda d, e: e["dataset"] == _key(d.location), lambda d, e: e["manifest"] == d.manifest.fingerprint,
                 lambda d, e: len(self.datasets) == len(reads) == 1 and e is reads[0])
        for rule in rules:  # every dataset by its path first, then by its manifest, then one for one
            for i, d in enumerate(self.datasets):
                if found[i] is None:
                    found[i] = next((e for e in unmatched if rule(d, e)), None)
                    if found[i] is not None:
                        unmatched.remove(found[i])
        base = np.array([0 if e is None else e["reads"] for e in found], dtype=np.int64)
        said = [f"{d.location} at read {k}" + (" (new)" if e is None else "") for d, k, e in zip(self.datasets, base, found)]
        return consumed, base, unmatched, "data changed, each dataset goes on: " + ", ".join(said)

    def reset(self) -> None:
        """Back to the start of the stream (validation: the same batches at every evaluation)."""
        self._drop_pending()
        for dataset in self.datasets:
            dataset.rewind()
        self._samples_consumed = 0
        self._phase_start, self._phase_reads[:] = 0, 0

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """DataError unless every token id of this dataset fits the model's embedding."""
        check_model_vocab(self.data_dir, self.manifest, model_vocab_size)

    def _drop_pending(self) -> None:
        """Cancel the batches not started and wait for those being built (they would move the cache)."""
        running = [future for _, future in self._pending if not future.cancel()]
        wait(running)
        self._pending.clear()

    def close(self) -> None:
        self._drop_pending()
        for dataset in self.datasets:
            dataset.samples.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "TokenLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fingerprint(datasets: list[_Dataset], pattern: MixturePattern, window: int) -> str:
    """The dataset's manifest fingerprint; a mixture's covers its datasets and their shares (other
    weights are another stream), and a shuffle window its size (another order)."""
    if len(datasets) == 1 and not window:
        return datasets[0].manifest.fingerprint
    parts = [[d.manifest.fingerprint, int(n)] for d, n in zip(datasets, pattern.counts)]
    if window:
        parts.append(["shuffle_window_shards", window])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def check_model_vocab(location: str, manifest: Manifest, model_vocab_size: int) -> None:
    """DataError unless every token id of the dataset at `location` fits the model's embedding."""
    if model_vocab_size < manifest.vocab_size:
        raise DataError(f"{location}: tokenizer vocabulary is {manifest.vocab_size} ({manifest.tokenizer.path}), "
                        f"larger than the model's vocab_size {model_vocab_size}")


def check_same_tokenizer(datasets: list[tuple[str, Manifest]]) -> None:
    """DataError unless every dataset (location, manifest) of a mixture was tokenized alike (same ids
    for the same text)."""
    first, a = datasets[0][0], datasets[0][1].tokenizer
    for other, other_manifest in datasets[1:]:
        b = other_manifest.tokenizer
        if (a.fingerprint, a.vocab_size, a.eos_id) != (b.fingerprint, b.vocab_size, b.eos_id):
            raise DataError(f"{other}: tokenized with {b.path} (sha256 {b.fingerprint}, vocabulary "
                            f"{b.vocab_size}), but {first} with {a.path} (sha256 {a.fingerprint}, "
                            f"vocabulary {a.vocab_size}); a mixture's datasets need one tokenizer")


def _check_arguments(seq_len, global_batch_size, rank, world_size, split, num_workers, prefetch, window) -> None:
    def fail(name, value, expected):
        raise DataError(f"TokenLoader {name}={value!r}: expected {expected}")

    if seq_len <= 0:
        fail("seq_len", seq_len, "a positive int")
    if world_size <= 0:
        fail("world_size", world_size, "a positive int")
    if not 0 <= rank < world_size:
        fail("rank", rank, f"0 <= rank < world_size={world_size}")
    if global_batch_size <= 0 or global_batch_size % world_size:
        fail("global_batch_size", global_batch_size, f"a positive multiple of world_size={world_size}")
    if split not in SPLITS:
        fail("split", split, f"one of {SPLITS}")
    if num_workers < 0 or prefetch < 1:
        fail("num_workers/prefetch", (num_workers, prefetch), "num_workers >= 0 and prefetch >= 1")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        fail("shuffle_window_shards", window, "an int >= 0 (0: shuffle the whole split)")
