"""The CPU ratio table, measured in one process on this machine (DESIGN.md section 5).

    PYTHONPATH=python:src python benchmarks/ratios.py [--no-wait] [--out benchmarks/results]

Prints, and writes to benchmarks/results/cpu-<cpu-model>-<cores>c.{md,json}:
  - per step of the "cpu" backend / one bare torch.mv over the same float32 U (N=4096, M=65536),
    for float32 and bfloat16 storage (the bandwidth floor of a streaming step);
  - whole selections (gfs.select, k=256) of "cpu" and "torch" against "naive" at
    N=1024, M=16384 and N=4096, M=1024. "naive" (a Python loop over candidates) is timed on a
    few steps and scaled to k steps: T(s1) + (k - s1) (T(s2) - T(s1)) / (s2 - s1); the table says so.
Per-step times are differences over the backend's own loop (gfs.engines.stream.run_on, uniform rule),
(T(k=1+s) - T(k=1)) / s, so one-off costs (prepare, allocation) cancel; whole selections go
through gfs.select. Every time is the minimum over repetitions (the per-step timings
in interleaved rounds, torch.mv between them). Before measuring, the
script waits (up to --max-wait seconds) for a 1-minute load average below --load, since the
cores may be shared; the load before and after is recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import socket
import time
from datetime import datetime, timezone

import torch

import gfs
import gfs_kernels
from _machine import cpu_model, load1  # benchmarks/_machine.py, beside this script
from gfs.engines import stream


def select(U, y, k, backend):
    return gfs.select(U, y, k, backend=backend)


VIA = "gfs.select(U, y, k, backend=...)"


def loop(backend, U, y, k):
    """The backend's whole uniform loop as the streaming engine runs it (native where it has one)."""
    return stream.run_on(gfs_kernels.get(backend), U, y, k, step="uniform", replacement=True, stop_loss=-1.0)


def wait_for_quiet(limit: float, max_wait: float) -> float:
    t0 = time.time()
    while load1() >= limit and time.time() - t0 < max_wait:
        time.sleep(5)
    return time.time() - t0


def tmin(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def problem(N, M, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(N, M, generator=g)
    y = U[: N // 3].mean(0) + 0.1 * torch.randn(M, generator=g)
    return U.to(dtype), y


def backend_run(U, y, k, backend):
    """The backend's own loop, without the API's one-off validation and dense-loss passes."""
    return loop(backend, U, y, k)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--load", type=float, default=0.5, help="wait for a 1-minute load average below this")
    ap.add_argument("--max-wait", type=float, default=1800.0)
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the per-step timings")
    args = ap.parse_args()

    waited = 0.0 if args.no_wait else wait_for_quiet(args.load, args.max_wait)
    load_before = load1()
    rows, raw = [], {}

    def row(what, value, goal, note=""):
        ok = "" if goal is None else ("met" if goal(value) else "NOT met")
        rows.append((what, value, ok, note, load1()))
        print(f"{what:<62} {value:9.3f}  {ok:<7} {note}  (load {rows[-1][-1]:.2f})", flush=True)

    # -- per step vs torch.mv, N=4096, M=65536 -------------------------------------------------
    N, M = 4096, 65536
    U, y = problem(N, M)
    Ub = U.bfloat16()
    r = torch.randn(M)
    rb = r.bfloat16()
    # Interleaved rounds, minimum of each over all rounds: a slow spell of the machine (shared
    # cores, memory housekeeping) then hits every quantity alike instead of one of them.
    steps = 8
    timers = {
        "mv": lambda: torch.mv(U, r),
        "mv_bf": lambda: torch.mv(Ub, rb),
        "cpu1": lambda: backend_run(U, y, 1, "cpu"),
        "cpuk": lambda: backend_run(U, y, 1 + steps, "cpu"),
        "bf1": lambda: backend_run(Ub, y, 1, "cpu"),
        "bfk": lambda: backend_run(Ub, y, 1 + steps, "cpu"),
        "torch1": lambda: backend_run(U, y, 1, "torch"),
        "torchk": lambda: backend_run(U, y, 1 + steps // 2, "torch"),
    }
    best = {name: tmin(fn, 1) for name, fn in timers.items()}
    for _ in range(args.rounds - 1):
        for name, fn in timers.items():
            best[name] = min(best[name], tmin(fn, 1 if name.startswith(("cpu", "bf", "torch")) else 3, warmup=0))
    mv, mv_bf = best["mv"], best["mv_bf"]
    cpu32 = (best["cpuk"] - best["cpu1"]) / steps
    cpubf = (best["bfk"] - best["bf1"]) / steps
    torch32 = (best["torchk"] - best["torch1"]) / (steps // 2)
    U = Ub = None  # free them now (the timers' lambdas hold the names, not the tensors)
    raw["step_4096x65536"] = dict(
        torch_mv_f32_s=mv, cpu_f32_s=cpu32, torch_f32_s=torch32, torch_mv_bf16_s=mv_bf, cpu_bf16_s=cpubf
    )
    row("per step, cpu f32 / torch.mv f32 (4096x65536)", cpu32 / mv, lambda v: v <= 0.9, "goal <= 0.9")
    row("per step, cpu bf16 / torch.mv f32 (4096x65536)", cpubf / mv, lambda v: v <= 0.6, "goal <= 0.6")
    row("per step, torch backend f32 / torch.mv f32", torch32 / mv, None, "for reference")
    row("per step, cpu bf16 / torch.mv bf16 (same U)", cpubf / mv_bf, None, "for reference")

    # -- whole selections vs naive -----------------------------------------------------------
    k = args.k
    for (N, M), goal in (((1024, 16384), 10.0), ((4096, 1024), 100.0)):
        U, y = problem(N, M, seed=1)
        cpu_t = tmin(functools.partial(select, U, y, k, "cpu"), 3)
        torch_t = tmin(functools.partial(select, U, y, k, "torch"), 1)
        s1, s2 = 1, 3
        n1 = tmin(functools.partial(select, U, y, s1, "naive"), 1, warmup=0)
        n2 = tmin(functools.partial(select, U, y, s2, "naive"), 1, warmup=0)
        naive_t = n1 + (k - s1) * (n2 - n1) / (s2 - s1)
        key = f"select_{N}x{M}_k{k}"
        raw[key] = dict(cpu_s=cpu_t, torch_s=torch_t, naive_est_s=naive_t, naive_k1_s=n1, naive_k3_s=n2)
        note = f"naive timed at k={s1},{s2} and scaled to k={k}"
        row(
            f"select k={k}, naive / cpu ({N}x{M})",
            naive_t / cpu_t,
            lambda v, g=goal: v >= g,
            f"goal >= {goal:g}; {note}",
        )
        row(f"select k={k}, naive / torch ({N}x{M})", naive_t / torch_t, None, note)
        row(f"select k={k}, torch / cpu ({N}x{M})", torch_t / cpu_t, None, "")
        U = None

    load_after = load1()
    machine = dict(
        cpu=cpu_model(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        hostname=socket.gethostname(),
        load_before=load_before,
        load_after=load_after,
        waited_s=round(waited, 1),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        timed_via=VIA,
    )
    slug = re.sub(r"[^a-z0-9]+", "-", machine["cpu"].lower()).strip("-") + f"-{machine['cores']}c"
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"cpu-{slug}")
    lines = [
        f"# CPU ratios: {machine['cpu']}, {machine['cores']} cores",
        "",
        f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}, "
        f"{machine['date']}; 1-min load {load_before:.2f} before, {load_after:.2f} after. "
        f"Selections timed through `{VIA}`, per step through `gfs.engines.stream.run_on` (the backend's loop) as "
        "(T(k=1+s) - T(k=1)) / s; one process, minimum over repetitions (per-step timings and torch.mv in "
        "interleaved rounds).",
        "",
        "| ratio | value | goal | 1-min load when measured |",
        "|---|---:|---|---:|",
    ]
    for what, value, ok, note, load in rows:
        lines.append(f"| {what} | {value:.3f} | {(ok + ' ' + note).strip() if (ok or note) else ''} | {load:.2f} |")
    lines += ["", "Raw times (seconds):", "", "```json", json.dumps(raw, indent=1), "```", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(base + ".json", "w") as f:
        json.dump(
            dict(
                machine=machine,
                ratios=[dict(ratio=w, value=v, goal=o, note=n, load=ld) for w, v, o, n, ld in rows],
                raw=raw,
            ),
            f,
            indent=1,
        )
    print(f"wrote {base}.md and {base}.json")


if __name__ == "__main__":
    main()
