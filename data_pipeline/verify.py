"""Checking a dataset's shards against its manifest.

`verify_dataset` (`hope-data verify`) reads every shard whole: header, size, checksum.
`check_shard_files` is the quick check a run makes before it starts (`hope-train --check`): header
and size only, as the loader checks local shards when it opens them, without reading the tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from data_pipeline.errors import DataError
from data_pipeline.shards import (HEADER_SIZE, Manifest, ShardHeader, ShardInfo, decode_header, read_manifest,
                                  token_dtype)
from data_pipeline.storage import is_local, join

_READ_BLOCK = 16 << 20


@dataclass
class VerifyReport:
    manifest: Manifest
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(location: str) -> VerifyReport:
    """Read every shard once; collect one message per damaged shard (nothing is modified)."""
    fs, directory, manifest = read_manifest(location)
    report = VerifyReport(manifest)
    for shard in manifest.shards:
        path = join(directory, shard.name)
        report.checked += 1
        try:
            _verify_shard(fs, path, shard, manifest)
        except DataError as exc:
            report.problems.append(str(exc))
    return report


def check_shard_files(fs, directory: str, manifest: Manifest) -> None:
    """DataError naming the first shard that is missing, truncated or oversized, or whose header
    disagrees with the manifest (and how many more are damaged); the arguments are what
    `shards.read_manifest` returns.

    Sizes come from one listing of the directory. Headers are read (64 bytes a shard) on a local
    disk only; a remote dataset's shards are checksum-checked when the loader copies them.
    """
    sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size")
             for entry in fs.ls(directory, detail=True)}
    read_headers = is_local(fs)
    problems = []
    for shard in manifest.shards:
        path = join(directory, shard.name)
        try:
            if shard.name not in sizes:
                raise DataError(f"{path}: shard listed in the manifest is missing")
            _check_size(path, sizes[shard.name], shard)
            if read_headers:
                with fs.open(path, "rb") as f:
                    _check_header(path, decode_header(f.read(HEADER_SIZE), path), shard, manifest)
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more damaged shards: `hope-data verify {directory}` lists them)" \
            if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def check_shard(path: str, size: int, header: ShardHeader, shard: ShardInfo, manifest: Manifest) -> None:
    """DataError if a shard file of `size` bytes with `header` is not what the manifest lists."""
    _check_size(path, size, shard)
    _check_header(path, header, shard, manifest)


def _check_size(path: str, size: int, shard: ShardInfo) -> None:
    if size != shard.num_bytes:
        raise DataError(f"{path}: {'truncated' if size < shard.num_bytes else 'oversized'} shard, "
                        f"{size} bytes, the manifest expects {shard.num_bytes}")


def _check_header(path: str, header: ShardHeader, shard: ShardInfo, manifest: Manifest) -> None:
    itemsize, vocab_size = token_dtype(manifest.vocab_size).itemsize, manifest.vocab_size
    if (header.num_tokens, header.itemsize, header.vocab_size) != (shard.num_tokens, itemsize, vocab_size):
        raise DataError(f"{path}: header says {header.num_tokens} tokens of {header.itemsize} bytes, vocabulary "
                        f"{header.vocab_size}; the manifest says {shard.num_tokens} tokens of {itemsize} "
                        f"bytes, vocabulary {vocab_size}")


def _verify_shard(fs, path: str, shard: ShardInfo, manifest: Manifest) -> None:
    if not fs.exists(path):
        raise DataError(f"{path}: shard listed in the manifest is missing")
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        header_bytes = f.read(HEADER_SIZE)
        digest.update(header_bytes)
        size += len(header_bytes)
        while block := f.read(_READ_BLOCK):
            digest.update(block)
            size += len(block)
    header = decode_header(header_bytes, path)
    check_shard(path, size, header, shard, manifest)
    if digest.hexdigest() != shard.sha256:
        raise DataError(f"{path}: checksum mismatch (sha256 {digest.hexdigest()[:16]}..., manifest "
                        f"{shard.sha256[:16]}...): the shard is corrupt")
