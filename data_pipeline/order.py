"""The sample order of an epoch: a seeded permutation, computed per index in O(1) memory.

A 100B-token dataset has ~50M samples of 2049 tokens; materialising a permutation of that on
every rank costs hundreds of MB and seconds at each epoch. Instead the order is a keyed Feistel
network over [0, 2^k) with cycle walking into [0, n): a bijection of [0, n) that any rank can
evaluate for just the indices it needs. Key = (seed, epoch).

`EpochPermutation` draws from the whole split: every batch may need every shard. `WindowedOrder`
draws from a window of shards at a time (the shards in a seeded order, cut into windows of K;
each window's samples in a permutation of their own), so a reader of a remote dataset needs only
the current window's shards on disk, and the next one's arriving.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-distributed hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class EpochPermutation:
    """A pseudo-random bijection of [0, n), fixed by (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int, stream: int = 0):
        """`stream` > 0 keys another permutation of the same (seed, epoch): a window's own."""
        if n <= 0:
            raise ValueError(f"permutation size must be positive, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2  # two equal halves
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        base = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64) ^ _mix(np.array([epoch], dtype=np.uint64)))
        if stream:
            base = _mix(base ^ _mix(np.array([stream], dtype=np.uint64)))
        self._keys = [_mix(base + np.uint64(r + 1))[0] for r in range(_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """Positions in the epoch's order -> sample indices (int64 array in, int64 array out)."""
        x = np.asarray(indices, dtype=np.uint64)
        out = self._encrypt(x)
        outside = out >= self.n
        while outside.any():  # cycle walking: at most a few steps, the domain is < 4n
            out[outside] = self._encrypt(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class WindowedOrder:
    """Epoch `epoch`'s order of a split's samples, a window of shards at a time.

    The shards are put in a seeded random order and cut into windows of `window` consecutive
    ones; the epoch reads window 0's samples in a random order of their own, then window 1's, and
    so on. A sample belongs to the shard its first token is in (it may run into the next shards).
    Every sample is read once per epoch, as with EpochPermutation; the order is random across the
    whole split at the scale of windows and within each window at the scale of samples.
    `first_sample[k]` is shard k's first sample, `first_sample[-1]` the split's sample count.
    """

    def __init__(self, first_sample: np.ndarray, window: int, seed: int, epoch: int):
        counts = np.diff(first_sample)
        num_shards = len(counts)
        self.window, self.epoch = window, epoch
        self.shard_order = EpochPermutation(num_shards, seed, epoch)(np.arange(num_shards))
        self.first_sample = first_sample
        sizes = np.add.reduceat(counts[self.shard_order], np.arange(0, num_shards, window))
        self.window_start = np.concatenate([[0], np.cumsum(sizes)])  # epoch position where each window starts
        self.num_windows = len(sizes)
        self.seed = seed
        self._within: dict[int, tuple[EpochPermutation, np.ndarray, np.ndarray]] = {}

    def shards(self, w: int) -> np.ndarray:
        """The shards of window w (whose samples it reads), in the window's order."""
        return self.shard_order[w * self.window:(w + 1) * self.window]

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        """The window each epoch position reads (empty windows, of shards without samples, are skipped)."""
        return np.searchsorted(self.window_start, positions, side="right") - 1

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Positions in the epoch's order -> sample indices (int64)."""
        positions = np.asarray(positions, dtype=np.int64)
        windows = self.window_of(positions)
        out = np.empty_like(positions)
        for w in np.unique(windows).tolist():
            chosen = windows == w
            permutation, shard_ends, shard_firsts = self._window(w)
            slot = permutation(positions[chosen] - self.window_start[w])  # the window's sample slots, shuffled
            k = np.searchsorted(shard_ends, slot, side="right")  # which of the window's shards
            out[chosen] = shard_firsts[k] + slot - np.concatenate([[0], shard_ends])[k]
        return out

    def _window(self, w: int) -> tuple[EpochPermutation, np.ndarray, np.ndarray]:
        if w not in self._within:  # a few windows at a time: the batches in flight span at most two
            shards = self.shards(w)
            counts = self.first_sample[shards + 1] - self.first_sample[shards]
            n = int(self.window_start[w + 1] - self.window_start[w])
            within = (EpochPermutation(n, self.seed, self.epoch, stream=w + 1), np.cumsum(counts), self.first_sample[shards])
            self._within = {k: v for k, v in self._within.items() if k >= w - 2} | {w: within}
            return within
        return self._within[w]
