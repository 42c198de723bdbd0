"""Pruning baselines in one run: L1-norm, random, gfs "local" and gfs "loss" at the same kept channels.

    python benchmarks/prune_baselines.py            # or: gfs bench prune
    python benchmarks/prune_baselines.py --quick    # a smoke run (tiny sizes, written under runs/)

On the embedded data (scikit-learn's digits as 32x32 RGB images, the split of gfs.data with seed
0), ResNet-18 and MobileNetV2 (torchvision, weights=None) are trained from scratch as in
`gfs demo` (gfs.workflow.TRAIN_RECIPE, 8 epochs, seed --seed). Then, for each model, 50% of the
internal channels (gfs.models.internal_layers) are pruned by each criterion, and every pruned
network is evaluated before fine-tuning and after the same short fine-tune (2 epochs, SGD lr
0.01, cosine, seed --seed); gfs.workflow runs each step, as for `gfs prune` and `gfs demo`:

- "l1": the largest-L1 producer filters (Li et al. 2017); uses no data;
- "random": a seeded random subset;
- "local": gfs greedy forward selection imitating each layer, on --calib calibration images;
- "local" again on the --loss-calib images that "loss" gets (the same images: a like-for-like row);
- "loss": the ICML 2020 procedure, greedy on the whole network's calibration loss, scoring
  --loss-candidates random candidates a step (50), on the first --loss-calib calibration images.

The selection time of "local" vs "loss" is the ratio of the two gfs.prune calls' wall times on
ResNet-18 on the same --loss-calib images of 32x32 (same run, same machine). Writes
benchmarks/results/prune-baselines-cpu.md and .json with the machine, torch version, commit,
seeds and the 1-minute load average at each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))  # run from a checkout without installing
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _machine import cpu_model, load1  # noqa: E402


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "python", "benchmarks")
    return head + ("+dirty" if dirty else "")


def rebatch(calib, n, batch):
    """The first n images (and labels) of calibration batches, in batches of ``batch``."""
    import torch

    x = torch.cat([b[0] for b in calib])[:n]
    y = torch.cat([b[1] for b in calib])[:n]
    return list(zip(x.split(batch), y.split(batch), strict=True))


def parse(argv):
    p = argparse.ArgumentParser(
        prog="gfs bench prune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (16x16 images, 160 training images, 1 epoch): "
        "a smoke run, written under runs/ unless --out is given",
    )
    p.add_argument("--models", default="resnet18,mobilenet_v2", help="comma-separated torchvision models")
    p.add_argument("--criteria", default="l1,random,local,loss", help="comma-separated criteria to run")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the internal channels kept")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of initialisation, batch order, calibration subset, random criteria and fine-tuning",
    )
    p.add_argument("--epochs", type=int, default=8, help="training epochs from scratch")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--calib", type=int, default=256, help="calibration images for l1 / random / local")
    p.add_argument(
        "--loss-calib",
        type=int,
        default=32,
        help="calibration images for 'loss' (and the like-for-like 'local' row): the first of the --calib ones",
    )
    p.add_argument("--loss-candidates", type=int, default=50, help="candidates scored per step by 'loss'")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: two threads spin-wait on a busy 2-core machine)"
    )
    p.add_argument(
        "--out",
        help="output prefix (default benchmarks/results/prune-baselines-cpu; with --quick runs/prune-baselines-quick)",
    )
    p.add_argument("--progress", action="store_true", help="progress bars (off: plain lines, for logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.epochs, args.finetune_epochs = 16, 1, 1
        args.calib, args.loss_calib, args.loss_candidates = 32, 8, 4
        args.train_samples, args.test_samples = 160, 64
    else:
        args.train_samples = args.test_samples = None
    args.out = args.out or (
        os.path.join("runs", "prune-baselines-quick")
        if args.quick
        else os.path.join(ROOT, "benchmarks", "results", "prune-baselines-cpu")
    )
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    from gfs.models import MODELS
    from gfs.pruning.criteria import CRITERIA

    bad = [m for m in args.models if m not in MODELS] + [c for c in args.criteria if c not in CRITERIA]
    if bad:
        p.error(
            f"unknown model / criterion: {', '.join(bad)} (models: {', '.join(MODELS)}; criteria: "
            f"{', '.join(CRITERIA)})"
        )
    if not 0 < args.ratio <= 1 or args.loss_calib > args.calib:
        p.error("--ratio must be in (0, 1] and --loss-calib <= --calib")
    return args


def run(args) -> dict:
    import torch

    from gfs.models import internal_layers
    from gfs.workflow import TRAIN_RECIPE, Workflow, load_data

    torch.set_num_threads(args.threads)
    results = {
        "machine": machine(),
        "commit": commit(),
        "threads": torch.get_num_threads(),
        "load_at_start": load1(),
        "settings": {k: v for k, v in vars(args).items()},
        "train_recipe": TRAIN_RECIPE,
        "models": {},
    }
    print(
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
        f"{results['machine']['torch']}, {args.threads} thread(s); commit {results['commit']}; 1-min load "
        f"{results['load_at_start']:.2f}",
        flush=True,
    )
    data = load_data(
        "digits", image_size=args.image_size, train_samples=args.train_samples, test_samples=args.test_samples
    )
    # a fresh loader seeded alike for every training phase (gfs.workflow): each model trains, and
    # every row fine-tunes, on the same batch order whatever ran before (and as in `gfs demo`)
    flow = Workflow(data, batch_size=64, seed=args.seed, progress=args.progress)
    calib = flow.calibration(args.calib)
    small = rebatch(calib, args.loss_calib, 64)
    results["data"] = data.describe()
    results["images"] = {"train": len(data.train), "test": len(data.test)}
    print(results["data"], flush=True)

    for name in args.models:
        t0 = time.perf_counter()
        dense = flow.train_dense(name, args.epochs)
        entry = {
            "dense_accuracy": dense.evaluation["accuracy"],
            "dense_loss": dense.evaluation["loss"],
            "train_seconds": dense.training.seconds,
            "layers": internal_layers(name),
            "rows": [],
        }
        results["models"][name] = entry
        print(
            f"{name}: trained {args.epochs} epoch(s) in {dense.training.seconds:.0f} s, test accuracy "
            f"{dense.evaluation['accuracy']:.2%}",
            flush=True,
        )
        plan = []
        for c in args.criteria:
            if c == "local":
                plan.append(("local", calib, {}))
                if args.loss_calib < args.calib and "loss" in args.criteria:
                    plan.append(("local", small, {}))
            elif c == "loss":
                plan.append(("loss", small, {"loss_candidates": args.loss_candidates}))
            else:
                plan.append((c, calib, {}))
        for crit, cal, opts in plan:
            n_cal = sum(len(b[0]) for b in cal)
            load_before = load1()
            out = flow.prune(dense.model, cal, ratio=args.ratio, criterion=crit, layers=internal_layers(name), **opts)
            flow.finetune(out, args.finetune_epochs, lr=args.finetune_lr, description=f"{name} {crit}: fine-tuning")
            pruned, after = out.evaluation, out.final
            row = {
                "criterion": crit,
                "options": opts,
                "calibration_images": n_cal if crit in ("local", "loss") else 0,
                "channels": out.channels,
                "groups": len(out.result.report),
                "params": list(out.result.params),
                "flops_per_image": list(out.result.flops),
                "accuracy_pruned": pruned["accuracy"],
                "loss_pruned": pruned["loss"],
                "accuracy_finetuned": after["accuracy"],
                "loss_finetuned": after["loss"],
                "prune_seconds": out.seconds,
                "group_seconds": sum(r.seconds for r in out.result.report),
                "finetune_seconds": out.finetune_seconds,
                "load_before": load_before,
                "load_after": load1(),
            }
            entry["rows"].append(row)
            print(
                f"  {crit:<6} ({row['calibration_images']:>3} images{', ' + str(opts) if opts else ''}): "
                f"{row['channels'][0]} -> {row['channels'][1]} channels, before fine-tuning "
                f"{pruned['accuracy']:.2%}, after {after['accuracy']:.2%}; prune {out.seconds:.1f} s "
                f"(load {load_before:.2f} -> {row['load_after']:.2f})",
                flush=True,
            )
        entry["seconds"] = time.perf_counter() - t0

    # goals ---------------------------------------------------------------------------------
    goals = []
    for name, entry in results["models"].items():
        by = {}
        for r in entry["rows"]:
            by.setdefault(r["criterion"], r)  # the first row of each criterion (local: --calib images)
        if {"local", "l1", "random"} <= set(by):
            acc = {c: by[c]["accuracy_pruned"] for c in ("local", "l1", "random")}
            goals.append(
                {
                    "goal": f"{name}: gfs local beats L1 and random before fine-tuning",
                    "measured": acc,
                    "met": acc["local"] > acc["l1"] and acc["local"] > acc["random"],
                }
            )
    r18 = results["models"].get("resnet18")
    if r18:
        local_small = [
            r for r in r18["rows"] if r["criterion"] == "local" and r["calibration_images"] == args.loss_calib
        ]
        loss = [r for r in r18["rows"] if r["criterion"] == "loss"]
        if local_small and loss:
            ratio = loss[0]["prune_seconds"] / local_small[0]["prune_seconds"]
            results["selection_time"] = {
                "local_seconds": local_small[0]["prune_seconds"],
                "loss_seconds": loss[0]["prune_seconds"],
                "ratio": ratio,
                "calibration_images": args.loss_calib,
                "image_size": args.image_size,
                "loss_candidates": args.loss_candidates,
            }
            goals.append(
                {
                    "goal": f"resnet18: gfs local >= 100x faster than loss ({args.loss_candidates} candidates a "
                    f"step), same {args.loss_calib} images of {args.image_size}x{args.image_size}",
                    "measured": ratio,
                    "met": ratio >= 100,
                }
            )
    results["goals"] = goals
    results["load_at_end"] = load1()
    return results


def markdown(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    lines = [
        "# Pruning baselines on CPU: L1-norm, random, gfs local, gfs loss",
        "",
        f"Commit {res['commit']}. Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, "
        f"{res['threads']} torch thread(s); 1-min load {res['load_at_start']:.2f} at start, {res['load_at_end']:.2f} "
        f"at end (per row below). One run: `python benchmarks/prune_baselines.py"
        f"{' --quick' if s['quick'] else ''}` (= `gfs bench prune`), run under `nice`.",
        "",
        f"Data: {res['data']} (split seed 0). Models: torchvision, weights=None, trained from scratch for "
        f"{s['epochs']} epoch(s) (SGD momentum 0.9 Nesterov, lr {res['train_recipe']['lr']}, "
        f"{res['train_recipe']['warmup']:.0%} warm-up, cosine, batch 64, weight decay 5e-4). Seed {s['seed']} for the "
        f"initialisation, batch order, calibration subset, the random criterion, the candidate subsets of 'loss' "
        f"and fine-tuning. Every criterion keeps {s['ratio']:.0%} of the internal channels of every group "
        f"(ResNet-18: conv1 of each BasicBlock; MobileNetV2: the stem and the expanded hidden channels of the "
        f"inverted residuals). Fine-tuning: {s['finetune_epochs']} epoch(s), SGD lr {s['finetune_lr']}, cosine, "
        f"the same for every row. Accuracy on the {res['images']['test']} test images.",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "| --- | --- | --- |",
    ]
    for g in res["goals"]:
        meas = g["measured"]
        meas = ", ".join(f"{k} {v:.1%}" for k, v in meas.items()) if isinstance(meas, dict) else f"{meas:.0f}x"
        lines.append(f"| {g['goal']} | {meas} | {'yes' if g['met'] else 'no'} |")
    if "selection_time" in res:
        st = res["selection_time"]
        lines += [
            "",
            f"Selection time on ResNet-18 ({st['calibration_images']} images of {st['image_size']}x"
            f"{st['image_size']}, whole gfs.prune call: capture, selection, folding): local "
            f"{st['local_seconds']:.2f} s, loss ({st['loss_candidates']} candidates a step) "
            f"{st['loss_seconds']:.1f} s: ratio {st['ratio']:.0f}x.",
        ]
    lines += [
        "",
        "## Accuracy at the same kept channels",
        "",
        "| model | criterion | calibration images | channels | params | FLOPs / image | acc. before fine-tune "
        "| acc. after fine-tune | prune s | 1-min load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in res["models"].items():
        lines.append(
            f"| {name} | dense | - | {e['rows'][0]['channels'][0] if e['rows'] else '-'} | "
            f"{e['rows'][0]['params'][0] if e['rows'] else '-':,} | "
            f"{e['rows'][0]['flops_per_image'][0] / 1e6 if e['rows'] else 0:.1f}M | "
            f"{e['dense_accuracy']:.1%} | - | - | - |"
        )
        for r in e["rows"]:
            crit = r["criterion"] + (f" ({r['options']['loss_candidates']} candidates)" if r["options"] else "")
            images = r["calibration_images"] if r["criterion"] in ("local", "loss") else "-"  # l1, random: no data
            lines.append(
                f"| {name} | {crit} | {images} | {r['channels'][1]} | {r['params'][1]:,} | "
                f"{r['flops_per_image'][1] / 1e6:.1f}M | {r['accuracy_pruned']:.1%} | {r['accuracy_finetuned']:.1%} | "
                f"{r['prune_seconds']:.1f} | {r['load_before']:.2f} |"
            )
    lines += [
        "",
        "l1 and random use no calibration data. 'local' is run twice: on the default calibration set and on the "
        "smaller set 'loss' gets (the same images), so that the loss row has a like-for-like comparison.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--markdown"]:  # re-render the table of an earlier run: --markdown RESULTS.json
        if len(argv) != 2:
            print("usage: prune_baselines.py --markdown RESULTS.json (writes RESULTS.md beside it)", file=sys.stderr)
            return 2
        with open(argv[1]) as f:
            res = json.load(f)
        out = os.path.splitext(argv[1])[0] + ".md"
        with open(out, "w") as f:
            f.write(markdown(res))
        print(f"wrote {out}")
        return 0
    args = parse(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["seconds_total"] = time.perf_counter() - t0
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    text = markdown(res)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}.md and .json ({res['seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
