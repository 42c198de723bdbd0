"""Issue 16's goals in one table, measured in one run on one machine (the README's benchmark table).

    PYTHONPATH=python:src python benchmarks/goals.py [--quick] [--skip prune,threads,step,gram]

For each goal: the floor (what the work cannot beat), the peer or naive baseline, and gfs, all
timed in this run; then gfs / floor against the target. Prints the Markdown table and writes
benchmarks/results/goals-<cpu>-<cores>c.{md,json} (``-quick`` with --quick).

  1. prune: gfs.prune of a torchvision ResNet-50 (224 px, 64 calibration images, ratio 0.5,
     "local", every internal group) / one eval forward pass of those images (the floor); the
     baseline is the recomputing path from before issue 16 (tests/prune_reference.py), same
     process. Runs benchmarks/prune_resnet50.py --compare in a subprocess. Target <= 3x.
  2. threads: gfs.select(U 4096x1024 f32, y, 256, backend="cpu") with the default threads while
     one other process spins on a core (started here) / the same on 1 thread (the floor); the
     peer is the "torch" backend (vectorised PyTorch, default threads) in the same condition.
     Target <= 1.2x. (benchmarks/threads.py has more shapes and the quiet machine.)
  3. step: one greedy step over bfloat16 (and float16) storage of U (N=4096, M=65536) / a bare
     float32 torch.mv over the same U (the floor of a float32 step); the peer is torch.mv over
     the bfloat16 U. Target <= 0.55x (median of the rounds; the range is shown).
  4. Gram set-up: gfs.select(stats, k=N) at N=4096, everything but the steps / the k steps (the
     floor: the work itself); the baseline is the same call on the statistics loaded from a file
     (validated, as every call was before). Target <= 10%.
--quick runs every row at small sizes (a smoke test of this script; not the goals).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "src"), HERE]

import gfs  # noqa: E402
from _machine import cpu_model, load1, slug  # noqa: E402

PARTS = ("prune", "threads", "step", "gram")


def row(goal, floor, peer, gfs_value, ratio, target, met, note=""):
    return dict(goal=goal, floor=floor, peer=peer, gfs=gfs_value, ratio=ratio, target=target, met=met, note=note)


def goal_prune(quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "prune")
        cmd = [sys.executable, os.path.join(HERE, "prune_resnet50.py"), "--compare", "--out", prefix]
        if quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0 or not os.path.exists(prefix + ".json"):
            raise RuntimeError(f"prune_resnet50.py failed: {(proc.stderr or proc.stdout)[-800:]}")
        with open(prefix + ".json") as f:
            out = json.load(f)
    fwd, p, ref = out["forward_seconds"]["used"], out["prune"], out.get("reference", {})
    s = out["setup"]
    return row(
        f"1. `gfs.prune` ResNet-50 ({s['size']} px, {s['images']} images, ratio 0.5, local) vs one forward pass",
        f"{fwd:.2f} s (forward)",
        f"{ref['seconds']:.1f} s (before issue 16)" if ref else "-",
        f"{p['seconds']:.1f} s",
        p["seconds"] / fwd,
        3.0,
        p["seconds"] / fwd <= 3.0,
        (
            "same kept channels and weights as before: "
            + str(ref.get("same_kept_and_scales") and ref.get("same_weights"))
        )
        if ref
        else "",
    )


def goal_threads(quick: bool) -> dict:
    import threads as T  # benchmarks/threads.py

    N, M, k = (1024, 1024, 64) if quick else (4096, 1024, 256)
    U, y = T.problem(N, M)
    nt = torch.get_num_threads()
    with T.Spinner():
        load = load1()
        med, _, same = T.time_pair(U, y, k, nt, 5 if quick else 9)
        torch.set_num_threads(nt)
        gfs.select(U, y, k, backend="torch")
        peer = statistics.median(_timed(lambda: gfs.select(U, y, k, backend="torch")) for _ in range(3))
    return row(
        f"2. `gfs.select` {N}x{M} f32, k={k}, cpu backend, one core busy: {nt} threads vs 1",
        f"{med[1]:.3f} s (1 thread)",
        f"{peer:.3f} s (torch backend, {nt} threads)",
        f"{med[nt]:.3f} s ({nt} threads)",
        med[nt] / med[1],
        1.2,
        med[nt] / med[1] <= 1.2,
        f"same picks and losses on 1 and {nt} threads: {same}; 1-min load {load:.2f} with the spinner",
    )


def goal_step(quick: bool) -> list[dict]:
    import ratios as R  # benchmarks/ratios.py

    st = R.step_ratios(quick, 5)
    out = []
    for name in ("bf16", "f16"):
        r = st[name]
        peer = f"{st['torch_mv_bf16_s'] * 1e3:.1f} ms (torch.mv bf16)" if name == "bf16" else "-"
        out.append(
            row(
                f"3. one step, {name} storage, {st['shape']}, vs float32 torch.mv over the same U",
                f"{st['torch_mv_f32_s'] * 1e3:.1f} ms (torch.mv f32)",
                peer,
                f"{r['step_s'] * 1e3:.1f} ms",
                r["ratio"],
                0.55,
                r["ratio"] <= 0.55,
                f"median of {st['rounds']} rounds, range {r['lo']:.3f}-{r['hi']:.3f}",
            )
        )
    return out


def goal_gram(quick: bool) -> dict:
    import gram_ratios as G  # benchmarks/gram_ratios.py

    r = G.goal_setup(quick)
    f = r["first_call"]
    first = f" first call in a process: {f['first_overhead_s'] * 1e3:.1f} ms" if "first_overhead_s" in f else ""
    return row(
        f"4. `gfs.select(stats, k=N)` N={r['N']}: set-up (all but the steps) vs the steps",
        f"{r['steps_s'] * 1e3:.1f} ms (the {r['k']} steps)",
        f"{r['setup_loaded_s'] * 1e3:.1f} ms (loaded file: validated)",
        f"{r['setup_known_valid_s'] * 1e3:.2f} ms",
        r["ratio"],
        0.10,
        r["ratio"] <= 0.10,
        "statistics built by GramStats;" + first,
    )


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def markdown(rows, meta) -> str:
    lines = [
        "| goal | floor | peer or naive baseline | gfs | gfs / floor | target | met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['goal']} | | | | | | not measured: {r['error']} |")
            continue
        ratio = f"{r['ratio']:.1%}" if r["target"] < 0.5 else f"{r['ratio']:.2f}x"
        target = f"<= {r['target']:.0%}" if r["target"] < 0.5 else f"<= {r['target']:g}x"
        lines.append(
            f"| {r['goal']} | {r['floor']} | {r['peer']} | {r['gfs']} | {ratio} | {target} | "
            f"{'yes' if r['met'] else 'NO'}{'; ' + r['note'] if r['note'] else ''} |"
        )
    lines += [
        "",
        f"{meta['cpu']}, {meta['cores']} cores, torch {meta['torch']} ({meta['threads']} threads), commit "
        f"{meta['commit']}, {meta['date']}; 1-minute load {meta['load_start']:.2f} at the start, "
        f"{meta['load_end']:.2f} at the end; one run of `python benchmarks/goals.py`"
        + (" --quick (small shapes: NOT the goals)" if meta["quick"] else "")
        + f" ({meta['seconds']:.0f} s).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke test of this script")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to skip, of {', '.join(PARTS)}")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        ap.error(f"unknown parts {sorted(skip - set(PARTS))}; choose from {', '.join(PARTS)}")
    t0 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = dict(
        cpu=cpu_model(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        commit=commit.stdout.strip() or "unknown",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        quick=args.quick,
        load_start=load1(),
    )
    rows: list[dict] = []
    for part, fn in (("prune", goal_prune), ("threads", goal_threads), ("step", goal_step), ("gram", goal_gram)):
        if part in skip:
            continue
        print(f"measuring {part} (1-min load {load1():.2f}) ...", flush=True)
        try:
            got = fn(args.quick)
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            got = dict(goal=part, error=f"{type(exc).__name__}: {exc}"[:300])
        rows += got if isinstance(got, list) else [got]
    meta.update(load_end=load1(), seconds=time.time() - t0)
    md = markdown(rows, meta)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"goals-{slug()}" + ("-quick" if args.quick else ""))
    with open(base + ".md", "w") as f:
        f.write("# Issue 16 goals: floor, baseline and gfs in one run\n\n" + md)
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {base}.md and {base}.json")


if __name__ == "__main__":
    main()
