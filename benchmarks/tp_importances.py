"""Torch-Pruning's own importances vs gfs (GFSImportance with compensation), at the same kept channels.

    python benchmarks/tp_importances.py            # writes benchmarks/results/tp-importances-cpu.md / .json
    python benchmarks/tp_importances.py --quick    # a smoke run (tiny sizes, written under runs/)

On the embedded data (scikit-learn's digits as 32x32 RGB images, gfs.data's split, seed 0),
ResNet-18 and MobileNetV2 (torchvision, weights=None) are trained from scratch with gfs.workflow
(TRAIN_RECIPE, --epochs, seed --seed), as for `gfs demo` and `gfs bench prune`. Then each model is
pruned by Torch-Pruning's BasePruner (pruning_ratio --ratio: the fraction of every group's channels
removed, local pruning) with each importance, and evaluated on the test images before any
fine-tuning:

- Torch-Pruning's: L1 (MagnitudeImportance p=1), BNScale, Taylor (|w * dL/dw| from one backward
  pass per calibration batch, cross-entropy on the labels), LAMP, random (seeded);
- gfs: GFSImportance in sequential and one-shot mode, each followed by compensate(); and the
  sequential scores alone (no compensate(): what a score-only adapter gives).

Two sets of groups: "internal" (the channel groups of gfs.prune with
layers=gfs.models.internal_layers(model), as in `gfs bench prune` and the README: ResNet
block-internal channels, MobileNetV2 stem and expanded hidden channels; the other layers are
Torch-Pruning's ignored_layers), where gfs.prune(criterion="local") is also run as the
reference; and "all"
(every Torch-Pruning group, residual streams included; only the classifier ignored). Within a
set every importance removes the same number of channels from every group (checked). Writes the
table with the machine, torch and Torch-Pruning versions, commit, seeds and 1-minute loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))  # run from a checkout without installing
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _machine import cpu_model, load1  # noqa: E402


def machine() -> dict:
    from importlib.metadata import version

    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_pruning": version("torch-pruning"),  # (its __version__ says 1.6.0 in release 1.6.1)
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "python", "benchmarks")
    return head + ("+dirty" if dirty else "")


IMPORTANCES = ("l1", "bnscale", "taylor", "lamp", "random", "gfs-sequential", "gfs-one-shot", "gfs-scores-only")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, written under runs/")
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--importances", default=",".join(IMPORTANCES))
    p.add_argument("--groups", default="internal,all", help="'internal' (gfs.prune's groups), 'all' or both")
    p.add_argument("--ratio", type=float, default=0.5, help="Torch-Pruning's pruning_ratio: fraction removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8, help="training epochs from scratch")
    p.add_argument("--calib", type=int, default=256, help="calibration images (gfs, Taylor)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two spin-wait on a busy 2-core machine)")
    p.add_argument("--out", help="output prefix (default benchmarks/results/tp-importances-cpu)")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.epochs, args.calib = 16, 1, 32
        args.train_samples, args.test_samples = 160, 64
    else:
        args.train_samples = args.test_samples = None
    args.out = args.out or (
        os.path.join("runs", "tp-importances-quick")
        if args.quick
        else os.path.join(ROOT, "benchmarks", "results", "tp-importances-cpu")
    )
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.importances = [i.strip() for i in args.importances.split(",") if i.strip()]
    args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    bad = [i for i in args.importances if i not in IMPORTANCES] + [
        g for g in args.groups if g not in ("internal", "all")
    ]
    if bad:
        p.error(f"unknown importance / group set: {bad}; importances: {', '.join(IMPORTANCES)}")
    return args


def _importance(name, seed):
    import torch_pruning as tp

    from gfs.integrations.torch_pruning import GFSImportance

    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "bnscale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(),
        "random": lambda: tp.importance.RandomImportance(),
        "gfs-sequential": lambda: GFSImportance("sequential"),
        "gfs-one-shot": lambda: GFSImportance("one-shot"),
        "gfs-scores-only": lambda: GFSImportance("sequential"),
    }[name]()


def _ignored(model, which, example, name):
    """Torch-Pruning's ignored_layers for a set of groups: "all" ignores the classifier only;
    "internal" every dense layer but the producers of gfs.prune's groups with
    layers=gfs.models.internal_layers(name) (the channels of `gfs bench prune` and the README)."""
    import fnmatch

    import torch.nn as nn

    from gfs.models import internal_layers
    from gfs.pruning import find_groups

    dense = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m) is nn.Conv2d]
    if which == "all":
        return [m for _, m in dense if isinstance(m, nn.Linear) and m is dense[-1][1]]  # the classifier
    patterns = internal_layers(name)
    producers = {
        g.producer
        for g in find_groups(model, example).groups
        if patterns is None or any(fnmatch.fnmatchcase(g.name, p) for p in patterns)
    }
    return [m for n, m in dense if n not in producers and (isinstance(m, nn.Linear) or m.groups == 1)]


def _widths(model):
    import torch.nn as nn

    return {
        n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def prune_once(dense, name, which, calib, example, seed, ratio, model_name):
    """Prune a copy of ``dense`` with importance ``name``; returns (model, seconds)."""
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    torch.manual_seed(seed)  # the random importance
    model = copy.deepcopy(dense).eval()
    imp = _importance(name, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=imp,
            pruning_ratio=ratio,
            ignored_layers=_ignored(model, which, example, model_name),
        )
    t0 = time.perf_counter()
    if name.startswith("gfs"):
        imp.calibrate(pruner, calib)
    if name == "taylor":
        model.zero_grad()
        for x, y in calib:
            F.cross_entropy(model(x), y).backward()
    pruner.step()
    if name in ("gfs-sequential", "gfs-one-shot"):
        imp.compensate()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return model.eval(), seconds


def run(args) -> dict:
    import torch
    import torch_pruning as tp

    from gfs.models import internal_layers
    from gfs.workflow import TRAIN_RECIPE, Workflow, load_data

    torch.set_num_threads(args.threads)
    res = {
        "machine": machine(),
        "commit": commit(),
        "threads": torch.get_num_threads(),
        "load_at_start": load1(),
        "settings": {k: v for k, v in vars(args).items()},
        "train_recipe": TRAIN_RECIPE,
        "models": {},
    }
    m = res["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Torch-Pruning {m['torch_pruning']}, "
        f"{args.threads} thread(s); commit {res['commit']}; 1-min load {res['load_at_start']:.2f}",
        flush=True,
    )
    data = load_data(
        "digits", image_size=args.image_size, train_samples=args.train_samples, test_samples=args.test_samples
    )
    flow = Workflow(data, batch_size=64, seed=args.seed, progress=False)
    calib = flow.calibration(args.calib)
    res["data"] = data.describe()
    res["images"] = {"train": len(data.train), "test": len(data.test)}
    print(res["data"], flush=True)
    for name in args.models:
        dense = flow.train_dense(name, args.epochs)
        dense.model.eval()
        example = calib[0][0][:1]
        macs, params = tp.utils.count_ops_and_params(dense.model, example)
        entry = {
            "dense_accuracy": dense.evaluation["accuracy"],
            "train_seconds": dense.training.seconds,
            "macs": macs,
            "params": params,
            "sets": {},
        }
        res["models"][name] = entry
        print(
            f"{name}: trained in {dense.training.seconds:.0f} s, test accuracy {dense.evaluation['accuracy']:.2%}",
            flush=True,
        )
        for which in args.groups:
            rows, widths = [], None
            plan = list(args.importances)
            for imp_name in plan:
                load_before = load1()
                model, seconds = prune_once(dense.model, imp_name, which, calib, example, args.seed, args.ratio, name)
                w = _widths(model)
                if widths is None:
                    widths = w
                same = w == widths
                acc = flow.evaluate(model)["accuracy"]
                macs1, params1 = tp.utils.count_ops_and_params(model, example)
                rows.append(
                    {
                        "importance": imp_name,
                        "accuracy": acc,
                        "same_channels": same,
                        "channels": sum(w.values()),
                        "macs": macs1,
                        "params": params1,
                        "seconds": seconds,
                        "load_before": load_before,
                    }
                )
                print(
                    f"  {which:<8} {imp_name:<16} {acc:7.2%}  channels {sum(w.values())} (same: {same})  "
                    f"params {params1 / 1e6:.2f}M  {seconds:.1f} s (load {load_before:.2f})",
                    flush=True,
                )
            if which == "internal":
                t0 = time.perf_counter()
                out = flow.prune(dense.model, calib, ratio=1 - args.ratio, layers=internal_layers(name), progress=False)
                w = _widths(out.result.model)
                rows.append(
                    {
                        "importance": "gfs.prune local (reference)",
                        "accuracy": out.evaluation["accuracy"],
                        "same_channels": w == widths,
                        "channels": sum(w.values()),
                        "macs": tp.utils.count_ops_and_params(out.result.model.eval(), example)[0],
                        "params": sum(p.numel() for p in out.result.model.parameters()),
                        "seconds": time.perf_counter() - t0,
                        "load_before": load1(),
                    }
                )
                print(
                    f"  {which:<8} gfs.prune local  {out.evaluation['accuracy']:7.2%}  (same channels: {w == widths})"
                )
            entry["sets"][which] = {"channels_dense": sum(_widths(dense.model).values()), "rows": rows}
    res["load_at_end"] = load1()
    return res


LABELS = {
    "l1": "L1 (MagnitudeImportance p=1)",
    "bnscale": "BNScale",
    "taylor": "Taylor",
    "lamp": "LAMP",
    "random": "random",
    "gfs-sequential": "**GFSImportance sequential + compensate**",
    "gfs-one-shot": "**GFSImportance one-shot + compensate**",
    "gfs-scores-only": "GFSImportance sequential, scores only (no compensate)",
}


def markdown(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    lines = [
        "# Torch-Pruning's importances vs GFSImportance (accuracy before fine-tuning)",
        "",
        f"Commit {res['commit']}. Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Torch-Pruning "
        f"{m['torch_pruning']}; {res['threads']} torch thread(s); 1-min load {res['load_at_start']:.2f} at start, "
        f"{res['load_at_end']:.2f} at end (per row below). One run: `python benchmarks/tp_importances.py"
        f"{' --quick' if s['quick'] else ''}`.",
        "",
        f"Data: {res['data']} (split seed 0). Models: torchvision, weights=None, trained from scratch for "
        f"{s['epochs']} epoch(s) with gfs.workflow (SGD Nesterov momentum 0.9, lr {res['train_recipe']['lr']}, "
        f"{res['train_recipe']['warmup']:.0%} warm-up, cosine, batch 64, weight decay 5e-4), seed {s['seed']}. "
        f"Torch-Pruning BasePruner, local pruning, pruning_ratio {s['ratio']} (the fraction of every group's "
        f"channels removed): every row removes the same channels count from every group. {s['calib']} calibration "
        f"images (gfs; Taylor's gradients). No fine-tuning; no BatchNorm re-estimation. Accuracy on the "
        f"{res['images']['test']} test images.",
        "",
        "'internal': the groups of gfs.prune with layers=gfs.models.internal_layers (ResNet block-internal "
        "channels; MobileNetV2 stem and expanded hidden channels; the other layers in ignored_layers), the channels "
        "of `gfs bench prune`. 'all': every Torch-Pruning group, residual streams included (only the classifier "
        "ignored).",
        "",
    ]
    for name, e in res["models"].items():
        lines += [
            f"## {name} (dense {e['dense_accuracy']:.1%}, {e['params'] / 1e6:.2f}M params, "
            f"{e['macs'] / 1e6:.1f}M MACs)",
            "",
            "| groups | importance | acc. before fine-tune | channels | params | MACs | prune s | 1-min load |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for which, block in e["sets"].items():
            for r in block["rows"]:
                label = LABELS.get(r["importance"], r["importance"])
                same = "" if r["same_channels"] else " (other channels!)"
                lines.append(
                    f"| {which} | {label} | {r['accuracy']:.1%} | {block['channels_dense']} → {r['channels']}{same} | "
                    f"{r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | {r['seconds']:.1f} | {r['load_before']:.2f} |"
                )
        lines.append("")
    lines += [
        "Channels: the output channels of every Conv2d / Linear, summed (a MobileNetV2 hidden channel counts twice: "
        "the expand and the depthwise convolution's). 'prune s': the importance's calibration and Torch-Pruning's "
        "step (and compensate()); for gfs.prune its whole call; wall time on the shared machine (see the load).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--markdown"]:
        with open(argv[1]) as f:
            res = json.load(f)
        with open(os.path.splitext(argv[1])[0] + ".md", "w") as f:
            f.write(markdown(res))
        return 0
    args = parse(argv)
    t0 = time.perf_counter()
    res = run(args)
    res["seconds_total"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
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
