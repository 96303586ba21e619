"""`hope-data verify`: check every shard against the manifest (header, size, checksum)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from data_pipeline.errors import DataError
from data_pipeline.shards import HEADER_SIZE, Manifest, decode_header, read_manifest, token_dtype
from data_pipeline.storage import join

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
    itemsize = token_dtype(manifest.vocab_size).itemsize
    for shard in manifest.shards:
        path = join(directory, shard.name)
        report.checked += 1
        try:
            _verify_shard(fs, path, shard, itemsize, manifest.vocab_size)
        except DataError as exc:
            report.problems.append(str(exc))
    return report


def _verify_shard(fs, path: str, shard, itemsize: int, vocab_size: int) -> None:
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
    if size != shard.num_bytes:
        raise DataError(f"{path}: {'truncated' if size < shard.num_bytes else 'oversized'} shard, "
                        f"{size} bytes, the manifest expects {shard.num_bytes}")
    if (header.num_tokens, header.itemsize, header.vocab_size) != (shard.num_tokens, itemsize, vocab_size):
        raise DataError(f"{path}: header says {header.num_tokens} tokens of {header.itemsize} bytes, vocabulary "
                        f"{header.vocab_size}; the manifest says {shard.num_tokens} tokens of {itemsize} "
                        f"bytes, vocabulary {vocab_size}")
    if digest.hexdigest() != shard.sha256:
        raise DataError(f"{path}: checksum mismatch (sha256 {digest.hexdigest()[:16]}..., manifest "
                        f"{shard.sha256[:16]}...): the shard is corrupt")
