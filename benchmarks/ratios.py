"""The CPU ratio table, measured in one process on this machine (docs/design.md section 5).

    PYTHONPATH=python:src python benchmarks/ratios.py [--quick] [--no-wait] [--out benchmarks/results]

Prints, and writes to benchmarks/results/cpu-<cpu-model>-<cores>c.{md,json} (``-quick`` with --quick):
  - per step of the "cpu" backend / one bare torch.mv over the same float32 U (N=4096, M=65536),
    for float32, bfloat16 and float16 storage (the bandwidth floor of a streaming step; goal for
    bfloat16 and float16 <= 0.55);
  - whole selections (gfs.select, k=256) of "cpu" and "torch" against "naive" at
    N=1024, M=16384 and N=4096, M=1024. "naive" (a Python loop over candidates) is timed on a
    few steps and scaled to k steps: T(s1) + (k - s1) (T(s2) - T(s1)) / (s2 - s1); the table says so.
Per-step times are differences over the backend's own loop (gfs.engines.stream.run_on, uniform rule),
(T(k=1+s) - T(k=1)) / s, so one-off costs (prepare, allocation) cancel; whole selections go
through gfs.select. The per-step ratios are taken round by round (each round times torch.mv,
then every loop at k=1 and k=1+s, then torch.mv again; the step over the mean of its round's two
torch.mv), and the median over the rounds is quoted with its range: a slow spell of the machine
hits both sides of a ratio alike. Whole selections: minimum over repetitions. --quick: small
shapes (N=2048, M=16384 for the step, still beyond the last-level cache; selections at k=64),
a smoke test, not the recorded goals. Before measuring, the
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
import statistics
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


STEP_GOALS = (
    ("f32", "cpu f32", 0.9),
    ("bf16", "cpu bf16", 0.55),
    ("f16", "cpu f16", 0.55),
    ("torch", "torch backend f32", None),
)


def step_ratios(quick: bool = False, rounds: int = 5) -> dict:
    """Per-step time of the "cpu" loop for float32, bfloat16 and float16 storage of one U (and of
    the "torch" backend, float32) over a bare float32 torch.mv of the same U, round by round:
    each round times torch.mv, every loop at k=1 and k=1+s, then torch.mv again; a step's ratio
    is over the mean of its round's two torch.mv. Returns, per storage, the median ratio, its
    range and the rounds' ratios; the median torch.mv times (float32, and bfloat16 of the same U)."""
    N, M = (2048, 16384) if quick else (4096, 65536)
    U, y = problem(N, M)
    stores = {"f32": U, "bf16": U.bfloat16(), "f16": U.half()}
    r = torch.randn(M)
    steps = 4 if quick else 8
    loops = {
        (name, kk): functools.partial(backend_run, Us, y, kk, "cpu")
        for name, Us in stores.items()
        for kk in (1, 1 + steps)
    }
    loops.update({("torch", kk): functools.partial(backend_run, U, y, kk, "torch") for kk in (1, 1 + steps // 2)})
    for fn in loops.values():  # warm-up: first touch, thread pool
        fn()
    mv_fn = functools.partial(torch.mv, U, r)
    mv_fn()
    per_round: dict[str, list] = {name: [] for name in ("f32", "bf16", "f16", "torch")}
    mv_times = []
    for _ in range(rounds):
        mv0 = tmin(mv_fn, 3, warmup=0)
        t = {key: tmin(fn, 1, warmup=0) for key, fn in loops.items()}
        mv1 = tmin(mv_fn, 3, warmup=0)
        mv = (mv0 + mv1) / 2
        mv_times.append(mv)
        for name in ("f32", "bf16", "f16"):
            per_round[name].append(((t[(name, 1 + steps)] - t[(name, 1)]) / steps, mv))
        per_round["torch"].append(((t[("torch", 1 + steps // 2)] - t[("torch", 1)]) / (steps // 2), mv))
    mv_bf = tmin(functools.partial(torch.mv, stores["bf16"], r.bfloat16()), 3)
    out: dict = dict(
        shape=f"{N}x{M}", N=N, M=M, rounds=rounds, torch_mv_f32_s=statistics.median(mv_times), torch_mv_bf16_s=mv_bf
    )
    for name, v in per_round.items():
        ratios = [st / mv for st, mv in v]
        out[name] = dict(
            ratio=statistics.median(ratios),
            lo=min(ratios),
            hi=max(ratios),
            ratios=ratios,
            step_s=statistics.median(st for st, _ in v),
            rounds=[dict(step_s=st, mv_s=mv) for st, mv in v],
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--load", type=float, default=0.5, help="wait for a 1-minute load average below this")
    ap.add_argument("--max-wait", type=float, default=1800.0)
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the per-step timings")
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke test, not the recorded goals")
    ap.add_argument("--parts", default="step,select", help="step (per step vs torch.mv), select (vs naive), or both")
    args = ap.parse_args()

    waited = 0.0 if args.no_wait else wait_for_quiet(args.load, args.max_wait)
    load_before = load1()
    rows, raw = [], {}

    def row(what, value, goal, note=""):
        ok = "" if goal is None else ("met" if goal(value) else "NOT met")
        rows.append((what, value, ok, note, load1()))
        print(f"{what:<62} {value:9.3f}  {ok:<7} {note}  (load {rows[-1][-1]:.2f})", flush=True)

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"step", "select"}:
        ap.error(f"unknown parts {sorted(parts - {'step', 'select'})}; choose from step, select")

    # -- per step vs torch.mv ----------------------------------------------------------------
    st = step_ratios(args.quick, args.rounds) if "step" in parts else None
    if st is not None:
        shape = st["shape"]
        raw[f"step_{shape}"] = st
        for name, label, goal in STEP_GOALS:
            r = st[name]
            what = f"per step, {label} / torch.mv f32 ({shape})"
            note = f"median of {args.rounds} rounds, range {r['lo']:.3f}-{r['hi']:.3f}"
            if goal is None:
                row(what, r["ratio"], None, f"for reference; {note}")
            else:
                within = sum(v <= goal for v in r["ratios"])
                row(
                    what,
                    r["ratio"],
                    lambda v, g=goal: v <= g,
                    f"goal <= {goal:g}; {note}; {within} of {args.rounds} rounds",
                )
        row(
            f"per step, cpu bf16 / torch.mv bf16 (same U, {shape})",
            st["bf16"]["step_s"] / st["torch_mv_bf16_s"],
            None,
            "for reference",
        )

    # -- whole selections vs naive -----------------------------------------------------------
    k = 64 if args.quick else args.k
    quick_sizes = (((512, 4096), 10.0), ((1024, 1024), 100.0))
    sizes = quick_sizes if args.quick else (((1024, 16384), 10.0), ((4096, 1024), 100.0))
    if "select" not in parts:
        sizes = ()
    for (N, M), goal in sizes:
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
    base = os.path.join(args.out, f"cpu-{slug}" + ("-quick" if args.quick else ""))
    lines = [
        f"# CPU ratios: {machine['cpu']}, {machine['cores']} cores",
        "",
        f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}, "
        f"{machine['date']}; 1-min load {load_before:.2f} before, {load_after:.2f} after. "
        f"Selections timed through `{VIA}`, per step through `gfs.engines.stream.run_on` (the backend's loop) as "
        "(T(k=1+s) - T(k=1)) / s, the ratio to torch.mv taken round by round (median and range over the rounds); "
        "whole selections: minimum over repetitions; one process."
        + (" QUICK: small shapes, not the recorded goals." if args.quick else ""),
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
