""" "triton": the fused streaming step in Triton (kernels in `triton_step`).

Runs on CUDA devices; on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1,
which must be set before triton is first imported), where it is a correctness check, not a
fast path. The whole k-step loop stays on the device: the host launches k steps without
reading anything back, and reads the number of steps taken once at the end.

Set GFS_TRITON_GRAPH=1 (or `TritonBackend(use_cuda_graph=True)`) to capture one step in a CUDA
graph and replay it k - 1 times (fewer launch gaps for small problems).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .base import STEPS, Backend, LoopResult


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton step (split-M partial sums, one-program argmin), device-resident loop"
    device_types = ("cuda",)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    engines = {"stream": STEPS, "gram": ("uniform",)}
    native_uniform = True
    native_gram = ("uniform",)  # one persistent Triton program (triton_gram.py)

    def __init__(self, use_cuda_graph: bool | None = None):
        if use_cuda_graph is None:
            use_cuda_graph = os.environ.get("GFS_TRITON_GRAPH", "0") not in ("", "0")
        self.use_cuda_graph = use_cuda_graph

    def unavailable_reason(self):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if _interpret():
            return None
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def supports(self, device, dtype, engine="stream", step="uniform"):
        device = torch.device(device)
        if engine == "gram":
            if device.type != "cuda":
                return f"runs the Gram engine on cuda, not {device.type}"
            from . import triton_gram

            return triton_gram.unavailable_reason() or super().supports(device, dtype, engine, step)
        if device.type == "cpu":
            if importlib.util.find_spec("triton") is None:
                return "triton is not installed"
            if not _interpret():
                return "runs on cuda; on cpu only under the Triton interpreter (TRITON_INTERPRET=1)"
            if dtype not in self.dtypes:
                return f"does not take {dtype}"
            return None
        return super().supports(device, dtype, engine, step)

    @staticmethod
    def _k():
        from . import triton_step  # imported lazily: triton reads TRITON_INTERPRET at import

        return triton_step

    @staticmethod
    def _rows(U):
        """The kernels need unit stride along M (any row stride)."""
        return U if U.stride(-1) == 1 else U.contiguous()

    def prepare(self, U, y):
        return self._k().prepare(self._rows(U), y.contiguous())

    def dots(self, U, r):
        return self._k().dots(self._rows(U), r.contiguous())

    def greedy_uniform(self, U, y, k, replacement, stop_loss):
        U, y = self._rows(U), y.contiguous()
        loop = self._k().GreedyLoop(U, y, k, replacement, stop_loss)
        picks, losses, gaps = loop.run(use_graph=self.use_cuda_graph)
        notes = {"splits": loop.splits, "cuda_graph": bool(self.use_cuda_graph and U.is_cuda and k > 1)}
        return LoopResult.uniform(picks, losses, gaps, U.shape[0], notes)

    def gram_loop(self, G, b, yy, count, k, step, replacement, stop_loss, tol):
        from . import triton_gram

        idx, losses, gaps = triton_gram.gram_uniform(G, b, yy, count, k, replacement, stop_loss)
        return LoopResult.uniform(idx, losses, gaps, G.shape[0], {"gram_loop": "one persistent Triton program"})
