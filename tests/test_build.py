"""The compiled extension is part of an install: a missing build is a failure, not a skip."""

import os
import shutil

import pytest
import torch

from gfs_kernels import _ops


def test_extension_imports_and_registers_its_operators():
    assert _ops.load_error is None, _ops.load_error
    for op in ("prepare", "dots", "greedy_uniform"):
        assert hasattr(torch.ops.gfs, op)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gfs::{op}", "CPU")


@pytest.mark.skipif(
    torch.version.cuda is None or shutil.which("nvcc") is None or os.environ.get("GFS_BUILD_CUDA") == "0",
    reason="no CUDA toolkit or CPU-only torch here: the CUDA sources are not compiled",
)
def test_cuda_sources_were_compiled_into_the_extension():
    assert _ops.has_cuda_kernels(), "nvcc and a CUDA torch are present but the extension has no CUDA kernels"


def test_the_native_gram_loop_is_registered():
    assert _ops.load_error is None, _ops.load_error
    assert hasattr(torch.ops.gfs, "gram_greedy")
    assert _ops.has_gram_kernel("CPU")
