"""`hope-data tokenize`: documents -> binary shards + manifest.json, in parallel, resumable.

The document stream (inputs in the order given, files sorted) is cut into chunks of about
`shard_chars` characters. Chunk k becomes shards `train-0000k.bin` and `validation-0000k.bin`
(each document goes to one split by a hash of its text, so the split does not depend on order or
on the number of workers). Tokens are EOS-terminated documents laid end to end.

Resume: when both shards of a chunk are written (temp name, fsync, rename), a small record
`.progress/chunk-0000k.json` is written. A rerun with the same settings skips the chunks that have
a record (it reads their text but does not tokenize it again) and redoes any other chunk, so a
half-written shard is simply replaced. The manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.shards import MANIFEST_NAME, SPLITS, Manifest, ShardInfo, encode_shard
from data_pipeline.sources import iter_documents, resolve_inputs
from data_pipeline.storage import atomic_write_bytes, filesystem, join
from data_pipeline.tokenizer import Tokenizer

PROGRESS_DIR = ".progress"


@dataclass(frozen=True)
class TokenizeSettings:
    shard_chars: int = 256_000_000  # characters of text per chunk (~128 MB of uint16 tokens)
    validation_fraction: float = 0.005
    workers: int = os.cpu_count() or 1  # 0 = tokenize in this process
    text_field: str = "text"
    batch_chars: int = 1_000_000  # characters per task sent to a worker


@dataclass(frozen=True)
class TokenizeReport:
    num_docs: int
    num_tokens: int  # all tokens in the dataset, kept shards included
    tokenized_tokens: int  # tokens produced by this run
    seconds: float
    chunks_written: int
    chunks_kept: int
    manifest: Manifest

    @property
    def tokens_per_second(self) -> float:
        return self.tokenized_tokens / max(self.seconds, 1e-9)

    @property
    def validation_warning(self) -> str | None:
        """Why the validation split is empty although a validation fraction was asked for; else None.

        The split is by hash of each document's text alone (no document is moved to validation to
        fill it), so a small input can end up with none: the command line prints this as a warning.
        """
        fraction = self.manifest.validation_fraction
        if fraction == 0 or self.manifest.split_shards("validation"):
            return None
        return (f"the validation split is empty: none of the {self.num_docs:,} documents fell under "
                f"--validation-fraction {fraction:g} (each document goes to validation by a hash of its text, "
                f"about 1 in {1 / fraction:,.0f}); hope-train needs validation data: add documents or raise "
                "--validation-fraction")


def document_split(text: str, validation_fraction: float) -> str:
    """'validation' for a fixed pseudo-random fraction of documents, by hash of their text."""
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") / 2**64 < validation_fraction else "train"


# ---------------------------------------------------------------- worker side
_worker_tokenizer: Tokenizer | None = None
_worker_threads: int | None = None  # 1 in a worker process: the processes already fill the cores


def _init_worker(tokenizer_path: str, threads: int | None = 1) -> None:
    global _worker_tokenizer, _worker_threads
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if threads == 1 else "true"  # Hugging Face's thread pool
    _worker_tokenizer, _worker_threads = Tokenizer(tokenizer_path), threads


def _encode_batch(texts: list[str]) -> np.ndarray:
    """The documents' tokens, each followed by EOS, as one flat array."""
    tok = _worker_tokenizer
    pieces = []
    eos = np.array([tok.eos_id], dtype=np.uint32)
    for ids in tok.encode(texts, _worker_threads):
        pieces += [np.asarray(ids, dtype=np.uint32), eos]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)


# ---------------------------------------------------------------- main side
def _groups(docs: Iterable[str], min_chars: int) -> Iterator[list[str]]:
    """Consecutive documents grouped until each group holds at least `min_chars` characters
    (the last may hold fewer): shard-sized chunks on the main side, encode batches in workers."""
    group, size = [], 0
    for doc in docs:
        group.append(doc)
        size += len(doc)
        if size >= min_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


class _Progress:
    """The `.progress/` folder: the run's settings and one record per finished chunk."""

    def __init__(self, fs, out: str, settings_key: dict):
        self.fs, self.dir = fs, join(out, PROGRESS_DIR)
        settings_path = join(self.dir, "settings.json")
        if fs.exists(settings_path):
            previous = json.loads(fs.cat_file(settings_path))
            changed = [k for k in settings_key if previous.get(k) != settings_key[k]]
            if changed:
                k = changed[0]
                raise DataError(f"{out}: holds a tokenization made with other settings ({k}: "
                                f"{previous.get(k)!r}, now {settings_key[k]!r}); use a new --out directory")
        else:
            atomic_write_bytes(fs, settings_path, json.dumps(settings_key, indent=1).encode())

    def _path(self, chunk_id: int) -> str:
        return join(self.dir, f"chunk-{chunk_id:05d}.json")

    def finished(self, chunk_id: int) -> list[ShardInfo] | None:
        path = self._path(chunk_id)
        if not self.fs.exists(path):
            return None
        return [ShardInfo(**s) for s in json.loads(self.fs.cat_file(path))["shards"]]

    def mark_finished(self, chunk_id: int, shards: list[ShardInfo], num_docs: int) -> None:
        record = {"num_docs": num_docs, "shards": [asdict(s) for s in shards]}
        atomic_write_bytes(self.fs, self._path(chunk_id), json.dumps(record).encode())


def _encode_documents(docs: list[str], pool, settings: TokenizeSettings, bar) -> np.ndarray:
    """The documents' tokens (EOS after each), encoded in batches by the pool, in order.

    At most two batches per worker are in flight, so memory stays bounded however large the input.
    """
    if pool is None:
        pieces = [_encode_batch(batch) for batch in _groups(docs, settings.batch_chars)]
        bar.update(sum(map(len, pieces)))
        return np.concatenate(pieces)
    pending: deque = deque()
    pieces = []
    for batch in _groups(docs, settings.batch_chars):
        pending.append(pool.apply_async(_encode_batch, (batch,)))
        while len(pending) > 2 * settings.workers:
            pieces.append(pending.popleft().get())
            bar.update(len(pieces[-1]))
    while pending:
        pieces.append(pending.popleft().get())
        bar.update(len(pieces[-1]))
    return np.concatenate(pieces)


def _write_shard(fs, out: str, name: str, split: str, tokens: np.ndarray, num_docs: int, vocab_size: int) -> ShardInfo:
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise DataError(f"{name}: token id {int(tokens.max())} is outside the tokenizer's vocabulary of {vocab_size}")
    data = encode_shard(tokens, vocab_size, num_docs)
    atomic_write_bytes(fs, join(out, name), data)
    return ShardInfo(name, split, len(tokens), num_docs, len(data), hashlib.sha256(data).hexdigest())


def tokenize_to_shards(inputs: list[str], tokenizer_path: str, out: str,
                       settings: TokenizeSettings = TokenizeSettings(), progress: bool = True) -> TokenizeReport:
    """Tokenize INPUTs into shards under `out` (a local path or fsspec URL); returns a report."""
    from tqdm import tqdm

    if not 0.0 <= settings.validation_fraction < 1.0:
        raise DataError(f"--validation-fraction {settings.validation_fraction}: expected a value in [0, 1)")
    if settings.shard_chars < 1:
        raise DataError(f"shard_chars {settings.shard_chars}: expected at least 1 character per shard (--shard-mb)")
    if settings.workers < 0:
        raise DataError(f"--workers {settings.workers}: expected 0 (tokenize in this process) or more processes")
    tokenizer = Tokenizer(tokenizer_path)
    sources = resolve_inputs(inputs)
    fs, out_path = filesystem(out)
    fs.makedirs(out_path, exist_ok=True)
    for leftover in fs.glob(join(out_path, "*.tmp-*")):  # a write cut short by a crash
        fs.rm(leftover)
    key = {"tokenizer_fingerprint": tokenizer.fingerprint, "shard_chars": settings.shard_chars,
           "validation_fraction": settings.validation_fraction, "text_field": settings.text_field,
           "inputs": list(inputs)}
    record = _Progress(fs, out_path, key)

    pool = None
    if settings.workers > 0:
        import multiprocessing as mp

        # fork: workers start in milliseconds and need no importable __main__; the parent holds
        # no threads of its own at this point.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(settings.workers, _init_worker, (tokenizer.path,))
    else:  # in this process, with the tokenizer's own threads
        _init_worker(tokenizer.path, threads=None)
    bar = tqdm(unit="tok", unit_scale=True, disable=not progress, desc="tokenize")
    shards: dict[int, list[ShardInfo]] = {}
    num_docs = tokenized = written = kept = 0
    start = time.perf_counter()
    try:
        for chunk_id, chunk in enumerate(_groups(iter_documents(sources, settings.text_field), settings.shard_chars)):
            num_docs += len(chunk)
            done = record.finished(chunk_id)
            if done is not None:
                shards[chunk_id], kept = done, kept + 1
                continue
            by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
            for doc in chunk:
                by_split[document_split(doc, settings.validation_fraction)].append(doc)
            shards[chunk_id] = []
            for split, docs in by_split.items():
                if docs:
                    tokens = _encode_documents(docs, pool, settings, bar)
                    tokenized += len(tokens)
                    shards[chunk_id].append(_write_shard(fs, out_path, f"{split}-{chunk_id:05d}.bin", split, tokens,
                                                         len(docs), tokenizer.vocab_size))
            record.mark_finished(chunk_id, shards[chunk_id], len(chunk))
            written += 1
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - start
    if num_docs == 0:
        raise DataError(f"{' '.join(inputs)}: no documents found (every input is empty)")
    manifest = Manifest(tokenizer.info, settings.validation_fraction,
                        [s for chunk_id in sorted(shards) for s in shards[chunk_id]])
    atomic_write_bytes(fs, join(out_path, MANIFEST_NAME), manifest.to_json().encode())
    total = sum(s.num_tokens for s in manifest.shards)
    return TokenizeReport(num_docs, total, tokenized, seconds, written, kept, manifest)
