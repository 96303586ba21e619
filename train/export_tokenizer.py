"""The run's tokenizer, for hope-export: found through the dataset's manifest, which names it and
records its sha256 (a tokenizer changed since the data was tokenized is refused)."""
from __future__ import annotations

import json
from pathlib import Path

from .export_source import CheckpointInfo, ExportError, one_line


def data_location(run_config: dict) -> str:
    """The dataset directory whose manifest names the run's tokenizer."""
    from data_pipeline.corpus import corpus_root

    data = run_config.get("data", {})
    if data.get("mixture"):  # a mixture's datasets share one tokenizer (the loader refuses others): the first one's
        return str(next(iter(data["mixture"])))
    if data.get("path", "default") == "default":
        return str(corpus_root(data.get("cache_dir", ".cache/hope-data"), data.get("vocab_size", 4096)) / "shards")
    return str(data["path"])


def existing_paths(path: str | Path, roots: list[Path]) -> list[Path]:
    """`path` if absolute, else `path` under each root, then under the current directory: those that exist."""
    path = Path(path)
    candidates = [path] if path.is_absolute() else [root / path for root in roots] + [path]
    found, seen = [], set()
    for candidate in candidates:
        if candidate.exists() and candidate.resolve() not in seen:
            found.append(candidate)
            seen.add(candidate.resolve())
    return found


def tokenizer_file(path: Path) -> Path:
    """The file a tokenizer path means: a directory stands for its tokenizer.json (as data_pipeline reads it)."""
    return path / "tokenizer.json" if path.is_dir() else path


def file_digest(path: Path) -> str:
    """sha256 hex digest, as data_pipeline.tokenizer fingerprints a tokenizer."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_manifest(run_config: dict, search_roots: list[Path], datasets: list[str]) -> tuple[Path | None, str]:
    """(the manifest.json of the run's dataset, "") or (None, why not found). `datasets` are the absolute
    dataset paths the loader recorded, tried first; then the configured path under `search_roots`."""
    from data_pipeline.shards import MANIFEST_NAME

    location = data_location(run_config)
    name = location if location.endswith(".json") else f"{location.rstrip('/')}/{MANIFEST_NAME}"  # dataset or manifest
    manifests = [m for d in datasets for m in existing_paths(Path(d) / MANIFEST_NAME, [])]
    if "://" not in location:  # a remote dataset's manifest is not fetched
        manifests += existing_paths(name, search_roots)
    if manifests:
        return manifests[0], ""
    if "://" in name:
        return None, f"{name}: a remote dataset (the exporter reads only local files)"
    where = "" if Path(name).is_absolute() else f" (looked under {', '.join(map(str, search_roots))})"
    return None, f"{name} not found{where}"


def find_tokenizer(run_config: dict, search_roots: list[Path],
                   datasets: list[str] | None = None) -> tuple[Path | None, str | None]:
    """(the run's tokenizer file, None) or (None, why not found).

    The dataset's manifest.json names the tokenizer and records its sha256; a relative tokenizer path
    is tried under `search_roots` and under the dataset's own parents. When files exist but none has
    the recorded digest, the tokenizer changed since the data was tokenized: an ExportError, since
    exporting it would ship a tokenizer the model was not trained with."""
    manifest, why = find_manifest(run_config, search_roots, datasets or [])
    if manifest is None:
        data = run_config.get("data", {})
        if data.get("path", "default") == "default" and not data.get("mixture"):
            # the default corpus with its shards deleted: the tokenizer.model beside them, unchecked
            found = existing_paths(Path(data_location(run_config)).parent / "tokenizer.model", search_roots)
            if found:
                return found[0], None
        return None, why
    try:
        recorded = json.loads(manifest.read_text())["tokenizer"]
        path, expected = recorded["path"], recorded.get("fingerprint")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{manifest}: unreadable manifest ({type(error).__name__}: {one_line(error)})"
    roots = search_roots + [manifest.parent, *manifest.resolve().parents]
    candidates = [c for c in existing_paths(path, roots) if tokenizer_file(c).is_file()]
    if not candidates:
        return None, f"tokenizer not found ({manifest} names {path})"
    if not isinstance(expected, str) or not expected:  # a manifest without a digest: nothing to check against
        return candidates[0], None
    for candidate in candidates:
        if file_digest(tokenizer_file(candidate)).startswith(expected):  # the manifest keeps a prefix
            return candidate, None
    actual = file_digest(tokenizer_file(candidates[0]))[:len(expected)]
    raise ExportError(f"{tokenizer_file(candidates[0])}: sha256 {actual}, but {manifest} records {expected}: "
                      "the tokenizer changed after the data was tokenized; restore the original file")


def tokenizer_for_run(run_config: dict, search_roots: list[Path], datasets: list[str] | None = None):
    """The run's tokenizer in Hugging Face form, or None with a reason when it cannot be found."""
    from data_pipeline.tokenizer import Tokenizer

    from .hf_tokenizer import hf_tokenizer

    found, why = find_tokenizer(run_config, search_roots, datasets)
    if found is None:
        return None, why
    if tokenizer_file(found).suffix == ".json":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_file(found).parent), None
    try:
        tok = Tokenizer(found)
        return hf_tokenizer(found, tok.bos_id, tok.eos_id, tok.pad_id), None
    except ValueError as error:  # e.g. a unigram model (or an unreadable one): the weights are still worth exporting
        return None, one_line(error)


def search_roots(info: CheckpointInfo) -> list[Path]:
    """Where a relative data path of the run may start: the current directory, then the run directory
    and each of its parents (hope-train usually runs in a folder above its run directories)."""
    roots = [Path.cwd()]
    if info.run_dir is not None:
        run_dir = info.run_dir.resolve()
        roots += [run_dir, *run_dir.parents]
    return roots


def recorded_datasets(info: CheckpointInfo) -> list[str]:
    """The absolute dataset paths in trainer_state.json's loader state (data_state.reads)."""
    reads = info.data_state.get("reads")
    return [r["dataset"] for r in reads if isinstance(r, dict) and isinstance(r.get("dataset"), str)
            and "://" not in r["dataset"]] if isinstance(reads, list) else []
