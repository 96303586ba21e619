"""Random access to fixed-length samples packed from one split's shards.

The split's shards (manifest order) form one token stream; sample i is tokens
[i * width, (i + 1) * width) of it, width = seq_len + 1. Samples do not overlap, so every token
of the split is in exactly one sample (the last, shorter-than-width tail is left out).

Local shards are memory-mapped. Shards on a remote store (s3://, gs://, hf://, memory://...) are
first copied whole into a local cache (checksum checked on the way, temp name then rename, so a
crash never leaves a bad cache entry) and then memory-mapped; each rank reads random samples from
every shard, so whole-shard caching is what makes remote reads fast. A background thread copies
the shards in manifest order from the start (read-ahead); a batch that needs a shard not yet
copied fetches that one at once.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.shards import HEADER_SIZE, Manifest, ShardInfo, decode_header, token_dtype
from data_pipeline.storage import atomic_write_local, is_local, join

DEFAULT_CACHE = Path(os.environ.get("HOPE_DATA_CACHE", Path.home() / ".cache" / "hope-data" / "shards"))


def split_samples(manifest: Manifest, split: str, width: int, directory: str) -> int:
    """The samples of `width` tokens in a split (from its manifest); DataError if there is none."""
    num_tokens = sum(s.num_tokens for s in manifest.split_shards(split))
    if num_tokens < width:
        hint = " (`hope-data tokenize --validation-fraction` sets its share)" if split == "validation" else ""
        raise DataError(f"{join(directory, 'manifest.json')}: split {split!r} has {num_tokens} tokens, "
                        f"fewer than one sample of seq_len + 1 = {width}{hint}")
    return num_tokens // width


class PackedSplit:
    def __init__(self, fs, directory: str, manifest: Manifest, split: str, width: int,
                 cache_dir: str | Path | None = None):
        self.fs, self.directory, self.manifest, self.width = fs, directory, manifest, width
        self.shards: list[ShardInfo] = manifest.split_shards(split)
        self.num_tokens = sum(s.num_tokens for s in self.shards)
        self.num_samples = split_samples(manifest, split, width, directory)
        self._starts = np.cumsum([0] + [s.num_tokens for s in self.shards]).tolist()
        self._dtype = token_dtype(manifest.vocab_size)
        self._cache = Path(cache_dir or DEFAULT_CACHE) / manifest.fingerprint
        self._arrays: dict[int, np.ndarray] = {}
        self._locks = [threading.Lock() for _ in self.shards]
        self._stop = threading.Event()
        if is_local(fs):  # cheap: a header read and a stat per shard, catches truncation up front
            for k in range(len(self.shards)):
                self._array(k)
        else:
            threading.Thread(target=self._read_ahead, name="hope-data-cache", daemon=True).start()

    def _read_ahead(self) -> None:
        for k in range(len(self.shards)):
            if self._stop.is_set():
                return
            try:
                self._array(k)
            except DataError:
                return  # the batch that needs this shard raises the same error in the trainer's thread

    def close(self) -> None:
        self._stop.set()

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
        local = path if is_local(self.fs) else self._cached_copy(shard, path)
        try:
            size = os.path.getsize(local)
            with open(local, "rb") as f:
                header = decode_header(f.read(HEADER_SIZE), path)
        except FileNotFoundError as exc:
            raise DataError(f"{path}: shard listed in the manifest is missing") from exc
        expected = HEADER_SIZE + self._dtype.itemsize * shard.num_tokens
        if size < expected:
            raise DataError(f"{path}: truncated shard, {size} bytes, the manifest expects {expected}")
        if size != expected or header.num_tokens != shard.num_tokens or header.itemsize != self._dtype.itemsize:
            raise DataError(f"{path}: shard does not match the manifest (header: {header.num_tokens} tokens "
                            f"of {header.itemsize} bytes, {size} bytes on disk; manifest: {shard.num_tokens} "
                            f"tokens, {expected} bytes)")
        if shard.num_tokens == 0:
            return np.zeros(0, self._dtype)
        return np.memmap(local, dtype=self._dtype, mode="r", offset=HEADER_SIZE, shape=(shard.num_tokens,))

    def _cached_copy(self, shard: ShardInfo, remote_path: str) -> str:
        local = self._cache / shard.name
        if local.exists():
            return str(local)
        self._cache.mkdir(parents=True, exist_ok=True)
        # The ranks of a node share the cache: one downloads a shard, the others wait for it.
        with open(self._cache / f".{shard.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not local.exists():
                self._download(shard, remote_path, local)
        return str(local)

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
