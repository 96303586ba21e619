"""The run in one line: model, batch arithmetic, tokens, and how often it reads its data.

The trainer prints it before the first step; `hope-train CONFIG --check --world-size N` prints it
from the config alone, for N ranks, before a job is queued: it reads the config, the datasets'
manifests and the model config (the model built on the meta device, no memory), and starts no
process group, engine or loader.
"""
from __future__ import annotations

import functools

from .config import RunConfig, load_model_config, resolve_batch
from .metrics import amount


def plan_line(model: str, n_params: int, world_size: int, ds: dict, seq_len: int, max_steps: int, data: str,
              tokens: int | None = None) -> str:
    """`ds`: DeepSpeed's resolved batch keys; `data`: how often the data is read (`epochs_read`); `tokens`:
    the run's tokens by max_steps when not max_steps x this batch (resumed from steps of another batch)."""
    micro, accumulation, batch = (ds[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                      "train_batch_size"))
    if tokens is None:
        tokens = max_steps * batch * seq_len
    return (f"model {model}: {amount(n_params)} parameters | {world_size} rank{'s' if world_size > 1 else ''} x "
            f"micro-batch {micro} x accumulation {accumulation} = {batch} sequences of {seq_len} = "
            f"{batch * seq_len:,} tokens/step | {max_steps:,} step{'s' if max_steps > 1 else ''} = "
            f"{amount(tokens)} tokens, {data}")


def epochs_read(epochs: dict[str, float]) -> str:
    """How many times each dataset is read through by the end ('' names a single dataset)."""
    def times(e: float) -> str:
        return f"{e:,.0f}" if e >= 100 else f"{e:.3g}"

    if list(epochs) == [""]:
        return f"{times(epochs[''])} epochs of the data"
    return "epochs of each dataset: " + ", ".join(f"{label} {times(e)}" for label, e in epochs.items())


def check(config: RunConfig, world_size: int) -> str:
    """hope-train --check: the plan line of `config` on `world_size` ranks (ConfigError, DataError
    as the trainer would raise them)."""
    import torch

    from data_pipeline.corpus import corpus_root
    from data_pipeline.loader import check_model_vocab, check_same_tokenizer
    from data_pipeline.mixture import MixturePattern, dataset_labels
    from data_pipeline.packed import split_samples
    from data_pipeline.shards import read_manifest
    from data_pipeline.verify import check_shard_files
    from hope import HopeForCausalLM

    d, t = config.data, config.train
    ds = resolve_batch(config.deepspeed, world_size, config.source)
    model_config = load_model_config(config.model, config.source)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in HopeForCausalLM(model_config).parameters())
    line = functools.partial(plan_line, config.model.config, n_params, world_size, ds, d.seq_len, t.max_steps)
    sources = d.mixture or {d.path: 1.0}
    if list(sources) == ["default"]:  # the embedded corpus: known once a run has prepared it
        prepared = corpus_root(d.cache_dir, d.vocab_size) / "shards"
        if not (prepared / "manifest.json").exists():
            return line("the embedded corpus (prepared by the first run)")
        sources = {str(prepared): 1.0}
    # what the trainer's loaders check when they open: one tokenizer, a vocabulary the model holds,
    # a sample or more in both splits
    manifests = [(location, read_manifest(location)) for location in sources]
    check_same_tokenizer([(location, manifest) for location, (_, _, manifest) in manifests])
    samples = []
    for location, (fs, directory, manifest) in manifests:
        check_shard_files(fs, directory, manifest)  # header and size, as the loaders check them when they open
        check_model_vocab(location, manifest, model_config.vocab_size)
        per_shard = d.shuffle_window_shards > 0  # windows of shards (train split) pack each shard on its own
        samples.append(split_samples(manifest, "train", d.seq_len + 1, directory, per_shard))
        split_samples(manifest, "validation", d.seq_len + 1, directory)
    reads = MixturePattern(list(sources.values())).reads_before(t.max_steps * ds["train_batch_size"])
    labels = dataset_labels(list(sources)) if len(sources) > 1 else [""]
    return line(epochs_read({label: k / n for label, k, n in zip(labels, reads, samples)}))
