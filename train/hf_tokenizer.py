"""The run's SentencePiece model as a Hugging Face fast tokenizer (tokenizer.json + config).

data_pipeline trains SentencePiece BPE with byte fallback, no normalisation, no dummy prefix,
split digits and whitespace runs kept together ("  x" -> "▁▁", "x"; "   x" -> "▁▁", "▁x"). The
`tokenizers` pipeline below reproduces that segmentation id for id (tests/test_export.py checks it on
real text). transformers' own SpmConverter assumes Llama's dummy prefix, so it is not used.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SentencePieceExtractor

SPACE = "▁"
CONTROL, USER_DEFINED = 3, 4  # SentencePiece piece types


def sentencepiece_to_tokenizers(model_path: str | Path) -> Tokenizer:
    extractor = SentencePieceExtractor(str(model_path))
    proto = extractor.proto
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise ValueError(f"{model_path}: only SentencePiece BPE models convert (model_type "
                         f"{proto.trainer_spec.model_type})")
    fields = extractor.extract(None)  # vocab {piece: id} and merges in SentencePiece's order
    tokenizer = Tokenizer(BPE(fields["vocab"], fields["merges"], unk_token=proto.trainer_spec.unk_piece,
                              fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback, dropout=None))
    # User-defined pieces holding a space ("    ") never match in SentencePiece either: it replaces
    # spaces with ▁ before looking for them.
    tokenizer.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                          for p in proto.pieces if p.type == USER_DEFINED and " " not in p.piece])
    tokenizer.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                  for p in proto.pieces if p.type == CONTROL])
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=proto.trainer_spec.split_digits),
    ])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def hf_tokenizer(model_path: str | Path, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None) -> PreTrainedTokenizerFast:
    """A fast tokenizer that AutoTokenizer.from_pretrained(folder) loads after save_pretrained."""
    backend = sentencepiece_to_tokenizers(model_path)

    def piece(token_id: int | None) -> str | None:
        return None if token_id is None else backend.id_to_token(token_id)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=piece(bos_id), eos_token=piece(eos_id), pad_token=piece(pad_id),
        unk_token=piece(backend.token_to_id("<unk>")) if backend.token_to_id("<unk>") is not None else None,
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        model_max_length=1_000_000_000)
