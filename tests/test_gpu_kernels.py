"""The GPU backends ("triton", "cuda") and host streaming, checked where CI runs: without a GPU.

- The Triton kernels run under the Triton interpreter on CPU tensors, in a subprocess (the
  interpreter is chosen when triton is imported), against the float64 reference.
- Every Triton kernel variant the GPU path launches is compiled for sm_90 (no device needed);
  a compile error or a register spill fails.
- The CUDA sources are compiled by the normal build; the extension must carry CUDA kernels
  (and no local-memory spills in them) wherever nvcc and a CUDA torch exist.
- Host streaming: chunk planning, and the streamed loop on the CPU.
- Tests that need a real GPU are marked `gpu` and skipped without one.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from reference import brute_force_uniform, check_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not _has_triton(), reason="triton is not installed")


# ---------------------------------------------------------------------------------------------
# Triton under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------
INTERPRET_CASES = [
    "float32_well_separated",
    "bfloat16_well_separated",
    "float16_and_float64_small",
    "ragged_shapes_and_tiny",
    "integer_ties_float32",
    "integer_ties_bfloat16",
    "all_equal_candidates",
    "no_replacement",
    "stop_loss",
    "k_zero_and_k_above_n",
    "prepare_and_dots",
    "deterministic",
    "host_stream_with_triton_dots",
    "supports_cpu_under_interpreter",
]


@functools.lru_cache(maxsize=1)
def _interpreter_results() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, p) for p in ("python", "src", "tests")] + [env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "triton_interpret_check.py"), *INTERPRET_CASES],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            results[d["case"]] = d
    results["_stderr"] = proc.stderr[-4000:]
    return results


@needs_triton
@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_triton_interpreter(case):
    res = _interpreter_results()
    assert case in res, f"case {case} did not report; subprocess stderr:\n{res['_stderr']}"
    assert res[case]["ok"], res[case]["error"]


# ---------------------------------------------------------------------------------------------
# Triton: every kernel compiled for sm_90, no spills
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _sm90_specs():
    if not _has_triton():
        return {}
    from gfs_kernels import triton_step

    return {s["name"]: s for s in triton_step.sm90_compile_specs()}


def _spec_names():
    try:
        return list(_sm90_specs()) or ["<triton missing>"]
    except Exception as exc:  # noqa: BLE001 - reported by the test itself
        return [f"<spec error: {exc}>"]


@needs_triton
@pytest.mark.parametrize("name", _spec_names())
def test_triton_kernel_compiles_for_sm90_without_spills(name):
    from gfs_kernels import triton_aot

    assert name in _sm90_specs(), name
    spec = _sm90_specs()[name]
    compiled = triton_aot.compile_spec(spec)  # raises on a compile error
    res = triton_aot.kernel_resources(compiled)
    assert res["spills"] == 0, f"{name}: {res}"
    assert res.get("stack_frame", 0) == 0, f"{name}: local memory in use: {res}"
    assert res["registers"] <= 255, res
    if name.startswith("dots_partial") and "unaligned" not in name:
        # the streaming loads of U are 16 bytes wide on the aligned path
        assert triton_aot.count_16byte_loads(compiled.asm["ptx"]) > 0, f"{name}: no 16-byte loads"


# ---------------------------------------------------------------------------------------------
# registry and availability on a machine without a GPU
# ---------------------------------------------------------------------------------------------
def test_gpu_backends_registered_and_explain_themselves():
    import gfs_kernels

    assert {"triton", "cuda"} <= set(gfs_kernels.names())
    assert gfs_kernels.PREFERENCE["stream"]["cuda"][:2] == ["cuda", "triton"]
    assert gfs_kernels.PREFERENCE["gram"]["cuda"][0] == "triton"
    avail = gfs_kernels.availability("cuda", torch.float32)
    for name in ("triton", "cuda"):
        if not HAS_CUDA:
            assert avail[name], f"{name} should explain why it cannot run here"
            assert "\n" not in avail[name]
    if not HAS_CUDA:
        assert avail["triton"] == "no CUDA device" or "triton" in avail["triton"]
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        reason = gfs_kernels.get("triton").supports(torch.device("cpu"), torch.float32)
        assert reason and ("interpreter" in reason or "triton" in reason)


# ---------------------------------------------------------------------------------------------
# the CUDA extension
# ---------------------------------------------------------------------------------------------
def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.isfile(path) else shutil.which("nvcc")


needs_cuda_build = pytest.mark.skipif(
    _nvcc() is None or torch.version.cuda is None,
    reason="no CUDA toolkit (nvcc) or a CPU-only torch: the CUDA sources are not built here",
)


def _extension_path() -> str | None:
    from gfs_kernels import _ops

    if _ops.load_error is not None:
        return None
    import gfs_kernels._C as C

    return C.__file__


@needs_cuda_build
def test_cuda_extension_built_with_cuda_kernels():
    from gfs_kernels import _ops

    assert _ops.load_error is None, (
        f"{_ops.load_error}\nbuild in place with: CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace"
    )
    assert _ops.has_cuda_kernels(), "gfs_kernels._C was built without its CUDA sources (csrc/cuda/*.cu)"
    for op in ("gfs::prepare", "gfs::dots", "gfs::greedy_uniform"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    reason = __import__("gfs_kernels").get("cuda").unavailable_reason()
    if not HAS_CUDA:
        assert reason == "no CUDA device"


def _cuobjdump() -> str | None:
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    nvcc = _nvcc()
    if nvcc and os.path.isfile(os.path.join(os.path.dirname(nvcc), "cuobjdump")):
        return os.path.join(os.path.dirname(nvcc), "cuobjdump")
    return shutil.which("cuobjdump")


@needs_cuda_build
def test_cuda_kernels_are_sm90_and_spill_free():
    so = _extension_path()
    assert so, "the extension is not built"
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither triton's bundled one nor the toolkit's)")
    out = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "sm_90" in text, "no sm_90 code in the extension"
    kernels = [blk for blk in text.split("Function ")[1:] if "gfs_cuda" in blk or "dots_partial" in blk]
    names = {"dots_partial", "select_kernel", "update_kernel", "loss_kernel", "reduce_splits"}
    assert all(any(n in blk for blk in kernels) for n in names), f"kernels missing from:\n{text[:2000]}"
    for blk in kernels:
        local = int(blk.split("LOCAL:")[1].split()[0])
        stack = int(blk.split("STACK:")[1].split()[0])
        assert local == 0 and stack == 0, f"local memory (spills) in {blk.split(':')[0]}"


# ---------------------------------------------------------------------------------------------
# host streaming (no GPU needed)
# ---------------------------------------------------------------------------------------------
def test_plan_chunks_fits_budget_and_covers_rows():
    from gfs_kernels.host_stream import plan_chunks

    for N, M, itemsize, budget in [
        (1000, 4096, 2, 64 << 20),
        (7, 3, 4, 10_000),
        (100_000, 262_144, 2, 6 << 30),
        (5, 1000, 4, 2 * 1000 * 4),
    ]:
        p = plan_chunks(N, M, itemsize, budget)
        assert p.buffers * p.buffer_bytes <= budget
        r = p.ranges()
        assert r[0][0] == 0 and r[-1][1] == N and all(a[1] == b[0] for a, b in itertools.pairwise(r))
        assert all(0 < i1 - i0 <= p.rows for i0, i1 in r) and len(r) == p.n_chunks
        sizes = [i1 - i0 for i0, i1 in r]
        assert max(sizes) - min(sizes) <= 1  # balanced
    big = plan_chunks(100_000, 262_144, 2, 6 << 30)
    assert big.buffer_bytes <= (256 << 20) and big.n_chunks > 2  # several chunks in flight
    assert plan_chunks(10, 10, 4, 1 << 30).n_chunks == 1  # small U: one chunk
    with pytest.raises(MemoryError):
        plan_chunks(10, 1_000_000, 4, 4_000_000)  # two one-row buffers do not fit
    with pytest.raises(ValueError):
        plan_chunks(0, 10, 4, 1 << 20)


def test_fits_on_device_uses_free_memory():
    from gfs.engines.cost import fits_on_device
    from gfs_kernels.host_stream import workspace_bytes

    shape = (1000, 2000, torch.bfloat16)
    need = 1000 * 2000 * 2 + workspace_bytes(*shape)
    assert fits_on_device(*shape, "cuda", free_bytes=2 * need)
    assert not fits_on_device(*shape, "cuda", free_bytes=need)  # headroom: 90% of free memory
    assert fits_on_device(*shape, "cpu")


def _integer_problem(N, M, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.randint(-3, 4, (N, M), generator=g).float()
    U[N - 1] = U[0]
    U[N // 2] = U[1]
    U[4] = 0.0
    y = torch.randint(-3, 4, (M,), generator=g).float()
    return U, y


@pytest.mark.parametrize("rows", [1, 3, 8, 41])
@pytest.mark.parametrize("replacement", [True, False])
def test_streamed_loop_matches_reference_on_cpu(rows, replacement):
    from gfs_kernels.host_stream import greedy_uniform_streamed, plan_chunks
    from gfs_kernels.torch_ref import TorchBackend

    U, y = _integer_problem(41, 60, 3)
    plan = plan_chunks(41, 60, 4, 2 * rows * 60 * 4)
    assert plan.rows == rows or plan.rows == -(-41 // plan.n_chunks)
    res = greedy_uniform_streamed(TorchBackend(), U, y, 12, replacement, -1.0, device="cpu", plan=plan)
    rp, rl, rg, _ = brute_force_uniform(U.double().numpy(), y.double().numpy(), 12, replacement)
    assert res.indices.tolist() == rp
    check_path(
        U.double().numpy(), y.double().numpy(), res.indices.tolist(), res.losses.numpy(), replacement=replacement
    )
    assert np.allclose(res.gaps.numpy(), rg, rtol=1e-6, atol=1e-9)
    assert res.notes["host_stream_chunks"] == plan.n_chunks
    assert "streamed" in res.notes["host_stream"]


def test_streamed_loop_stop_loss_and_k_zero():
    from gfs.engines.uniform import stream_loop as uniform_loop
    from gfs_kernels.host_stream import greedy_uniform_streamed, plan_chunks
    from gfs_kernels.torch_ref import TorchBackend

    U, y = _integer_problem(30, 40, 4)
    plan = plan_chunks(30, 40, 4, 2 * 7 * 40 * 4)
    _, rl, _, _ = brute_force_uniform(U.double().numpy(), y.double().numpy(), 10)
    stop = float(rl[2]) * (1 + 1e-9)  # float64 rounding of z differs between formulas
    res = greedy_uniform_streamed(TorchBackend(), U, y, 10, True, stop, device="cpu", plan=plan)
    ref = uniform_loop(TorchBackend(), U, y, 10, True, stop)
    assert res.indices.tolist() == ref.indices.tolist() and len(res.indices) == 3
    assert torch.allclose(res.gaps, ref.gaps)
    res0 = greedy_uniform_streamed(TorchBackend(), U, y, 0, True, -1.0, device="cpu", plan=plan)
    ref0 = uniform_loop(TorchBackend(), U, y, 0, True, -1.0)
    assert len(res0.indices) == 0 and torch.allclose(res0.gaps, ref0.gaps)


# ---------------------------------------------------------------------------------------------
# on a real GPU
# ---------------------------------------------------------------------------------------------
GPU_BACKENDS = ["triton", "cuda"]


def _gpu_backend(name):
    import gfs_kernels

    b = gfs_kernels.get(name)
    why = b.unavailable_reason()
    if why:
        pytest.skip(f"{name}: {why}")
    return b


def _problem(N, M, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(N, M, generator=g, dtype=torch.float64)
    y = U[: max(2, N // 10)].mean(0) + 0.05 * torch.randn(M, generator=g, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return U.to(dtype).to(device), y.to(acc).to(device)


@gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(300, 1000), (1037, 4099), (5, 1)])
def test_gpu_greedy_matches_reference(name, dtype, shape):
    b = _gpu_backend(name)
    N, M = shape
    U, y = _problem(N, M, dtype, seed=N + M)
    k = min(16, 2 * N)
    res = b.greedy_uniform(U, y, k, True, -1.0)
    U64, y64 = U.double().cpu().numpy(), y.double().cpu().numpy()
    rp, rl, rg, _ = brute_force_uniform(U64, y64, k)
    picks = res.indices.cpu().tolist()
    check_path(U64, y64, picks, res.losses.cpu().numpy())
    assert len(res.gaps) == len(rg)
    assert np.allclose(res.gaps.cpu().numpy(), rg, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(rg).max()))


@gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("replacement", [True, False])
def test_gpu_integer_ties_and_no_replacement(name, replacement):
    b = _gpu_backend(name)
    U, y = _integer_problem(2049, 515, 5)
    U[2000] = U[7]
    res = b.greedy_uniform(U.cuda(), y.cuda(), 24, replacement, -1.0)
    rp, _, _, _ = brute_force_uniform(U.double().numpy(), y.double().numpy(), 24, replacement)
    assert res.indices.cpu().tolist() == rp
    ones = torch.ones(3000, 64, device="cuda")
    r = b.greedy_uniform(ones, torch.full((64,), 2.0, device="cuda"), 5, replacement, -1.0)
    assert r.indices.cpu().tolist() == ([0] * 5 if replacement else [0, 1, 2, 3, 4])


@gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_stop_loss_and_determinism(name):
    b = _gpu_backend(name)
    U, y = _problem(777, 2048, torch.float32, 9)
    _, rl, _, _ = brute_force_uniform(U.double().cpu().numpy(), y.double().cpu().numpy(), 40)
    res = b.greedy_uniform(U, y, 40, True, float(rl[20]) * (1 + 1e-9))
    assert len(res.indices) == 21 and len(res.gaps) == 21
    a = b.greedy_uniform(U, y, 30, True, -1.0)
    c = b.greedy_uniform(U, y, 30, True, -1.0)
    assert torch.equal(a.indices, c.indices) and torch.equal(a.losses, c.losses) and torch.equal(a.gaps, c.gaps)


@gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_prepare_and_dots(name):
    b = _gpu_backend(name)
    for dtype in (torch.float32, torch.bfloat16):
        U, y = _problem(4100, 3000, dtype, 11)
        norms, bb = b.prepare(U, y)
        U64 = U.double()
        assert torch.allclose(norms.double(), (U64 * U64).sum(1), rtol=1e-5)
        r = torch.randn(3000, device="cuda")
        ref = U64 @ r.double()
        assert float((b.dots(U, r).double() - ref).norm() / ref.norm()) < 1e-5
        # unaligned rows (M not a multiple of 16 bytes) take the scalar path
        V = U[:, :2999]
        ref = V.double() @ r[:2999].double()
        assert float((b.dots(V, r[:2999]).double() - ref).norm() / ref.norm()) < 1e-5


@gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_one_sync_per_select(name):
    """A whole select synchronises once (reading the number of steps at the end)."""
    b = _gpu_backend(name)
    U, y = _problem(4096, 8192, torch.bfloat16, 13)
    b.greedy_uniform(U, y, 8, True, -1.0)  # compile, autotune, warm the allocator
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        b.greedy_uniform(U, y, 64, True, -1.0)
    syncs = [e for e in prof.events() if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize")]
    assert len(syncs) == 1, [e.name for e in syncs]


@gpu
@needs_gpu
def test_gpu_triton_cuda_graph_matches_eager():
    from gfs_kernels.triton_backend import TritonBackend

    if TritonBackend().unavailable_reason():
        pytest.skip(TritonBackend().unavailable_reason())
    U, y = _problem(1500, 4096, torch.bfloat16, 17)
    a = TritonBackend(use_cuda_graph=False).greedy_uniform(U, y, 20, False, -1.0)
    g = TritonBackend(use_cuda_graph=True).greedy_uniform(U, y, 20, False, -1.0)
    assert torch.equal(a.indices, g.indices) and torch.equal(a.losses, g.losses)


@gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_host_stream_matches_device_resident(name):
    from gfs_kernels.host_stream import greedy_uniform_streamed, plan_chunks

    b = _gpu_backend(name)
    U, y = _problem(3001, 2048, torch.bfloat16, 19, device="cpu")
    for pin in (False, True):
        Uh = U.pin_memory() if pin else U
        plan = plan_chunks(3001, 2048, 2, 2 * 500 * 2048 * 2)  # 7 chunks
        res = greedy_uniform_streamed(b, Uh, y, 12, False, -1.0, device="cuda", plan=plan)
        ref = b.greedy_uniform(U.cuda(), y.cuda(), 12, False, -1.0)
        assert res.indices.cpu().tolist() == ref.indices.cpu().tolist()
        assert torch.allclose(res.losses.cpu(), ref.losses.cpu(), rtol=1e-9)
        assert "pinned" in res.notes["host_stream"]
