"""`hope-data`: train-tokenizer, tokenize, verify.

    hope-data train-tokenizer INPUT... --vocab-size N --out MODEL_PATH [--overwrite]
    hope-data tokenize INPUT... --tokenizer MODEL_PATH --out DIR
    hope-data verify DIR_OR_MANIFEST

INPUT is a file, a glob, a directory, an fsspec URL, or hfds:NAME[:SPLIT] (a Hugging Face dataset).
Bad input prints one line naming the file and the problem, and exits with status 2.
An existing tokenizer file is never replaced without --overwrite: manifests and exported models
refer to it by path and sha256.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import MIN_VOCAB_SIZE


def _checked(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: `convert(text)`, refused as "expected EXPECTED, got 'TEXT'" unless accept(value)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_vocab_size = _checked(int, lambda n: n >= MIN_VOCAB_SIZE,
                       f"a whole number >= {MIN_VOCAB_SIZE} (256 byte-fallback pieces are included)")
_positive_bytes = _checked(int, lambda n: n > 0, "a positive whole number of bytes")
_workers = _checked(int, lambda n: n >= 0, "a whole number >= 0 (0 = tokenize in this process)")
_shard_mb = _checked(float, lambda x: math.isfinite(x) and x * 1_000_000 >= 1,
                     "a positive number of millions of characters per shard (at least 0.000001)")
_fraction = _checked(float, lambda x: 0 <= x < 1, "a fraction in [0, 1)")


def _train_tokenizer(args: argparse.Namespace) -> int:
    from data_pipeline.sources import iter_documents, resolve_inputs
    from data_pipeline.storage import filesystem, read_bytes
    from data_pipeline.tokenizer import Tokenizer, train_sentencepiece

    fs, path = filesystem(args.out)
    replaced = None
    if args.overwrite and fs.isfile(path):  # its fingerprint, for finding the datasets made with it
        replaced = Tokenizer.fingerprint_of(read_bytes(fs, path, "tokenizer"))
    documents = iter_documents(resolve_inputs(args.inputs), args.text_field)
    train_sentencepiece(documents, args.out, args.vocab_size, args.model_type, args.max_bytes,
                        overwrite=args.overwrite)
    tok = Tokenizer(args.out)
    print(f"wrote {args.out}: {tok.kind} vocabulary {tok.vocab_size}, pad={tok.pad_id} bos={tok.bos_id} "
          f"eos={tok.eos_id}, fingerprint {tok.fingerprint}"
          + (f" (replaced the tokenizer with fingerprint {replaced})" if replaced else ""))
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from data_pipeline.tokenize import TokenizeSettings, tokenize_to_shards

    settings = TokenizeSettings(shard_chars=int(args.shard_mb * 1_000_000),
                                validation_fraction=args.validation_fraction,
                                workers=args.workers, text_field=args.text_field)
    report = tokenize_to_shards(args.inputs, args.tokenizer, args.out, settings, progress=not args.quiet)
    counts = {s: sum(x.num_tokens for x in report.manifest.split_shards(s)) for s in ("train", "validation")}
    print(f"{args.out}: {report.num_docs} documents, {report.num_tokens} tokens (train {counts['train']}, "
          f"validation {counts['validation']}), {len(report.manifest.shards)} shards; this run tokenized "
          f"{report.tokenized_tokens} tokens in {report.seconds:.2f} s ({report.tokens_per_second:,.0f} tokens/s), "
          f"{report.chunks_kept} chunks kept from an earlier run; manifest fingerprint {report.manifest.fingerprint}")
    if report.validation_warning:
        print(f"hope-data tokenize: warning: {report.validation_warning}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from data_pipeline.verify import verify_dataset

    report = verify_dataset(args.location)
    for problem in report.problems:
        print(f"BAD {problem}")
    total = sum(s.num_tokens for s in report.manifest.shards)
    verdict = "OK" if report.ok else f"{len(report.problems)} damaged"
    print(f"{args.location}: {report.checked} shards, {total} tokens, fingerprint "
          f"{report.manifest.fingerprint}: {verdict}")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hope-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train-tokenizer", help="train a SentencePiece tokenizer (byte fallback)")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--vocab-size", type=_vocab_size, default=32000)
    p.add_argument("--out", required=True, metavar="MODEL_PATH", help="refused if it exists, unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing MODEL_PATH (datasets made with the old tokenizer no longer match it)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--max-bytes", type=_positive_bytes, default=200_000_000,
                   help="text used for training (default 200 MB)")
    p.add_argument("--text-field", default="text", help="JSONL/parquet/dataset field holding the text")
    p.set_defaults(run=_train_tokenizer)

    p = commands.add_parser("tokenize", help="tokenize INPUTs into DIR/*.bin + DIR/manifest.json (resumable)")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--tokenizer", required=True, metavar="MODEL_PATH",
                   help="a SentencePiece .model, or a Hugging Face tokenizer.json (or its directory)")
    p.add_argument("--out", required=True, metavar="DIR", help="local directory or fsspec URL")
    p.add_argument("--workers", type=_workers, default=os.cpu_count() or 1,
                   help="tokenizer processes (0 = in this process)")
    p.add_argument("--shard-mb", type=_shard_mb, default=256, help="text (millions of characters) per shard")
    p.add_argument("--validation-fraction", type=_fraction, default=0.005,
                   help="share of documents (by hash of their text) put in the validation split, in [0, 1); "
                        "a warning says when a small input leaves it empty")
    p.add_argument("--text-field", default="text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_tokenize)

    p = commands.add_parser("verify", help="check every shard against the manifest; exit 0 only if all are whole")
    p.add_argument("location", metavar="DIR_OR_MANIFEST")
    p.set_defaults(run=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DataError as exc:
        print(f"hope-data {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hope-data {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
