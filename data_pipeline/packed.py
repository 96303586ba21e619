"""Random access to fixed-length samples packed from one split's shards.

The split's shards (manifest order) form one token stream; sample i is tokens
[i * width, (i + 1) * width) of it, width = seq_len + 1. Samples do not overlap, so every token
of the split is in exactly one sample (the last, shorter-than-width tail is left out).
Packed per shard instead (`per_shard`, for reading a window of shards at a time: a sample then
needs no other shard than its own), each shard is cut into samples on its own and its last
< width tokens are left out (2,048 of a 100M-token shard at seq 2048: 0.002%).

Local shards are memory-mapped. Shards on a remote store (s3://, gs://, hf://, memory://...) are
first copied whole into a local cache (checksum checked on the way, temp name then rename, so a
crash never leaves a bad cache entry) and then memory-mapped; each rank reads random samples from
many shards, so whole-shard caching is what makes remote reads fast. The reader says which shards
to copy ahead (`read_ahead`: a few background threads fetch them in that order) and which to keep
(`keep_only`: the others this process opened leave the cache); a batch that needs a shard not
copied yet (or evicted, also by another rank of the node) fetches it at once.
"""

from __future__ import annotations

import bisect
import fcntl
import glob
import hashlib
import os
import queue
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.shards import HEADER_SIZE, Manifest, ShardInfo, decode_header, token_dtype
from data_pipeline.storage import atomic_write_local, is_local, join
from data_pipeline.verify import check_shard

DEFAULT_CACHE = Path(os.environ.get("HOPE_DATA_CACHE", Path.home() / ".cache" / "hope-data" / "shards"))
READ_AHEAD_THREADS = 4  # concurrent shard downloads: one stream rarely fills a node's link to object storage


def first_samples(manifest: Manifest, split: str, width: int, directory: str, per_shard: bool = False) -> np.ndarray:
    """Each shard's first sample, then the split's sample count (from its manifest); DataError if
    there is no sample. Packed as one stream, a shard's samples are those whose first token is in it."""
    sizes = np.array([s.num_tokens for s in manifest.split_shards(split)], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    if per_shard:
        first = np.concatenate([[0], np.cumsum(sizes // width)])
    else:
        first = np.minimum(-(-starts // width), starts[-1] // width)
    if first[-1] == 0:
        hint = " (`hope-data tokenize --validation-fraction` sets its share)" if split == "validation" else ""
        what = f"no shard of split {split!r} holds" if per_shard and starts[-1] >= width else \
            f"split {split!r} has {starts[-1]} tokens, fewer than"
        raise DataError(f"{join(directory, 'manifest.json')}: {what} one sample of seq_len + 1 = {width}{hint}"
                        + (" (windows of shards pack each shard on its own)" if per_shard else ""))
    return first


def split_samples(manifest: Manifest, split: str, width: int, directory: str, per_shard: bool = False) -> int:
    """The samples of `width` tokens in a split (`first_samples`' count)."""
    return int(first_samples(manifest, split, width, directory, per_shard)[-1])


class PackedSplit:
    def __init__(self, fs, directory: str, manifest: Manifest, split: str, width: int,
                 cache_dir: str | Path | None = None, per_shard: bool = False):
        self.fs, self.directory, self.manifest, self.width = fs, directory, manifest, width
        self.shards: list[ShardInfo] = manifest.split_shards(split)
        self.per_shard = per_shard
        # shard k's samples: [first_sample[k], first_sample[k + 1])
        self.first_sample = first_samples(manifest, split, width, directory, per_shard)
        self.num_samples = int(self.first_sample[-1])
        self._starts = np.cumsum([0] + [s.num_tokens for s in self.shards]).tolist()
        self._dtype = token_dtype(manifest.vocab_size)
        self._cache = Path(cache_dir or DEFAULT_CACHE) / manifest.fingerprint
        self._arrays: dict[int, np.ndarray] = {}
        self._locks = [threading.Lock() for _ in self.shards]
        self.remote = not is_local(fs)
        # read-ahead: daemon threads (a process exits without waiting for them) copy queued shards
        self._wanted: queue.Queue[int] = queue.Queue()
        self._queued: set[int] = set()  # shards waiting for or being copied by the fetchers
        self._fetchers: list[threading.Thread] = []
        self._keep: set[int] | None = None  # the shards the cache may hold (None: all)
        self._closed = threading.Event()
        if not self.remote:  # cheap: a header read and a stat per shard, catches truncation up front
            for k in range(len(self.shards)):
                self._array(k)

    def read_ahead(self, shards: Iterable[int]) -> None:
        """Start copying these shards of a remote dataset into the cache, in this order, in the background."""
        if not self.remote or self._closed.is_set():
            return
        if not self._fetchers:
            self._fetchers = [threading.Thread(target=self._fetch_queued, name="hope-data-cache", daemon=True)
                              for _ in range(READ_AHEAD_THREADS)]
            for thread in self._fetchers:
                thread.start()
        for k in shards:
            if k not in self._arrays and k not in self._queued:
                self._queued.add(k)
                self._wanted.put(k)

    def _fetch_queued(self) -> None:
        while not self._closed.is_set():
            try:
                k = self._wanted.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if self._keep is None or k in self._keep:  # not if the reader moved on before its turn came
                    self._array(k)
            except DataError:
                pass  # the batch that needs this shard raises the same error in the trainer's thread
            finally:
                self._queued.discard(k)
            if self._keep is not None and k not in self._keep:  # the reader moved on while it was copied
                self._evict(k)

    def keep_only(self, shards: Iterable[int]) -> None:
        """Remove from the local cache every shard of this split (remote dataset) not in `shards`,
        those a process before this one left there too. A rank still reading one keeps its memory
        map (the file's blocks are freed when the last map goes); a rank that needs one again
        fetches it again."""
        if not self.remote:
            return
        self._keep = keep = set(shards)
        for k in [k for k in list(self._arrays) if k not in keep]:
            self._evict(k)
        index = {shard.name: k for k, shard in enumerate(self.shards)}
        if self._cache.is_dir():
            for entry in os.scandir(self._cache):  # one listing, not a stat per shard of the split
                if entry.name in index and index[entry.name] not in keep:
                    self._evict(index[entry.name])
                name, tmp, _ = entry.name.partition(".tmp-")
                if tmp and name in index:  # a copy under way (its lock is held), or one a killed process left
                    shard = self.shards[index[name]]
                    with self._shard_lock(shard, wait=False) as free:
                        if free:
                            self._remove_partial_copies(shard)

    def _evict(self, k: int) -> None:
        with self._locks[k]:
            self._arrays.pop(k, None)
            (self._cache / self.shards[k].name).unlink(missing_ok=True)

    def close(self) -> None:
        """Stop reading ahead; a copy under way finishes in its daemon thread (or ends with the process)."""
        self._closed.set()

    # ------------------------------------------------------------ shard files
    def _array(self, k: int) -> np.ndarray:
        array = self._arrays.get(k)
        if array is None:
            with self._locks[k]:
                array = self._arrays.get(k)
                if array is None:
                    array = self._arrays[k] = self._open(self.shards[k])
        return array

    def _open(self, shard: ShardInfo) -> np.ndarray:
        path = join(self.directory, shard.name)
        if not self.remote:
            try:
                return self._map(path, shard, path)
            except FileNotFoundError as exc:
                raise DataError(f"{path}: shard listed in the manifest is missing") from exc
        for attempt in range(3):
            local = self._cached_copy(shard, path)
            try:
                return self._map(local, shard, path)
            except FileNotFoundError:  # another rank of the node evicted it between the copy and the map
                continue
        raise DataError(f"{local}: the cached copy of {path} was removed 3 times before it could be opened "
                        "(by another process sharing the cache?)")

    def _map(self, local: str, shard: ShardInfo, path: str) -> np.ndarray:
        """The shard file `local` (a copy of `path`) checked against the manifest and memory-mapped."""
        size = os.path.getsize(local)
        with open(local, "rb") as f:
            header = decode_header(f.read(HEADER_SIZE), path)
        check_shard(path, size, header, shard, self.manifest)
        if shard.num_tokens == 0:
            return np.zeros(0, self._dtype)
        return np.memmap(local, dtype=self._dtype, mode="r", offset=HEADER_SIZE, shape=(shard.num_tokens,))

    def _cached_copy(self, shard: ShardInfo, remote_path: str) -> str:
        local = self._cache / shard.name
        if local.exists():
            return str(local)
        self._cache.mkdir(parents=True, exist_ok=True)
        # The ranks of a node share the cache: one downloads a shard, the others wait for it.
        with self._shard_lock(shard):
            if not local.exists():
                self._remove_partial_copies(shard)
                self._download(shard, remote_path, local)
        return str(local)

    def _shard_lock(self, shard: ShardInfo, wait: bool = True):
        """The lock a process holds while it copies `shard` into the cache (shared by the node's ranks)."""
        return _FileLock(self._cache / f".{shard.name}.lock", wait)

    def _remove_partial_copies(self, shard: ShardInfo) -> None:
        """Remove the temporary files of copies of `shard` cut short by a killed process. Call with the
        shard's lock held: a copy under way holds it, so what is left is a leftover."""
        for leftover in self._cache.glob(f"{glob.escape(shard.name)}.tmp-*"):
            leftover.unlink(missing_ok=True)

    def _download(self, shard: ShardInfo, remote_path: str, local: Path) -> None:
        url = self.fs.unstrip_protocol(remote_path)
        try:
            data = self.fs.cat_file(remote_path)
        except FileNotFoundError as exc:
            raise DataError(f"{url}: shard listed in the manifest is missing") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise DataError(f"{url}: checksum mismatch (sha256 {digest[:16]}..., manifest {shard.sha256[:16]}...)")
        atomic_write_local(local, data)

    # ------------------------------------------------------------ samples
    def read(self, sample_indices: np.ndarray) -> np.ndarray:
        """int64 array [len(sample_indices), width] of the samples' tokens."""
        out = np.empty((len(sample_indices), self.width), dtype=np.int64)
        if self.per_shard:
            shards = np.searchsorted(self.first_sample, sample_indices, side="right") - 1
            for row, (sample, k) in enumerate(zip(sample_indices.tolist(), shards.tolist())):
                begin = (sample - int(self.first_sample[k])) * self.width
                out[row] = self._array(k)[begin:begin + self.width]
            return out
        for row, sample in enumerate(sample_indices.tolist()):
            begin, end = sample * self.width, (sample + 1) * self.width
            k = bisect.bisect_right(self._starts, begin) - 1
            filled = 0
            while filled < self.width:  # a sample may span shard boundaries
                lo = begin + filled - self._starts[k]
                take = min(self.width - filled, self.shards[k].num_tokens - lo)
                if take > 0:
                    out[row, filled:filled + take] = self._array(k)[lo:lo + take]
                    filled += take
                k += 1
            assert begin + filled == end
        return out


class _FileLock:
    """flock on a file for a `with` block, which gets whether the lock was taken (False: wait=False and it was held)."""
    def __init__(self, path: Path, wait: bool):
        self.path, self.wait = path, wait

    def __enter__(self) -> bool:
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def __exit__(self, *exc) -> None:
        self.file.close()  # closing releases the lock
