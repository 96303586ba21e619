"""Newton-Schulz orthogonalisation: map a matrix G = U S V^T to (approximately) U V^T.

The quintic iteration and its coefficients are Keller Jordan's Muon ones: they push every
singular value into roughly [0.7, 1.2] in 5 steps rather than converging exactly to 1, which is
cheaper and trains as well. Works on [rows, cols] or a stack [..., rows, cols] (each slice on its
own), which is how the HOPE memories' per-head initial states are handled.
"""

from __future__ import annotations

import torch

QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthogonalise the last two dims of `grad`; the result has grad's shape and dtype float32."""
    if grad.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(grad.shape)}")
    a, b, c = QUINTIC_COEFFS
    x = grad.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        x = x.mT
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1].
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transposed:
        x = x.mT
    return x.float()

