"""`hope-export`: a trainer checkpoint -> a standalone Hugging Face folder (docs/EXPORT.md).

    hope-export RUN_DIR_OR_CHECKPOINT OUTPUT_DIR [--dtype bf16|fp32] [--push-to-hub ORG/NAME ...]

The folder holds config.json (with auto_map), safetensors weights (sharded past --max-shard-size),
generation_config.json, the tokenizer converted from the run's SentencePiece model, a model card
(README.md) with the training metadata, and HOPE's modeling code, so that
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) works without this project.

What it reads, checkpoint metadata and weights, is train/export_source.py; the tokenizer,
train/export_tokenizer.py. The folder is built under a temporary name and renamed into place: a crash never leaves half of one.
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
from pathlib import Path

import torch
import yaml

import hope
from hope import HopeForCausalLM

from .checkpoint import LATEST, fsync_tree, tag_for, write_atomic
from .export_source import CheckpointInfo, ExportError, load_model, read_checkpoint
from .export_tokenizer import find_tokenizer, recorded_datasets, search_roots, tokenizer_for_run

MODELING_FILES = ("config.py", "layers.py", "memory.py", "chunk_grad.py", "triton_chunk.py", "projection_step.py",
                  "triton_projection.py", "memory_pass.py", "titans.py", "modeling_hope.py")
AUTO_MAP = {
    "AutoConfig": "config.HopeConfig",
    "AutoModel": "modeling_hope.HopeModel",
    "AutoModelForCausalLM": "modeling_hope.HopeForCausalLM",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # as huggingface_hub counts them


# ---------------------------------------------------------------------- model card
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
