#!/usr/bin/env python
"""Convert a hope-train checkpoint to a Hugging Face folder; the same as `hope-export`.

    python tools/convert_to_hf.py RUN_DIR_OR_CHECKPOINT OUTPUT_DIR [--dtype bf16|fp32]
        [--max-shard-size 5GB] [--push-to-hub ORG/NAME [--revision BRANCH] [--private]]

See docs/EXPORT.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # works from a checkout without install

from train.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
