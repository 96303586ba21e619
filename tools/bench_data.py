"""Throughput of the data pipeline on this machine.

    .venv/bin/python tools/bench_data.py [--text-mb 10] [--repeats 3] [--workers N...] [--loader-tokens 100000000]

1. Tokenization: raw SentencePiece encode speed (the limit: one thread, and SentencePiece's own
   C++ threads on all cores) against `hope-data tokenize` end to end (read, hash split, worker
   processes, write shards + manifest) on the same text: the standard library's .py files.
2. Loader: samples/s of one TokenLoader rank at seq 2048 and 4096 (random order over memory-mapped
   shards, background threads), against what a 1.3B model consumes on 8 H100s
   (8 x 57K tokens/s / seq_len, all ranks together).
3. Remote dataset: one rank reading an epoch of a dataset on a simulated object store (fsspec's
   in-memory filesystem, each download slowed to --remote-mb-s per stream), in the global order
   and in windows of shards (data.shuffle_window_shards): the wait for the first batch, the local
   cache's peak and the bytes downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

H100_TOKENS_PER_S_1_3B = 57_000
GPUS = 8


def stdlib_text(max_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or not path.is_file():
            continue
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(docs[-1])
        if total >= max_bytes:
            break
    return docs


def best_of(repeats: int, run) -> float:
    """Fastest wall time of `repeats` runs: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_tokenize(work: Path, text_mb: float, workers: list[int], repeats: int) -> None:
    import sentencepiece as spm

    from data_pipeline import prepare_default_corpus
    from data_pipeline.sources import iter_documents, resolve_inputs
    from data_pipeline.tokenize import TokenizeSettings, document_split, tokenize_to_shards

    tokenizer = prepare_default_corpus(work / "corpus", vocab_size=4096).tokenizer_path
    docs = stdlib_text(int(text_mb * 1e6))
    chars = sum(map(len, docs))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tokens = sum(map(len, sp.encode(docs)))
    print(f"text: {len(docs)} files, {chars / 1e6:.1f} M chars, {tokens:,} tokens; best of {repeats} runs each")
    for threads in sorted({1, os.cpu_count() or 1}):
        seconds = best_of(repeats, lambda t=threads: sp.encode(docs, num_threads=t))
        print(f"raw SentencePiece encode, {threads} thread(s): {tokens / seconds:,.0f} tokens/s")

    inputs = work / "inputs"
    inputs.mkdir()
    for i, doc in enumerate(docs):  # the same text, as files the command reads
        (inputs / f"{i:05d}.py").write_text(doc)

    def read_and_split() -> None:
        for doc in iter_documents(resolve_inputs([str(inputs)])):
            document_split(doc, 0.005)

    seconds = best_of(repeats, read_and_split)
    print(f"main process alone (read files, split hash): {tokens / seconds:,.0f} tokens/s "
          "(the ceiling however many workers)")
    for n in workers:
        settings = TokenizeSettings(workers=n)  # the command-line defaults
        outs = iter(work / f"shards-{n}-{run}" for run in range(repeats))  # a fresh directory per run
        seconds = best_of(repeats, lambda o=outs, s=settings: tokenize_to_shards([str(inputs)], str(tokenizer),
                                                                                 str(next(o)), s, progress=False))
        print(f"hope-data tokenize, {n} worker process(es): {tokens / seconds:,.0f} tokens/s "
              "(reading files, worker processes, writing shards + manifest)")


def write_random_dataset(directory: Path, num_tokens: int, vocab: int = 32000, shard_tokens: int = 25_000_000) -> None:
    from data_pipeline.shards import Manifest, ShardInfo, TokenizerInfo, encode_shard

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for k, begin in enumerate(range(0, num_tokens, shard_tokens)):
        tokens = rng.integers(0, vocab, min(shard_tokens, num_tokens - begin), dtype=np.uint16)
        data = encode_shard(tokens, vocab, num_docs=1)
        (directory / f"train-{k:05d}.bin").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        shards.append(ShardInfo(f"train-{k:05d}.bin", "train", len(tokens), 1, len(data), digest))
    info = TokenizerInfo("sentencepiece", "random", "0" * 16, vocab, 2, 3, 0)
    (directory / "manifest.json").write_text(Manifest(info, 0.0, shards).to_json())


def bench_loader(work: Path, num_tokens: int, seconds: float) -> None:
    from data_pipeline import TokenLoader

    data, second = work / "random", work / "random-second"
    write_random_dataset(data, num_tokens)
    write_random_dataset(second, num_tokens // 4)
    cases = [(seq_len, workers, "") for seq_len in (2048, 4096) for workers in (0, 1, 2)]
    cases += [(4096, 1, "a mixture of two datasets (0.9 / 0.1)")]
    for seq_len, workers, mixture in cases:
        needed = GPUS * H100_TOKENS_PER_S_1_3B / seq_len
        source = {str(data): 0.9, str(second): 0.1} if mixture else data
        # one rank of 8, 8 samples per micro batch: each call reads 8 random samples
        with TokenLoader(source, seq_len, 64, rank=3, world_size=8, seed=0, num_workers=workers) as loader:
            next(loader)
            start, samples = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                samples += len(next(loader))
            rate = samples / (time.perf_counter() - start)
        print(f"loader seq {seq_len}, {workers} worker thread(s){', ' + mixture if mixture else ''}: {rate:,.0f} "
              f"samples/s on one rank; 1.3B on {GPUS} H100s needs {needed:,.0f} samples/s in all, "
              f"{needed / GPUS:,.1f} per rank: {rate / (needed / GPUS):,.0f}x headroom")


def cached_bytes(cache: Path) -> int:
    total = 0
    for path in cache.rglob("*.bin"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # evicted meanwhile
            pass
    return total


def bench_remote(work: Path, shards: int, shard_tokens: int, mb_per_s: float, windows: list[int]) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    from data_pipeline import TokenLoader

    local = work / "remote-source"
    write_random_dataset(local, shards * shard_tokens, shard_tokens=shard_tokens)
    store = MemoryFileSystem()
    for path in local.iterdir():
        store.pipe_file(f"/bench-remote/{path.name}", path.read_bytes())
    downloaded = [0]
    original = MemoryFileSystem.cat_file

    def object_store(self, path, start=None, end=None, **kwargs):  # one stream's bandwidth, per download
        data = original(self, path, start, end, **kwargs)
        downloaded[0] += len(data)
        time.sleep(len(data) / (mb_per_s * 1e6))
        return data

    MemoryFileSystem.cat_file = object_store
    seq_len, batch, world = 2048, 512, 8  # 1M-token global batches; one rank of 8 reads 64 samples a call
    size_mb = shards * shard_tokens * 2 / 1e6
    print(f"remote dataset: {shards} shards of {shard_tokens / 1e6:g}M tokens ({size_mb:,.0f} MB), downloads at "
          f"{mb_per_s:g} MB/s per stream; one rank of {world}, global batch {batch} x {seq_len}, one epoch "
          "(the download count includes the next epoch's first window, read ahead)")
    try:
        for window in windows:
            cache = work / f"remote-cache-{window}"
            downloaded[0], peak = 0, 0
            start = time.perf_counter()
            with TokenLoader("memory://bench-remote", seq_len, batch, rank=3, world_size=world, seed=0,
                             cache_dir=cache, shuffle_window_shards=window) as loader:
                calls = loader.num_samples // batch
                for call in range(calls):
                    next(loader)
                    if call == 0:
                        first = time.perf_counter() - start
                    peak = max(peak, cached_bytes(cache))
            seconds = time.perf_counter() - start
            order = f"windows of {window} shards" if window else "global order"
            print(f"  {order:>20}: first batch after {first:5.2f} s, epoch ({calls} calls) in {seconds:5.1f} s, "
                  f"cache peak {peak / 1e6:6,.0f} MB ({peak / 1e6 / size_mb:4.0%} of the dataset), "
                  f"downloaded {downloaded[0] / 1e6:,.0f} MB")
    finally:
        MemoryFileSystem.cat_file = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-mb", type=float, default=10.0, help="text for the tokenization benchmark")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tokenization figure (the best is shown)")
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="worker process counts to measure `hope-data tokenize` with")
    parser.add_argument("--loader-tokens", type=int, default=100_000_000, help="size of the random loader dataset")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per loader measurement")
    parser.add_argument("--remote-shards", type=int, default=64, help="shards of the simulated remote dataset")
    parser.add_argument("--remote-shard-tokens", type=int, default=2_000_000, help="tokens per remote shard")
    parser.add_argument("--remote-mb-s", type=float, default=100.0, help="simulated download speed per stream")
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 4, 16],
                        help="data.shuffle_window_shards values to compare (0: the global order)")
    parser.add_argument("--only", choices=["tokenize", "loader", "remote"], help="run one part")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "tokenize"):
            bench_tokenize(Path(tmp), args.text_mb, args.workers, args.repeats)
        if args.only in (None, "loader"):
            bench_loader(Path(tmp), args.loader_tokens, args.seconds)
        if args.only in (None, "remote"):
            bench_remote(Path(tmp), args.remote_shards, args.remote_shard_tokens, args.remote_mb_s, args.windows)


if __name__ == "__main__":
    main()
