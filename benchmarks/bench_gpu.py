"""GPU benchmark of the streaming greedy step: triton, cuda and torch backends against the
bandwidth floor (a bare device-to-device copy of U), float32 and bfloat16.

For each (shape, dtype):
  - copy:     dst.copy_(U), median of several; copy bandwidth = (bytes read + bytes written) / time.
              A step must read U once, so its floor is bytes(U) / copy bandwidth.
  - mv:       a bare torch.mv(U, q) in U's dtype (DESIGN section 5's floor of a streaming step).
  - per step: (time of a whole select with k = K) - (with k = 1), over K - 1: prepare, the final
              gap pass and the end-of-call read cancel out.
  - select:   a whole select with k = 256 (the uniform rule, with replacement, no stop loss).
  - effective bandwidth = bytes(U) / step time, and its % of the copy bandwidth.
Then a torch.profiler run of a whole select per GPU backend, counting cudaStreamSynchronize and
cudaDeviceSynchronize (expected: one, reading the step count at the end).

Writes benchmarks/results/gpu-<device>.md and .json. Run from the repository root after
building the extension in place:

    CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace
    PYTHONPATH=python:src:tests python benchmarks/bench_gpu.py              # full (H100/H200)
    PYTHONPATH=python:src:tests python benchmarks/bench_gpu.py --quick      # small shapes
    PYTHONPATH=python:src:tests python benchmarks/bench_gpu.py --dry-run    # CPU smoke test of the script

Shapes: N=16384 x M=262144 (fp32: 17.2 GB, bf16: 8.6 GB; the copy needs as much again), and a
ResNet-50 layer4 shape: 2048 candidate channels x M = 512 * 7 * 7 * 64 (outputs x spatial x
images) = 1,605,632.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in ("src", "python", "tests"):
    if os.path.join(ROOT, p) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, p))

import gfs_kernels  # noqa: E402
from gfs.engines import stream  # noqa: E402

FULL_SHAPES = [("N16384_M262144", 16384, 262144), ("resnet50_layer4", 2048, 512 * 7 * 7 * 64)]
QUICK_SHAPES = [("N4096_M65536", 4096, 65536), ("N512_M401408", 512, 512 * 7 * 7 * 16)]
DRY_SHAPES = [("dry_N300_M2000", 300, 2000)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms: CUDA events around each call on a GPU, else a host clock."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def make_problem(N, M, dtype, device, seed=0):
    """Random U (never zeros: they can run faster than real data) and a target near a few rows'
    mean, generated on the device in row blocks (no float32 copy of a bfloat16 U)."""
    g = torch.Generator(device=device).manual_seed(seed)
    U = torch.empty(N, M, dtype=dtype, device=device)
    rows = max(1, (256 << 20) // (4 * M))
    for i in range(0, N, rows):
        U[i : i + rows] = torch.randn(min(rows, N - i), M, generator=g, device=device, dtype=torch.float32).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y = U[:8].to(acc).mean(0) + 0.1 * torch.randn(M, generator=g, device=device, dtype=acc)
    return U, y


def backend_select(name, U, y, k):
    return stream.run_on(gfs_kernels.get(name), U, y, k, step="uniform", replacement=True, stop_loss=-1.0)


def count_syncs(name, U, y, k) -> dict:
    from torch.profiler import ProfilerActivity, profile

    backend_select(name, U, y, k)  # warm: compile, autotune, allocator
    _sync(U.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if U.is_cuda else [])
    with profile(activities=acts) as prof:
        backend_select(name, U, y, k)
    names = [e.name for e in prof.events()]
    return {
        "cudaStreamSynchronize": sum(n == "cudaStreamSynchronize" for n in names),
        "cudaDeviceSynchronize": sum(n == "cudaDeviceSynchronize" for n in names),
        "cudaEventSynchronize": sum(n == "cudaEventSynchronize" for n in names),
        "cudaMemcpy(D2H, sync)": sum(n in ("cudaMemcpy",) for n in names),
        "kernel launches": sum(
            n in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC") for n in names
        ),
    }


# ---------------------------------------------------------------------------------------------
def bench_case(label, N, M, dtype_name, device, backends, args) -> dict:
    dtype = DTYPES[dtype_name]
    U, y = make_problem(N, M, dtype, device)
    nbytes = U.numel() * U.element_size()
    out = {"shape": label, "N": N, "M": M, "dtype": dtype_name, "bytes_U": nbytes, "backends": {}}

    dst = torch.empty_like(U)
    copy_ms = time_ms(functools.partial(dst.copy_, U), device, reps=args.reps_copy, warmup=2)
    del dst
    copy_bw = 2 * nbytes / (copy_ms * 1e-3)  # read + write
    out.update(copy_ms=copy_ms, copy_GBps=copy_bw / 1e9, floor_step_ms=1e3 * nbytes / copy_bw)
    q = y.to(dtype)
    mv_ms = time_ms(functools.partial(torch.mv, U, q), device, reps=args.reps_copy, warmup=2)
    out.update(mv_ms=mv_ms, mv_pct_of_copy_bw=100 * (nbytes / (mv_ms * 1e-3)) / copy_bw)
    print(
        f"[{label} {dtype_name}] U {nbytes / 1e9:.2f} GB: copy {copy_ms:.3f} ms ({copy_bw / 1e12:.2f} TB/s r+w), "
        f"floor per step {out['floor_step_ms']:.3f} ms, torch.mv {mv_ms:.3f} ms",
        flush=True,
    )

    ref_picks = None
    for name in backends:
        b = gfs_kernels.get(name)
        why = b.supports(device, dtype)
        if why:
            out["backends"][name] = {"skipped": why}
            print(f"  {name:14s} skipped: {why}", flush=True)
            continue
        K = args.k_step
        if name == "triton+graph":
            b = b.__class__(use_cuda_graph=True)

        def run(k, b=b):
            return stream.run_on(b, U, y, k, step="uniform", replacement=True, stop_loss=-1.0)

        res = run(K)  # warm-up: compile, autotune, first-touch
        picks = res.indices.tolist()
        t1 = time_ms(functools.partial(run, 1), device, reps=args.reps, warmup=0)
        tk = time_ms(functools.partial(run, K), device, reps=args.reps, warmup=0)
        step_ms = max(tk - t1, 1e-9) / (K - 1)
        eff = nbytes / (step_ms * 1e-3)
        sel_ms = time_ms(functools.partial(run, args.k_select), device, reps=args.reps_select, warmup=0)
        agree = None
        if ref_picks is None:
            ref_picks = picks
        else:
            agree = sum(a == c for a, c in zip(picks, ref_picks, strict=False)) / max(1, len(ref_picks))
        out["backends"][name] = {
            "step_ms": step_ms,
            "eff_GBps": eff / 1e9,
            "pct_of_copy_bw": 100 * eff / copy_bw,
            "step_over_floor": step_ms / out["floor_step_ms"],
            f"select_k{args.k_select}_s": sel_ms / 1e3,
            "picks_agree_with_first_backend": agree,
            "notes": {k: v for k, v in res.notes.items()},
        }
        print(
            f"  {name:14s} step {step_ms:8.3f} ms  {eff / 1e9:8.1f} GB/s  {100 * eff / copy_bw:5.1f}% of copy  "
            f"select k={args.k_select}: {sel_ms / 1e3:7.3f} s"
            + (f"  picks agree {agree:.2f}" if agree is not None else ""),
            flush=True,
        )
    U = y = q = None  # free them now (run's closure holds the names, not the tensors)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def write_report(results, meta, path_base):
    with open(path_base + ".json", "w") as f:
        json.dump({"meta": meta, "results": results["cases"], "syncs": results["syncs"]}, f, indent=2)
    lines = [
        f"# GPU benchmark: {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}. "
        f"Per-step time = (select k={meta['k_step']} - select k=1) / {meta['k_step'] - 1}; "
        "floor = bytes(U) / measured copy bandwidth (read + write).",
        "",
    ]
    for case in results["cases"]:
        lines += [
            f"## {case['shape']} (N={case['N']}, M={case['M']}), {case['dtype']}: U = {case['bytes_U'] / 1e9:.2f} GB",
            "",
            f"copy {case['copy_ms']:.3f} ms = {case['copy_GBps']:.0f} GB/s (r+w); floor per step "
            f"{case['floor_step_ms']:.3f} ms; torch.mv {case['mv_ms']:.3f} ms "
            f"({case['mv_pct_of_copy_bw']:.0f}% of copy bandwidth)",
            "",
            f"| backend | step (ms) | GB/s | % of copy BW | step / floor | select k={meta['k_select']} (s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in case["backends"].items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} | | | | |")
                continue
            sel = r[f"select_k{meta['k_select']}_s"]
            lines.append(
                f"| {name} | {r['step_ms']:.3f} | {r['eff_GBps']:.0f} | {r['pct_of_copy_bw']:.1f} | "
                f"{r['step_over_floor']:.2f} | {sel:.3f} |"
            )
        lines.append("")
    lines += [
        "## Host synchronisations during one whole select",
        "",
        "| backend | shape | cudaStreamSynchronize | cudaDeviceSynchronize | cudaEventSynchronize | launches |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in results["syncs"].items():
        if "skipped" in s:
            lines.append(f"| {name} | skipped: {s['skipped']} | | | | |")
            continue
        lines.append(
            f"| {name} | {s['shape']} | {s['cudaStreamSynchronize']} | {s['cudaDeviceSynchronize']} | "
            f"{s['cudaEventSynchronize']} | {s['kernel launches']} |"
        )
    with open(path_base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (about a minute)")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing useful"
    )
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--backends", default="triton,cuda,torch,triton+graph")
    ap.add_argument("--k-step", type=int, default=33, help="K of the per-step difference (select K vs select 1)")
    ap.add_argument("--k-select", type=int, default=256)
    ap.add_argument("--k-profile", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reps-select", type=int, default=2)
    ap.add_argument("--reps-copy", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    if args.dry_run:
        device = torch.device("cpu")
        shapes = DRY_SHAPES
        args.k_step, args.k_select, args.k_profile = 5, 8, 4
        args.reps, args.reps_select, args.reps_copy = 1, 1, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on a GPU machine (or --dry-run to check the script on the CPU)")
        device = torch.device("cuda", torch.cuda.current_device())
        shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    # "triton+graph": the triton backend with its step captured in a CUDA graph
    if "triton+graph" in backends and "triton+graph" not in gfs_kernels.names():
        from gfs_kernels.triton_backend import TritonBackend

        tg = TritonBackend(use_cuda_graph=True)
        tg.name = "triton+graph"
        gfs_kernels.register(tg)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    meta = {
        "device": dev_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "k_step": args.k_step,
        "k_select": args.k_select,
        "sms": torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None,
        "dry_run": args.dry_run,
        "availability": gfs_kernels.availability(device, torch.float32),
    }
    print(json.dumps({k: meta[k] for k in ("device", "torch", "triton", "cuda", "sms")}), flush=True)

    results = {"cases": [], "syncs": {}}
    for label, N, M in shapes:
        for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            results["cases"].append(bench_case(label, N, M, dt, device, backends, args))

    # host synchronisations during one whole select (a mid-size problem)
    pN, pM = (4096, 65536) if not args.dry_run else (300, 2000)
    U, y = make_problem(pN, pM, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    for name in [b for b in backends if b != "torch"] + ["torch"]:
        if name not in gfs_kernels.names():
            continue
        why = gfs_kernels.get(name).supports(device, U.dtype)
        if why:
            results["syncs"][name] = {"skipped": why}
            continue
        s = count_syncs(name, U, y, args.k_profile)
        s["shape"] = f"N={pN}, M={pM}, {str(U.dtype).removeprefix('torch.')}, k={args.k_profile}"
        results["syncs"][name] = s
        print(f"syncs during one select, {name}: {s}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")
    base = os.path.join(args.out, f"gpu-{slug}" + ("-dryrun" if args.dry_run else "-quick" if args.quick else ""))
    write_report(results, meta, base)
    print(f"wrote {base}.md and {base}.json")
    print(open(base + ".md").read())


if __name__ == "__main__":
    main()
