"""The persistent Triton program of the Gram engine's uniform loop (src/gfs_kernels/triton_gram.py):
run under the Triton interpreter on the CPU against the PyTorch loop, compiled for sm_90 without
a GPU (no register spills), and run on a GPU where there is one."""

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_INTERPRET = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
from gfs_kernels import triton_gram
from gfs.engines import uniform
from gfs.stats import GramStats

out = []
cases = [(1, 1, 3, True, None), (5, 3, 9, True, None), (37, 20, 30, False, 16), (70, 40, 25, True, 16),
         (64, 10, 12, True, 16), (40, 30, 40, False, 8)]
for N, M, k, rep, block in cases:
    g = torch.Generator().manual_seed(N)
    if N == 64:  # duplicated candidates across tiles: ties must go to the lowest index
        base = torch.randint(-2, 3, (16, M), generator=g).double()
        U, y = base.repeat(4, 1), torch.randint(-2, 3, (M,), generator=g).double()
    else:
        U, y = torch.randn(N, M, generator=g, dtype=torch.float64), torch.randn(M, generator=g, dtype=torch.float64)
    st = GramStats.from_features(U, y)
    blk = block or triton_gram.triton.next_power_of_2(N)
    for stop in (-1.0, st.dense_loss + 0.05):
        idx, losses, gaps = triton_gram.gram_uniform(st.G, st.b, st.yy, st.count, k, rep, stop, block=blk)
        ref = uniform.gram_loop(lambda j: st.G[j], torch.diagonal(st.G).contiguous(), st.b, st.yy, st.count, k,
                                replacement=rep, stop_loss=stop)
        out.append(dict(case=[N, M, k, rep, blk, stop], same=idx.tolist() == ref.indices.tolist(),
                        loss=float((losses - ref.losses).abs().max()), gap=float((gaps - ref.gaps).abs().max())))
print(json.dumps(out))
"""


def test_interpreter_matches_the_torch_loop():
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join(
            [os.path.join(ROOT, "python"), os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    run = subprocess.run([sys.executable, "-c", _INTERPRET], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 12
    for r in results:
        assert r["same"], r
        assert r["loss"] < 1e-12 and r["gap"] < 1e-12, r


def _nvidia_backend():
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")


@pytest.mark.parametrize("replacement", [True, False])
def test_compiles_for_sm90_without_register_spills(replacement):
    _nvidia_backend()
    from gfs_kernels import triton_gram

    compiled = triton_gram.compile_for(90, replacement)
    assert "cubin" in compiled.asm and "gram_uniform_kernel" in compiled.asm["ptx"]
    report = triton_gram.ptxas_report(compiled, 90)
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["text"]
    assert report["registers"] is not None and report["registers"] <= 255


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("replacement", [True, False])
def test_gpu_matches_the_native_cpu_loop(replacement):  # pragma: no cover - needs a GPU
    import gfs

    g = torch.Generator().manual_seed(0)
    U, y = torch.randn(3000, 700, generator=g, dtype=torch.float64), torch.randn(700, generator=g, dtype=torch.float64)
    cpu = gfs.select(gfs.GramStats.from_features(U, y), k=500, replacement=replacement)
    gpu = gfs.select(gfs.GramStats.from_features(U.cuda(), y.cuda()), k=500, replacement=replacement)
    assert gpu.backend == "triton" and gpu.engine == "gram"
    assert gpu.indices.tolist() == cpu.indices.tolist()
    torch.testing.assert_close(gpu.losses, cpu.losses, rtol=1e-10, atol=1e-12)
