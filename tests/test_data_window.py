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
# 40 shards of 0 to 120 tokens (5 to 15 samples but for some tiny and empty ones): windows of 3 shards
SHARDS = (40, 3, 97, 64, 0, 120, 8, 8, 100, 51, 16, 77, 5, 110, 90, 33, 60, 70, 44, 81,
          95, 41, 66, 12, 88, 57, 73, 49, 102, 39, 58, 67, 91, 43, 79, 54, 63, 115, 47, 85)
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
    first_sample = np.concatenate([[0], np.cumsum(np.array(SHARDS) // WIDTH)])
    for epoch in (0, 1):  # position p of the epoch reads a sample of a shard of p's window
        order = WindowedOrder(first_sample, WINDOW, seed=4, epoch=epoch)
        windows = order.window_of(np.arange(num_samples))
        shard_of = np.searchsorted(starts, rows[epoch * num_samples:(epoch + 1) * num_samples, 0], side="right") - 1
        assert all(shard_of[p] in order.shards(windows[p]) for p in range(num_samples))
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
        with pytest.raises(DataError, match="shuffle_window_shards is 0, the checkpoint's was 3"):
            other_order.load_state_dict(state)
    with pytest.raises(DataError, match=r"shuffle_window_shards=-1: expected an int >= 0"):
        TokenLoader(many_shards, SEQ, 12, 0, 1, seed=4, shuffle_window_shards=-1)


def cache_bound(data, batch: int, batches: int, lag: int = 1) -> int:
    """The most shards the cache may hold: those kept for `lag` + 1 consecutive global batches (a
    batch's windows, the one before and the next; while the cache moves on from one batch's to the
    next, both), against every shard of the dataset with a sample."""
    with TokenLoader(data, SEQ, batch, 0, 1, seed=4, shuffle_window_shards=WINDOW, num_workers=0) as loader:
        dataset = loader.datasets[0]
        kept = [set(dataset.window_cache(dataset._window(g * batch), dataset._window((g + 1) * batch - 1))[0])
                for g in range(batches)]
    bound = max(len(set().union(*kept[g:g + lag + 1])) for g in range(batches - lag))
    assert bound < sum(1 for n in SHARDS if n >= WIDTH) / 2, "the test's windows are too large to tell"
    return bound


def cached_shards(cache: Path) -> int:
    return sum(1 for p in cache.rglob("train-*.bin"))


@pytest.fixture
def downloads(monkeypatch):
    """The names of the files downloaded from the in-memory store, in order."""
    names = []
    original = fsspec.implementations.memory.MemoryFileSystem.cat_file

    def counted(self, path, *args, **kwargs):
        names.append(Path(path).name)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "cat_file", counted)
    return names


def test_remote_cache_holds_three_windows_and_downloads_each_shard_once_an_epoch(many_shards, tmp_path, downloads):
    remote = on_memory_fs(many_shards, "window-cache")
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
    assert most[WINDOW] <= cache_bound(many_shards, 12, steps + 5)


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
    for fetcher in loader.datasets[0].samples._fetchers:  # closed: each ends after the copy it has under way
        fetcher.join(timeout=30)
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
    # each process keeps 3 or 4 windows; while one has moved on to the next window and the other not yet, 5
    assert max(int(Path(out).with_suffix(".most").read_text()) for out in outs) <= cache_bound(many_shards, 12, steps + 2,
                                                                                               lag=3)


def test_windows_smaller_than_a_batch_download_each_shard_once_an_epoch(many_shards, tmp_path, downloads):
    """A global batch of 48 samples spans several windows of one shard: the cache keeps them all."""
    remote = on_memory_fs(many_shards, "window-small")
    num_samples = sum(n // WIDTH for n in SHARDS)
    with TokenLoader(remote, SEQ, 48, 0, 1, seed=4, shuffle_window_shards=1, cache_dir=tmp_path,
                     num_workers=0) as loader:  # no batch built ahead into the next epoch
        rows = np.concatenate([next(loader).numpy() for _ in range(num_samples // 48)])
    with TokenLoader(many_shards, SEQ, 48, 0, 1, seed=4, shuffle_window_shards=1) as local:
        assert np.array_equal(rows, np.concatenate([next(local).numpy() for _ in range(num_samples // 48)]))
    shards = [name for name in downloads if name.startswith("train-")]
    assert len(shards) == len(set(shards)), "a shard was downloaded twice in one epoch"


def test_a_restarted_reader_clears_what_the_one_before_left_and_skips_window_zero(many_shards, tmp_path, downloads):
    """Preempted every 2 batches and resumed (a new loader on the same cache): the cache stays at
    three windows, and a resumed loader downloads its own windows, not epoch 0's first."""
    remote = on_memory_fs(many_shards, "window-restarts")
    cache, state, rows, most = tmp_path / "cache", None, [], 0
    for restart in range(8):
        downloads.clear()
        with TokenLoader(remote, SEQ, 12, 0, 1, seed=4, shuffle_window_shards=WINDOW, cache_dir=cache) as loader:
            if state is not None:
                loader.load_state_dict(state)
            for _ in range(2):
                rows.append(next(loader).numpy())
                most = max(most, cached_shards(cache))
            state = loader.state_dict()
            if restart:  # the windows of this run's reads: its 2 batches and the 4 built ahead (prefetch)
                dataset, begin = loader.datasets[0], state["samples_consumed"] - 24
                windows = dataset._window(begin), dataset._window(begin + 6 * 12 - 1)
                shards = {int(name[6:11]) for name in downloads if name.startswith("train-")}
                assert shards <= set(dataset.window_cache(*windows)[0]), "a resumed reader downloaded other windows"
    assert most <= cache_bound(many_shards, 12, 16 + 5)
    assert np.array_equal(np.concatenate(rows), epoch_rows(many_shards, WINDOW, 1, 16))


def test_read_ahead_threads_do_not_keep_a_process_alive(many_shards):
    remote = on_memory_fs(many_shards, "window-daemon")
    loader = TokenLoader(remote, SEQ, 12, 0, 1, seed=4)
    next(loader)  # global order: every shard queued for copying
    import threading

    fetchers = [t for t in threading.enumerate() if t.name == "hope-data-cache"]
    assert fetchers and all(t.daemon for t in fetchers)
    loader.close()


def test_copies_cut_short_by_a_killed_process_are_removed_but_not_one_under_way(many_shards, tmp_path):
    """A download killed between its temporary file and the rename leaves `NAME.tmp-XXXX` in the cache:
    the next reader removes it, unless the shard's lock is held (a rank of the node copying it now)."""
    import fcntl

    remote = on_memory_fs(many_shards, "window-partial")
    with TokenLoader(remote, SEQ, 12, 0, 1, seed=4, shuffle_window_shards=WINDOW, cache_dir=tmp_path) as loader:
        dataset = loader.datasets[0]
        cache, names = dataset.samples._cache, [shard.name for shard in dataset.samples.shards]
        first_batch = set(dataset.window_cache(dataset._window(0), dataset._window(11))[0])
    busy = names[min(set(range(len(names))) - first_batch)]  # not read by the batch below: nobody waits for it
    cache.mkdir(parents=True)
    for name in names:
        (cache / f"{name}.tmp-dead0001").write_bytes(b"cut short")
    with open(cache / f".{busy}.lock", "w") as lock:  # another process copying `busy` right now
        fcntl.flock(lock, fcntl.LOCK_EX)
        with TokenLoader(remote, SEQ, 12, 0, 1, seed=4, shuffle_window_shards=WINDOW, cache_dir=tmp_path,
                         num_workers=0) as loader:
            next(loader)
            left = sorted(p.name for p in cache.glob("*.tmp-dead*"))  # not the copies the reader has under way
    assert left == [f"{busy}.tmp-dead0001"]
