"""Figure 4 of "How Much Pre-training Is Enough to Discover a Good Subnetwork?" (Appendix D) on
this machine: the time to select the channels of ResNet-34 blocks of increasing width with
gfs.distributed.select_sharded on 1, 2 and 3 CPU ranks (gloo, one thread each), the speed-up per
block and the bytes each rank receives per step.

    PYTHONPATH=python:src python benchmarks/figure4_sharded.py [--wait-load 1.0] [--quick]

Candidates: the internal channels of a BasicBlock, i.e. the input channels of its conv2 (the
consumer), as gfs's local criterion sees them: u_j = N conv2(x_j, W[:, j]), the contribution of
channel j to conv2's output over a calibration batch (gfs.stats.conv2d_contributions), the
target the dense conv2 output (their mean). The features are real activations of torchvision's
ResNet-34 (randomly initialised: no weights can be downloaded here) on B random images of S x S
pixels; each rank computes the contributions of its own block of channels, as it would on a GPU
of its own. k = N / 2 without replacement (half the channels kept), float32, uniform rule, the
streaming engine (Algorithm 2), the C++ backend's pass over each rank's rows.

Reported per block and rank count: the selection loop's time (best of --repeat, the slowest
rank), the whole call, the speed-up over 1 rank, and the bytes and collectives a rank receives
per step (from Selection.notes["comm"]). Reference rows: gfs.select in one process (the native
C++ loop) with 1 and 2 threads. Writes benchmarks/results/figure4-sharded-<machine>.{json,md,png}
with the machine, its load before and after, and the commit.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "src"), os.path.dirname(os.path.abspath(__file__))]

from _machine import cpu_model, load1  # noqa: E402  (benchmarks/_machine.py, beside this script)

BLOCKS = ("layer1.0", "layer2.1", "layer3.1", "layer4.1")  # widths 64, 128, 256, 512


@functools.lru_cache(maxsize=1)
def _activations(block: str, batch: int, size: int):
    """(x, W, out) of `block`'s conv2: its input, weight and output on the calibration batch."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None).eval()
    conv = dict(model.named_modules())[block].conv2
    seen = {}
    handle = conv.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach(), out=out.detach()))
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)))
    handle.remove()
    return seen["x"], conv.weight.detach(), seen["out"]


def features(block: str, lo: int | None, hi: int | None, batch: int, size: int):
    """(U[lo:hi], y, N): channels lo..hi-1 (default all) of `block`'s conv2 input as candidates,
    and the target (the dense conv2 output, their mean)."""
    import torch

    from gfs.stats import conv2d_contributions

    x, W, out = _activations(block, batch, size)
    N = W.shape[1]
    lo, hi = (0, N) if lo is None else (lo, hi)
    with torch.no_grad():
        U = conv2d_contributions(x[:, lo:hi], W[:, lo:hi], padding=1).reshape(hi - lo, -1).contiguous()
    return U, out.reshape(-1).contiguous(), N


def _rank(rank, world, store, args, out):
    import torch
    import torch.distributed as dist

    from gfs.distributed import rows_of, select_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = []
    for block in args.blocks:
        N = _activations(block, args.batch, args.size)[1].shape[1]
        lo, hi = rows_of(N, rank, world)
        U, y, _ = features(block, lo, hi, args.batch, args.size)
        best = None
        for _ in range(args.repeat):
            dist.barrier()
            t0 = time.perf_counter()
            sel = select_sharded(U, y, N // 2, replacement=False, backend=args.backend)
            wall = time.perf_counter() - t0
            if best is None or sel.timings["select"] < best["select_s"]:
                per_step = sel.notes["comm"]["per_step"]
                best = dict(select_s=sel.timings["select"], call_s=wall, indices=sel.indices.tolist(), **per_step)
        rows.append(dict(block=block, N=N, M=U.shape[1], rank_rows=hi - lo, **best))
        del U
    with open(os.path.join(out, f"r{world}-{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def _single(threads, args, out):
    import torch

    import gfs

    torch.set_num_threads(threads)
    rows = []
    for block in args.blocks:
        U, y, N = features(block, None, None, args.batch, args.size)
        times = []
        for _ in range(args.repeat):
            sel = gfs.select(U, y, N // 2, replacement=False, engine="stream", backend=args.backend)
            times.append((sel.timings["select"], sel.seconds))
        rows.append(
            dict(
                block=block,
                N=N,
                M=U.shape[1],
                select_s=min(times)[0],
                call_s=min(times)[1],
                indices=sel.indices.tolist(),
            )
        )
    with open(os.path.join(out, f"single{threads}.json"), "w") as f:
        json.dump(rows, f)


def _spawn(target, args_list):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=a) for a in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a benchmark process failed: exit codes {[p.exitcode for p in procs]}")


def measure(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="figure4-") as out:
        return _measure(args, out)


def _measure(args, out: str) -> dict:
    results: dict = {"sharded": {}, "single": {}}
    for world in args.ranks:
        store = os.path.join(out, f"store{world}")
        _spawn(_rank, [(r, world, store, args, out) for r in range(world)])
        per_rank = [json.load(open(os.path.join(out, f"r{world}-{r}.json"))) for r in range(world)]
        rows = []
        for i, row in enumerate(per_rank[0]):
            slowest = max(p[i]["select_s"] for p in per_rank)
            assert all(p[i]["indices"] == row["indices"] for p in per_rank), "ranks disagree"
            rows.append(dict(row, select_s=slowest, call_s=max(p[i]["call_s"] for p in per_rank)))
        results["sharded"][world] = rows
    for threads in (1, 2):
        _spawn(_single, [(threads, args, out)])
        results["single"][threads] = json.load(open(os.path.join(out, f"single{threads}.json")))
    return results


def machine() -> tuple[str, str]:
    import torch

    model, cores = cpu_model(), os.cpu_count() or 1
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") + f"-{cores}c"
    return slug, f"{model}, {cores} cores, {platform.machine()}, torch {torch.__version__}"


def report(results, args, loads, slug, desc) -> str:
    base = {row["block"]: row for row in results["sharded"][1]}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [
        "# Figure 4 (Appendix D) on CPU ranks: sharded selection of ResNet-34 blocks",
        "",
        f"Commit {commit.strip()}. Machine: {desc}; gloo, one thread per rank. 1-min load {loads[0]:.2f} at start, "
        f"{loads[1]:.2f} at end (`uptime` at start: {loads[2]}). Features: real conv2 input-channel contributions "
        f"of a randomly initialised torchvision ResNet-34 on {args.batch} random {args.size}x{args.size} images; "
        f"k = N/2 without replacement, float32, uniform rule, streaming engine, backend {args.backend!r}; "
        f"best of {args.repeat}, the slowest rank.",
        "",
        "| block | N | M | ranks | select s | call s | speed-up (select) | bytes/step/rank | collectives/step "
        "| U bytes/rank |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for world, rows in results["sharded"].items():
        for row in rows:
            speed = base[row["block"]]["select_s"] / row["select_s"]
            lines.append(
                f"| {row['block']} | {row['N']} | {row['M']} | {world} | {row['select_s']:.3g} | {row['call_s']:.3g} | "
                f"{speed:.2f}x | {row['bytes']:.0f} | {row['collectives']:.2f} | "
                f"{4 * row['M'] * -(-row['N'] // world):,} |"
            )
    lines += ["", "One process, gfs.select (the native C++ loop, no collectives):", ""]
    lines += ["| block | threads | select s | vs 1 rank sharded |", "| --- | --- | --- | --- |"]
    for threads, rows in results["single"].items():
        for row in rows:
            lines.append(
                f"| {row['block']} | {threads} | {row['select_s']:.3g} | "
                f"{base[row['block']]['select_s'] / row['select_s']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def figure(results, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = results["sharded"][1]
    blocks, widths = [row["block"] for row in one], [row["N"] for row in one]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    bars = {f"{w} rank{'s' if w > 1 else ''}": rows for w, rows in results["sharded"].items()}
    if 2 in results["single"]:
        bars["gfs.select, 1 process, 2 threads"] = results["single"][2]
    n = len(bars)
    for i, (label, rows) in enumerate(bars.items()):
        xs = [x + (i - (n - 1) / 2) * 0.8 / n for x in range(len(blocks))]
        hatch = "//" if label.startswith("gfs.select") else None
        drawn = a.bar(xs, [row["select_s"] for row in rows], 0.8 / n, label=label, hatch=hatch)
        for bar, row, row1 in zip(drawn, rows, one, strict=True):
            top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            a.annotate(f"{row1['select_s'] / row['select_s']:.1f}x", top, ha="center", va="bottom", fontsize=7)
    a.set_xticks(range(len(blocks)), [f"{blk}\nN={w}" for blk, w in zip(blocks, widths, strict=True)])
    a.set_ylabel("selection time (s), slowest rank")
    a.set_title("select N/2 channels (speed-up over 1 rank)", fontsize=10)
    a.legend(fontsize=8)
    for world, rows in results["sharded"].items():
        line = b.plot(widths, [row["bytes"] for row in rows], "o-", label=f"{world} rank(s): received")[0]
        read = [4 * row["M"] * -(-row["N"] // world) for row in rows]
        b.plot(widths, read, "s--", color=line.get_color(), label=f"{world} rank(s): U read (local pass)")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("block width N (channels)")
    b.set_ylabel("bytes per step and rank")
    b.set_title("per step: received (the pick + one row of U) vs read", fontsize=10)
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3])
    p.add_argument("--batch", type=int, default=16, help="calibration images (default 16)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backend", default="cpu")
    p.add_argument(
        "--wait-load", type=float, default=None, help="wait (at most --max-wait s) for a 1-min load below this"
    )
    p.add_argument("--max-wait", type=float, default=900.0)
    p.add_argument("--quick", action="store_true", help="batch 2, one repeat: a smoke test")
    p.add_argument("--replot", metavar="JSON", help="only write the figure again from a results .json")
    args = p.parse_args()
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        results = {kind: {int(n): rows for n, rows in part.items()} for kind, part in saved["results"].items()}
        load = saved["load"]
        figure(
            results,
            args.replot.removesuffix(".json") + ".png",
            f"{saved['machine']}; load {load[0]:.2f} -> {load[1]:.2f}",
        )
        return
    args.blocks = BLOCKS
    if args.quick:
        args.batch, args.repeat = 2, 1
    os.environ["OMP_NUM_THREADS"] = "1"  # each rank one thread (the single-process reference sets its own)
    if args.wait_load is not None:
        t0 = time.time()
        while load1() >= args.wait_load and time.time() - t0 < args.max_wait:
            time.sleep(15)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    start = load1()
    results = measure(args)
    loads = (start, load1(), uptime)
    slug, desc = machine()
    name = f"figure4-sharded-{slug}" + ("-quick" if args.quick else "")
    folder = os.path.join(ROOT, "benchmarks", "results")
    text = report(results, args, loads, slug, desc)
    with open(os.path.join(folder, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(
            dict(machine=desc, load=loads, args={k: v for k, v in vars(args).items()}, results=results), f, indent=1
        )
    figure(results, os.path.join(folder, name + ".png"), f"{desc}; load {loads[0]:.2f} -> {loads[1]:.2f}")
    print(text)


if __name__ == "__main__":
    main()
