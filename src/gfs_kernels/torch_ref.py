""" "torch": the vectorised PyTorch reference of the streaming step, any device, any dtype.

Readable rather than fast: every row's dot product is an elementwise product reduced along the
row, one row chunk at a time (half-precision storage is upcast a slice at a time, never a full
float32 copy of U). It avoids BLAS gemv on purpose: gemv blocks rows and may round two
identical rows differently by their position, which would break ties-to-the-lowest-index;
a row-wise reduction rounds every row the same way.
"""

from __future__ import annotations

import torch

from .base import STEPS, Backend

_CHUNK_BYTES = 64 << 20


def _row_dots(U: torch.Tensor, v: torch.Tensor, square: bool = False) -> torch.Tensor:
    """(U_j . v) for every row j (or ||U_j||^2 when square), in v's dtype."""
    out = torch.empty(U.shape[0], dtype=v.dtype, device=U.device)
    rows = max(1, _CHUNK_BYTES // max(1, U.shape[1] * v.element_size()))
    for i in range(0, U.shape[0], rows):
        c = U[i : i + rows].to(v.dtype)
        out[i : i + len(c)] = (c * (c if square else v)).sum(1)
    return out


class TorchBackend(Backend):
    name = "torch"
    description = "vectorised PyTorch reference (one row-wise product per step; the Gram loops in torch), any device"
    device_types = ("cpu", "cuda")
    engines = {"stream": STEPS, "gram": STEPS}  # no loops of its own: the engines' Python loops run

    def prepare(self, U, y):
        return _row_dots(U, y, square=True), _row_dots(U, y)

    def dots(self, U, r):
        return _row_dots(U, r)
