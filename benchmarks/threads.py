"""Threads on a busy machine (issue 16, item 2), measured in one run on one machine.

    PYTHONPATH=python:src python benchmarks/threads.py [--quick] [--rounds 7] [--no-busy] [--no-quiet]

gfs.select(U, y, k, backend="cpu") (uniform rule) with the default thread count against the same
call on 1 thread, in two conditions:
  - "busy": this script starts one process that spins on a core (`while True: pass`), as a
    laptop or shared server always has somewhere; goal: default threads <= 1.2x one thread;
  - "quiet": nothing started (the machine as it is; its 1-minute load is recorded).
Each shape is timed in interleaved rounds (1 thread, default, 1 thread, default, ...), and the
median of each is quoted, so a burst of load hits both alike. Writes
benchmarks/results/threads-<cpu>-<cores>c.{md,json} (``-quick`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "src")]

import gfs  # noqa: E402
from _machine import cpu_model, load1, slug  # noqa: E402  (benchmarks/_machine.py, beside this script)

# (N, M, k): the case first
SHAPES = [(4096, 1024, 256), (1024, 16384, 64), (512, 256, 2000), (4096, 65536, 4)]
QUICK = [(4096, 1024, 256), (512, 256, 2000)]
GOAL = 1.2


def problem(N, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(N, M, generator=g)
    y = U[: N // 3].mean(0) + 0.1 * torch.randn(M, generator=g)
    return U, y


class Spinner:
    """One process that keeps a core busy, started and stopped by this script."""

    def __init__(self):
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let the scheduler see it
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def time_pair(U, y, k, threads, rounds):
    """Median seconds of gfs.select(..., backend="cpu") on 1 thread and on `threads` threads,
    interleaved; plus whether both gave the same selection."""
    times = {1: [], threads: []}
    picks = {}
    for nt in (1, threads):  # warm-up: first-call costs, the thread pool
        torch.set_num_threads(nt)
        picks[nt] = gfs.select(U, y, k, backend="cpu")
    for r in range(rounds):
        for nt in (1, threads) if r % 2 == 0 else (threads, 1):
            torch.set_num_threads(nt)
            t0 = time.perf_counter()
            gfs.select(U, y, k, backend="cpu")
            times[nt].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    same = torch.equal(picks[1].indices, picks[threads].indices) and torch.equal(picks[1].losses, picks[threads].losses)
    return {nt: statistics.median(v) for nt, v in times.items()}, {nt: v for nt, v in times.items()}, same


def measure(shapes, threads, rounds, condition):
    rows = []
    for N, M, k in shapes:
        U, y = problem(N, M)
        load0 = load1()
        med, raw, same = time_pair(U, y, k, threads, rounds)
        row = dict(
            condition=condition,
            N=N,
            M=M,
            k=k,
            one_thread_s=med[1],
            default_s=med[threads],
            ratio=med[threads] / med[1],
            identical=same,
            load=round(max(load0, load1()), 2),
            raw=raw,
        )
        rows.append(row)
        print(
            f"{condition:<5} {N}x{M} k={k}: 1 thread {med[1]:.4f} s, {threads} threads {med[threads]:.4f} s, "
            f"ratio {row['ratio']:.2f} (identical: {same}; load {row['load']})",
            flush=True,
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-busy", action="store_true")
    ap.add_argument("--no-quiet", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    threads = torch.get_num_threads()
    rounds = args.rounds or (5 if args.quick else 9)
    shapes = QUICK if args.quick else SHAPES
    rows = []
    if not args.no_quiet:
        rows += measure(shapes, threads, rounds, "quiet")
    if not args.no_busy:
        with Spinner():
            rows += measure(shapes, threads, rounds, "busy")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info = dict(
        cpu=cpu_model(),
        cores=os.cpu_count(),
        threads=threads,
        torch=torch.__version__,
        commit=commit.stdout.strip(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        rounds=rounds,
    )
    md = [
        f"# Threads: default ({threads}) vs 1 thread, {info['cpu']}, {info['cores']} cores",
        "",
        f'Commit {info["commit"]}, torch {info["torch"]}, {info["date"]}. `gfs.select(U, y, k, backend="cpu")`, '
        f"uniform rule, float32; median of {rounds} interleaved runs each. busy: one process spinning on a core, "
        "started by the script. Goal (busy): default <= 1.2x one thread.",
        "",
        "| condition | N x M, k | 1 thread s | default s | default / 1 thread | same picks and losses | 1-min load |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['condition']} | {r['N']} x {r['M']}, {r['k']} | {r['one_thread_s']:.4f} | {r['default_s']:.4f} | "
            f"{r['ratio']:.2f} | {'yes' if r['identical'] else 'NO'} | {r['load']:.2f} |"
        )
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"threads-{slug()}" + ("-quick" if args.quick else ""))
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    with open(base + ".json", "w") as f:
        json.dump(dict(machine=info, rows=rows), f, indent=1)
    print("\n".join(md))
    print(f"wrote {base}.md and {base}.json")


if __name__ == "__main__":
    main()
