"""Windowed shuffle (data.shuffle_window_shards): each epoch reads a window of shards at a time, every
sample once (each shard packed on its own), and a remote dataset's local cache holds three windows,
not the dataset, and downloads each shard once per epoch.

The synthetic datasets of test_data_loader (token i of the train split has id i) make every sample
recognisable by its first token.
"""

import json
import multiprocessing
import os
from pathlib import Path

import fsspec
import fsspec.implementations.dirfs
import fsspec.implementations.memory
import numpy as np
import pytest
import torch
from test_data_loader import SEQ, take, write_dataset

from data_pipeline import DataError, TokenLoader
from data_pipeline.order import WindowedOrder
from data_pipeline.packed import PackedSplit

WIDTH = SEQ + 1
SHARDS = (40, 3, 97, 64, 0, 120, 8, 8, 200, 51, 16, 77, 5, 130, 90, 33)  # 937 tokens: tiny, empty, uneven shards
WINDOW = 3


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("window"), train_sizes=SHARDS)


def on_memory_fs(directory: Path, name: str) -> str:
    """A copy of a dataset directory on fsspec's in-memory filesystem: a remote dataset."""
    fs = fsspec.filesystem("memory")
    for path in directory.iterdir():
        fs.pipe_file(f"/{name}/{path.name}", path.read_bytes())
    return f"memory://{name}"


class LocalAsRemote(fsspec.implementations.dirfs.DirFileSystem):
    """`testremote://NAME`: the folder $TEST_REMOTE_ROOT/NAME as a remote store (cached, not memory-mapped
    in place) that separate processes share, as the ranks of a node share a bucket."""

    protocol = "testremote"

    def __init__(self, **kwargs):
        super().__init__(path=os.environ["TEST_REMOTE_ROOT"], fs=fsspec.filesystem("file"), **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return path.removeprefix("testremote://")


def test_windowed_order_is_a_bijection_reading_a_window_of_shards_at_a_time():
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = rng.integers(0, 30, int(rng.integers(1, 20)))
        if counts.sum() == 0:
            continue
        first = np.concatenate([[0], np.cumsum(counts)])
        window, epoch = int(rng.integers(1, len(counts) + 2)), int(rng.integers(0, 5))
        order = WindowedOrder(first, window, seed=3, epoch=epoch)
        positions = np.arange(first[-1])
        samples = order(positions)
        assert np.array_equal(np.sort(samples), positions), "a sample repeated or skipped"
        windows = order.window_of(positions)
        assert (np.diff(windows) >= 0).all(), "the epoch went back to an earlier window"
        shard_of = np.searchsorted(first, samples, side="right") - 1
        assert all(shard_of[p] in order.shards(windows[p]) for p in positions), "a sample read outside its window"
    first = np.concatenate([[0], np.cumsum([50] * 8)])
    a, b, c = (WindowedOrder(first, 2, seed, epoch)(np.arange(400)) for seed, epoch in ((1, 0), (1, 1), (2, 0)))
    assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9


def epoch_rows(data, window, world_size, steps, batch=12, seed=4, **kwargs):
    """The global stream's rows over `steps` batches (rank slices put back in order)."""
    loaders = [TokenLoader(data, SEQ, batch, r, world_size, seed, shuffle_window_shards=window, **kwargs)
               for r in range(world_size)]
    per_rank = [torch.cat(take(loader, steps)).numpy() for loader in loaders]
    for loader in loaders:
        loader.close()
    local = batch // world_size
    return np.stack(per_rank).reshape(world_size, steps, local, WIDTH).transpose(1, 0, 2, 3).reshape(-1, WIDTH)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_token_once_per_epoch_in_windows_and_the_same_on_any_world_size(many_shards, world_size):
    starts = np.cumsum((0,) + SHARDS)
    num_samples = sum(n // WIDTH for n in SHARDS)
    # each shard packed on its own: its tokens but the last n % WIDTH, in samples within the shard
    expected = np.concatenate([np.arange(s, s + n // WIDTH * WIDTH) for s, n in zip(starts, SHARDS)])
    steps = 2 * num_samples // 12 + 2
    rows = epoch_rows(many_shards, WINDOW, world_size, steps)
    for epoch in (rows[:num_samples], rows[num_samples:2 * num_samples]):
        assert np.array_equal(np.sort(epoch.ravel()), expected), "a token repeated or skipped"
        assert all(np.array_equal(r, np.arange(r[0], r[0] + WIDTH)) for r in epoch), "a sample is not contiguous"
    assert np.array_equal(np.searchsorted(starts, rows[:, 0], side="right"),
                          np.searchsorted(starts, rows[:, -1], side="right")), "a sample spans two shards"
    shard_of = np.searchsorted(starts, rows[:num_samples, 0], side="right") - 1
    windows = [set(shard_of[i:i + 12]) for i in range(0, num_samples - 12, 12)]
    assert max(len(w) for w in windows) <= 2 * WINDOW, "a batch drew from more than two windows"
    global_order = epoch_rows(many_shards, 0, 1, steps)
    assert not np.array_equal(rows, global_order)
    if world_size > 1:
        assert np.array_equal(rows, epoch_rows(many_shards, WINDOW, 1, steps))


def test_resume_mid_window_equals_uninterrupted_and_the_window_is_in_the_fingerprint(many_shards):
    reference = epoch_rows(many_shards, WINDOW, 2, 20)
    with TokenLoader(many_shards, SEQ, 12, 0, 1, seed=4, shuffle_window_shards=WINDOW) as loader:
        first = torch.cat(take(loader, 9)).numpy()
        state = json.loads(json.dumps(loader.state_dict()))
    with TokenLoader(many_shards, SEQ, 12, 0, 1, seed=4, shuffle_window_shards=WINDOW) as loader:
        loader.load_state_dict(state)
        rest = torch.cat(take(loader, 11)).numpy()
    assert np.array_equal(reference, np.concatenate([first, rest]))
    with TokenLoader(many_shards, SEQ, 12, 0, 1, seed=4) as other_order:
        assert other_order.fingerprint != state["fingerprint"]
        with pytest.raises(DataError, match="changed since the checkpoint"):
            other_order.load_state_dict(state)
    with pytest.raises(DataError, match=r"shuffle_window_shards=-1: expected an int >= 0"):
        TokenLoader(many_shards, SEQ, 12, 0, 1, seed=4, shuffle_window_shards=-1)


def cached_shards(cache: Path) -> int:
    return sum(1 for p in cache.rglob("train-*.bin"))


def test_remote_cache_holds_three_windows_and_downloads_each_shard_once_an_epoch(many_shards, tmp_path, monkeypatch):
    remote = on_memory_fs(many_shards, "window-cache")
    downloads = []
    original = fsspec.implementations.memory.MemoryFileSystem.cat_file

    def counted(self, path, *args, **kwargs):
        downloads.append(Path(path).name)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "cat_file", counted)
    num_samples = sum(n // WIDTH for n in SHARDS)
    steps = 3 * num_samples // 12 // 2  # an epoch and a half
    local_rows = epoch_rows(many_shards, WINDOW, 1, steps)
    most = {}
    for window in (WINDOW, 0):
        cache = tmp_path / f"cache-{window}"
        with TokenLoader(remote, SEQ, 12, 0, 1, seed=4, shuffle_window_shards=window, cache_dir=cache) as loader:
            rows = []
            for _ in range(steps):
                rows.append(next(loader).numpy())
                most[window] = max(most.get(window, 0), cached_shards(cache))
            assert np.array_equal(np.concatenate(rows), local_rows if window else epoch_rows(many_shards, 0, 1, steps))
            if not window:
                continue
            shards = [name for name in downloads if name.startswith("train-")]
            assert max(shards.count(name) for name in shards) <= 2  # once in each of the two epochs begun
            downloads.clear()
            loader.reset()  # back to the start (as validation does): evicted shards are fetched again
            assert np.array_equal(next(loader).numpy(), local_rows[:12])
    assert most[0] == len(SHARDS)  # the whole dataset, read ahead in manifest order
    assert most[WINDOW] <= 3 * WINDOW  # the window before, the current one and the next


def test_a_cached_shard_removed_by_another_rank_is_fetched_again(many_shards, tmp_path, monkeypatch):
    remote = on_memory_fs(many_shards, "window-evicted")
    copies = []
    original = PackedSplit._cached_copy

    def evicted_at_once(self, shard, remote_path):  # another rank of the node evicts it before it is mapped
        local = original(self, shard, remote_path)
        copies.append(shard.name)
        if copies.count(shard.name) == 1:
            Path(local).unlink()
        return local

    monkeypatch.setattr(PackedSplit, "_cached_copy", evicted_at_once)
    with TokenLoader(remote, SEQ, 12, 0, 1, seed=4, num_workers=0, cache_dir=tmp_path) as loader:
        batch = next(loader).numpy()
    assert np.array_equal(batch, epoch_rows(many_shards, 0, 1, 1))
    assert copies and all(copies.count(name) == 2 for name in set(copies))


def test_shards_too_small_for_a_sample_of_their_own_are_refused_by_name(tmp_path):
    small = write_dataset(tmp_path / "small", train_sizes=(5, 5, 5))  # 15 tokens: one sample of 8 as a stream
    with TokenLoader(small, SEQ, 1, 0, 1, seed=0) as loader:
        assert loader.num_samples == 1
    with pytest.raises(DataError, match=r"small/manifest.json: no shard of split 'train' holds one sample of "
                                        r"seq_len \+ 1 = 8 \(windows of shards pack each shard on its own\)"):
        TokenLoader(small, SEQ, 1, 0, 1, seed=0, shuffle_window_shards=2)


def rank_reads(rank: int, world_size: int, steps: int, cache: str, barrier, out: str) -> None:
    """One rank of a node: its slice of `steps` batches, the ranks stepping together (as collectives
    make them), and the most shards it saw in the shared cache."""
    fsspec.register_implementation("testremote", LocalAsRemote, clobber=True)
    rows, most = [], 0
    with TokenLoader("testremote://dataset", SEQ, 12, rank, world_size, seed=4, shuffle_window_shards=WINDOW,
                     cache_dir=cache, prefetch=1) as loader:
        for _ in range(steps):
            rows.append(next(loader).numpy())
            most = max(most, cached_shards(Path(cache)))
            barrier.wait()
    np.save(out, np.stack(rows))
    Path(out).with_suffix(".most").write_text(str(most))


def test_two_processes_share_one_cache_evicting_as_they_go(many_shards, tmp_path, monkeypatch):
    """Real processes (not threads) read one remote dataset through one cache folder: each removes the
    shards it no longer needs, also while the other maps them, and both read the exact stream."""
    monkeypatch.setenv("TEST_REMOTE_ROOT", str(many_shards.parent))
    (many_shards.parent / "dataset").symlink_to(many_shards.name)
    num_samples = sum(n // WIDTH for n in SHARDS)
    steps = 3 * num_samples // 12 // 2
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    outs = [str(tmp_path / f"rank{r}.npy") for r in range(2)]
    ranks = [context.Process(target=rank_reads, args=(r, 2, steps, str(tmp_path / "cache"), barrier, outs[r]))
             for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    assert [p.exitcode for p in ranks] == [0, 0]
    per_rank = [np.load(out) for out in outs]  # [steps, 6, WIDTH] each
    rows = np.concatenate(per_rank, axis=1).reshape(-1, WIDTH)
    assert np.array_equal(rows, epoch_rows(many_shards, WINDOW, 1, steps))
    # each process keeps 3 windows; while one has moved on to the next window and the other not yet, 4
    assert max(int(Path(out).with_suffix(".most").read_text()) for out in outs) <= 4 * WINDOW
