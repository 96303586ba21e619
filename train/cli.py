"""`hope-train CONFIG.yaml --run-dir DIR [--set section.key=value ...]`
`hope-train CONFIG.yaml --check [--world-size N] [--set ...]`: the config checked and the run's plan printed

Runs as one process, under torchrun or under the `deepspeed` launcher (launch/train.sh). The
config is read and validated completely before any process group starts; a bad config prints
one line naming the file, key and expectation and exits with status 2.
"""
from __future__ import annotations

import argparse
import atexit
import os
import socket
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def check_run_dir(run_dir: str) -> str | None:
    """Why `run_dir` cannot hold a run (one line), or None; creates it. Every rank checks, before any
    process group starts, so a bad path stops them all alike instead of failing on rank 0 only."""
    path = Path(run_dir)
    where = f"--run-dir {run_dir}"
    if path.exists() and not path.is_dir():
        return f"{where}: a file is there; expected a directory (a new one, or an earlier run's to resume it)"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{where}: {parent} is a file, so no directory can be made under it"
    # what the trainer writes there, if an earlier run left it, must be of the right kind
    for name, directory in (("checkpoints", True), ("checkpoints/latest", False), ("metrics.jsonl", False)):
        inside = path / name
        if inside.exists() and inside.is_dir() != directory:
            kinds = ("directory", "file") if directory else ("file", "directory")
            return f"{where}: {inside} is a {kinds[1]}; expected a {kinds[0]}"
    try:  # permissions as the file system applies them (also to root, read-only mounts, ACLs)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".hope-train-write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return f"{where}: cannot write there ({error.strerror or error}: {error.filename or path})"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hope-train", description="Pretrain HOPE on DeepSpeed ZeRO.")
    parser.add_argument("config", help="run config YAML (e.g. configs/train/tiny-cpu.yaml)")
    parser.add_argument("--run-dir", help="checkpoints and metrics go here; rerun to resume (required to train)")
    parser.add_argument("--check", action="store_true",
                        help="only check the config and print the run's plan (model, batch, tokens, epochs of the "
                             "data) for --world-size ranks; starts nothing")
    parser.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                        help="with --check: the number of ranks (GPUs) to plan for (default: $WORLD_SIZE or 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (YAML scalar), e.g. --set deepspeed.zero_optimization.stage=3")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.world_size is not None and not args.check:
        parser.error("--world-size goes with --check (a run takes its world size from its launcher)")
    if args.check and args.world_size is None:
        try:
            args.world_size = _positive_int(os.environ.get("WORLD_SIZE", "1"))
        except argparse.ArgumentTypeError as error:
            parser.error(f"$WORLD_SIZE: {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:  # runs nothing on an accelerator: no detection, nor DeepSpeed's notice of it on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"hope-train: error: {error}", file=sys.stderr)
        return 2

    from data_pipeline import DataError

    if args.check:
        from .plan import check

        try:
            line = check(config, args.world_size)
        except (ConfigError, DataError) as error:
            print(f"hope-train: error: {error}", file=sys.stderr)
            return 2
        print(f"hope-train: {args.config}: valid\n{line}")
        return 0
    if args.run_dir is None:
        print("hope-train: error: --run-dir is required to train (only --check goes without)", file=sys.stderr)
        return 2

    problem = check_run_dir(args.run_dir)
    if problem is not None:
        print(f"hope-train: error: {problem}", file=sys.stderr)
        return 2

    from .checkpoint import CheckpointError, ResumeError
    from .trainer import Trainer, TrainingError

    try:
        trainer = Trainer(config, args.run_dir)
        step = trainer.fit()
    except (ConfigError, DataError) as error:
        print(f"hope-train: error: {error}", file=sys.stderr)
        return 2
    except ResumeError as error:  # the same message on every rank: printed once
        if os.environ.get("RANK", "0") == "0":
            print(f"hope-train: error: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingError) as error:
        print(f"hope-train: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - only torch.compile's failures become one line
        from .compile import compile_failure

        message = compile_failure(error)
        if message is None:
            raise
        hint = " (train.compile: true; --set train.compile=false runs the blocks eagerly)" if config.train.compile else ""
        print(f"hope-train: error: {message}{hint}", file=sys.stderr)
        return 1
    if trainer.world.is_main:
        latest = trainer.checkpoints.latest_tag()
        where = trainer.checkpoints.root / latest if latest else "none"
        print(f"[hope-train] done at step {step}/{config.train.max_steps}; checkpoint: {where}", flush=True)
    return 0


def exit_without_teardown(code: int) -> None:
    """Exit once main has returned: everything is saved, flushed and closed by then (fit ends on a
    barrier). The exit handlers still run (logging, child processes, file locks); what is skipped
    is the interpreter's teardown of every module and object of torch, transformers and DeepSpeed,
    ~1.5 s of nothing per process at every exit (and a chance to hang in a library's destructor)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """The `hope-train` command (and `python -m train.cli`)."""
    exit_without_teardown(main())


if __name__ == "__main__":
    run()
