"""Session-wide test setup."""
import os

import torch

# Without CUDA, Triton kernels run in Triton's interpreter. Triton reads this once, when it is
# first imported (which torch or DeepSpeed may do during collection), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

