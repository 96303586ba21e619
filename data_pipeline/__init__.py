"""hope-train's data pipeline: tokenizer, token shards, and the resumable streaming loader.

See docs/DATA.md for the shard format, the command lines and the measured throughputs.
"""

from data_pipeline.corpus import PreparedData, prepare_default_corpus
from data_pipeline.errors import DataError
from data_pipeline.loader import TokenLoader

__all__ = ["DataError", "PreparedData", "TokenLoader", "prepare_default_corpus"]
