"""The training loop on a DeepSpeed engine.

One optimizer step = gradient_accumulation_steps micro-batches on every rank. The data loader is
told the global batch of the whole step (micro x accumulation x ranks sequences), so its state at
a step boundary is exact and the same on every rank; a resume continues with the next batch.

    for step in range(start, max_steps):
        lr = schedule(step)                       # applied to every param group (x lr_scale)
        for micro in range(accumulation):
            loss = engine(inputs, labels=targets) ; engine.backward(loss) ; engine.step()
        log / validate / checkpoint / stop on preemption

A non-finite loss on any rank skips the update of that step on all ranks (the optimizer step is
a no-op, the gradients are dropped) and is counted; max_bad_steps in a row stop the run. SIGTERM
and SIGUSR1 (preemption) make every rank save a checkpoint at the end of the current step and exit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
import zlib
from pathlib import Path

import torch
import yaml

from .checkpoint import (Checkpoint, CheckpointManager, ResumeError, TrainerState, config_changes, rng_state,
                         set_rng_state)
from .compile import compile_blocks
from .config import ConfigError, RunConfig, load_model_config, resolve_batch
from .distributed import World, all_reduce_sum, any_rank, barrier, init_world
from .export import export_during_training
from .metrics import MetricsSink, device_peak_flops, peak_memory_gb
from .optim import attach_engine, build_optimizer
from .plan import epochs_read, plan_line
from .schedule import apply_lr, lr_at


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it (agreed over ranks) after every step."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


def _nan_fault_steps() -> set[int]:
    """Test hook (docs/TRAINING.md): steps whose loss is made NaN on purpose."""
    text = os.environ.get("HOPE_FAULT_NAN_STEPS", "")
    return {int(s) for s in text.split(",") if s.strip()}


def guard_optimizer_step(optimizer) -> None:
    """Make optimizer.step() a no-op while `optimizer.skip_update` is set.

    DeepSpeed (any ZeRO stage) calls this base optimizer's step at the accumulation boundary and
    clears the gradients afterwards, so skipping here drops the step's update and nothing else.
    """
    original = optimizer.step
    optimizer.skip_update = False

    def step(*args, **kwargs):
        if optimizer.skip_update:
            return None
        return original(*args, **kwargs)

    optimizer.step = step


class Trainer:
    def __init__(self, config: RunConfig, run_dir: str | Path):
        import deepspeed
        from data_pipeline import prepare_default_corpus

        self.config, self.run_dir = config, Path(run_dir)
        self.bar = None  # rank 0's progress bar while fit() runs
        self.world: World = init_world()
        t, d = config.train, config.data
        self.ds_config = resolve_batch(config.deepspeed, self.world.size, config.source)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accumulation = self.ds_config["gradient_accumulation_steps"]
        self.global_batch = self.ds_config["train_batch_size"]
        self.tokens_per_step = self.global_batch * d.seq_len
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        # Model config first: the loader checks the tokens against its vocabulary.
        self.model_config = load_model_config(config.model, config.source)

        # The checkpoint to resume from, checked (by every rank, agreeing) before anything is built:
        # a damaged one, or a config that changes what it fixes, stops the run here with one line.
        self.checkpoints = CheckpointManager(self.run_dir, self.world, t.keep_checkpoints, t.portable_checkpoint)
        self.checkpoints.clean_partial_saves()
        self.resume_from = self.checkpoints.find_resumable()
        if self.resume_from is not None:
            self._check_resume(self.resume_from)

        # Data: the embedded corpus is prepared once (rank 0 first, the others then find it ready).
        data_dir = d.mixture or d.path  # {directory: weight} or one directory
        if data_dir == "default":
            if self.world.is_main:
                prepare_default_corpus(d.cache_dir, vocab_size=d.vocab_size)
            barrier(self.world)
            data_dir = prepare_default_corpus(d.cache_dir, vocab_size=d.vocab_size).data_dir
        self.loader = self._open_loader("train", self.global_batch, data_dir)
        # opened now, so that a dataset without a validation split stops the run before its first step
        self.val_loaders = self._open_validation(data_dir)

        # Model and engine. The seed makes every rank build the same initial weights.
        torch.manual_seed(t.seed)
        from hope import HopeForCausalLM

        model = HopeForCausalLM(self.model_config)
        self.n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        if t.compile:
            self._log_main(f"compiling {compile_blocks(model)} blocks (at the first step, and again for validation)")
        optimizer = build_optimizer(model, config.optimizer, self.ds_config, self.tokens_per_step)
        guard_optimizer_step(optimizer)
        self.base_optimizer = optimizer
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        attach_engine(self.engine)
        self.state = TrainerState(world_size=self.world.size)
        self.preemption = PreemptionFlag()
        self.flops_per_token = self.model_config.flops_per_token(d.seq_len)
        self.peak_flops = device_peak_flops(self.world.device, t.peak_tflops)

    def _plan(self) -> str:
        """The run in one line (train/plan.py), the epochs and tokens counting those read so far (the
        steps before a resume may have had another global batch)."""
        left = max(self.config.train.max_steps - self.state.step, 0)
        epochs = self.loader.planned_epochs(self.loader.state_dict()["samples_consumed"] + left * self.global_batch)
        labels = self.val_loaders  # the datasets' labels, in the loader's order ('' for a single one)
        return plan_line(self.config.model.config, self.n_params, self.world.size, self.ds_config,
                         self.config.data.seq_len, self.config.train.max_steps, epochs_read(dict(zip(labels, epochs))),
                         tokens=self.state.tokens_seen + left * self.tokens_per_step)

    def _open_loader(self, split: str, global_batch: int, data_dir):
        from data_pipeline import TokenLoader

        return TokenLoader(data_dir, self.config.data.seq_len, global_batch, self.world.rank, self.world.size,
                           self.config.train.seed, split=split, expected_vocab_size=self.model_config.vocab_size,
                           # validation reads its first batches at every evaluation: no windows needed
                           shuffle_window_shards=self.config.data.shuffle_window_shards if split == "train" else 0)

    def _open_validation(self, data_dir) -> dict[str, tuple[float, object]]:
        """{label: (weight, validation loader)}: one dataset's, or each dataset of a mixture on its own,
        weighted by its share ('' labels a single dataset)."""
        from data_pipeline.mixture import dataset_labels

        batch = self.micro * self.world.size
        if not isinstance(data_dir, dict):
            return {"": (1.0, self._open_loader("validation", batch, data_dir))}
        total = sum(data_dir.values())
        return {label: (weight / total, self._open_loader("validation", batch, path))
                for label, (path, weight) in zip(dataset_labels(list(data_dir)), data_dir.items())}

    # ------------------------------------------------------------------ resume
    def _check_resume(self, checkpoint: Checkpoint) -> None:
        """Refuse a config that changes what the checkpoint fixes (the model, the optimizer, the seed,
        the sequence length: checkpoint.config_changes), and choose how its state is read. Every rank
        decides alike: the same files and the same config."""
        changes = config_changes(checkpoint, self.config.to_dict(), self.model_config.to_dict(),
                                 getattr(self.model_config, "execution_fields", frozenset()))
        if changes:
            shown = ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
            them = "it" if len(changes) == 1 else "them"
            allow = ""
            if any(change.startswith("data.seq_len:") for change in changes):
                allow = ", or let data.seq_len change with data.allow_changed_data: true"
            raise ResumeError(f"cannot resume from {checkpoint.path}: this config changes what the checkpoint "
                              f"fixes: {shown}. Set {them} back (the checkpoint's config: "
                              f"{checkpoint.path / 'config.yaml'}){allow}, or give another --run-dir for a new run")
        self.resume_portable = self.checkpoints.needs_portable(checkpoint, self.ds_config)

    def _resume_warnings(self, checkpoint: Checkpoint) -> list[str]:
        """What changed on resume that the run goes on with, but the user should know: the global batch
        (micro-batch x accumulation x ranks) and, with data.allow_changed_data, the sequence length."""
        warnings = []
        try:
            before = resolve_batch(checkpoint.config["deepspeed"], checkpoint.state.world_size,
                                   str(checkpoint.path / "config.yaml"))
        except (KeyError, TypeError, ConfigError):  # a config from other code: nothing to compare
            before = None
        if before is not None and before["train_batch_size"] != self.global_batch:
            def batch(world_size: int, ds: dict) -> str:
                return (f"{world_size} rank{'s' if world_size > 1 else ''} x micro-batch "
                        f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']} = "
                        f"{ds['train_batch_size']}")

            keep = before["train_batch_size"]
            hint = (f"; --set deepspeed.train_batch_size={keep} keeps the checkpoint's"
                    if keep % (self.micro * self.world.size) == 0 else "")
            warnings.append(
                f"warning: the global batch changed on resume: {batch(checkpoint.state.world_size, before)} sequences "
                f"per step before, {batch(self.world.size, self.ds_config)} now. The data goes on from the checkpoint's "
                f"position (no sample repeated or skipped), but the steps left read {self.global_batch} sequences "
                f"each{hint}")
        seq_len = (checkpoint.config.get("data") or {}).get("seq_len")
        if seq_len is not None and seq_len != self.config.data.seq_len:  # refused without allow_changed_data
            warnings.append(
                f"warning: data.seq_len changed on resume ({seq_len} -> {self.config.data.seq_len}, allowed by "
                f"data.allow_changed_data): the data goes on from sample {self.loader.state_dict()['samples_consumed']} "
                "of the new length, not from the checkpoint's token")
        return warnings

    def resume_if_possible(self) -> None:
        checkpoint = self.resume_from
        if checkpoint is None:
            return
        rank_state = self.checkpoints.load(self.engine, checkpoint, self.resume_portable)
        state = checkpoint.state
        allow = self.config.data.allow_changed_data
        if rank_state is not None:  # same world size: this rank's exact loader position and RNG
            self.loader.load_state_dict(rank_state["data"], allow_changed_manifest=allow)
            set_rng_state(rank_state["rng"])
        else:  # new world size: the global position (rank 0's state) carries over
            self.loader.load_state_dict(state.data_state, allow_changed_manifest=allow)
        self.state = dataclasses.replace(state, world_size=self.world.size)  # the checkpoint's own stays as saved
        if self.checkpoints.note:
            self._log_main(self.checkpoints.note)
        self._log_main(f"resumed from {checkpoint.path} at step {state.step}")
        if self.loader.data_change:
            self._log_main(self.loader.data_change)
        for warning in self._resume_warnings(checkpoint):
            self._log_main(warning)

    # ------------------------------------------------------------------ one step
    def _micro_batches(self) -> tuple[list[torch.Tensor], float]:
        """This rank's micro-batches of the step, and a fingerprint of its sequences.

        The fingerprint is a sum of per-sequence CRC32s, so summed over ranks it identifies the
        step's global batch whatever the number of ranks (tests use it to prove no token is seen
        twice or skipped across a resume).
        """
        batch = next(self.loader)  # [micro * accumulation, seq_len + 1] for this rank
        fingerprint = float(sum(zlib.crc32(row.numpy().tobytes()) for row in batch.cpu().to(torch.int64)))
        return list(batch.to(self.world.device).split(self.micro)), fingerprint

    def train_step(self, nan_steps: set[int]) -> tuple[float, bool]:
        """One optimizer step; returns (mean loss over all ranks, whether the update was skipped)."""
        engine = self.engine
        apply_lr(self.base_optimizer, self._lr(self.state.step))
        local_sum, nonfinite = 0.0, False
        micro_batches, fingerprint = self._micro_batches()
        for i, batch in enumerate(micro_batches):
            loss = engine(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss
            if self.state.step + 1 in nan_steps:
                loss = loss * float("nan")
            value = loss.item()
            nonfinite |= not math.isfinite(value)
            local_sum += value
            engine.backward(loss)
            if i == len(micro_batches) - 1:  # the boundary: decide the update on every rank at once
                total, bad, self.data_fingerprint = all_reduce_sum(
                    [local_sum if not nonfinite else 0.0, float(nonfinite), fingerprint], self.world)
                self.base_optimizer.skip_update = bad > 0
                self.stage0_grad_norm = self._stage0_grad_norm()
            engine.step()
        self.base_optimizer.skip_update = False
        if bad > 0:
            return float("nan"), True
        return total / (self.world.size * len(micro_batches)), False

    def _stage0_grad_norm(self) -> float | None:
        """DeepSpeed reports no gradient norm without ZeRO in fp32; take it before the step clips."""
        if self.engine.zero_optimization_stage() > 0 or self.engine.bfloat16_enabled():
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    def _lr(self, step: int) -> float:
        t = self.config.train
        return lr_at(step, self.config.optimizer.lr, t.max_steps, t.schedule, t.warmup_steps,
                     t.min_lr_ratio, t.decay_fraction)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss over eval_batches validation batches of each dataset (the same batches every
        time): {"val_loss": ...}, and for a mixture each dataset's "val_loss/LABEL", val_loss being
        their mean under the mixture's weights (its expected loss, without the sampling noise of a
        mixed validation stream)."""
        t = self.config.train
        self.engine.eval()
        totals = []
        for _, loader in self.val_loaders.values():
            loader.reset()
            total = 0.0
            for _ in range(t.eval_batches):
                batch = next(loader).to(self.world.device)
                total += self.engine(batch[:, :-1], labels=batch[:, 1:], shift_labels=False).loss.item()
            totals.append(total)
        self.engine.train()
        losses = [total / (self.world.size * t.eval_batches) for total in all_reduce_sum(totals, self.world)]
        record = {"val_loss": sum(weight * loss for (weight, _), loss in zip(self.val_loaders.values(), losses))}
        record.update({f"val_loss/{label}": loss for label, loss in zip(self.val_loaders, losses) if label})
        return record

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> Path:
        self.state.data_state = self.loader.state_dict() if self.world.is_main else {}
        rank_state = {"rng": rng_state(), "data": self.loader.state_dict()}
        config_yaml = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        path = self.checkpoints.save(self.engine, self.state, rank_state, config_yaml, self.model_config.to_dict())
        self.last_saved = self.state.step
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self) -> int:
        """Train to max_steps (or a preemption). Returns the step reached."""
        t = self.config.train
        self.resume_if_possible()
        self._log_main(self._plan())
        self.last_saved = self.state.step
        self.hf_exports = []
        sink = None
        if self.world.is_main:
            if t.progress_bar:
                from tqdm import tqdm

                self.bar = tqdm(total=t.max_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)
            sink = MetricsSink(self.run_dir, t.wandb, t.wandb_project, t.wandb_name, self.state.wandb_id,
                               self.config.to_dict(), progress_write=self.bar.write if self.bar else None)
            self.state.wandb_id = sink.wandb_id
        nan_steps, bad_streak = _nan_fault_steps(), 0
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.state.step < t.max_steps:
                loss, skipped = self.train_step(nan_steps)
                self.state.step += 1
                self.state.tokens_seen += self.tokens_per_step
                window_steps += 1
                bad_streak = bad_streak + 1 if skipped else 0
                self.state.skipped_steps += int(skipped)
                if self.bar is not None:
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{loss:.4f}")
                last = self.state.step == t.max_steps
                evaluate = last or (t.eval_every and self.state.step % t.eval_every == 0)
                if evaluate or self.state.step % t.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    record = self._record(loss, window_steps, elapsed)
                    if evaluate:
                        record.update(self.validate())
                        record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
                    if sink is not None:
                        sink.log(record)
                    window_start, window_steps = time.perf_counter(), 0
                if bad_streak >= t.max_bad_steps:
                    raise TrainingError(
                        f"{bad_streak} non-finite losses in a row (steps {self.state.step - bad_streak + 1}-"
                        f"{self.state.step}); stopping. The last good checkpoint is "
                        f"{self.checkpoints.latest_tag() or 'none'} under {self.checkpoints.root}")
                preempted = any_rank(self.preemption.signal is not None, self.world)
                due = self.state.step % t.checkpoint_every == 0 or last or preempted
                if due and not skipped:
                    saving = time.perf_counter()
                    path = self.save()
                    if self.world.is_main:  # what rank 0 sees of it (all of it on a shared file system)
                        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                        self._log_main(f"checkpoint saved: {path} ({size / 1e9:.2f} GB in "
                                       f"{time.perf_counter() - saving:.1f} s)")
                    if self.world.is_main and t.hf_export_every and (last or self.state.step % t.hf_export_every == 0):
                        self.hf_exports.append(export_during_training(  # a background process (docs/EXPORT.md)
                            self.run_dir, path, self.state.step, t.hf_export_dtype, t.hf_push_to_hub))
                    window_start += time.perf_counter() - saving  # saving time is not training time
                if preempted:
                    self._log_main(f"preempted (signal) at step {self.state.step}; run again to resume")
                    break
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if sink is not None:
                sink.close()
            self.loader.close()
            for _, loader in self.val_loaders.values():
                loader.close()
        for export in self.hf_exports:  # let the Hugging Face exports finish before exiting
            export.wait()
        barrier(self.world)
        return self.state.step

    def _record(self, loss: float, steps: int, elapsed: float) -> dict:
        tokens_per_s = steps * self.tokens_per_step / max(elapsed, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.stage0_grad_norm
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.item()
        mfu = None
        if self.peak_flops:
            mfu = tokens_per_s / self.world.size * self.flops_per_token / self.peak_flops
        return {"step": self.state.step, "loss": loss, "grad_norm": grad_norm,
                "lr": self._lr(self.state.step - 1), "tokens_per_s": tokens_per_s, "mfu": mfu,
                "peak_mem_gb": peak_memory_gb(self.world.device), "tokens_seen": self.state.tokens_seen,
                "skipped_steps": self.state.skipped_steps, "data_fingerprint": int(self.data_fingerprint),
                "data_epoch": self.loader.epoch,
                # to max_steps at this window's pace (validation and saves not counted)
                "eta_s": (self.config.train.max_steps - self.state.step) * elapsed / max(steps, 1)}

    def _log_main(self, text: str) -> None:
        if self.world.is_main:  # through the progress bar while it runs, so that it is not cut in two
            (self.bar.write if self.bar is not None else functools.partial(print, flush=True))(f"[hope-train] {text}")
