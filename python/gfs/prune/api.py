"""gfs.prune: a model and calibration data in, a physically smaller model and a report out."""
from __future__ import annotations

import copy
import fnmatch
import math
import numbers
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import _validation as check
from . import fold
from .capture import GraphRunner, as_batches
from .criteria import CRITERIA, Context, consumer_output, keep_count, remove_bias
from .groups import UnsupportedModelError, _find, describe_rejected


@dataclass
class LayerReport:
    """One pruned channel group.

    Attributes
    ----------
    name, producer, consumer : str
        The group (named by its producer), the layer whose outputs and the one whose inputs went.
    channels_before, channels_after : int
    loss, dense_loss : float
        Mean squared error to the original network's consumer output (no bias) on the
        calibration batches, of the pruned consumer and of the dense consumer, both on inputs from
        the network pruned so far.
    gap : float or None
        The Frank-Wolfe gap of the last selection step ("local" only).
    fold_error : float
        max |pruned consumer output - selected subnetwork output| / max |subnetwork output|,
        measured by running the pruned network on the calibration batches: float rounding for
        groups without squeeze-excitation, the effect of the recomputed gate for those with.
    sampled : float
        Fraction of the output coordinates the criterion looked at (1.0 unless the candidate
        matrix would exceed criteria.MAX_ELEMENTS).
    seconds : float
        Wall time for this group: capture, criterion, fold.
    kept, scale : Tensor
        The kept channel indices and the factor each kept input column was multiplied by.
    """

    name: str
    producer: str
    consumer: str
    channels_before: int
    channels_after: int
    loss: float
    dense_loss: float
    gap: float | None
    fold_error: float
    sampled: float
    seconds: float
    kept: torch.Tensor = field(repr=False)
    scale: torch.Tensor = field(repr=False)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "producer", "consumer", "channels_before", "channels_after",
                                          "loss", "dense_loss", "gap", "fold_error", "sampled", "seconds")}
        d["kept"] = self.kept.tolist()
        d["scale"] = self.scale.tolist()
        return d


@dataclass
class PruneResult:
    """The result of :func:`gfs.prune`.

    Attributes
    ----------
    model : nn.Module
        A new, physically smaller model (the input model is not modified). Its modules have the
        training flags of the input model's.
    report : list of LayerReport
        One entry per pruned group, in the order they were pruned (forward order).
    selections : dict
        {group name: gfs.Selection} for criterion "local".
    groups : list of ChannelGroup
        The groups pruned.
    skipped : dict
        {layer name: why its output channels were not pruned} for every other Conv2d / Linear.
    params, flops : (int, int)
        Before and after; FLOPs of one sample of the first calibration batch, counted by
        torch.utils.flop_counter (2 per multiply-add, convolutions and matrix products).
    criterion : str
    seconds : float
    """

    model: nn.Module
    report: list
    selections: dict
    groups: list
    skipped: dict
    params: tuple
    flops: tuple
    criterion: str
    seconds: float

    def save(self, path, **kwargs) -> None:
        """Save the pruned model (gfs.prune.io.save: JSON architecture + tensors, no pickle)."""
        from .io import save

        save(self.model, path, **kwargs)

    def summary(self) -> str:
        """A plain-text table: per group the channels, losses, fold error and seconds; then totals."""
        head = f"{'layer':<28} {'consumer':<28} {'channels':>11} {'loss':>10} {'dense':>10} {'fold err':>9} {'s':>6}"
        lines = [head, "-" * len(head)]
        for r in self.report:
            lines.append(
                f"{_clip(r.name, 28):<28} {_clip(r.consumer, 28):<28} {f'{r.channels_before}->{r.channels_after}':>11} "
                f"{r.loss:>10.4g} {r.dense_loss:>10.4g} {r.fold_error:>9.2g} {r.seconds:>6.2f}"
            )
        pb, pa = self.params
        fb, fa = self.flops
        lines.append("-" * len(head))
        lines.append(
            f"criterion {self.criterion!r}: {len(self.report)} groups pruned, {len(self.skipped)} layers left whole; "
            f"parameters {pb:,} -> {pa:,} ({pa / max(pb, 1):.1%}); FLOPs {fb:,} -> {fa:,} ({fa / max(fb, 1):.1%}); "
            f"{self.seconds:.1f} s"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        pb, pa = self.params
        fb, fa = self.flops
        return (f"PruneResult(criterion={self.criterion!r}, groups={len(self.report)}, params={pb}->{pa}, "
                f"flops={fb}->{fa}, seconds={self.seconds:.3g})")


def _clip(s, n):
    return s if len(s) <= n else "..." + s[-(n - 3):]


# ---- validation ------------------------------------------------------------------------------

def _check_budget(keep, ratio):
    if (keep is None) == (ratio is None):
        raise ValueError("pass exactly one of keep= (channels kept per group) or ratio= (fraction kept, in (0, 1]); "
                         f"got keep={keep!r}, ratio={ratio!r}")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral):
            raise TypeError(f"keep must be an int (channels kept per group), got {type(keep).__name__} {keep!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (channels kept per group), got {keep}")
        return int(keep), None
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
        raise TypeError(f"ratio must be a number in (0, 1] (fraction of channels kept), got {ratio!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1] (fraction of channels kept per group), got {ratio}")
    return None, float(ratio)


def _choose(scan, layers, model_name) -> list:
    if layers is None:
        if not scan.groups:
            raise UnsupportedModelError(
                f"{model_name} has no channel group gfs.prune can prune; for each Conv2d / Linear:\n"
                f"{describe_rejected(scan)}"
            )
        return list(scan.groups)
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers or not all(isinstance(x, str) for x in layers):
        raise TypeError(f"layers must be None, a layer name / glob pattern, or a list of them; got {layers!r}")
    by_name = {g.name: g for g in scan.groups}
    chosen = set()
    for pat in layers:
        if any(c in pat for c in "*?["):
            hits = [n for n in by_name if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"layers: pattern {pat!r} matches no prunable layer of {model_name}; "
                                 f"prunable: {_few(by_name)}")
            chosen.update(hits)
        elif pat in by_name:
            chosen.add(pat)
        elif pat in scan.rejected:
            raise UnsupportedModelError(f"layers: {pat!r} cannot be pruned: {scan.rejected[pat]}")
        else:
            raise ValueError(f"layers: {model_name} has no prunable layer named {pat!r} (groups are named by the layer "
                             f"whose output channels go); prunable: {_few(by_name)}")
    return [g for g in scan.groups if g.name in chosen]


def _few(names, n=8):
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _device(model):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    raise UnsupportedModelError(f"{type(model).__name__} has no parameters to prune")


# ---- the driver ------------------------------------------------------------------------------

def prune(model: nn.Module, calibration, *, keep=None, ratio=None, criterion="local", step="uniform",
          replacement=False, eps=None, layers=None, progress=True, seed=0, backend="auto") -> PruneResult:
    """Prune the channels of ``model`` group by group; return a new, physically smaller model.

    Channel groups (producer -> per-channel layers -> consumer) are found automatically from the
    traced data flow (see gfs.prune.groups); the residual stream is left whole. Groups are
    pruned in forward order. For each, the consumer's input X is captured from the network
    pruned so far and its output from the original network, on the same calibration batches;
    the criterion picks the channels; the decision is folded into new, smaller modules.

    Parameters
    ----------
    model : nn.Module
        Traceable by torch.fx. Never modified (it is deep-copied; forward passes run on copies in
        eval mode, so BatchNorm statistics are untouched).
    calibration : Tensor, DataLoader or iterable of batches
        Inputs x, or (x, y) batches (y ignored). Read once and kept in memory.
    keep : int, optional
        Channels kept per group (exactly one of keep / ratio).
    ratio : float in (0, 1], optional
        Fraction of each group's channels kept, rounded half up, at least 1.
    criterion : {"local", "l1", "random"}
        "local": greedy forward selection imitating each consumer's original output (the kept
        columns are re-weighted by the selection's weights). "l1": largest L1-norm producer
        filters. "random": a random subset (seeded by ``seed``). The last two keep weights as
        they are.
    step, replacement, eps, backend
        Passed to gfs.select ("local" only; replacement / eps with another criterion is an
        error). With replacement a channel can be picked several times and its column weighs more; ``keep`` then counts distinct channels. With eps a group may
        keep fewer than ``keep`` channels (the papers' stopping rule).
    layers : str or list of str, optional
        Prune only these groups: names of the layer whose output channels go, or glob patterns
        ("layer*.conv1"). Default: every group found.
    progress : bool
        One line per group on stderr.
    seed : int
        Seeds "random" and the subsampling of large candidate matrices.

    Returns
    -------
    PruneResult
        ``.model``, ``.report`` (per group: channels before / after, loss, gap, seconds, ...),
        ``.selections``, ``.params``, ``.flops``, ``.summary()``, ``.save(path)``.

    Examples
    --------
    >>> import torch, torchvision, gfs
    >>> net = torchvision.models.resnet18(weights=None)
    >>> result = gfs.prune(net, torch.randn(8, 3, 64, 64), ratio=0.5, progress=False)
    >>> print(result.summary())  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    keep, ratio = _check_budget(keep, ratio)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}")
    eps = check.check_options(step, eps, replacement)
    if criterion != "local" and (replacement or eps is not None):
        raise ValueError(f"replacement= and eps= apply to criterion 'local' (greedy selection) only, not {criterion!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    name = type(model).__name__
    crit = CRITERIA[criterion]()
    batches = as_batches(calibration, _device(model))
    example = batches[0][: min(2, batches[0].shape[0])]

    reference = copy.deepcopy(model).eval()  # the original network: targets
    scan = _find(reference, example)
    groups = _choose(scan, layers, name)
    budgets = {}
    for g in groups:
        k = keep_count(g.channels, keep, ratio)
        if k > g.channels:
            raise ValueError(f"keep={keep} is more than the {g.channels} channels of group {g.name!r}; "
                             f"use a smaller keep, ratio=, or layers= to leave that group out")
        budgets[g.name] = k
    skipped = {n: r for n, r in scan.rejected.items()}
    skipped.update({g.name: "not in layers=" for g in scan.groups if g not in groups})
    say = (lambda s: print(f"[gfs.prune] {s}", file=sys.stderr, flush=True)) if progress else (lambda s: None)
    say(f"{name}: {len(groups)} channel groups to prune with criterion {criterion!r}, {len(skipped)} layers left "
        f"whole, {sum(b.shape[0] for b in batches)} calibration samples")

    pruned = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(int(seed))
    node_of = {n.target: n for n in scan.graph.nodes if n.op == "call_module"}
    runner = GraphRunner(scan.graph, pruned, batches)  # the network pruned so far
    original = GraphRunner(scan.graph, reference, batches)  # the original, run once, front to back
    at = 0
    producers = [runner.pos[node_of[g.producer]] for g in groups]
    report, selections = [], {}
    pending = None  # (consumer node, expected output, report index): checked on the next pass
    with torch.no_grad():
        for i, g in enumerate(groups):
            t0 = time.perf_counter()
            consumer = node_of[g.consumer]
            se_fc1 = [node_of[m.name] for m in g.members if m.kind == "se"]
            pc = runner.pos[consumer]
            got = runner.run(runner.start_for(producers[i]), pc, inputs=[consumer, *se_fc1],
                             outputs=[pending[0]] if pending else (), checkpoint_at=producers[i:])
            if pending:
                _check_fold(runner, pending, got, report)
            ref = original.run(at, pc + 1, outputs=[consumer], checkpoint_at=[pc + 1], clone_start=False)
            original.keep_only([pc + 1])
            at = pc + 1
            layer = pruned.get_submodule(g.consumer)
            X = got[("in", consumer)]
            y_full = ref[("out", consumer)]
            target = remove_bias(y_full, layer)
            ctx = Context(group=g, X=X, layer=layer, target=target, producer=pruned.get_submodule(g.producer),
                          keep=budgets[g.name], step=step, replacement=bool(replacement), eps=eps, backend=backend,
                          generator=generator)
            decision = crit.decide(ctx)
            s = torch.zeros(g.channels, dtype=torch.float64)
            s[decision.keep] = decision.scale
            sub = consumer_output(X, layer, s.to(X.device))
            dense = consumer_output(X, layer)
            loss = float(((target.double() - sub.double()) ** 2).mean())
            dense_loss = float(((target.double() - dense.double()) ** 2).mean())
            se_means = {n.target: got[("in", n)].double().mean(dim=(0, 2, 3)) for n in se_fc1}
            expected = sub + (y_full - target)  # + bias
            del got, ref, X, y_full, target, dense
            fold.apply(pruned, g, decision.keep, decision.scale, se_means)
            runner.invalidate_after(producers[i])
            runner.keep_only(producers[i + 1:])
            sel = decision.selection
            if sel is not None:
                selections[g.name] = sel
            report.append(LayerReport(
                name=g.name, producer=g.producer, consumer=g.consumer, channels_before=g.channels,
                channels_after=int(decision.keep.numel()), loss=loss, dense_loss=dense_loss,
                gap=float(sel.gaps[-1]) if sel is not None else None, fold_error=float("nan"),
                sampled=decision.sampled, seconds=0.0, kept=decision.keep.clone(), scale=decision.scale.clone(),
            ))
            pending = (consumer, expected, i)
            report[-1].seconds = time.perf_counter() - t0
            r = report[-1]
            say(f"{i + 1}/{len(groups)} {g.producer} -> {g.consumer}: {r.channels_before} -> {r.channels_after} "
                f"channels, loss {r.loss:.4g} (dense {r.dense_loss:.4g}), {r.seconds:.2f} s")
        if pending:
            t0 = time.perf_counter()
            _check_fold(runner, pending, {}, report)
            report[pending[2]].seconds += time.perf_counter() - t0
        del runner, original

        one = batches[0][:1]
        params = (fold.count_parameters(reference), fold.count_parameters(pruned))
        flops = (fold.count_flops(reference, one), fold.count_flops(pruned, one))
    flags = {n: m.training for n, m in model.named_modules()}
    for n, m in pruned.named_modules():
        m.training = flags.get(n, model.training)
    result = PruneResult(model=pruned, report=report, selections=selections, groups=groups, skipped=skipped,
                         params=params, flops=flops, criterion=criterion, seconds=time.perf_counter() - t_start)
    say(f"done: parameters {params[0]:,} -> {params[1]:,}, FLOPs {flops[0]:,} -> {flops[1]:,}, "
        f"{result.seconds:.1f} s")
    return result


def _check_fold(runner, pending, got, report):
    """fold_error of the group whose consumer is pending[0], from the pruned network's output."""
    node, expected, idx = pending
    out = got.get(("out", node))
    if out is None:
        p = runner.pos[node]
        out = runner.run(runner.start_for(p), p + 1, outputs=[node])[("out", node)]
    err = (out.double() - expected.double()).abs().max()
    report[idx].fold_error = float(err / expected.double().abs().max().clamp_min(1e-30))
