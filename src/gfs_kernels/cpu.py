""""cpu": the fused C++ kernel (csrc/cpu), OpenMP over candidates, AVX2/FMA.

One pass over U per step computes every candidate's score and the argmin (no N x M
temporary); float32 / float64 / float16 / bfloat16 storage with float32 (float64 for float64)
accumulation; the whole k-step loop runs in one native call.
"""
from __future__ import annotations

import torch

from . import _ops


class CpuBackend(_ops.OpBackend):
    name = "cpu"
    description = "fused C++ kernel, OpenMP + AVX2, whole loop in one native call"
    device_types = ("cpu",)

    def unavailable_reason(self):
        if _ops.load_error:
            return _ops.load_error
        if not torch._C._dispatch_has_kernel_for_dispatch_key("gfs::greedy_uniform", "CPU"):
            return "the extension was built without the C++ streaming kernels (csrc/cpu/greedy_cpu.cpp)"
        return None
