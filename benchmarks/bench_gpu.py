"""GPU benchmark of the streaming greedy step: triton, cuda and torch backends against the
bandwidth floor (a bare device-to-device copy of U), float32 and bfloat16.

For each (shape, dtype):
  - copy:     dst.copy_(U), median of several; copy bandwidth = (bytes read + bytes written) / time.
              A step must read U once, so its floor is bytes(U) / copy bandwidth.
  - mv:       a bare torch.mv(U, q) in U's dtype (docs/design.md section 5's floor of a streaming step).
  - per step: (time of a whole select with k = K) - (with k = 1), over K - 1: prepare, the final
              gap pass and the end-of-call read cancel out.
  - select:   a whole select with k = 256 (the uniform rule, with replacement, no stop loss).
  - effective bandwidth = bytes(U) / step time, and its % of the copy bandwidth.
Then a torch.profiler run of a whole select per GPU backend, counting cudaStreamSynchronize and
cudaDeviceSynchronize (expected: one, reading the step count at the end).

Two more parts (`--parts`, default all):
  - gram: the Gram engine's uniform loop from (G, b) on the device, one launch for all k steps
    (the "triton" backend's persistent program) against a loop of per-step launches (the "torch"
    backend: gfs.engines.uniform.gram_loop over torch operations, a host round trip per step),
    and the native CPU loop on a host copy; ms per step and whether the picks agree.
  - host: features in host memory streamed to the device every step (gfs_kernels.host_stream,
    double-buffered row chunks), pinned and through pinned staging buffers, against the floor
    bytes(U) / measured host-to-device copy bandwidth (pinned); picks against device-resident.
`--deadline-s` skips what would start after that many seconds (the report says so), and the
report is rewritten after every part, so a run cut short still leaves its numbers.

Writes benchmarks/results/gpu-<device>.md and .json. Run from the repository root after
building the extension in place:

    CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace
    PYTHONPATH=python:src:tests python benchmarks/bench_gpu.py              # full (H100/H200)
    PYTHONPATH=python:src:tests python benchmarks/bench_gpu.py --quick      # small shapes
    PYTHONPATH=python:src:tests python benchmarks/bench_gpu.py --dry-run    # CPU smoke test of the script
    benchmarks/gpu_check.sh                                                  # build + GPU tests + this, one command

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


# ---------------------------------------------------------------------------------------------
GRAM_SHAPES = {"full": [(4096, 4096), (16384, 2048)], "quick": [(4096, 1024)], "dry": [(300, 200)]}
HOST_SHAPES = {"full": [(4096, 65536)], "quick": [(2048, 32768)], "dry": [(300, 2000)]}


def gram_problem(N, device, seed=0):
    """(G, b, yy, count) of random features (N x 2N, float64) built on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    m = 2 * N
    A = torch.randn(N, m, generator=g, device=device, dtype=torch.float64)
    y = A[: max(1, N // 8)].mean(0) + 0.1 * torch.randn(m, generator=g, device=device, dtype=torch.float64)
    return A @ A.T, A @ y, float(y @ y), m


def bench_gram(device, size, args) -> list[dict]:
    """The Gram loop on the device: one launch for all k steps vs per-step launches."""
    from gfs.engines import gram as gram_engine

    rows = []
    for N, k in GRAM_SHAPES[size]:
        G, b, yy, count = gram_problem(N, device)
        row = {"N": N, "k": k, "loops": {}}
        picks = {}
        runs = {
            "one launch (triton)": ("triton", G, b),
            "per-step launches (torch)": ("torch", G, b),
            "native CPU loop (host copy)": ("cpu", G.cpu(), b.cpu()),
        }
        for label, (name, Gd, bd) in runs.items():
            backend = gfs_kernels.get(name)
            why = backend.supports(Gd.device, torch.float64, "gram", "uniform")
            if why:
                row["loops"][label] = {"skipped": why}
                print(f"  gram N={N} k={k} {label}: skipped: {why}", flush=True)
                continue

            run = functools.partial(
                gram_engine.run,
                backend,
                Gd,
                bd,
                yy,
                count,
                k,
                step="uniform",
                replacement=True,
                stop_loss=-1.0,
                tol=1e-9,
            )
            res = run()  # warm-up: compile, first launch
            reps = 1 if name == "torch" else args.reps
            ms = time_ms(run, Gd.device, reps=reps, warmup=0)
            picks[label] = res.indices.cpu()
            row["loops"][label] = {"ms": ms, "us_per_step": 1e3 * ms / k, "notes": dict(res.notes)}
            print(f"  gram N={N} k={k} {label:30s} {ms:9.2f} ms  {1e3 * ms / k:8.2f} us/step", flush=True)
        ref = next(iter(picks.values()), None)
        for label, p in picks.items():
            row["loops"][label]["picks_agree"] = float((p == ref).double().mean()) if ref is not None else None
        one, per = row["loops"].get("one launch (triton)", {}), row["loops"].get("per-step launches (torch)", {})
        if "ms" in one and "ms" in per:
            row["per_step_launches_over_one_launch"] = per["ms"] / one["ms"]
        rows.append(row)
        G = b = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_host(device, size, args, backends) -> list[dict]:
    """U in host memory streamed to the device every step, against the host-to-device floor."""
    from gfs_kernels import host_stream

    rows = []
    K = max(3, min(args.k_step, 9))
    for N, M in HOST_SHAPES[size]:
        for dtype_name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            dtype = DTYPES[dtype_name]
            U, y = make_problem(N, M, dtype, torch.device("cpu"))
            nbytes = U.numel() * U.element_size()
            row = {"N": N, "M": M, "dtype": dtype_name, "bytes_U": nbytes, "runs": {}}
            if device.type == "cuda":
                pinned = U.pin_memory()
                dst = torch.empty_like(U, device=device)
                h2d = functools.partial(dst.copy_, pinned, non_blocking=True)
                h2d_ms = time_ms(h2d, device, reps=args.reps_copy, warmup=2)
                h2d = None
                del dst
                row.update(h2d_ms=h2d_ms, h2d_GBps=nbytes / (h2d_ms * 1e-3) / 1e9, floor_step_ms=h2d_ms)
            else:
                pinned = U
            plan = host_stream.plan_chunks(N, M, U.element_size(), 2 * host_stream.TARGET_CHUNK_BYTES)
            if plan.n_chunks < 2:  # make the double buffering do something even on small shapes
                plan = host_stream.plan_chunks(N, M, U.element_size(), nbytes, target_chunk_bytes=max(1, nbytes // 4))
            row["chunks"] = plan.n_chunks
            resident = None
            for name in [b for b in backends if b in ("triton", "cuda")]:
                backend = gfs_kernels.get(name)
                why = backend.supports(device, dtype)
                if why:
                    row["runs"][name] = {"skipped": why}
                    print(f"  host {N}x{M} {dtype_name} {name}: skipped: {why}", flush=True)
                    continue
                if resident is None:
                    resident = backend_select(name, U.to(device), y.to(device), K).indices.cpu()
                for mode, src in (("pinned", pinned), ("staged", U)):
                    if mode == "staged" and device.type != "cuda":
                        continue

                    def run(k, backend=backend, src=src, y=y, plan=plan):
                        return host_stream.greedy_uniform_streamed(
                            backend, src, y, k, True, -1.0, device=device, plan=plan
                        )

                    res = run(K)
                    t1 = time_ms(functools.partial(run, 1), device, reps=args.reps, warmup=0)
                    tk = time_ms(functools.partial(run, K), device, reps=args.reps, warmup=0)
                    step_ms = max(tk - t1, 1e-9) / (K - 1)
                    r = {
                        "step_ms": step_ms,
                        "GBps": nbytes / (step_ms * 1e-3) / 1e9,
                        "picks_agree_with_resident": bool(torch.equal(res.indices.cpu(), resident)),
                    }
                    if "floor_step_ms" in row:
                        r["step_over_floor"] = step_ms / row["floor_step_ms"]
                    row["runs"][f"{name} {mode}"] = r
                    print(
                        f"  host {N}x{M} {dtype_name} {name} {mode}: step {step_ms:.3f} ms, {r['GBps']:.1f} GB/s"
                        + (f", {r['step_over_floor']:.2f}x the H2D floor" if "step_over_floor" in r else "")
                        + f", picks agree: {r['picks_agree_with_resident']}",
                        flush=True,
                    )
            rows.append(row)
            U = pinned = None
    return rows


def write_report(results, meta, path_base):
    with open(path_base + ".json", "w") as f:
        json.dump(
            {
                "meta": meta,
                "results": results["cases"],
                "syncs": results["syncs"],
                "gram": results["gram"],
                "host": results["host"],
                "skipped": results["skipped"],
            },
            f,
            indent=2,
        )
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
    if results["syncs"]:
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
        lines.append("")
    if results["gram"]:
        lines += [
            "## Gram loop (uniform, float64 G): one launch for all k steps vs per-step launches",
            "",
            "| N | k | loop | ms | us / step | picks agree |",
            "| ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for row in results["gram"]:
            for label, r in row["loops"].items():
                if "skipped" in r:
                    lines.append(f"| {row['N']} | {row['k']} | {label} | skipped: {r['skipped']} | | |")
                    continue
                lines.append(
                    f"| {row['N']} | {row['k']} | {label} | {r['ms']:.2f} | {r['us_per_step']:.2f} | "
                    f"{r['picks_agree']:.2f} |"
                )
            if "per_step_launches_over_one_launch" in row:
                lines.append(
                    f"| {row['N']} | {row['k']} | per-step / one launch | "
                    f"{row['per_step_launches_over_one_launch']:.1f}x | | |"
                )
        lines.append("")
    if results["host"]:
        lines += [
            "## Host streaming: U in host memory, streamed every step",
            "",
            "| N x M | dtype | chunks | H2D copy GB/s (pinned) | run | step (ms) | GB/s | step / H2D floor | "
            "picks = resident |",
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        for row in results["host"]:
            h2d = f"{row['h2d_GBps']:.1f}" if "h2d_GBps" in row else "-"
            for name, r in row["runs"].items():
                if "skipped" in r:
                    lines.append(
                        f"| {row['N']} x {row['M']} | {row['dtype']} | {row['chunks']} | {h2d} | {name} | "
                        f"skipped: {r['skipped']} | | | |"
                    )
                    continue
                over = f"{r['step_over_floor']:.2f}" if "step_over_floor" in r else "-"
                lines.append(
                    f"| {row['N']} x {row['M']} | {row['dtype']} | {row['chunks']} | {h2d} | {name} | "
                    f"{r['step_ms']:.3f} | {r['GBps']:.1f} | {over} | {r['picks_agree_with_resident']} |"
                )
        lines.append("")
    if results["skipped"]:
        lines += ["## Not run (deadline)", ""] + [f"- {s}" for s in results["skipped"]] + [""]
    with open(path_base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (about a minute)")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing useful"
    )
    ap.add_argument(
        "--parts",
        default="stream,syncs,gram,host",
        help="which parts, in this order: stream (every shape), stream:LABEL (one shape), syncs, gram, host",
    )
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--backends", default="triton,cuda,torch,triton+graph")
    ap.add_argument("--k-step", type=int, default=33, help="K of the per-step difference (select K vs select 1)")
    ap.add_argument("--k-select", type=int, default=256)
    ap.add_argument("--k-profile", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reps-select", type=int, default=2)
    ap.add_argument("--reps-copy", type=int, default=10)
    ap.add_argument(
        "--deadline-s", type=float, default=None, help="start nothing after this many seconds (the report lists it)"
    )
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = {p for p in parts if p.split(":")[0] not in ("stream", "syncs", "gram", "host")}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from stream, stream:LABEL, syncs, gram, host")

    if args.dry_run:
        device = torch.device("cpu")
        shapes, size = DRY_SHAPES, "dry"
        args.k_step, args.k_select, args.k_profile = 5, 8, 4
        args.reps, args.reps_select, args.reps_copy = 1, 1, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on a GPU machine (or --dry-run to check the script on the CPU)")
        device = torch.device("cuda", torch.cuda.current_device())
        shapes, size = (QUICK_SHAPES, "quick") if args.quick else (FULL_SHAPES, "full")
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
        "parts": parts,
        "availability": gfs_kernels.availability(device, torch.float32),
    }
    print(json.dumps({k: meta[k] for k in ("device", "torch", "triton", "cuda", "sms")}), flush=True)

    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")
    base = os.path.join(args.out, f"gpu-{slug}" + ("-dryrun" if args.dry_run else "-quick" if args.quick else ""))
    results: dict = {"cases": [], "syncs": {}, "gram": [], "host": [], "skipped": []}

    def time_left(what: str) -> bool:
        if args.deadline_s is not None and time.monotonic() - t_start > args.deadline_s:
            results["skipped"].append(what)
            print(f"deadline ({args.deadline_s:.0f} s) passed: skipping {what}", flush=True)
            return False
        return True

    def done(part: str):
        meta["seconds"] = round(time.monotonic() - t_start, 1)
        write_report(results, meta, base)
        print(f"[{part} done at {meta['seconds']} s; report rewritten]", flush=True)

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for part in parts:
        if part.split(":")[0] == "stream":
            want = part.split(":", 1)[1] if ":" in part else None
            for label, N, M in shapes:
                if want is not None and label != want:
                    continue
                for dt in dtypes:
                    if time_left(f"stream {label} {dt}"):
                        results["cases"].append(bench_case(label, N, M, dt, device, backends, args))
                        done(f"stream {label} {dt}")
        elif part == "syncs" and time_left("syncs"):
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
            U = y = None
            done("syncs")
        elif part == "gram" and time_left("gram"):
            results["gram"] = bench_gram(device, size, args)
            done("gram")
        elif part == "host" and time_left("host"):
            results["host"] = bench_host(device, size, args, backends)
            done("host")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    done("all")
    print(f"wrote {base}.md and {base}.json")
    print(open(base + ".md").read())


if __name__ == "__main__":
    main()
