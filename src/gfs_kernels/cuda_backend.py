""" "cuda": the fused CUDA C++ kernels (csrc/cuda/greedy_cuda.cu), registered for the CUDA
dispatch key of the gfs operators.

16-byte streaming loads of several rows per block, warp-shuffle reductions, deterministic
split-M partial sums, a one-block argmin (lowest index on ties); the whole k-step loop is one
native call with no host synchronisation until it reads the number of steps taken at the end
(the stop loss is checked on the device). float32 / float16 / bfloat16 / float64 storage.
"""

from __future__ import annotations

import torch

from . import _ops


class CudaBackend(_ops.OpBackend):
    name = "cuda"
    description = "fused CUDA C++ kernels (16-byte loads, warp shuffles), device-resident loop"
    device_types = ("cuda",)

    def unavailable_reason(self):
        if _ops.load_error is not None:
            return _ops.load_error
        if not _ops.has_cuda_kernels():
            return "extension gfs_kernels._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
