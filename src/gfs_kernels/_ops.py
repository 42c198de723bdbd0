"""Loads the compiled extension (gfs_kernels._C) and gives its operators fake implementations
so torch.compile / FakeTensor tracing can pass through them.

`load_error` is None when the extension imported, else the one-line reason it did not.
"""

from __future__ import annotations

import importlib.util

import torch

from .base import Backend, LoopResult

_REBUILD = "build it with `pip install --no-build-isolation -e .`"
load_error: str | None
if importlib.util.find_spec(f"{__package__}._C") is None:
    load_error = f"compiled extension gfs_kernels._C is not built; {_REBUILD}"
else:
    try:
        from . import _C  # noqa: F401  (importing registers torch.ops.gfs.*)

        load_error = None
    except ImportError as exc:  # e.g. built against another torch
        load_error = f"compiled extension gfs_kernels._C does not import ({exc}); re{_REBUILD}"


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources."""
    if load_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("gfs::dots", "CUDA")


if load_error is None:

    @torch.library.register_fake("gfs::prepare")
    def _prepare_fake(U, y):
        return U.new_empty(U.shape[0], dtype=y.dtype), U.new_empty(U.shape[0], dtype=y.dtype)

    @torch.library.register_fake("gfs::dots")
    def _dots_fake(U, r):
        return U.new_empty(U.shape[0], dtype=r.dtype)

    @torch.library.register_fake("gfs::greedy_uniform")
    def _greedy_uniform_fake(U, y, k, replacement, stop_loss):
        s = torch.library.get_ctx().new_dynamic_size(min=1, max=k)
        f64 = dict(dtype=torch.float64, device=U.device)
        return U.new_empty(s, dtype=torch.int64), U.new_empty(s, **f64), U.new_empty(s, **f64)

    @torch.library.register_fake("gfs::gram_greedy")
    def _gram_greedy_fake(G, b, yy, count, k, step, replacement, stop_loss, tol):
        s = torch.library.get_ctx().new_dynamic_size(min=1, max=k)
        f64 = dict(dtype=torch.float64, device=G.device)
        return (
            G.new_empty(s, dtype=torch.int64),
            G.new_empty(s, **f64),
            G.new_empty(s, **f64),
            G.new_empty(s, **f64),
            G.new_empty(G.shape[0], **f64),
        )


class OpBackend(Backend):
    """A backend whose primitives are the torch.ops.gfs operators: the dispatcher runs the
    kernel registered for the tensors' device (csrc/cpu or csrc/cuda), the whole uniform loop
    included. Subclasses say when they are usable."""

    native_uniform = True

    def prepare(self, U, y):
        return torch.ops.gfs.prepare(U, y)

    def dots(self, U, r):
        return torch.ops.gfs.dots(U, r)

    def greedy_uniform(self, U, y, k, replacement, stop_loss):
        idx, losses, gaps = torch.ops.gfs.greedy_uniform(U, y, k, replacement, stop_loss)
        return LoopResult.uniform(idx, losses, gaps, U.shape[0])


def has_gram_kernel(device_type: str = "CPU") -> bool:
    """True when the extension has the native Gram loop (gfs::gram_greedy) for this device."""
    if load_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("gfs::gram_greedy", device_type)
