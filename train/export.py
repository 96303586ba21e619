"""`hope-export`: a trainer checkpoint -> a standalone Hugging Face folder (docs/EXPORT.md).

    hope-export RUN_DIR_OR_CHECKPOINT OUTPUT_DIR [--dtype bf16|fp32] [--push-to-hub ORG/NAME ...]

The folder holds config.json (with auto_map), safetensors weights (sharded past --max-shard-size),
generation_config.json, the tokenizer converted from the run's SentencePiece model, a model card
(README.md) with the training metadata, and HOPE's modeling code, so that
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) works without this project.

Weights come from the DeepSpeed checkpoint of any ZeRO stage and world size through
deepspeed.utils.zero_to_fp32 (stage 0 checkpoints hold the whole module in one file).
The folder is built under a temporary name and renamed into place: a crash never leaves half of one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import hope
from hope import HopeConfig, HopeForCausalLM

from .checkpoint import LATEST, fsync_tree, tag_for, write_atomic

MODELING_FILES = ("config.py", "layers.py", "memory.py", "chunk_grad.py", "triton_chunk.py", "projection_step.py",
                  "triton_projection.py", "memory_pass.py", "titans.py", "modeling_hope.py")
AUTO_MAP = {
    "AutoConfig": "config.HopeConfig",
    "AutoModel": "modeling_hope.HopeModel",
    "AutoModelForCausalLM": "modeling_hope.HopeForCausalLM",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ExportError(ValueError):
    """A checkpoint or an export option is unusable; the message names the file or value."""


@dataclass
class CheckpointInfo:
    path: Path  # RUN_DIR/checkpoints/step-XXXXXXXX
    run_dir: Path | None
    step: int
    tokens_seen: int
    world_size: int
    run_config: dict
    model_config: HopeConfig


# ---------------------------------------------------------------------- reading a checkpoint
def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its `latest` checkpoint) or one checkpoint directory."""
    path = Path(path)
    if (path / "model_config.json").is_file():
        return path
    latest = path / "checkpoints" / LATEST
    if latest.is_file():
        checkpoint = path / "checkpoints" / latest.read_text().strip()
        if not (checkpoint / "model_config.json").is_file():
            raise ExportError(f"{latest} names {checkpoint.name!r}, which holds no model_config.json")
        return checkpoint
    raise ExportError(f"{path}: expected a run directory (with checkpoints/latest) or a checkpoint "
                      "directory (with model_config.json)")


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    checkpoint = resolve_checkpoint(path)
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        model_fields = json.loads((checkpoint / "model_config.json").read_text())
        run_config = yaml.safe_load((checkpoint / "config.yaml").read_text()) if (checkpoint / "config.yaml").is_file() else {}
    except FileNotFoundError as error:
        raise ExportError(f"{checkpoint}: missing {Path(error.filename).name}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ExportError(f"{checkpoint}: unreadable metadata: {error}") from None
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    return CheckpointInfo(checkpoint, run_dir, int(state.get("step", 0)), int(state.get("tokens_seen", 0)),
                          int(state.get("world_size", 1)), run_config or {}, HopeConfig(**model_fields))


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights by name, from a DeepSpeed checkpoint of any ZeRO stage saved on any world size."""
    if any(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    model_file = checkpoint / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ExportError(f"{checkpoint}: no DeepSpeed model states (expected mp_rank_00_model_states.pt)")
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in module.items()}


def load_model(info: CheckpointInfo) -> HopeForCausalLM:
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: leave the caller's RNG alone
        model = HopeForCausalLM(info.model_config).float().eval()
    weights = consolidated_state_dict(info.path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if info.model_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(f"{info.path}: weights do not match model_config.json "
                          f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    return model


# ---------------------------------------------------------------------- tokenizer and model card
def tokenizer_for_run(run_config: dict, search_roots: list[Path]):
    """The run's tokenizer in Hugging Face form, or None with a reason when it cannot be found."""
    from data_pipeline.corpus import corpus_root
    from data_pipeline.tokenizer import Tokenizer

    from .hf_tokenizer import hf_tokenizer

    data = run_config.get("data", {})
    # a mixture's datasets share one tokenizer (the loader refuses others): the first one's
    path = next(iter(data["mixture"])) if data.get("mixture") else data.get("path", "default")
    if path == "default":
        candidates = [corpus_root(data.get("cache_dir", ".cache/hope-data"), data.get("vocab_size", 4096))
                      / "tokenizer.model"]
    else:
        manifest = Path(path) / "manifest.json"
        if not manifest.is_file():
            return None, f"{manifest} not found"
        candidates = [Path(json.loads(manifest.read_text())["tokenizer"]["path"])]
    for candidate in list(candidates):
        if not candidate.is_absolute():
            candidates += [root / candidate for root in search_roots]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None, f"tokenizer not found (looked for {', '.join(map(str, candidates))})"
    if found.suffix == ".json":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(found.parent), None
    tok = Tokenizer(found)
    try:
        return hf_tokenizer(found, tok.bos_id, tok.eos_id, tok.pad_id), None
    except ValueError as error:  # e.g. a unigram model: the weights are still worth exporting
        return None, str(error)


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


# ---------------------------------------------------------------------- writing a folder
def write_folder(model: HopeForCausalLM, info: CheckpointInfo, output: Path, dtype: str = "fp32",
                 max_shard_size: str = "5GB", tokenizer_roots: list[Path] | None = None) -> list[str]:
    """Write the export to `output` (atomically); returns warnings (e.g. no tokenizer found)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    warnings = []
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        roots = (tokenizer_roots or []) + [Path.cwd()] + ([info.run_dir, info.run_dir.parent] if info.run_dir else [])
        tokenizer, why = tokenizer_for_run(info.run_config, roots)
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
        (tmp / "README.md").write_text(model_card(info, output.name, dtype, val_loss))
        (tmp / "training_state.json").write_text(json.dumps(
            {"step": info.step, "tokens_seen": info.tokens_seen, "final_val_loss": val_loss,
             "checkpoint": str(info.path), "world_size": info.world_size}, indent=2))
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; the folder is meant to be shared
        fsync_tree(tmp)
        _replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return warnings


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(checkpoint: str | Path, output: str | Path, dtype: str = "fp32",
                      max_shard_size: str = "5GB") -> tuple[Path, list[str]]:
    info = read_checkpoint(checkpoint)
    model = load_model(info)
    warnings = write_folder(model, info, Path(output), dtype, max_shard_size)
    return Path(output), warnings


# ---------------------------------------------------------------------- during training
def export_step(run_dir: str | Path, checkpoint_dir: str | Path, step: int, dtype: str = "bf16",
                push_to_hub: str | None = None) -> Path:
    """RUN_DIR/hf/step-XXXXXXXX from a complete checkpoint, then RUN_DIR/hf/latest; optionally push
    the folder to the branch step-XXXXXXXX of `push_to_hub` (ORG/NAME, private when created)."""
    tag = tag_for(step)
    out_root = Path(run_dir) / "hf"
    out_root.mkdir(parents=True, exist_ok=True)
    folder, warnings = export_checkpoint(checkpoint_dir, out_root / tag, dtype)
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hope-export", description="Export a hope-train checkpoint as a "
                                     "Hugging Face model folder (and optionally push it to the Hub).")
    parser.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("output_dir")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard limit (e.g. 2GB, 500MB)")
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
    except (ExportError, HubError) as error:
        print(f"hope-export: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
