"""Quality at equal FLOPs: gfs against Torch-Pruning's criteria on Fashion-MNIST (issue 13).

    python benchmarks/quality.py            # or: gfs bench quality   (hours on 2 cores; resumable)
    python benchmarks/quality.py --quick    # a few minutes: 1 seed, tiny sizes, written under runs/

For each model (ResNet-56 and torchvision's MobileNetV2 by default) and seed, the dense network
is trained from scratch once (gfs.workflow, TRAIN_RECIPE) on a seeded random subset of the
Fashion-MNIST training images, then pruned to 2x and 4x fewer FLOPs by every method, each
pruned network evaluated on the test images three times: as pruned, after BatchNorm
recalibration (the running statistics re-estimated on --recal training images, nothing trained),
and after the same short fine-tune (from the recalibrated network; --no-bn-recal: from the
pruned one). Every method prunes the same channel groups (the internal channels of
gfs.models.internal_layers: conv1 of ResNet-56's 27 BasicBlocks; MobileNetV2's stem and 16
expanded hidden layers), and every FLOPs figure is counted the same way (torch.utils.flop_counter
through gfs, 2 per multiply-add, one image).

Methods (--methods: names, all, or gfs[...] with options; see METHODS and parse_method):

- gfs: greedy forward selection with criterion "local" (each consumer imitates its dense
  output, gfs.prune), the papers' uniform step, and one keep ratio for every group, the largest
  whose FLOPs are at most the target (FlopModel.uniform_ratio: exact, from the layer shapes);
- gfs variants (gfs-NAME, or gfs[step=...,budget=...,rounds=...,rescale=...,fold=...,imitate=...,
  criterion=...,shortlist=...]):
  step line_search or refit (gfs-line_search, gfs-refit); budget=global (gfs-global: the FLOPs
  budget spent where the selection losses drop most per FLOP: a first gfs.prune at ratio 1
  records every group's loss curve, relative to its target's energy, then FlopModel.allocate
  adds channels greedily by loss drop per FLOP up to the target); budget=eps (gfs-eps: the same
  curves, every group kept to the same relative loss eps, eps bisected to meet the target, what
  is left of the budget then spent as by budget=global: the papers' stopping rule with a
  relative eps); budget=lamp (gfs-lamp-budget: every group keeps as many channels as
  Torch-Pruning's LAMP global ranking leaves it at the target, gfs choosing which: the
  allocation of tp-lamp-global with gfs's selection); budget=count (gfs-count: the same
  number of channels in every group, the largest within the target, as LAMP global's allocation
  nearly is on MobileNetV2: small groups kept whole, wide ones cut most); rounds=2 (gfs-seq2, sequential: two
  prunes of sqrt(factor) each, BatchNorm recalibrated between them, instead of one shot);
  rescale=1 (gfs-rescale: each consumer's weight norm moved back to its dense value, the factor
  folded into the BatchNorm after it, rescale_into_bn: the same function, a better-conditioned
  start for fine-tuning); fold=0
  (gfs-nofold, gfs-refit-nofold: gfs's choice of channels, the consumers' weights left as in the
  dense network, as the baselines leave them: what the selection alone is worth);
  imitate=normalized / recalibrated (gfs.prune's imitate=: a consumer followed by a BatchNorm
  imitates that BatchNorm's output, recalibrated with each channel's mean free);
  criterion=loss (the ICML 2020 procedure: greedy on the whole network's cross-entropy on the
  calibration images, uniform step), with shortlist=T (only the T best by the first-order
  estimate evaluated each step);
- tp-IMPORTANCE and tp-IMPORTANCE-global: Torch-Pruning's MetaPruner with the L1
  (MagnitudeImportance p=1), BNScale, Taylor (gradients of the cross-entropy on the calibration
  images), FPGM, LAMP and random importances, local (every group keeps the channels the gfs row
  keeps: the same architecture) or global (one ranking over all groups, the pruning ratio
  bisected to the smallest whose FLOPs are within the target). Needs torch-pruning (pip install
  "torch-pruning==1.6.*", or gfs's extra gfs[torch-pruning]); without it those rows are skipped,
  with a message.

Sizes for 2 CPU cores (the defaults; the report states them): 10,000 training images (a seeded
random subset per seed), all 10,000 test images, 32x32 (the 28x28 images zero-padded), 10 epochs
of training from scratch (batch 64, lr 0.05), 512 calibration images, 1,024 images for BatchNorm
recalibration, 1 epoch of fine-tuning (lr 0.01), 1 torch thread, 3 seeds, the 17 methods of
DEFAULT_METHODS, factors 2 and 4. --quick: 2,000 training images of 16x16, 500 test images, 3
epochs, 128 calibration and 256 recalibration images, 1 seed, the 5 QUICK_METHODS.

Resumable: the dense weights and every finished (model, seed, factor, method) cell are written
atomically under --work (default runs/quality, runs/quality-quick with --quick) as they finish,
and a rerun with the same settings computes only what is missing (more seeds, methods or models
can be added later). The report (Markdown, JSON and a figure of accuracy vs FLOPs per method) is
written from all finished cells to --out (default benchmarks/results/quality-fashion-mnist-cpu;
runs/quality-quick with --quick), with the machine, its load and the commit.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))  # run from a checkout without installing
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _machine import load1  # noqa: E402
from prune_baselines import commit, machine  # noqa: E402

FACTORS = (2, 4)  # FLOPs reduction targets
MODELS = ("resnet56", "mobilenet_v2")
TP_IMPORTANCES = ("l1", "bnscale", "taylor", "fpgm", "lamp", "random")
GFS_DEFAULTS = {
    "step": "uniform",
    "budget": "uniform",
    "rounds": 1,
    "rescale": 0,
    "fold": 1,
    "imitate": "output",
    "criterion": "local",
    "shortlist": 0,
}
# Named methods; gfs[...] spells any other combination of the gfs options.
METHODS = {
    "gfs": {},
    "gfs-line_search": {"step": "line_search"},
    "gfs-refit": {"step": "refit"},
    "gfs-global": {"budget": "global"},
    "gfs-eps": {"budget": "eps"},
    "gfs-lamp-budget": {"budget": "lamp"},
    "gfs-count": {"budget": "count"},
    "gfs-seq2": {"rounds": 2},
    "gfs-rescale": {"rescale": 1},
    "gfs-nofold": {"fold": 0},
    "gfs-refit-nofold": {"step": "refit", "fold": 0},
}
TP_METHODS = tuple(f"tp-{imp}{mode}" for mode in ("", "-global") for imp in TP_IMPORTANCES)
# The default run: the papers' default, the best step rule as pruned (refit), the best after BN
# recalibration (refit's channels, dense weights), sequential, the papers' eps rule, and every
# Torch-Pruning row. gfs-line_search, gfs-global and gfs-rescale are left out (the quick run:
# benchmarks/results/quality-fashion-mnist-quick-cpu.md); --methods all runs every one.
DEFAULT_METHODS = ("gfs", "gfs-refit", "gfs-refit-nofold", "gfs-seq2", "gfs-eps") + TP_METHODS
ALL_METHODS = tuple(METHODS) + TP_METHODS

# --quick runs these unless --methods says otherwise (every method: --methods all)
QUICK_METHODS = ("gfs", "gfs-refit-nofold", "tp-l1", "tp-taylor", "tp-lamp-global")

TP_MISSING = (
    "torch-pruning is not installed, so the Torch-Pruning rows are skipped: pip install 'torch-pruning==1.6.*' "
    "(or the gfs extra: pip install 'gfs[torch-pruning]')"
)


# ---- methods ----------------------------------------------------------------------------------


def parse_method(text: str) -> dict:
    """A method name -> {"name", "kind": "gfs" | "tp", ...options}.

    gfs: "gfs", a name of METHODS, or "gfs[step=refit,budget=global,rounds=2,rescale=1,fold=0]"
    (step uniform / line_search / refit; budget uniform / global / eps / lamp / count; rounds >= 1; rescale and
    fold 0 / 1).
    Torch-Pruning:
    "tp-IMPORTANCE" (local) or "tp-IMPORTANCE-global", IMPORTANCE one of TP_IMPORTANCES.
    ValueError for anything else."""
    text = text.strip()
    if text in METHODS:
        return {"name": text, "kind": "gfs", **GFS_DEFAULTS, **METHODS[text]}
    m = re.fullmatch(r"gfs\[(.*)\]", text)
    if m:
        opts = dict(GFS_DEFAULTS)
        for part in filter(None, (p.strip() for p in m.group(1).split(","))):
            key, _, value = part.partition("=")
            if key not in GFS_DEFAULTS or not value:
                raise ValueError(
                    f"method {text!r}: unknown option {part!r} "
                    "(options: step=, budget=, rounds=, rescale=, fold=, imitate=, criterion=, shortlist=)"
                )
            opts[key] = int(value) if key in ("rounds", "rescale", "fold", "shortlist") else value
        if opts["step"] not in ("uniform", "line_search", "refit"):
            raise ValueError(f"method {text!r}: step must be uniform, line_search or refit")
        if opts["budget"] not in ("uniform", "global", "eps", "lamp", "count"):
            raise ValueError(f"method {text!r}: budget must be uniform, global, eps, lamp or count")
        if opts["rounds"] < 1:
            raise ValueError(f"method {text!r}: rounds must be >= 1")
        if opts["imitate"] not in ("output", "normalized", "recalibrated"):
            raise ValueError(f"method {text!r}: imitate must be output, normalized or recalibrated")
        if opts["criterion"] not in ("local", "loss"):
            raise ValueError(f"method {text!r}: criterion must be local or loss")
        if opts["criterion"] == "loss" and (opts["step"] != "uniform" or opts["imitate"] != "output"):
            raise ValueError(f"method {text!r}: criterion=loss takes the uniform step and imitates nothing")
        if opts["shortlist"] < 0 or (opts["shortlist"] and opts["criterion"] != "loss"):
            raise ValueError(f"method {text!r}: shortlist (>= 1) applies to criterion=loss")
        return {"name": text, "kind": "gfs", **opts}
    m = re.fullmatch(r"tp-([a-z0-9]+)(-global)?", text)
    if m and m.group(1) in TP_IMPORTANCES:
        return {"name": text, "kind": "tp", "importance": m.group(1), "global": bool(m.group(2))}
    raise ValueError(
        f"unknown method {text!r}: expected one of {', '.join(ALL_METHODS)}, or gfs[step=...,budget=...,...]"
    )


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


# ---- FLOPs as a function of the channels kept ------------------------------------------------


def keep_count(n: int, ratio: float) -> int:
    """Channels gfs.prune keeps of n at ``ratio``: rounded half up, at least 1 (gfs.pruning's rule)."""
    return max(1, min(n, math.floor(ratio * n + 0.5)))


class FlopModel:
    """FLOPs of one image through ``model`` as a function of the channels kept in ``groups``.

    Every Conv2d / Linear costs 2 x (output elements) x (inputs per output) FLOPs, as
    torch.utils.flop_counter counts them; pruning group g to k of its C channels multiplies the
    cost of its producer (output channels), of its depthwise members and squeeze-excitation
    layers, and of its consumer (input channels) by k / C. A layer that consumes one group and
    produces another (VGG) scales by both. ``dense`` is the exact count (count_flops)."""

    def __init__(self, model, groups, example):
        import torch
        import torch.nn as nn

        from gfs.pruning.fold import count_flops

        model = copy.deepcopy(model).eval()
        costs, hooks = {}, []

        def hook(name):
            def record(module, inputs, output):
                if isinstance(module, nn.Conv2d):
                    per_out = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
                else:
                    per_out = module.in_features
                costs[name] = costs.get(name, 0) + 2 * output[:1].numel() * per_out

            return record

        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(m.register_forward_hook(hook(name)))
        one = example[:1]
        with torch.no_grad():
            model(one)
        for h in hooks:
            h.remove()
        self.dense = int(count_flops(model, one))
        self.channels = {g.name: int(g.channels) for g in groups}
        self.order = [g.name for g in groups]
        scale_in, scale_out = {}, {}
        for g in groups:
            scale_out[g.producer] = g.name
            scale_in[g.consumer] = g.name
            for mem in g.members:
                if mem.kind == "depthwise":
                    scale_out[mem.name] = g.name
                elif mem.kind == "se":
                    scale_in[mem.name] = g.name
                    scale_out[mem.fc2] = g.name
        self.terms = [(float(f), scale_in.get(n), scale_out.get(n)) for n, f in costs.items()]
        self.fixed = self.dense - sum(costs.values())  # anything the hooks do not see (0 for these models)

    def flops(self, keeps: dict) -> float:
        total = float(self.fixed)
        for f, a, b in self.terms:
            if a is not None:
                f *= keeps[a] / self.channels[a]
            if b is not None:
                f *= keeps[b] / self.channels[b]
            total += f
        return total

    def keeps_for_ratio(self, ratio: float) -> dict:
        return {g: keep_count(c, ratio) for g, c in self.channels.items()}

    def uniform_ratio(self, target: float) -> float | None:
        """The largest keep ratio (one for every group, gfs.prune's ratio=) whose FLOPs are at
        most ``target``; None when even one channel per group is more."""
        if self.flops(self.keeps_for_ratio(0.0)) > target:
            return None
        if self.flops(self.keeps_for_ratio(1.0)) <= target:
            return 1.0
        lo, hi = 0.0, 1.0  # F(keeps(lo)) <= target < F(keeps(hi)); keeps are computed as gfs.prune computes them
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.flops(self.keeps_for_ratio(mid)) <= target else (lo, mid)
        return max(lo, 1e-9)  # gfs.prune takes ratio in (0, 1]; 1e-9 keeps one channel per group, as 0 would

    def equal_count(self, target: float) -> dict | None:
        """The same number of channels K in every group (all of a group smaller than K), K the
        largest within ``target`` FLOPs; None when one channel per group is more."""
        keeps = lambda k: {g: min(k, c) for g, c in self.channels.items()}  # noqa: E731
        lo, hi = 1, max(self.channels.values())
        if self.flops(keeps(lo)) > target:
            return None
        while lo < hi:  # the largest K within the target (FLOPs grow with K)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.flops(keeps(mid)) <= target else (lo, mid - 1)
        return keeps(lo)

    def allocate(self, curves: dict, target: float, minimum: int = 1, start: dict | None = None) -> dict:
        """Per-group keep counts within ``target`` FLOPs, spent greedily where the relative
        selection loss drops most per FLOP: each step adds one channel to the group with the
        largest (best average loss drop over any number of further channels) / (FLOPs of one
        more channel), among those still within the target. ``curves[g][k]``: the relative loss
        with k channels kept (k = 0 .. C, non-increasing). ``start``: keep counts to add to
        (default ``minimum`` channels per group)."""
        import numpy as np

        keeps = dict(start) if start is not None else {g: min(minimum, c) for g, c in self.channels.items()}
        slopes = {}

        def slope(g):
            r, k = curves[g], keeps[g]
            ahead = r[k + 1 :]
            return float(np.max((r[k] - ahead) / np.arange(1, len(ahead) + 1))) if len(ahead) else -1.0

        for g in self.order:
            slopes[g] = slope(g)
        current = self.flops(keeps)
        while True:
            best, best_score, best_cost = None, -math.inf, 0.0
            for g in self.order:
                if keeps[g] >= self.channels[g]:
                    continue
                keeps[g] += 1
                cost = self.flops(keeps) - current
                keeps[g] -= 1
                if current + cost > target or cost <= 0:
                    continue
                score = slopes[g] / cost
                if score > best_score:
                    best, best_score, best_cost = g, score, cost
            if best is None:
                return keeps
            keeps[best] += 1
            current += best_cost
            slopes[best] = slope(best)

    def equal_loss(self, curves: dict, target: float) -> tuple:
        """Per-group keep counts within ``target`` FLOPs that give every group the same relative
        selection loss: the papers' stopping rule (stop a layer once its loss is within eps),
        with eps relative to each layer's target energy and bisected to meet the FLOPs target.
        Returns (keeps, eps)."""
        import numpy as np

        def keeps_at(eps):
            out = {}
            for g, c in self.channels.items():
                hit = np.flatnonzero(curves[g][1:] <= eps)
                out[g] = int(hit[0]) + 1 if len(hit) else c
            return out

        lo, hi = 0.0, float(max(c[1] for c in curves.values())) + 1.0  # hi: one channel each
        if self.flops(keeps_at(hi)) > target:
            return keeps_at(hi), hi
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.flops(keeps_at(mid)) <= target else (mid, hi)
        # the keep counts are a step function of eps (a flat curve jumps from C to 1 channel): what
        # the last step leaves of the budget is spent greedily, by loss drop per FLOP
        return self.allocate(curves, target, start=keeps_at(hi)), hi


# ---- pruning ----------------------------------------------------------------------------------


def chosen_groups(model, layers, example):
    """The channel groups gfs.prune finds in ``model`` that ``layers`` (patterns) selects."""
    import fnmatch

    from gfs.pruning import find_groups

    scan = find_groups(model, example[:2])
    if layers is None:
        return scan.groups
    return [g for g in scan.groups if any(fnmatch.fnmatchcase(g.name, p) for p in layers)]


def prune_keeps(model, calib, keeps: dict, **options):
    """gfs.prune keeping keeps[g] channels of every group g (keep= as a mapping)."""
    import gfs

    return gfs.prune(model, calib, keep=dict(keeps), **options)


def relative_curves(model, calib, profile, groups) -> dict:
    """{group: relative selection loss with k = 0..C channels kept}, from a gfs.prune run at
    ratio 1 (``profile``): losses[k-1] / the energy of the group's target (the dense consumer's
    output minus bias, mean square over the calibration batches: the loss of keeping nothing),
    made non-increasing (a running minimum)."""
    import numpy as np
    import torch

    modules = dict(model.named_modules())
    energy, hooks = {}, []

    def hook(name):
        def record(module, inputs, output):
            out = output
            if getattr(module, "bias", None) is not None:
                shape = (1, -1) + (1,) * (out.dim() - 2) if out.dim() > 2 else (1, -1)
                out = out - module.bias.view(shape)
            s, n = energy.get(name, (0.0, 0))
            energy[name] = (s + float(out.double().pow(2).sum()), n + out.numel())

        return record

    for g in groups:
        hooks.append(modules[g.consumer].register_forward_hook(hook(g.consumer)))
    twin_flags = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in calib:
                model(batch[0])
    finally:
        for h in hooks:
            h.remove()
        for n, m in model.named_modules():
            m.training = twin_flags[n]
    curves = {}
    for g in groups:
        s, n = energy[g.consumer]
        e = max(s / max(n, 1), 1e-30)
        losses = profile.selections[g.name].losses.double().numpy()
        r = np.concatenate([[1.0], losses / e])
        if len(r) < g.channels + 1:  # a selection that stopped early: flat from there
            r = np.concatenate([r, np.full(g.channels + 1 - len(r), r[-1])])
        curves[g.name] = np.minimum.accumulate(r[: g.channels + 1])
    return curves


def recalibrate_bn(model, batches):
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``batches``
    (cumulative averages over them; forward passes only, nothing is trained; dropout off)."""
    import torch
    import torch.nn as nn

    twin = copy.deepcopy(model).eval()
    norms = [m for m in twin.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return twin
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for batch in batches:
            twin(batch[0])
    for m, mom in zip(norms, momenta, strict=True):
        m.momentum = mom
    return twin.eval()


def rescale_into_bn(pruned, reference, groups) -> list:
    """Give each consumer that feeds a BatchNorm the weight norm it had in ``reference``, per
    output channel, moving the factor into that BatchNorm's running statistics (in place): the
    same function, but the weight scale gfs's selection weights put on
    the kept columns (about C / k under the uniform step) no longer shrinks the effective
    learning rate of fine-tuning (a layer followed by BatchNorm learns as 1 / ||W||^2). Returns
    the consumers rescaled."""
    import torch
    import torch.fx as fx
    import torch.nn as nn

    mods, ref = dict(pruned.named_modules()), dict(reference.named_modules())
    consumers = {g.consumer for g in groups}
    done = []
    for node in fx.symbolic_trace(pruned).graph.nodes:
        if node.op != "call_module" or node.target not in consumers or node.target not in ref:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        conv, bn = mods[node.target], mods[users[0].target]
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
            continue
        with torch.no_grad():
            s = conv.weight.flatten(1).norm(dim=1) / ref[node.target].weight.flatten(1).norm(dim=1).clamp(min=1e-12)
            s = s.clamp(min=1e-6)
            conv.weight.div_(s.view(-1, 1, 1, 1))
            if conv.bias is not None:
                conv.bias.div_(s)
            bn.running_mean.div_(s)
            # sqrt(var' + eps) = sqrt(var + eps) / s: the same output, eps included
            bn.running_var.copy_(((bn.running_var + bn.eps) / (s * s) - bn.eps).clamp(min=0))
        done.append(node.target)
    return done


def unfold(pruned, reference, report) -> int:
    """Undo the fold of the selection's weights (in place): each consumer's kept input columns
    become ``reference``'s columns again, so the pruned network is the dense one with the other
    channels dropped, as the baselines leave it (gfs chose the channels, nothing else). Returns
    the number of consumers changed."""
    import torch

    mods, ref = dict(pruned.named_modules()), dict(reference.named_modules())
    for r in report:
        with torch.no_grad():
            mods[r.consumer].weight.copy_(ref[r.consumer].weight[:, r.kept])
    return len(report)


def gfs_method(model, calib, layers, target: float, opts: dict, recal_batches, seed: int) -> tuple:
    """Prune ``model`` with gfs to at most ``target`` FLOPs; returns (pruned model, info)."""
    import torch

    import gfs

    example = calib[0][0]
    info = {"rounds": [], "search_seconds": 0.0, "prune_seconds": 0.0}
    dense = FlopModel(model, chosen_groups(model, layers, example), example).dense
    current = model
    for r in range(opts["rounds"]):
        t0 = time.perf_counter()
        round_target = dense * (target / dense) ** ((r + 1) / opts["rounds"])
        groups = chosen_groups(current, layers, example)
        fm = FlopModel(current, groups, example)
        common = dict(criterion=opts["criterion"], step=opts["step"], layers=layers, progress=False, seed=seed)
        if opts["criterion"] == "local":
            common["imitate"] = opts["imitate"]
        if opts["shortlist"]:
            common["shortlist"] = opts["shortlist"]
        entry = {"target_flops": round_target}
        if opts["budget"] == "uniform":
            ratio = fm.uniform_ratio(round_target)
            if ratio is None:
                raise RuntimeError(f"cannot reach {round_target:.3g} FLOPs with one channel per group")
            entry.update(ratio=ratio, predicted_flops=fm.flops(fm.keeps_for_ratio(ratio)))
            info["search_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            result = gfs.prune(current, calib, ratio=ratio, **common)
        else:  # per-group keep counts
            if opts["budget"] == "count":  # one channel count for every group
                keeps = fm.equal_count(round_target)
                if keeps is None:
                    raise RuntimeError(f"cannot reach {round_target:.3g} FLOPs with one channel per group")
            elif opts["budget"] == "lamp":  # Torch-Pruning's LAMP global allocation, gfs's channels in each group
                lamp = {"importance": "lamp", "global": True}
                allocated, _ = tp_method(current, calib, layers, round_target, lamp, seed)
                keeps = {g.name: int(allocated.get_submodule(g.producer).weight.shape[0]) for g in groups}
            else:  # from the loss curves of a gfs.prune at ratio 1
                with torch.no_grad():
                    profile = gfs.prune(current, calib, ratio=1.0, **common)
                curves = relative_curves(current, calib, profile, groups)
                if opts["budget"] == "global":
                    keeps = fm.allocate(curves, round_target)
                else:
                    keeps, eps = fm.equal_loss(curves, round_target)
                    entry["relative_eps"] = eps
                entry["profile_seconds"] = profile.seconds
            entry.update(keeps=keeps, predicted_flops=fm.flops(keeps))
            info["search_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            result = prune_keeps(current, calib, keeps, **common)
        before, current = current, result.model
        if not opts["fold"]:
            entry["unfolded"] = unfold(current, before, result.report)
        if opts["rescale"]:
            entry["rescaled"] = rescale_into_bn(current, model, groups)
        if r + 1 < opts["rounds"] and recal_batches is not None:
            current = recalibrate_bn(current, recal_batches)
        info["prune_seconds"] += time.perf_counter() - t0
        entry.update(
            channels=[sum(x.channels_before for x in result.report), sum(x.channels_after for x in result.report)],
            fold_error=max((x.fold_error for x in result.report), default=0.0),
            selection_loss=sum(x.loss for x in result.report),
        )
        info["rounds"].append(entry)
    return current, info


def _tp_importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "bnscale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "fpgm": lambda: tp.importance.FPGMImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "random": lambda: tp.importance.RandomImportance(),
    }[name]()


def tp_method(model, calib, layers, target: float, opts: dict, seed: int) -> tuple:
    """Prune ``model`` with Torch-Pruning's MetaPruner to at most ``target`` FLOPs; returns
    (pruned model, info). Local: every group keeps exactly the channels the gfs row keeps (the
    largest uniform ratio within the target, FlopModel.uniform_ratio, given to TP per group
    through pruning_ratio_dict), so the two have the same architecture and FLOPs. Global: one
    ranking over all groups, its pruning ratio bisected to the smallest whose FLOPs are within
    the target."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torch_pruning as tp

    from gfs.pruning.fold import count_flops

    example = calib[0][0][:1]
    t0 = time.perf_counter()
    groups = chosen_groups(model, layers, calib[0][0])
    producers = {g.producer for g in groups}
    # the same groups as gfs: every other dense layer's output channels are left whole
    ignored = [
        n
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)) and n not in producers
    ]
    ratios = None
    if not opts["global"]:
        fm = FlopModel(model, groups, calib[0][0])
        ratio = fm.uniform_ratio(target)
        if ratio is None:
            raise RuntimeError(f"cannot reach {target:.3g} FLOPs with one channel per group")
        keeps = fm.keeps_for_ratio(ratio)
        # TP keeps int(C * (1 - r)) channels of C: r = 1 - (k + 1/2) / C keeps k
        ratios = {g.producer: 1.0 - (keeps[g.name] + 0.5) / g.channels for g in groups}
    grads, grad_seconds = None, 0.0
    if opts["importance"] == "taylor":  # the cross-entropy's gradients on the calibration images, once
        t1 = time.perf_counter()
        twin = copy.deepcopy(model).eval()
        twin.zero_grad()
        for x, y in calib:
            F.cross_entropy(twin(x), y, reduction="sum").backward()
        grads = {n: p.grad.detach().clone() for n, p in twin.named_parameters() if p.grad is not None}
        del twin
        grad_seconds = time.perf_counter() - t1

    def attempt(ratio: float):
        twin = copy.deepcopy(model).eval()
        if grads is not None:
            for n, p in twin.named_parameters():
                p.grad = grads[n].clone() if n in grads else None
        mods = dict(twin.named_modules())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pruner = tp.pruner.MetaPruner(
                twin,
                example,
                importance=_tp_importance(opts["importance"]),
                global_pruning=opts["global"],
                pruning_ratio=ratio,
                pruning_ratio_dict=None if ratios is None else {mods[n]: r for n, r in ratios.items()},
                ignored_layers=[mods[n] for n in ignored],
            )
            pruner.step()
        for p in twin.parameters():
            p.grad = None
        return twin, count_flops(twin.eval(), example)

    hi = 0.0
    if opts["global"]:
        # the largest ratio that leaves every group a channel (TP leaves alone a group it would empty)
        lo, hi = 0.0, 1.0 - 1.001 / min(g.channels for g in groups)
        _, flops_hi = attempt(hi)
        if flops_hi > target:
            raise RuntimeError(
                f"Torch-Pruning cannot reach {target:.3g} FLOPs (pruning ratio {hi:.4f} gives {flops_hi:.3g})"
            )
        for _ in range(16):  # the smallest pruning ratio whose FLOPs are within the target, to 2^-16
            mid = (lo + hi) / 2
            _, f = attempt(mid)
            lo, hi = (lo, mid) if f <= target else (mid, hi)
    search = time.perf_counter() - t0 - grad_seconds
    t1 = time.perf_counter()
    pruned, _ = attempt(hi)
    prune_seconds = time.perf_counter() - t1 + grad_seconds
    info = {"search_seconds": search, "prune_seconds": prune_seconds}
    info.update({"pruning_ratio": hi} if opts["global"] else {"pruning_ratio_dict": ratios})
    return pruned, info


# ---- settings, work folder, cells ---------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser(
        prog="gfs bench quality",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (2000 training images of 16x16, 500 test images, 3 epochs), 1 seed, 5 methods: a few "
        "minutes, written under runs/",
    )
    p.add_argument("--data", default="fashion-mnist", help="gfs --data spec (fashion-mnist[:DIR], mnist:DIR, ...)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated gfs.models names")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated methods (see parse_method), or all; --quick: " + ",".join(QUICK_METHODS),
    )
    p.add_argument("--factors", default=",".join(map(str, FACTORS)), help="FLOPs reduction targets, e.g. 2,4")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: initialisation, batch order, subsets")
    p.add_argument("--train-samples", type=int, default=10000, help="training subset (class-balanced, seeded)")
    p.add_argument("--test-samples", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="training from scratch (gfs.workflow.TRAIN_RECIPE)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of that training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib", type=int, default=512, help="calibration images (gfs; Taylor's gradients)")
    p.add_argument("--recal", type=int, default=1024, help="training images for BatchNorm recalibration")
    p.add_argument(
        "--no-bn-recal",
        dest="bn_recal",
        action="store_false",
        help="fine-tune (and prune the 2nd round of rounds=2) from the pruned model as it is, not the recalibrated one",
    )
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two spin-wait on a busy 2-core machine)")
    p.add_argument("--work", help="folder of the dense weights and finished cells (default runs/quality[-quick])")
    p.add_argument("--out", help="report prefix (default benchmarks/results/quality-fashion-mnist-cpu)")
    p.add_argument("--overwrite", action="store_true", help="discard a --work folder of other settings")
    p.add_argument("--report-only", action="store_true", help="only write the report from the finished cells")
    p.add_argument("--note", help="a line added to the report (e.g. where and on which code the cells ran)")
    p.add_argument("--progress", action="store_true", help="progress bars (off: plain lines, for logs)")
    args = p.parse_args(argv)
    if args.quick:
        quick = dict(
            seeds=1, train_samples=2000, test_samples=500, image_size=16, epochs=3, calib=128, recal=256,
            finetune_epochs=1, methods=",".join(QUICK_METHODS),
        )  # fmt: skip
        given = {a.dest for a in p._actions if a.option_strings and any(o in argv for o in a.option_strings)}
        for k, v in quick.items():
            if k not in given:
                setattr(args, k, v)
    try:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        names = ALL_METHODS if args.methods.strip() == "all" else _split_methods(args.methods)
        args.methods = [parse_method(m) for m in names]
        args.factors = [float(f) for f in args.factors.split(",") if f.strip()]
    except ValueError as exc:
        p.error(str(exc))
    from gfs.models import MODELS as ALL

    bad = [m for m in args.models if m not in ALL]
    if bad or not args.models:
        p.error(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(ALL)}")
    if not args.factors or any(f <= 1 for f in args.factors):
        p.error("--factors must be numbers > 1 (FLOPs divided by each)")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    args.work = args.work or os.path.join("runs", "quality-quick" if args.quick else "quality")
    args.out = args.out or (
        os.path.join("runs", "quality-quick", "quality")
        if args.quick
        else os.path.join(ROOT, "benchmarks", "results", "quality-fashion-mnist-cpu")
    )
    return args


def _split_methods(text: str) -> list:
    """Comma-separated methods, commas inside gfs[...] kept."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [m.strip() for m in out if m.strip()]


def identity(args) -> dict:
    """The settings a cell's numbers depend on (not which models, methods, factors or seeds)."""
    from gfs.workflow import TRAIN_RECIPE

    keys = (
        "data",
        "train_samples",
        "test_samples",
        "image_size",
        "epochs",
        "lr",
        "batch_size",
        "calib",
        "recal",
        "bn_recal",
        "finetune_epochs",
        "finetune_lr",
    )
    return {**{k: getattr(args, k) for k in keys}, "recipe": dict(TRAIN_RECIPE)}


def settings_hash(args) -> str:
    return hashlib.sha256(json.dumps(identity(args), sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: str, obj) -> None:
    """Atomically: a whole file or none (write a temporary file, then rename it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_plain)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plain(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON: {type(o).__name__}")


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def prepare_work(args) -> str:
    """The work folder for these settings: created, or checked (another settings' folder is
    refused unless --overwrite)."""
    import shutil

    digest = settings_hash(args)
    path = os.path.join(args.work, "settings.json")
    stored = read_json(path)
    if stored is not None and stored.get("hash") != digest:
        if not args.overwrite:
            differ = sorted(k for k in identity(args) if stored.get("identity", {}).get(k) != identity(args)[k])
            raise SystemExit(
                f"gfs bench quality: {args.work} holds cells of other settings ({', '.join(differ)}); pass "
                "--overwrite to discard them, or --work another folder"
            )
        for sub in ("dense", "cells"):
            shutil.rmtree(os.path.join(args.work, sub), ignore_errors=True)
    for sub in ("dense", "cells"):
        os.makedirs(os.path.join(args.work, sub), exist_ok=True)
    write_json(path, {"hash": digest, "identity": identity(args)})
    return digest


def cell_path(args, model: str, seed: int, factor: float, method: str) -> str:
    return os.path.join(args.work, "cells", f"{model}-seed{seed}-x{factor:g}-{slug(method)}.json")


# ---- the run --------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def dense_model(args, flow, name: str, seed: int, digest: str):
    """The trained dense model of (name, seed): from --work if there, else trained and saved."""
    from gfs.weights import load_weights, save_weights, stored_training

    path = os.path.join(args.work, "dense", f"{name}-seed{seed}.safetensors")
    record = {"model": name, "seed": seed, "settings": digest}
    info = read_json(path + ".json")
    if os.path.isfile(path) and info is not None and stored_training(path) == record:
        model = flow.build(name)
        load_weights(model, path, what="the dense weights")
        model.eval()
        say(f"{name} seed {seed}: dense weights from {path} (test accuracy {info['evaluation']['accuracy']:.2%})")
        return model, info
    say(f"{name} seed {seed}: training from scratch, {args.epochs} epoch(s) on {len(flow.data.train)} images")
    dense = flow.train_dense(name, args.epochs, lr=args.lr, description=f"{name} seed {seed}: training")
    dense.model.eval()
    save_weights(dense.model, path, training=record)
    info = {"evaluation": dense.evaluation, "train_seconds": dense.training.seconds, "load": load1()}
    write_json(path + ".json", info)
    say(f"  trained in {dense.training.seconds:.0f} s; test accuracy {dense.evaluation['accuracy']:.2%}")
    return dense.model, info


def _needs_tp(method: dict) -> bool:
    """Whether a method runs Torch-Pruning (its rows, and gfs with LAMP's allocation)."""
    return method["kind"] == "tp" or method.get("budget") == "lamp"


def run_cell(args, flow, name, seed, dense, dense_info, calib, recal, factor, method, tp_ok) -> dict | None:
    from gfs.models import internal_layers
    from gfs.pruning.finetune import finetune
    from gfs.pruning.fold import count_flops, count_parameters

    layers = internal_layers(name)
    example = calib[0][0][:1]
    dense_flops = count_flops(dense, example)
    target = dense_flops / factor
    load_before = load1()
    t0 = time.perf_counter()
    if not tp_ok and _needs_tp(method):
        return None
    if method["kind"] == "tp":
        pruned, info = tp_method(dense, calib, layers, target, method, seed)
    else:
        pruned, info = gfs_method(dense, calib, layers, target, method, recal if args.bn_recal else None, seed)
    info["method_seconds"] = time.perf_counter() - t0
    pruned.eval()
    flops, params = count_flops(pruned, example), count_parameters(pruned)
    ev_pruned = flow.evaluate(pruned)
    recalibrated = recalibrate_bn(pruned, recal)
    ev_recal = flow.evaluate(recalibrated)
    start = recalibrated if args.bn_recal else pruned
    if args.finetune_epochs > 0:
        tuned = finetune(
            start,
            flow.train_loader(),
            args.finetune_epochs,
            lr=args.finetune_lr,
            seed=seed,
            progress=args.progress,
            description=f"{name} {method['name']} x{factor:g}: fine-tuning",
        )
        ev_ft, ft_seconds = flow.evaluate(tuned.model), tuned.seconds
    else:
        ev_ft, ft_seconds = None, 0.0
    return {
        "model": name,
        "seed": seed,
        "factor": factor,
        "method": method["name"],
        "options": {k: v for k, v in method.items() if k not in ("name",)},
        "target_flops": target,
        "dense_flops": dense_flops,
        "dense_params": count_parameters(dense),
        "flops": flops,
        "params": params,
        "accuracy": {
            "dense": dense_info["evaluation"]["accuracy"],
            "pruned": ev_pruned["accuracy"],
            "recalibrated": ev_recal["accuracy"],
            "finetuned": ev_ft["accuracy"] if ev_ft else None,
        },
        "loss": {
            "pruned": ev_pruned["loss"],
            "recalibrated": ev_recal["loss"],
            "finetuned": ev_ft["loss"] if ev_ft else None,
        },
        "prune_seconds": info["prune_seconds"],
        "search_seconds": info["search_seconds"],
        "finetune_seconds": ft_seconds,
        "info": info,
        "load_before": load_before,
        "load_after": load1(),
    }


def run(args, started: dict) -> None:
    import torch

    from gfs.workflow import Workflow, load_data

    torch.set_num_threads(args.threads)
    digest = prepare_work(args)
    try:
        import torch_pruning  # noqa: F401

        tp_ok = True
    except ImportError:
        tp_ok = False
        if any(m["kind"] == "tp" for m in args.methods):
            say(TP_MISSING)
    say(
        f"gfs bench quality: {', '.join(args.models)} x {len(args.methods)} methods x factors "
        f"{', '.join(f'{f:g}' for f in args.factors)} x {args.seeds} seed(s); work folder {args.work}; 1-min load "
        f"{load1():.2f}"
    )
    data = load_data(args.data, image_size=args.image_size)
    started.update(data=data.describe(), test_images=args.test_samples or len(data.test))
    for seed in range(args.seeds):
        sub = data.subset(args.train_samples, args.test_samples, seed=seed)
        flow = Workflow(sub, batch_size=args.batch_size, seed=seed, progress=args.progress)
        calib = flow.calibration(args.calib)
        recal = sub.calibration(args.recal, args.batch_size, seed=seed + 1000)
        for name in args.models:
            todo = [
                (f, m)
                for f in args.factors
                for m in args.methods
                if not os.path.isfile(cell_path(args, name, seed, f, m["name"])) and (tp_ok or not _needs_tp(m))
            ]
            if not todo:
                continue
            dense, dense_info = dense_model(args, flow, name, seed, digest)
            for factor, method in todo:
                t0 = time.perf_counter()
                try:
                    cell = run_cell(args, flow, name, seed, dense, dense_info, calib, recal, factor, method, tp_ok)
                except (RuntimeError, ValueError) as exc:  # a method that cannot meet the target: recorded
                    cell = {"model": name, "seed": seed, "factor": factor, "method": method["name"], "error": str(exc)}
                    say(f"  {name} seed {seed} x{factor:g} {method['name']}: failed: {exc}")
                if cell is None:
                    continue
                cell["settings"] = digest
                cell["cell_seconds"] = time.perf_counter() - t0
                write_json(cell_path(args, name, seed, factor, method["name"]), cell)
                if "error" in cell:
                    continue
                a = cell["accuracy"]
                say(
                    f"  {name} seed {seed} x{factor:g} {method['name']:<18} FLOPs {cell['flops'] / 1e6:7.2f}M "
                    f"({cell['dense_flops'] / cell['flops']:.2f}x) acc {a['pruned']:.2%} / recal "
                    f"{a['recalibrated']:.2%} / ft {a['finetuned'] if a['finetuned'] is not None else float('nan'):.2%}"
                    f"; prune {cell['prune_seconds']:.1f} s, search {cell['search_seconds']:.1f} s, cell "
                    f"{time.perf_counter() - t0:.0f} s (load {cell['load_before']:.2f})"
                )


# ---- the report -----------------------------------------------------------------------------------


def collect(args, digest: str) -> list:
    folder = os.path.join(args.work, "cells")
    cells = []
    for fn in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        c = read_json(os.path.join(folder, fn)) if fn.endswith(".json") else None
        if c is not None and c.get("settings") == digest:
            cells.append(c)
    return cells


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def summarise(cells: list) -> list:
    """One row per (model, factor, method): means and standard deviations over the seeds."""
    groups = {}
    for c in cells:
        groups.setdefault((c["model"], c["factor"], c["method"]), []).append(c)
    rows = []
    for (model, factor, method), cs in groups.items():
        row = {"model": model, "factor": factor, "method": method, "seeds": sorted(c["seed"] for c in cs)}
        for key in ("flops", "params", "prune_seconds", "search_seconds", "dense_flops"):
            row[key] = _stats([c[key] for c in cs])[0]
        for stage in ("dense", "pruned", "recalibrated", "finetuned"):
            row[stage] = _stats([c["accuracy"][stage] for c in cs])
        rows.append(row)
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    rows.sort(key=lambda r: (r["model"], r["factor"], order.get(r["method"], len(order)), r["method"]))
    return rows


def _pct(ms) -> str:
    mean, std = ms
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def markdown(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    lines = [
        "# Quality at equal FLOPs: gfs vs Torch-Pruning's criteria on Fashion-MNIST",
        "",
        f"Commit {res['commit']}. Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, "
        f"{s['threads']} torch thread(s); 1-min load {res['load_at_start']:.2f} at the start of this report's last "
        f"run, {res['load_at_end']:.2f} at its end (per cell in the JSON). `python benchmarks/quality.py"
        f"{' --quick' if s['quick'] else ''}` (= `gfs bench quality`); torch-pruning "
        f"{res['torch_pruning'] or 'absent'}.",
        "",
        f"Data: {res['data']}; a seeded random subset of {s['train_samples']} training images "
        f"per seed, {res['test_images']} test images. Dense training from scratch: {s['epochs']} epoch(s), SGD "
        f"Nesterov momentum 0.9, lr {s['lr']}, {res['train_recipe']['warmup']:.0%} warm-up, cosine, batch "
        f"{s['batch_size']}, weight decay 5e-4, no augmentation. Pruning: the internal channels only (ResNet-56: "
        f"conv1 of each of the 27 BasicBlocks; MobileNetV2: the stem and the 16 expanded hidden layers), to the "
        f"largest FLOPs at most dense / factor; {s['calib']} calibration images (gfs; the gradients of "
        f"Taylor). BN recalibration: running statistics re-estimated on {s['recal']} training images. Fine-tune: "
        f"{s['finetune_epochs']} epoch(s), SGD lr {s['finetune_lr']}, cosine, from the "
        f"{'recalibrated' if s['bn_recal'] else 'pruned'} model, the same for every row. Seeds 0..{s['seeds'] - 1} "
        "(initialisation, batch order, subsets, random criteria); mean ± standard deviation over seeds.",
        "",
        *([res["note"], ""] if res.get("note") else []),
        "FLOPs: one image, 2 per multiply-add (torch.utils.flop_counter). prune s: the pruning itself (gfs: the "
        "gfs.prune call(s), with the recalibration between rounds; Torch-Pruning: graph, importance and pruning, "
        "with Taylor's gradients); search s: finding the channels that meet the FLOPs target (gfs budget=global "
        "/ eps: with the gfs.prune at ratio 1 that records the loss curves; budget=lamp and Torch-Pruning global: "
        "the bisection of Torch-Pruning's ratio). Both are wall times on a shared machine: compare them within one "
        "run only.",
        "",
    ]
    for model, dense in res["dense"].items():
        lines += [
            f"## {model}",
            "",
            f"Dense: {_pct(dense['accuracy'])}% test accuracy, {dense['flops'] / 1e6:.2f}M FLOPs, "
            f"{dense['params']:,} parameters, trained in {dense['train_seconds']:.0f} s (mean).",
            "",
        ]
        for factor in sorted({r["factor"] for r in res["rows"] if r["model"] == model}):
            rows = [r for r in res["rows"] if r["model"] == model and r["factor"] == factor]
            best = {
                st: max((r[st][0] for r in rows if r[st][0] is not None), default=None)
                for st in ("pruned", "recalibrated", "finetuned")
            }

            def cell(r, st, best=best):
                text = _pct(r[st])
                return f"**{text}**" if r[st][0] is not None and r[st][0] == best[st] else text

            lines += [
                f"### {factor:g}x fewer FLOPs (target {dense['flops'] / factor / 1e6:.2f}M)",
                "",
                "| method | FLOPs | params | acc. pruned | after BN recal. | after fine-tune | prune s | search s "
                "| seeds |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in rows:
                lines.append(
                    f"| {r['method']} | {r['flops'] / 1e6:.2f}M ({r['dense_flops'] / r['flops']:.2f}x) | "
                    f"{r['params']:,.0f} | {cell(r, 'pruned')} | {cell(r, 'recalibrated')} | {cell(r, 'finetuned')} | "
                    f"{r['prune_seconds']:.1f} | {r['search_seconds']:.1f} | {len(r['seeds'])} |"
                )
            lines.append("")
    for c in res.get("failed", []):
        lines += [f"Failed: {c['model']} seed {c['seed']} {c['factor']:g}x {c['method']}: {c['error']}", ""]
    if res.get("skipped"):
        lines += [f"Skipped: {res['skipped']}", ""]
    lines += [
        f"Figure: `{os.path.basename(res['figure'])}` (accuracy vs FLOPs per method)."
        if res.get("figure")
        else "No figure (matplotlib absent).",
        "",
    ]
    return "\n".join(lines)


def figure(res: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(res["dense"])
    stages = (("pruned", "as pruned"), ("recalibrated", "after BN recalibration"), ("finetuned", "after fine-tuning"))
    fig, axes = plt.subplots(len(models), len(stages), figsize=(17, 4.4 * len(models)), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for i, model in enumerate(models):
        dense = res["dense"][model]
        rows = [r for r in res["rows"] if r["model"] == model]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for j, (stage, title) in enumerate(stages):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                pts = [(r["flops"], r[stage][0], r[stage][1]) for r in rows if r["method"] == method]
                pts = sorted([p for p in pts if p[1] is not None] + [(dense["flops"], dense["accuracy"][0], None)])
                ax.errorbar(
                    [p[0] / 1e6 for p in pts],
                    [100 * p[1] for p in pts],
                    yerr=[100 * (p[2] or 0.0) for p in pts],
                    color=colours[k % len(colours)],
                    marker="os^vD<>pPX*h"[k % 12],
                    linestyle="-" if method.startswith("gfs") else "--",
                    linewidth=2.2 if method == "gfs" else 1.0,
                    capsize=2,
                    label=method,
                )
            ax.set_xscale("log")
            ax.set_xlabel("FLOPs per image (M)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{model}: {title}")
            ax.grid(alpha=0.3)
        axes[i][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def report(args, digest: str, started: dict) -> dict:
    cells = collect(args, digest)
    failed = [c for c in cells if "error" in c]
    cells = [c for c in cells if "error" not in c]
    rows = summarise(cells)
    dense = {}
    for c in cells:
        d = dense.setdefault(c["model"], {"acc": {}, "flops": c["dense_flops"], "params": c["dense_params"]})
        d["acc"][c["seed"]] = c["accuracy"]["dense"]
    for model, d in dense.items():
        infos = [
            read_json(os.path.join(args.work, "dense", f"{model}-seed{s}.safetensors.json")) for s in sorted(d["acc"])
        ]
        d["accuracy"] = _stats(list(d.pop("acc").values()))
        d["train_seconds"] = _stats([i["train_seconds"] for i in infos if i])[0] or 0.0
    try:
        import importlib.metadata

        import torch_pruning

        try:  # the package metadata: torch_pruning 1.6.1 says "1.6.0" in its __version__
            tp_version = importlib.metadata.version("torch-pruning")
        except importlib.metadata.PackageNotFoundError:
            tp_version = getattr(torch_pruning, "__version__", "installed")
    except ImportError:
        tp_version = None
    res = {
        "machine": machine(),
        "commit": commit(),
        "settings": {
            **identity(args),
            "quick": args.quick,
            "seeds": args.seeds,
            "threads": args.threads,
            "models": args.models,
            "methods": [m["name"] for m in args.methods],
            "factors": args.factors,
        },
        "train_recipe": identity(args)["recipe"],
        "data": started.get("data", args.data),
        "test_images": started.get("test_images"),
        "torch_pruning": tp_version,
        "load_at_start": started.get("load", load1()),
        "load_at_end": load1(),
        "dense": dense,
        "rows": rows,
        "cells": cells,
        "failed": failed,
        "note": args.note,
        "skipped": None if tp_version or not any(m["kind"] == "tp" for m in args.methods) else TP_MISSING,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    res["figure"] = figure(res, args.out + ".png") if rows else None
    write_json(args.out + ".json", res)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res))
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    started = {"load": load1()}
    t0 = time.perf_counter()
    if not args.report_only:
        run(args, started)
    else:
        from gfs.workflow import load_data

        data = load_data(args.data, image_size=args.image_size)
        started.update(data=data.describe(), test_images=args.test_samples or len(data.test))
    res = report(args, settings_hash(args), started)
    say(markdown(res))
    say(f"wrote {args.out}.md, .json{', .png' if res['figure'] else ''} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
