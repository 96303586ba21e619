"""The embedded default corpus: the Python standard library's own source, found on every machine.

`prepare_default_corpus` builds, once per cache directory, a BPE tokenizer and token shards from
a deterministic subset of the standard library's .py files (sorted by path, test suites left
out, up to `max_bytes` of text). Files are cut at top-level boundaries (two blank lines, PEP 8's
separator) into documents of a few KB, so the split by document hash gives a validation set
close to its nominal 5% instead of a handful of whole files. It takes a few seconds on 2 cores,
needs no download, and is safe when several processes call it at once: the first takes a file
lock and builds, the others wait on the lock and then find the finished manifest.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.shards import MANIFEST_NAME
from data_pipeline.storage import atomic_write_bytes, filesystem
from data_pipeline.tokenize import TokenizeSettings, tokenize_to_shards
from data_pipeline.tokenizer import train_sentencepiece

_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
TOKENIZER_TRAINING_BYTES = 2_000_000
DOCUMENT_CHARS = 3000  # documents are at least this long (except a file's last one)


@dataclass(frozen=True)
class PreparedData:
    data_dir: Path
    tokenizer_path: Path


def stdlib_files(max_bytes: int) -> list[Path]:
    """Sorted .py files of the standard library, up to max_bytes in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_DIRS & set(path.relative_to(root).parts[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            continue  # skip a file too big for what is left, keep filling with smaller ones
        chosen.append(path)
        total += size
    return chosen


def file_documents(text: str, min_chars: int = DOCUMENT_CHARS) -> list[str]:
    """A source file cut into documents at top-level boundaries; joined they give the file back."""
    docs, current = [], ""
    for piece in text.split("\n\n\n"):
        current = f"{current}\n\n\n{piece}" if current else piece
        if len(current) >= min_chars:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


def _write_corpus_jsonl(files: list[Path], path: Path) -> None:
    lines = [json.dumps({"text": doc, "source": file.name}) for file in files
             for doc in file_documents(file.read_text(encoding="utf-8", errors="replace"))]
    fs, local = filesystem(path)
    atomic_write_bytes(fs, local, ("\n".join(lines) + "\n").encode())


DEFAULT_MAX_BYTES = 6_000_000  # of standard-library source: the embedded corpus of `data.path: default`


def corpus_root(cache_dir: str | Path, vocab_size: int, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Where one configuration is built (the stdlib differs between Python versions)."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(cache_dir) / f"stdlib-{version}-v{vocab_size}-{max_bytes}"


def prepare_default_corpus(cache_dir: str | Path, vocab_size: int = 4096, max_bytes: int = DEFAULT_MAX_BYTES) -> PreparedData:
    """Tokenizer + shards of the standard library's source under cache_dir (built once)."""
    root = corpus_root(cache_dir, vocab_size, max_bytes)
    prepared = PreparedData(root / "shards", root / "tokenizer.model")
    if (prepared.data_dir / MANIFEST_NAME).exists():
        return prepared
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        if (prepared.data_dir / MANIFEST_NAME).exists():  # another process built it while we waited
            return prepared
        corpus = root / "corpus.jsonl"
        if not corpus.exists():
            _write_corpus_jsonl(stdlib_files(max_bytes), corpus)
        if not prepared.tokenizer_path.exists():
            documents = (json.loads(line)["text"] for line in corpus.open(encoding="utf-8"))
            train_sentencepiece(documents, prepared.tokenizer_path, vocab_size, max_bytes=TOKENIZER_TRAINING_BYTES)
        shutil.rmtree(prepared.data_dir, ignore_errors=True)  # an earlier build cut short: redo
        # In-process tokenization: a few MB, and the caller (the trainer) may hold threads that a
        # forked worker pool would not like.
        settings = TokenizeSettings(shard_chars=2_000_000, validation_fraction=0.05, workers=0)
        tokenize_to_shards([str(corpus)], str(prepared.tokenizer_path), str(prepared.data_dir),
                           settings, progress=False)
    return prepared
