"""Tokenizers: train a SentencePiece model, or load an existing SentencePiece or Hugging Face one.

Special tokens are explicit. A trained model has PAD=0, UNK=1, BOS=2, EOS=3, byte fallback (so no
text is ever unknown) and no text normalisation, so source code keeps its whitespace and
decode(encode(text)) == text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.shards import TokenizerInfo
from data_pipeline.storage import atomic_write_bytes, filesystem

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MIN_VOCAB_SIZE = 300  # 4 specials + 256 byte pieces + newline/tab/indent pieces + some merges
# SentencePiece skips training lines longer than this; longer lines are cut into pieces.
_MAX_LINE = 4096
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


def _training_lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The documents' non-empty lines (cut to _MAX_LINE chars), up to max_bytes of text."""
    seen = 0
    for doc in documents:
        for line in doc.split("\n"):
            for start in range(0, len(line), _MAX_LINE):
                piece = line[start:start + _MAX_LINE]
                if piece.strip():
                    yield piece
                    seen += len(piece) + 1
        if seen >= max_bytes:
            return


def train_sentencepiece(documents: Iterable[str], out_path: str | Path, vocab_size: int = 32000,
                        model_type: str = "bpe", max_bytes: int = 200_000_000, threads: int | None = None,
                        *, overwrite: bool = False) -> Path:
    """Train a SentencePiece model on the documents and write it (atomically) to out_path.

    An existing out_path is refused before any training unless `overwrite`: datasets' manifests and
    exported models refer to a tokenizer by path and sha256, so replacing the file breaks them.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model-type {model_type!r}: expected 'bpe' or 'unigram'")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size}: expected at least {MIN_VOCAB_SIZE} "
                        "(256 byte-fallback pieces are included)")
    if max_bytes <= 0:
        raise DataError(f"--max-bytes {max_bytes}: expected a positive number of bytes")
    fs, path = filesystem(out_path)
    if fs.isdir(path):
        raise DataError(f"--out {out_path}: is a directory; expected a file path for the tokenizer model")
    if fs.exists(path) and not overwrite:
        raise DataError(f"--out {out_path}: exists; choose another path or pass --overwrite (manifests and "
                        "exported models refer to a tokenizer by path and sha256)")
    lines = _training_lines(documents, max_bytes)
    first = next(lines, None)
    if first is None:
        raise DataError("tokenizer training input holds no text")
    model = io.BytesIO()

    def all_lines() -> Iterator[str]:
        yield first
        yield from lines

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_digits=True, max_sentence_length=_MAX_LINE * 4, user_defined_symbols=["\n", "\t", "    "],
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            num_threads=threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as exc:  # e.g. "Vocabulary size is too high" for a tiny input
        raise DataError(f"SentencePiece training failed for --vocab-size {vocab_size}: {exc}") from exc
    atomic_write_bytes(fs, path, model.getvalue())
    return Path(out_path)


class Tokenizer:
    """A loaded tokenizer: encode / decode, vocabulary size, special ids, and a fingerprint."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        target = Path(path)
        if target.is_dir() and (target / "tokenizer.json").exists():
            target = target / "tokenizer.json"
        if not target.exists():
            raise DataError(f"{path}: tokenizer not found (expected a SentencePiece .model file, "
                            "a tokenizer.json, or a directory holding one)")
        raw = target.read_bytes()
        self.fingerprint = self.fingerprint_of(raw)
        if target.suffix == ".json":
            self._load_huggingface(target, raw)
        else:
            self._load_sentencepiece(target, raw)

    @staticmethod
    def fingerprint_of(raw: bytes) -> str:
        """The fingerprint manifests record for a tokenizer file holding `raw`."""
        return hashlib.sha256(raw).hexdigest()[:16]

    def _load_sentencepiece(self, target: Path, raw: bytes) -> None:
        import sentencepiece as spm

        self.kind = "sentencepiece"
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(raw)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"{target}: not a SentencePiece model ({exc})") from exc
        self.vocab_size = self._sp.get_piece_size()
        none_if_negative = lambda i: i if i >= 0 else None  # noqa: E731
        self.bos_id, self.pad_id = none_if_negative(self._sp.bos_id()), none_if_negative(self._sp.pad_id())
        self.eos_id = none_if_negative(self._sp.eos_id())
        if self.eos_id is None:
            raise DataError(f"{target}: SentencePiece model has no EOS token (eos_id is -1)")

    def _load_huggingface(self, target: Path, raw: bytes) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.kind = "huggingface"
        try:
            self._hf = HFTokenizer.from_str(raw.decode())
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise DataError(f"{target}: not a Hugging Face tokenizer.json ({exc})") from exc
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        config_path = target.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}

        def special(key: str, candidates: tuple[str, ...] = ()) -> int | None:
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            for name in ([token] if token else []) + list(candidates):
                token_id = self._hf.token_to_id(name)
                if token_id is not None:
                    return token_id
            return None

        self.bos_id, self.pad_id = special("bos_token"), special("pad_token")
        self.eos_id = special("eos_token", _EOS_CANDIDATES)
        if self.eos_id is None:
            raise DataError(f"{target}: no EOS token found (set eos_token in tokenizer_config.json, "
                            f"or add one of {list(_EOS_CANDIDATES)})")

    @property
    def info(self) -> TokenizerInfo:
        return TokenizerInfo(self.kind, self.path, self.fingerprint, self.vocab_size,
                             self.bos_id, self.eos_id, self.pad_id)

    def encode(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """Token ids per text (no special tokens added); threads=None lets the library use every core."""
        if self.kind == "sentencepiece":
            return self._sp.encode(texts, num_threads=threads if threads else -1)
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "sentencepiece":
            return self._sp.decode(list(ids))
        return self._hf.decode(list(ids), skip_special_tokens=False)
