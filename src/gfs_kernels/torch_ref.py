""""torch": the vectorised PyTorch reference of the streaming step, any device, any dtype.

Readable rather than fast: one matrix-vector product per step, done in row chunks so that
half-precision storage is upcast a slice at a time (never a full float32 copy of U).
"""
from __future__ import annotations

import torch

from .base import Backend

_CHUNK_BYTES = 64 << 20


def _row_chunks(U: torch.Tensor):
    rows = max(1, _CHUNK_BYTES // max(1, U.shape[1] * 4))
    for i in range(0, U.shape[0], rows):
        yield i, U[i : i + rows]


class TorchBackend(Backend):
    name = "torch"
    description = "vectorised PyTorch reference (one torch.mv per step), any device"
    device_types = ("cpu", "cuda")

    def prepare(self, U, y):
        norms = torch.empty(U.shape[0], dtype=y.dtype, device=U.device)
        b = torch.empty_like(norms)
        for i, chunk in _row_chunks(U):
            c = chunk.to(y.dtype)
            norms[i : i + len(c)] = (c * c).sum(1)
            b[i : i + len(c)] = c @ y
        return norms, b

    def dots(self, U, r):
        if U.dtype == r.dtype:
            return U @ r
        out = torch.empty(U.shape[0], dtype=r.dtype, device=U.device)
        for i, chunk in _row_chunks(U):
            out[i : i + len(chunk)] = chunk.to(r.dtype) @ r
        return out
