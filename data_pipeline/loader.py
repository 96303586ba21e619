"""TokenLoader: the resumable, rank-sliced, prefetching stream of training samples.

The global sample stream is epoch 0's permutation of all samples, then epoch 1's (a new seeded
permutation), and so on; position p of the stream is sample perm(seed, p // N)(p % N). Global
batch g is positions [g*B, (g+1)*B); rank r of W gets the contiguous slice
[g*B + r*B/W, g*B + (r+1)*B/W). Ranks therefore read disjoint samples and never the whole dataset.

The state is {seed, epoch, samples_consumed, fingerprint}; samples_consumed counts global
positions, so it does not depend on the world size: a run resumed on another number of ranks
with the same global batch size sees exactly the batches of an uninterrupted run.

Background threads build the next `prefetch` batches while the trainer computes (numpy copies
out of memory-mapped shards release the GIL, and remote shards are cached locally).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import DataError
from data_pipeline.order import EpochPermutation
from data_pipeline.packed import PackedSplit
from data_pipeline.shards import SPLITS, read_manifest

STATE_KEYS = ("seed", "epoch", "samples_consumed", "fingerprint")


class TokenLoader:
    """Yields this rank's [global_batch_size // world_size, seq_len + 1] slice of each global batch."""

    def __init__(self, data_dir: str | Path, seq_len: int, global_batch_size: int, rank: int, world_size: int,
                 seed: int, split: str = "train", num_workers: int = 1, prefetch: int = 4,
                 cache_dir: str | Path | None = None, expected_vocab_size: int | None = None):
        _check_arguments(seq_len, global_batch_size, rank, world_size, split, num_workers, prefetch)
        fs, directory, self.manifest = read_manifest(str(data_dir))
        self.data_dir, self.split, self.seq_len, self.seed = str(data_dir), split, seq_len, seed
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.vocab_size: int = self.manifest.vocab_size
        self.fingerprint: str = self.manifest.fingerprint
        if expected_vocab_size is not None:
            self.check_model_vocab(expected_vocab_size)
        self._samples = PackedSplit(fs, directory, self.manifest, split, seq_len + 1, cache_dir)
        self.num_samples: int = self._samples.num_samples
        self._permutations: dict[int, EpochPermutation] = {}
        self._samples_consumed = 0  # global positions handed to the trainer
        self._prefetch = prefetch
        self._executor = ThreadPoolExecutor(num_workers, thread_name_prefix="hope-data") if num_workers else None
        self._pending: deque[tuple[int, Future]] = deque()  # (start position, batch being built)
        self._fill_pending()

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
        first = start + self.rank * self.local_batch_size
        positions = np.arange(first, first + self.local_batch_size, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_samples)
        samples = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():
            chosen = epochs == epoch
            samples[chosen] = self._permutation(epoch)(within[chosen])
        return self._samples.read(samples)

    def _permutation(self, epoch: int) -> EpochPermutation:
        if epoch not in self._permutations:
            self._permutations = {epoch: EpochPermutation(self.num_samples, self.seed, epoch)} | {
                e: p for e, p in self._permutations.items() if e >= epoch - 1}
        return self._permutations[epoch]

    # ------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        return self._samples_consumed // self.num_samples

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "samples_consumed": self._samples_consumed,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict, allow_changed_manifest: bool = False) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"loader state: missing key {missing[0]!r} (expected keys {list(STATE_KEYS)})")
        if state["fingerprint"] != self.fingerprint and not allow_changed_manifest:
            raise DataError(f"{self.data_dir}: the manifest changed since the checkpoint (fingerprint "
                            f"{state['fingerprint']}, now {self.fingerprint}); resuming would not continue "
                            "the same token stream. Pass allow_changed_manifest to accept it.")
        if state["seed"] != self.seed:
            raise DataError(f"loader state: seed {state['seed']} in the checkpoint, but this loader has seed "
                            f"{self.seed}; resume with the checkpoint's seed")
        consumed = state["samples_consumed"]
        if not isinstance(consumed, int) or consumed < 0:
            raise DataError(f"loader state: samples_consumed {consumed!r}, expected an int >= 0")
        self._drop_pending()
        self._samples_consumed = consumed
        self._fill_pending()

    def reset(self) -> None:
        """Back to the start of the stream (validation: the same batches at every evaluation)."""
        self._drop_pending()
        self._samples_consumed = 0
        self._fill_pending()

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """DataError unless every token id of this dataset fits the model's embedding."""
        if model_vocab_size < self.vocab_size:
            raise DataError(f"{self.data_dir}: tokenizer vocabulary is {self.vocab_size} "
                            f"({self.manifest.tokenizer.path}), larger than the model's vocab_size "
                            f"{model_vocab_size}")

    def _drop_pending(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        self._drop_pending()
        self._samples.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "TokenLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_arguments(seq_len, global_batch_size, rank, world_size, split, num_workers, prefetch) -> None:
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
