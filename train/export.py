"""`hope-export`: a trainer checkpoint -> a standalone Hugging Face folder (docs/EXPORT.md).

    hope-export RUN_DIR_OR_CHECKPOINT OUTPUT_DIR [--dtype bf16|fp32] [--push-to-hub ORG/NAME ...]

The folder holds config.json (with auto_map), safetensors weights (sharded past --max-shard-size),
generation_config.json, the tokenizer converted from the run's SentencePiece model, a model card
(README.md) with the training metadata, and HOPE's modeling code, so that
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) works without this project.

Weights come from the DeepSpeed checkpoint of any ZeRO stage and world size through
deepspeed.utils.zero_to_fp32 (stage 0 checkpoints hold the whole module in one file).
The folder is built under a temporary name and renamed into place: a crash never leaves half of one.
OUTPUT_DIR is written only when it does not exist, is empty, or is a previous export (is_export_folder);
anything else there, and any OUTPUT_DIR overlapping the run being exported, is refused before any work.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import hope
from hope import HopeConfig, HopeForCausalLM
from hope.config import POSITIVE_INT_FIELDS, check_positive_ints

from .checkpoint import LATEST, fsync_tree, tag_for, write_atomic

MODELING_FILES = ("config.py", "layers.py", "memory.py", "chunk_grad.py", "triton_chunk.py", "projection_step.py",
                  "triton_projection.py", "memory_pass.py", "titans.py", "modeling_hope.py")
AUTO_MAP = {
    "AutoConfig": "config.HopeConfig",
    "AutoModel": "modeling_hope.HopeModel",
    "AutoModelForCausalLM": "modeling_hope.HopeForCausalLM",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # as huggingface_hub counts them


class ExportError(ValueError):
    """A checkpoint or an export option is unusable; the message names the file or value."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (YAML, torch and pydantic-style errors span several)."""
    return " ".join(str(error).split()) or type(error).__name__


@dataclass
class CheckpointInfo:
    path: Path  # RUN_DIR/checkpoints/step-XXXXXXXX
    run_dir: Path | None
    step: int
    tokens_seen: int
    world_size: int
    run_config: dict
    model_config: HopeConfig
    data_state: dict = field(default_factory=dict)  # the loader's state: it records each dataset's absolute path


# ---------------------------------------------------------------------- reading a checkpoint
def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its `latest` checkpoint) or one checkpoint directory."""
    path = Path(path)
    if (path / "model_config.json").is_file():
        return path
    latest = path / "checkpoints" / LATEST
    if latest.is_file():
        try:
            checkpoint = path / "checkpoints" / latest.read_text().strip()
        except (OSError, ValueError) as error:  # ValueError: not UTF-8
            raise ExportError(f"{latest}: not readable ({one_line(error)})") from None
        if not (checkpoint / "model_config.json").is_file():
            raise ExportError(f"{latest} names {checkpoint.name!r}, which holds no model_config.json")
        return checkpoint
    raise ExportError(f"{path}: expected a run directory (with checkpoints/latest) or a checkpoint "
                      "directory (with model_config.json)")


def read_json_object(path: Path) -> dict:
    """One of a checkpoint's JSON metadata files, which must hold an object."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise ExportError(f"{path}: not readable JSON ({one_line(error)})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_run_config(path: Path) -> dict:
    """config.yaml, the run's resolved config ({} when the checkpoint has none)."""
    if not path.is_file():
        return {}
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ExportError(f"{path}: not readable YAML ({one_line(error)})") from None
    if not isinstance(value, (dict, type(None))):
        raise ExportError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value or {}


def read_count(state: dict, key: str, path: Path, default: int, least: int) -> int:
    """An integer field of trainer_state.json."""
    value = state.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ExportError(f"{path}: {key} is {value!r}, expected an integer >= {least}")
    return value


def read_model_config(path: Path) -> HopeConfig:
    fields = read_json_object(path)
    try:
        # the sizes first: building the config divides by num_heads
        check_positive_ints({key: fields.get(key, getattr(HopeConfig(), key)) for key in POSITIVE_INT_FIELDS})
        return HopeConfig(**fields).validate()
    except Exception as error:  # TypeError, ModelConfigError, or huggingface_hub's StrictDataclassError
        raise ExportError(f"{path}: not a valid model configuration: {one_line(error)}") from None


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    checkpoint = resolve_checkpoint(path)
    state_path = checkpoint / "trainer_state.json"
    state = read_json_object(state_path)
    data_state = state.get("data_state")
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    return CheckpointInfo(checkpoint, run_dir,
                          read_count(state, "step", state_path, 0, 0),
                          read_count(state, "tokens_seen", state_path, 0, 0),
                          read_count(state, "world_size", state_path, 1, 1),
                          read_run_config(checkpoint / "config.yaml"),
                          read_model_config(checkpoint / "model_config.json"),
                          data_state if isinstance(data_state, dict) else {})


def check_weight_files(checkpoint: Path, world_size: int) -> None:
    """Name a missing, empty or truncated weights file before DeepSpeed or torch.load fails on it
    with a traceback that does not say which file. Cheap: reads each zip's index, not its data."""
    files = sorted(checkpoint.glob("*_model_states.pt")) + sorted(checkpoint.glob("*_optim_states.pt"))
    # ZeRO's files: [bf16_]zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt, one of each kind per rank
    ranked = [re.fullmatch(r"((?:bf16_)?zero_pp_rank_)(\d+)(_mp_rank_\d+_(?:model|optim)_states\.pt)", f.name)
              for f in files]
    for kind in {(m.group(1), m.group(3)) for m in ranked if m}:
        ranks = {int(m.group(2)) for m in ranked if m and (m.group(1), m.group(3)) == kind}
        count = max(world_size, max(ranks) + 1)
        for rank in range(count):
            if rank not in ranks:
                raise ExportError(f"{checkpoint / f'{kind[0]}{rank}{kind[1]}'}: missing (expected one such file "
                                  f"for each of ranks 0-{count - 1})")
    for file in files:
        if file.stat().st_size == 0:
            raise ExportError(f"{file}: empty file (the save did not complete)")
        with open(file, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format; older pickles are left to torch.load
        if is_zip and not zipfile.is_zipfile(file):
            raise ExportError(f"{file}: truncated or corrupt (its zip index is unreadable)")


def consolidated_state_dict(checkpoint: Path, world_size: int = 1) -> dict[str, torch.Tensor]:
    """fp32 weights by name, from a DeepSpeed checkpoint of any ZeRO stage saved on any world size."""
    check_weight_files(checkpoint, world_size)
    if any(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        except MemoryError:
            raise  # not a bad file: too little host memory
        except Exception as error:  # zero_to_fp32 and torch.load raise many kinds; one line is what we can say
            raise ExportError(f"{checkpoint}: cannot consolidate the ZeRO checkpoint "
                              f"({type(error).__name__}: {one_line(error)})") from None
    model_file = checkpoint / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ExportError(f"{checkpoint}: no DeepSpeed model states (expected mp_rank_00_model_states.pt)")
    try:
        module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
        return {name: tensor.float() for name, tensor in module.items()}
    except MemoryError:
        raise
    except Exception as error:  # a corrupt file: RuntimeError, EOFError, UnpicklingError, KeyError ...
        raise ExportError(f"{model_file}: not a readable DeepSpeed model states file "
                          f"({type(error).__name__}: {one_line(error)})") from None


def check_weights_fit(model: HopeForCausalLM, weights: dict[str, torch.Tensor], config_path: Path) -> None:
    """One line naming the tensors that differ, instead of load_state_dict's many-line error."""
    expected = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(weights) - tied)
    unexpected = sorted(set(weights) - set(expected))
    reshaped = [f"{name} is {list(weights[name].shape)} in the checkpoint, {list(expected[name].shape)} by the config"
                for name in expected if name in weights and weights[name].shape != expected[name].shape]
    problems = [f"missing {missing[:3]}"] if missing else []
    problems += [f"unexpected {unexpected[:3]}"] if unexpected else []
    problems += reshaped[:2]
    if problems:
        raise ExportError(f"{config_path} does not fit the checkpoint's weights: {'; '.join(problems)}")


def load_model(info: CheckpointInfo) -> HopeForCausalLM:
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: leave the caller's RNG alone
        model = HopeForCausalLM(info.model_config).float().eval()
    weights = consolidated_state_dict(info.path, info.world_size)
    check_weights_fit(model, weights, info.path / "model_config.json")
    model.load_state_dict(weights, strict=False)  # strict=False: a tied lm_head is not saved
    model.tie_weights()
    return model


# ---------------------------------------------------------------------- tokenizer and model card
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


def final_validation_loss(run_dir: Path | None, step: int) -> float | None:
    """The last val_loss logged at or before `step` in RUN_DIR/metrics.jsonl."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return None
    loss = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if "val_loss" in record and int(record.get("step", 0)) <= step:
            loss = float(record["val_loss"])
    return loss


def model_card(info: CheckpointInfo, name: str, dtype: str, val_loss: float | None) -> str:
    cfg = info.model_config
    params = sum(p.numel() for p in HopeForCausalLM(cfg).parameters()) if cfg.hidden_size <= 256 else None
    kind = "HOPE (self-modifying Titans + CMS)" if cfg.mixer == "titans" else "Transformer++ baseline"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [hope, nested-learning]", "---",
        f"# {name}", "",
        f"{kind} trained with hope-train, exported from `{info.path.name}`.", "",
        "| | |", "|---|---|",
        f"| optimizer steps | {info.step} |",
        f"| tokens seen | {info.tokens_seen} |",
        f"| final validation loss | {'n/a' if val_loss is None else f'{val_loss:.4f}'} |",
        f"| layers / hidden / heads | {cfg.num_layers} / {cfg.hidden_size} / {cfg.num_heads} |",
        f"| mixer | {cfg.mixer} |", f"| weights dtype | {dtype} |",
    ]
    if params:
        lines.append(f"| parameters | {params} |")
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
              "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)", "```", "",
              "Training run configuration:", "", "```yaml", yaml.safe_dump(info.run_config, sort_keys=False).rstrip(),
              "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- where the folder goes
def shard_size(value: str | int) -> int:
    """--max-shard-size in bytes: a number with a unit, e.g. 500MB or 2.5GB (units of 1000, as the Hub's)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", str(value), re.IGNORECASE)
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]) if match else 0
    if size < 1:
        raise ExportError(f"--max-shard-size {value!r}: expected a positive size with a unit, such as 500MB or 5GB "
                          f"(units {', '.join(SIZE_UNITS)})")
    return size


def is_export_folder(path: Path) -> bool:
    """A folder written by hope-export: config.json of a HOPE model and our training_state.json beside it."""
    try:
        config = json.loads((path / "config.json").read_text())
        state = json.loads((path / "training_state.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("model_type") == "hope"
            and isinstance(state, dict) and {"step", "checkpoint"} <= set(state))


def check_output_dir(output: Path, protected: Path) -> None:
    """Refuse an OUTPUT_DIR whose replacement would destroy anything but a previous export.

    The export replaces OUTPUT_DIR as a whole, so it may only be new, an empty directory, or a
    folder this exporter wrote; and it must not overlap `protected` (the run or checkpoint read)."""
    out, kept = output.resolve(), protected.resolve()
    for overlaps, relation in ((out == kept, "is the very directory"), (out.is_relative_to(kept), "is inside"),
                               (kept.is_relative_to(out), "contains")):
        if overlaps:
            raise ExportError(f"{output}: {relation} {protected}, which is being exported; "
                              "choose an OUTPUT_DIR outside it")
    if output.is_symlink():
        raise ExportError(f"{output}: is a symbolic link; give the directory it points to, or a new path")
    if not output.exists():
        return
    if not output.is_dir():
        raise ExportError(f"{output}: exists and is not a directory; choose a new or empty OUTPUT_DIR")
    if any(output.iterdir()) and not is_export_folder(output):
        raise ExportError(f"{output}: a directory that is neither empty nor a hope-export folder (no config.json of a "
                          "HOPE model with training_state.json); choose a new or empty OUTPUT_DIR")


def protected_path(info: CheckpointInfo) -> Path:
    """What OUTPUT_DIR must stay clear of: the run directory, or the checkpoint when it is not in a run."""
    return info.run_dir if info.run_dir is not None else info.path


# ---------------------------------------------------------------------- writing a folder
def write_folder(model: HopeForCausalLM, info: CheckpointInfo, output: Path, dtype: str = "fp32",
                 max_shard_size: str | int = "5GB", tokenizer_roots: list[Path] | None = None,
                 protected: Path | None = None) -> list[str]:
    """Write the export to `output` (atomically); returns warnings (e.g. no tokenizer found).

    `protected` is what `output` must not overlap (default: protected_path(info))."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    max_shard_size = shard_size(max_shard_size)
    output = Path(output)
    protected = protected or protected_path(info)
    check_output_dir(output, protected)
    warnings = []
    place = Path(os.path.abspath(output))  # a name to build the temporary sibling from, even for "."
    tmp = place.with_name(f".{place.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        roots = (tokenizer_roots or []) + search_roots(info)
        tokenizer, why = tokenizer_for_run(info.run_config, roots, recorded_datasets(info))
        if tokenizer is None:
            warnings.append(f"no tokenizer exported: {why}")
        else:
            tokenizer.save_pretrained(tmp)
            config_path = tmp / "tokenizer_config.json"  # the class name transformers 4 knows too
            tokenizer_config = json.loads(config_path.read_text())
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_path.write_text(json.dumps(tokenizer_config, indent=2))
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(model.config, key) is None:
                    setattr(model.config, key, getattr(tokenizer, key))
        model = model.to(DTYPES[dtype])
        model.config.auto_map = dict(AUTO_MAP)
        model.config.architectures = ["HopeForCausalLM"]
        model.generation_config.bos_token_id = model.config.bos_token_id
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.pad_token_id
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        source = Path(hope.__file__).parent
        for name in MODELING_FILES:
            shutil.copyfile(source / name, tmp / name)
        val_loss = final_validation_loss(info.run_dir, info.step)
        (tmp / "README.md").write_text(model_card(info, place.name, dtype, val_loss))
        (tmp / "training_state.json").write_text(json.dumps(
            {"step": info.step, "tokens_seen": info.tokens_seen, "final_val_loss": val_loss,
             "checkpoint": str(info.path), "world_size": info.world_size}, indent=2))
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; the folder is meant to be shared
        fsync_tree(tmp)
        check_output_dir(output, protected)  # again: something may have appeared there during the export
        _replace_dir(tmp, place)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return warnings


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`, which check_output_dir allowed: absent, empty, or a previous export."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint: str | Path, output: str | Path, dtype: str = "fp32",
                      max_shard_size: str | int = "5GB", protected: Path | None = None) -> tuple[Path, list[str]]:
    """Export one checkpoint to `output`. Bad options, metadata or OUTPUT_DIR are refused before the
    weights are read; `protected` as in write_folder."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    shard_size(max_shard_size)
    info = read_checkpoint(checkpoint)
    protected = protected or protected_path(info)
    check_output_dir(Path(output), protected)
    find_tokenizer(info.run_config, search_roots(info), recorded_datasets(info))  # a changed tokenizer: refused now
    model = load_model(info)
    warnings = write_folder(model, info, Path(output), dtype, max_shard_size, protected=protected)
    return Path(os.path.abspath(output)), warnings  # absolute: "." names a folder that was replaced


# ---------------------------------------------------------------------- during training
def export_step(run_dir: str | Path, checkpoint_dir: str | Path, step: int, dtype: str = "bf16",
                push_to_hub: str | None = None) -> Path:
    """RUN_DIR/hf/step-XXXXXXXX from a complete checkpoint, then RUN_DIR/hf/latest; optionally push
    the folder to the branch step-XXXXXXXX of `push_to_hub` (ORG/NAME, private when created)."""
    tag = tag_for(step)
    out_root = Path(run_dir) / "hf"
    out_root.mkdir(parents=True, exist_ok=True)
    # RUN_DIR/hf/ is inside the run by design: only the checkpoint itself must stay clear of the folder
    folder, warnings = export_checkpoint(checkpoint_dir, out_root / tag, dtype, protected=Path(checkpoint_dir))
    write_atomic(out_root / LATEST, tag.encode())
    for warning in warnings:
        print(f"[hf-export] step {step}: {warning}", file=sys.stderr)
    if push_to_hub:
        from .hub import push_folder

        push_folder(folder, push_to_hub, revision=tag, private=True)
    return folder


def export_during_training(run_dir: str | Path, checkpoint_dir: str | Path, step: int, dtype: str = "bf16",
                           push_to_hub: str | None = None) -> subprocess.Popen:
    """Rank 0, once a checkpoint is complete: run export_step in a separate process and return at once.

    A process, not a thread: consolidation and writing do not hold the trainer's GIL, cannot touch
    its RNG or CUDA memory (the child sees no GPU), and a failure cannot kill training. Its output goes
    to RUN_DIR/hf/export.log. Wait for the returned Popen before the trainer exits.
    """
    log_dir = Path(run_dir) / "hf"
    log_dir.mkdir(parents=True, exist_ok=True)
    args = json.dumps([str(run_dir), str(checkpoint_dir), step, dtype, push_to_hub])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    with open(log_dir / "export.log", "a") as log:
        return subprocess.Popen([sys.executable, "-c", "import json, sys; from train.export import export_step; "
                                 "export_step(*json.loads(sys.argv[1]))", args],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())


# ---------------------------------------------------------------------- CLI
def _shard_size_argument(text: str) -> int:
    try:
        return shard_size(text)
    except ExportError as error:  # argparse prints this message after the usage line and exits with 2
        raise argparse.ArgumentTypeError(str(error).removeprefix("--max-shard-size ")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hope-export", description="Export a hope-train checkpoint as a "
                                     "Hugging Face model folder (and optionally push it to the Hub).")
    parser.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("output_dir")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--max-shard-size", default="5GB", type=_shard_size_argument,
                        help="safetensors shard limit (e.g. 2GB, 500MB; units KB, MB, GB, TB of 1000 bytes)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .hub import HubError, push_folder

    args = build_parser().parse_args(argv)
    try:
        folder, warnings = export_checkpoint(args.checkpoint, args.output_dir, args.dtype, args.max_shard_size)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"exported {folder}")
        if args.push_to_hub:
            url = push_folder(folder, args.push_to_hub, revision=args.revision, private=args.private)
            print(f"pushed to {url}")
    except (ExportError, HubError, OSError) as error:  # OSError: e.g. a full disk, or OUT not writable
        print(f"hope-export: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
