"""Input documents, in a fixed order, from files, globs, directories, fsspec URLs or HF datasets.

An INPUT is one of:
  * a local path or fsspec URL (file://, memory://, s3://, gs://, hf://...) to a file,
  * a directory (all files below it, sorted by path) or a glob (sorted matches),
  * `hfds:NAME_OR_DIR[:SPLIT]`: a Hugging Face dataset read with `datasets.load_dataset`
    (streaming), e.g. `hfds:HuggingFaceFW/fineweb-edu:train` or a local folder of parquet/json.
File formats by extension (a trailing .gz/.bz2/.xz/.zst is decompressed): .jsonl/.json (one JSON
object per line, text in --text-field), .parquet (the --text-field column); anything else is read
as UTF-8 text and the whole file is one document.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from data_pipeline.errors import DataError
from data_pipeline.storage import filesystem

HF_DATASET_PREFIX = "hfds:"
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass(frozen=True)
class Source:
    url: str  # an fsspec URL of one file, or an "hfds:" dataset spec
    fs: object | None = None  # the file's fsspec filesystem (None for a dataset)
    path: str = ""


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Expand every INPUT to its files (sorted); a missing one raises DataError."""
    if not inputs:
        raise DataError("no INPUT given: expected files, globs, directories or fsspec URLs")
    sources: list[Source] = []
    for spec in inputs:
        if spec.startswith(HF_DATASET_PREFIX):
            sources.append(Source(spec))
            continue
        fs, path = filesystem(spec)
        if any(ch in path for ch in "*?["):
            matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not matches:
                raise DataError(f"{spec}: the glob matches no file")
        elif fs.isdir(path):
            matches = sorted(p for p in fs.find(path) if not _hidden(p, path))
            if not matches:
                raise DataError(f"{spec}: the directory holds no file")
        elif fs.exists(path):
            matches = [path]
        else:
            raise DataError(f"{spec}: input not found")
        sources.extend(Source(fs.unstrip_protocol(p), fs, p) for p in matches)
    return sources


def _hidden(path: str, root: str) -> bool:
    return any(part.startswith(".") for part in path[len(root):].split("/") if part)


def iter_documents(sources: list[Source], text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of every source, in order."""
    for source in sources:
        if source.fs is None:
            yield from _dataset_documents(source.url, text_field)
            continue
        name = source.path
        for ext in _COMPRESSIONS:
            name = name.removesuffix(ext)
        if name.endswith((".jsonl", ".json", ".ndjson")):
            docs = _jsonl_documents(source, text_field)
        elif name.endswith(".parquet"):
            docs = _parquet_documents(source, text_field)
        else:
            docs = _text_document(source)
        yield from (doc for doc in docs if doc)


def _open_text(source: Source):
    return source.fs.open(source.path, "rt", encoding="utf-8", errors="replace", compression="infer")


def _text_document(source: Source) -> Iterator[str]:
    with _open_text(source) as f:
        yield f.read()


def _jsonl_documents(source: Source, text_field: str) -> Iterator[str]:
    import json

    with _open_text(source) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{source.url}, line {line_number}: expected a JSON object with a "
                                f"string field {text_field!r} ({type(exc).__name__}: {exc})") from exc
            if not isinstance(text, str):
                raise DataError(f"{source.url}, line {line_number}: field {text_field!r} is "
                                f"{type(text).__name__}, expected a string")
            yield text


def _parquet_documents(source: Source, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with source.fs.open(source.path, "rb") as f:
        try:
            table = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            raise DataError(f"{source.url}: not a readable parquet file ({exc})") from exc
        if text_field not in table.schema_arrow.names:
            raise DataError(f"{source.url}: no column {text_field!r} (columns: {table.schema_arrow.names})")
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)


def _dataset_documents(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    name, _, split = spec[len(HF_DATASET_PREFIX):].partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train", streaming=True)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{spec}: cannot load this dataset ({exc})") from exc
    for record in dataset:
        if text_field not in record:
            raise DataError(f"{spec}: records have no field {text_field!r} (fields: {sorted(record)})")
        if record[text_field]:
            yield record[text_field]
