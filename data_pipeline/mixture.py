"""Weighted mixtures of datasets: which dataset each position of the stream reads, in O(1).

A mixture of datasets s = 0..S-1 with weights w_s repeats one pattern of PERIOD positions in which
dataset s holds n_s slots (its share of PERIOD, largest remainder first), spread evenly: each slot
goes to the dataset furthest behind its share so far. Stream position p is slot p % PERIOD of
repeat p // PERIOD, so it reads dataset s(p), and it is that dataset's k-th read with
k = repeat * n_s + (the dataset's slots earlier in the pattern). Each dataset continues its own
stream at k (its seeded per-epoch permutations, data_pipeline/order.py), so it still visits each
of its samples once per its own epoch, any window of B positions holds B * n_s / PERIOD +- 2 reads
of it (tests/test_data_mixture.py), and the loader's state stays the mixture's position (with each
dataset's reads beside it, so that other weights can take over there: data_pipeline/loader.py).
One dataset is the mixture whose every slot is its own (k = p): the same stream as without a
mixture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from data_pipeline.errors import DataError

PERIOD = 10_000  # weights are kept to 1 part in 10,000


def slot_counts(weights: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """Each dataset's slots in a pattern of `period` (largest remainder); DataError naming a weight
    that is not a positive number or too small to hold one slot (the config check calls this)."""
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise DataError(f"mixture weight {w!r}: expected a positive number")
    if not weights:
        raise DataError("a mixture needs at least one dataset")
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * period
    counts = np.floor(shares).astype(np.int64)
    by_remainder = np.argsort(-(shares - counts), kind="stable")  # largest remainders get the rest
    counts[by_remainder[:period - counts.sum()]] += 1
    if (counts == 0).any():
        s = int(np.flatnonzero(counts == 0)[0])
        raise DataError(f"mixture weight {weights[s]!r} (dataset {s}) is below 1/{period} of the total: "
                        f"the mixture keeps weights to 1 part in {period}")
    return counts


class MixturePattern:
    """Where each stream position reads: (dataset, its read index in that dataset)."""

    def __init__(self, weights: Sequence[float], period: int = PERIOD):
        counts = slot_counts(weights, period)
        self.period, self.counts = period, counts
        # slot t goes to the dataset furthest behind its share of slots 0..t (ties: the lower index);
        # after the period every dataset has exactly its n_s
        self.dataset = np.empty(period, dtype=np.int64)  # the dataset each slot reads
        self.rank = np.empty(period, dtype=np.int64)  # how many of its slots come before this one
        taken = np.zeros(len(counts), dtype=np.int64)
        for t in range(period):
            s = int(np.argmax((t + 1) * counts - period * taken))
            self.dataset[t], self.rank[t] = s, taken[s]
            taken[s] += 1

    @property
    def fractions(self) -> np.ndarray:
        """Each dataset's share of the stream, as the pattern holds it."""
        return self.counts / self.period

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, read index within that dataset) of each stream position (int64 arrays)."""
        repeat, slot = np.divmod(np.asarray(positions, dtype=np.int64), self.period)
        dataset = self.dataset[slot]
        return dataset, repeat * self.counts[dataset] + self.rank[slot]

    def reads_before(self, position: int) -> np.ndarray:
        """How many of the positions [0, position) each dataset serves."""
        repeat, slot = divmod(position, self.period)
        return repeat * self.counts + np.bincount(self.dataset[:slot], minlength=len(self.counts))


def dataset_labels(locations: Sequence[str]) -> list[str]:
    """Short names of a mixture's datasets for metrics (`val_loss/NAME`): each directory's last path
    part, and where two would be the same, as many parts before it as it takes to tell them apart."""
    parts = [[part for part in str(location).split("/") if part] for location in locations]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not clashing:
            return labels
        if any(depth[i] >= len(parts[i]) for i in clashing):  # a path that ends another ('/x/web', '/y/x/web'),
            return [str(location) for location in locations]  # or one directory spelled two ways
        for i in clashing:
            depth[i] += 1
