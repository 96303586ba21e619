"""The on-disk format: binary token shards and the manifest that lists them.

A shard is a 64-byte little-endian header followed by the tokens as a flat array:

    offset  size  field
    0       8     magic  b"HOPETOKS"
    8       4     format version (1)
    12      4     bytes per token: 2 (uint16, vocabulary <= 65536) or 4 (uint32)
    16      4     vocabulary size of the tokenizer that wrote it
    20      4     reserved (0)
    24      8     number of tokens
    32      8     number of documents (each one ends with EOS)
    40      24    zero padding

The manifest (manifest.json beside the shards) records the tokenizer (fingerprint, vocabulary
size, BOS/EOS/PAD ids), and for every shard its split, token count, byte size and SHA-256.
Its fingerprint is a hash of all that (not of paths), so a moved dataset keeps its fingerprint
and a changed one does not.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field

import numpy as np

from data_pipeline.errors import DataError

MAGIC = b"HOPETOKS"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIIIQQ24x")
assert _HEADER.size == HEADER_SIZE
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits, uint32 otherwise."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardHeader:
    itemsize: int
    vocab_size: int
    num_tokens: int
    num_docs: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.itemsize == 2 else np.dtype(np.uint32)

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + self.itemsize * self.num_tokens


def encode_shard(tokens: np.ndarray, vocab_size: int, num_docs: int) -> bytes:
    """Header plus payload, ready to write."""
    dtype = token_dtype(vocab_size)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, vocab_size, 0, len(tokens), num_docs)
    return header + np.ascontiguousarray(tokens, dtype=dtype).tobytes()


def decode_header(raw: bytes, name: str) -> ShardHeader:
    """Parse and check a shard header; `name` is only used in error messages."""
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{name}: truncated shard, {len(raw)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, itemsize, vocab_size, _, num_tokens, num_docs = _HEADER.unpack(raw[:HEADER_SIZE])
    if magic != MAGIC:
        raise DataError(f"{name}: not a hope-data shard (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise DataError(f"{name}: shard format version {version}, this code reads version {FORMAT_VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{name}: corrupt header, {itemsize} bytes per token (expected 2 or 4)")
    return ShardHeader(itemsize, vocab_size, num_tokens, num_docs)


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # "sentencepiece" or "huggingface"
    path: str
    fingerprint: str  # SHA-256 of the tokenizer file(s)
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the dataset directory
    split: str
    num_tokens: int
    num_docs: int
    num_bytes: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: TokenizerInfo
    validation_fraction: float
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def fingerprint(self) -> str:
        """Hash of everything that decides the token stream (not the tokenizer's path)."""
        tok = asdict(self.tokenizer)
        tok.pop("path")
        content = {"format_version": self.format_version, "tokenizer": tok,
                   "shards": [[s.name, s.split, s.num_tokens, s.sha256] for s in self.shards]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        body = {"format": "hope-data-manifest", "format_version": self.format_version,
                "fingerprint": self.fingerprint, "tokenizer": asdict(self.tokenizer),
                "validation_fraction": self.validation_fraction,
                "num_tokens": {split: sum(s.num_tokens for s in self.split_shards(split)) for split in SPLITS},
                "shards": [asdict(s) for s in self.shards]}
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, name: str) -> "Manifest":
        try:
            body = json.loads(text)
            if body.get("format") != "hope-data-manifest":
                raise DataError(f"{name}: not a hope-data manifest (key 'format' is {body.get('format')!r})")
            manifest = cls(tokenizer=TokenizerInfo(**body["tokenizer"]),
                           validation_fraction=float(body["validation_fraction"]),
                           shards=[ShardInfo(**s) for s in body["shards"]],
                           format_version=int(body["format_version"]))
        except DataError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{name}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise DataError(f"{name}: manifest format version {manifest.format_version}, "
                            f"this code reads version {FORMAT_VERSION}")
        recorded = body.get("fingerprint")
        if recorded != manifest.fingerprint:
            raise DataError(f"{name}: manifest was edited, its fingerprint {recorded!r} does not match "
                            f"its content ({manifest.fingerprint})")
        for s in manifest.shards:
            if s.split not in SPLITS:
                raise DataError(f"{name}: shard {s.name} has split {s.split!r}, expected one of {SPLITS}")
        return manifest


def read_manifest(location: str) -> tuple[object, str, Manifest]:
    """(filesystem, dataset directory, manifest) for a dataset directory or its manifest.json."""
    from data_pipeline.storage import filesystem, join, read_bytes

    fs, path = filesystem(location)
    if path.endswith(".json") and not fs.isdir(path):
        directory, manifest_path = fs._parent(path), path
    else:
        directory, manifest_path = path.rstrip("/"), join(path, MANIFEST_NAME)
    if not fs.exists(manifest_path):
        raise DataError(f"{location}: no {MANIFEST_NAME} found (is this a `hope-data tokenize` output directory?)")
    return fs, directory, Manifest.from_json(read_bytes(fs, manifest_path, "manifest"), manifest_path)
