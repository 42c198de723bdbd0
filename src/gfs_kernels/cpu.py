""" "cpu": the fused C++ kernels (csrc/cpu), OpenMP over candidates, AVX2/FMA.

Streaming engine: one pass over U per step computes every candidate's score and the argmin (no
N x M temporary); float32 / float64 / float16 / bfloat16 storage with float32 (float64 for
float64) accumulation; the whole uniform k-step loop runs in one native call.
Gram engine: the whole k-step loop of every step rule in one native call (csrc/cpu/gram_cpu.cpp).
"""

from __future__ import annotations

import torch

from . import _ops
from .base import STEPS, LoopResult


class CpuBackend(_ops.OpBackend):
    name = "cpu"
    description = "fused C++ kernels, OpenMP + AVX2, whole loops in one native call (streaming and Gram)"
    device_types = ("cpu",)
    engines = {"stream": STEPS, "gram": STEPS}
    native_gram = STEPS

    def supports(self, device, dtype, engine="stream", step="uniform"):
        if engine == "gram" and device.type == "cpu" and not _ops.has_gram_kernel("CPU"):
            return _ops.load_error or "the extension was built without csrc/cpu/gram_cpu.cpp"
        return super().supports(device, dtype, engine, step)

    def gram_loop(self, G, b, yy, count, k, step, replacement, stop_loss, tol):
        out = torch.ops.gfs.gram_greedy(
            G, b, float(yy), int(count), int(k), step, bool(replacement), float(stop_loss), float(tol)
        )
        return LoopResult(*out, notes={"gram_loop": "native C++, one call"})

    def unavailable_reason(self):
        if _ops.load_error:
            return _ops.load_error
        if not torch._C._dispatch_has_kernel_for_dispatch_key("gfs::greedy_uniform", "CPU"):
            return "the extension was built without the C++ streaming kernels (csrc/cpu/greedy_cpu.cpp)"
        return None
