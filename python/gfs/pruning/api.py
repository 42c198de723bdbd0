"""gfs.prune: a model and calibration data in, a physically smaller model and a report out."""
from __future__ import annotations

import copy
import fnmatch
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import _validation as check
from . import fold, resume
from .capture import GraphRunner, as_batches
from .criteria import CRITERIA, Context, _channel_view, consumer_output, keep_count, remove_bias
from .loss import NetworkLoss
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
        Fraction of the output coordinates the criterion looked at: 1.0 for "local" on the Gram
        layer statistics (exact); below 1 only for a consumer they cannot take (see
        gfs.pruning.criteria) whose materialised candidate matrix would exceed
        criteria.MAX_ELEMENTS.
    seconds : float
        Wall time for this group: capture, criterion, fold.
    kept, scale : Tensor
        The kept channel indices and the factor each kept input column was multiplied by.
    network_loss, network_dense_loss, top1 : float or None
        Criterion "loss" only (else None): the whole network's calibration loss with this group
        pruned and with it dense (the groups before it pruned in both), and the pruned network's
        top-1 on the calibration data (accuracy, or agreement with the original's argmax
        without labels; see gfs.pruning.loss).
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
    network_loss: float | None = None
    network_dense_loss: float | None = None
    top1: float | None = None

    _PLAIN = ("name", "producer", "consumer", "channels_before", "channels_after", "loss", "dense_loss", "gap",
              "fold_error", "sampled", "seconds", "network_loss", "network_dense_loss", "top1")

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self._PLAIN}
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
        {group name: gfs.Selection} for criteria "local" and "loss" (for "loss": engine
        "network", ``losses`` the whole network's loss after each step, ``gaps`` NaN,
        ``notes["top1"]`` the top-1 after each step).
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
        """Save the pruned model (gfs.pruning.io.save: JSON architecture + tensors, no pickle)."""
        from .io import save

        save(self.model, path, **kwargs)

    def summary(self) -> str:
        """A plain-text table: per group the channels, losses, fold error and seconds; then totals.
        The losses are the consumer-output errors (``loss``, ``dense_loss``), or for criterion
        "loss" the whole network's (``network_loss``, ``network_dense_loss``)."""
        net = self.criterion == "loss"
        a, b = ("net loss", "net dense") if net else ("loss", "dense")
        head = f"{'layer':<28} {'consumer':<28} {'channels':>11} {a:>10} {b:>10} {'fold err':>9} {'s':>6}"
        lines = [head, "-" * len(head)]
        for r in self.report:
            lo, de = (r.network_loss, r.network_dense_loss) if net else (r.loss, r.dense_loss)
            lines.append(
                f"{_clip(r.name, 28):<28} {_clip(r.consumer, 28):<28} {f'{r.channels_before}->{r.channels_after}':>11} "
                f"{lo:>10.4g} {de:>10.4g} {r.fold_error:>9.2g} {r.seconds:>6.2f}"
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


def _float_dtype(model):
    """The dtype of the model's first floating-point parameter or buffer (None: it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _device(model):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    raise UnsupportedModelError(f"{type(model).__name__} has no parameters to prune")


# ---- the driver ------------------------------------------------------------------------------

_LOSS_BATCH = 16  # candidates per forward pass of criterion "loss" (loss_batch=None)


def _positive_int(value, name, what):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int ({what}) or None, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 ({what}), got {value}")
    return int(value)


def _check_loss_options(criterion, step, loss_candidates, loss_batch, shortlist, tolerance) -> dict:
    given = [n for n, v in (("loss_candidates", loss_candidates), ("loss_batch", loss_batch),
                            ("shortlist", shortlist), ("tolerance", tolerance)) if v is not None]
    if criterion != "loss":
        if given:
            raise ValueError(f"{given[0]}= applies to criterion 'loss' (whole-network loss) only, not {criterion!r}")
        return {}
    if step != "uniform":
        raise ValueError(f"step={step!r} applies to criterion 'local'; criterion 'loss' adds channels with the "
                         f"uniform step (each kept channel scaled by N / kept)")
    opts = dict(loss_candidates=_positive_int(loss_candidates, "loss_candidates", "candidates scored per step"),
                loss_batch=_positive_int(loss_batch, "loss_batch", "candidates per forward pass") or _LOSS_BATCH,
                shortlist=_positive_int(shortlist, "shortlist", "candidates evaluated exactly per step"))
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance):
            raise TypeError(f"tolerance must be a number in [0, 1) (relative top-1 drop allowed) or None, got {tolerance!r}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1) (relative top-1 drop allowed), got {tolerance}")
        tolerance = float(tolerance)
    opts["tolerance"] = tolerance
    return opts


def _check_checkpoint(checkpoint):
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path (str or os.PathLike) or None, got {type(checkpoint).__name__}")
    path = os.fspath(checkpoint)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint: the folder {folder!r} does not exist; create it or pass another path")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint: {path!r} is a folder; pass a file path, e.g. {os.path.join(path, 'prune.ckpt')!r}")
    return path


class _Progress:
    """rich progress bars on stderr (transient: they leave no lines behind): one over the groups,
    one over the greedy steps of a group (criterion "loss"). Does nothing when disabled, or when
    stderr is not a terminal (or a notebook)."""

    def __init__(self, enabled: bool, groups: int, steps: bool):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if not (console.is_terminal or console.is_jupyter):  # a log file: no bar (it would only add a blank line)
            return
        self.bar = Progress(TextColumn(r"\[gfs.prune] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        self.groups = self.bar.add_task("groups", total=groups)
        self.steps = self.bar.add_task("channels", total=1, visible=False) if steps else None

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def group(self, g, budget):
        if self.bar is None:
            return
        self.bar.update(self.groups, description=f"{g.producer} -> {g.consumer}")
        if self.steps is not None:
            self.bar.reset(self.steps, total=budget, visible=True, description=f"{g.name}: channels")

    def step(self):
        if self.bar is not None and self.steps is not None:
            self.bar.advance(self.steps)

    def group_done(self):
        if self.bar is not None:
            self.bar.advance(self.groups)


def prune(model: nn.Module, calibration, *, keep=None, ratio=None, criterion="local", step="uniform",
          replacement=False, eps=None, layers=None, progress=True, seed=0, backend="auto",
          loss_candidates=None, loss_batch=None, shortlist=None, tolerance=None, checkpoint=None) -> PruneResult:
    """Prune the channels of ``model`` group by group; return a new, physically smaller model.

    Channel groups (producer -> per-channel layers -> consumer) are found automatically from the
    traced data flow (see gfs.pruning.groups); the residual stream is left whole. Groups are
    pruned in forward order. For each, the consumer's input X is captured from the network
    pruned so far and its output from the original network, on the same calibration batches;
    the criterion picks the channels; the decision is folded into new, smaller modules.

    Parameters
    ----------
    model : nn.Module
        Traceable by torch.fx. Never modified (it is deep-copied; forward passes run on copies in
        eval mode, so BatchNorm statistics are untouched).
    calibration : Tensor, DataLoader or iterable of batches
        Inputs x, or (x, y) batches. Read once and kept in memory. y is used by criterion "loss"
        only, when it holds integer class labels (cross-entropy); otherwise it is ignored.
        Floating-point inputs must be finite (a NaN or Inf is a ValueError naming the batch), and
        those of another dtype than the model's (its first floating-point parameter's) are
        converted to the model's dtype, e.g. float64 data for a float32 model: the result is that
        of the converted values. The caller's tensors are not modified.
    keep : int, optional
        Channels kept per group (exactly one of keep / ratio).
    ratio : float in (0, 1], optional
        Fraction of each group's channels kept, rounded half up, at least 1.
    criterion : {"local", "loss", "l1", "random"}
        "local": greedy forward selection imitating each consumer's original output, on the Gram
        engine's layer statistics (exact; the kept columns are re-weighted by the selection's
        weights). "loss": greedy forward selection on the whole network's calibration loss
        (cross-entropy with integer labels, else the squared error to the original network's
        outputs); each kept channel is scaled by N / kept (the uniform average of the chosen
        channels). "l1": largest L1-norm producer filters. "random": a random subset (seeded by
        ``seed``). The last two keep weights as they are. See gfs.pruning.criteria.
    step, replacement, eps, backend
        Passed to gfs.select ("local" only; replacement / eps with another criterion is an
        error, and "loss" takes only step="uniform"). With replacement a channel can be picked
        several times and its column weighs more; ``keep`` then counts distinct channels. With
        eps a group may keep fewer than ``keep`` channels (the papers' stopping rule).
    layers : str or list of str, optional
        Prune only these groups: names of the layer whose output channels go, or glob patterns
        ("layer*.conv1"). Default: every group found.
    progress : bool
        rich progress bars on stderr (over the groups, and over the channels of a group for
        "loss"; they vanish when done; none when stderr is not a terminal), a line before and a
        summary line after.
    seed : int
        Seeds "random", the candidate subsets of "loss" (``loss_candidates``) and the
        subsampling of large materialised candidate matrices.
    loss_candidates : int, optional
        Criterion "loss": at each step score only this many of the channels not chosen yet,
        drawn uniformly at random (without replacement, from the generator seeded by ``seed``).
        Default: all of them.
    loss_batch : int, optional
        Criterion "loss": candidates evaluated per forward pass, stacked along the batch
        dimension (default 16; memory grows with it).
    shortlist : int, optional
        Criterion "loss": rank the candidates by the first-order (Taylor) prediction of their
        loss change, from the gradient of the loss w.r.t. the consumer's input-channel scales at
        the current subnetwork (one backward pass per step), and evaluate only the ``shortlist``
        best exactly. Default: evaluate every candidate.
    tolerance : float in [0, 1), optional
        Criterion "loss": stop adding channels to a group once the pruned network's top-1 on the
        calibration data is >= (1 - tolerance) x the original network's (accuracy with integer
        labels, else agreement with the original's argmax, the original scoring 1). keep / ratio
        stays the cap.
    checkpoint : str or os.PathLike, optional
        Resumable pruning: after each finished group the decisions so far are written to this
        file (atomically), and once more at the end. If the file exists and was written by a run
        with the same model, calibration data and settings, its groups are replayed (folded
        without re-selection) and pruning continues from there: the result is the same model as
        an uninterrupted run's. A file from another run is refused (ValueError). The file is
        kept when pruning ends; see gfs.pruning.resume.

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
    loss_opts = _check_loss_options(criterion, step, loss_candidates, loss_batch, shortlist, tolerance)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    checkpoint = _check_checkpoint(checkpoint)
    name = type(model).__name__
    crit = CRITERIA[criterion]()
    batches, labels = as_batches(calibration, _device(model), with_labels=True, dtype=_float_dtype(model))
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

    pruned = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(int(seed))
    node_of = {n.target: n for n in scan.graph.nodes if n.op == "call_module"}
    runner = GraphRunner(scan.graph, pruned, batches)  # the network pruned so far
    original = GraphRunner(scan.graph, reference, batches)  # the original, run once, front to back
    network = None
    if crit.needs_network:
        with torch.no_grad():
            outputs = [reference(x) for x in batches]
        network = NetworkLoss(runner, outputs, labels, batch=loss_opts["loss_batch"])
        if loss_opts["tolerance"] is not None and not network.classifier:
            raise ValueError("tolerance= needs a classifier (an output of shape (batch, classes)): the stop "
                             "compares the pruned network's top-1 with the original's")
    fingerprint, done = None, []
    if checkpoint is not None:
        fingerprint = _fingerprint(reference, batches, labels if crit.needs_network else None, groups, budgets,
                                   dict(criterion=criterion, keep=keep, ratio=ratio, step=step,
                                        replacement=bool(replacement), eps=eps, seed=int(seed), backend=backend,
                                        **loss_opts))
        found = resume.read(checkpoint, fingerprint)
        if found is not None:
            done, state = found
            generator.set_state(state)
    say = (lambda s: print(f"[gfs.prune] {s}", file=sys.stderr, flush=True)) if progress else (lambda s: None)
    say(f"{name}: {len(groups)} channel groups to prune with criterion {criterion!r}, {len(skipped)} layers left "
        f"whole, {sum(b.shape[0] for b in batches)} calibration samples"
        + (f"; resuming after {len(done)} groups from {checkpoint}" if done else ""))

    at = 0
    producers = [runner.pos[node_of[g.producer]] for g in groups]
    report, selections, finished = [], {}, []
    pending = None  # (consumer node, expected output, report index): checked on the next pass
    bar = _Progress(bool(progress), len(groups), crit.needs_network)
    with torch.no_grad(), bar:
        for i, g in enumerate(groups):
            t0 = time.perf_counter()
            consumer = node_of[g.consumer]
            pc = runner.pos[consumer]
            layer = pruned.get_submodule(g.consumer)
            bar.group(g, budgets[g.name])
            if i < len(done):  # finished before: replay the fold (no capture, no selection)
                d = done[i]
                if math.isnan(d["row"]["fold_error"]):  # its fold is checked on the next pass
                    got = runner.run(runner.start_for(producers[i]), pc, inputs=[consumer],
                                     checkpoint_at=producers[i:])
                    pending = (consumer, _expected(got[("in", consumer)], layer, d["keep"], d["scale"], g), i)
                    del got
                fold.apply(pruned, g, d["keep"], d["scale"], d["se_means"])
                runner.invalidate_after(producers[i])
                runner.keep_only(producers[i + 1:] or producers[i:])  # (the last: for its fold check)
                report.append(LayerReport(**d["row"], kept=d["keep"], scale=d["scale"]))
                if d["selection"] is not None:
                    selections[g.name] = d["selection"]
                finished.append(d)
                bar.group_done()
                continue
            se_fc1 = [node_of[m.name] for m in g.members if m.kind == "se"]
            got = runner.run(runner.start_for(producers[i]), pc, inputs=[consumer, *se_fc1],
                             outputs=[pending[0]] if pending else (),
                             checkpoint_at=producers[i:] + ([pc] if network is not None else []))
            if pending:
                _check_fold(runner, pending, got, report)
                if finished:
                    finished[-1]["row"]["fold_error"] = report[pending[2]].fold_error
            ref = original.run(at, pc + 1, outputs=[consumer], checkpoint_at=[pc + 1], clone_start=False)
            original.keep_only([pc + 1])
            at = pc + 1
            X = got[("in", consumer)]
            target = remove_bias(ref[("out", consumer)], layer)
            if crit.needs_data:
                _check_finite(X, f"the input of its consumer {g.consumer!r} (the network pruned so far)", g)
                _check_finite(target, f"the original network's output of {g.consumer!r}", g)
            tail = None
            if network is not None:
                tail = network.at(consumer, 1 if isinstance(layer, nn.Conv2d) else -1)
            ctx = Context(group=g, X=X, layer=layer, target=target, producer=pruned.get_submodule(g.producer),
                          keep=budgets[g.name], step=step, replacement=bool(replacement), eps=eps, backend=backend,
                          generator=generator, network=tail, loss_candidates=loss_opts.get("loss_candidates"),
                          shortlist=loss_opts.get("shortlist"), tolerance=loss_opts.get("tolerance"),
                          on_step=bar.step)
            try:
                decision = crit.decide(ctx)
            except ValueError as exc:  # say which group (the message is the selection's or the statistics')
                raise ValueError(f"group {g.name!r} (consumer {g.consumer!r}), criterion {criterion!r}: {exc}") from exc
            del tail
            s = torch.zeros(g.channels, dtype=torch.float64)
            s[decision.keep] = decision.scale
            sub = consumer_output(X, layer, s.to(X.device))
            dense = consumer_output(X, layer)
            loss = float(((target.double() - sub.double()) ** 2).mean())
            dense_loss = float(((target.double() - dense.double()) ** 2).mean())
            se_means = {n.target: got[("in", n)].double().mean(dim=(0, 2, 3)) for n in se_fc1}
            expected = _with_bias(sub, layer)
            del got, ref, X, target, dense
            fold.apply(pruned, g, decision.keep, decision.scale, se_means)
            runner.invalidate_after(producers[i])
            runner.keep_only(producers[i + 1:] or producers[i:])  # (the last: for its fold check)
            sel = decision.selection
            if sel is not None:
                selections[g.name] = sel
            net_loss = net_dense = top1 = None
            if sel is not None and sel.engine == "network":
                net_loss, net_dense, top1 = sel.loss, sel.dense_loss, float(sel.notes["top1"][-1])
            report.append(LayerReport(
                name=g.name, producer=g.producer, consumer=g.consumer, channels_before=g.channels,
                channels_after=int(decision.keep.numel()), loss=loss, dense_loss=dense_loss,
                gap=float(sel.gaps[-1]) if sel is not None and criterion == "local" else None,
                fold_error=float("nan"), sampled=decision.sampled, seconds=0.0, kept=decision.keep.clone(),
                scale=decision.scale.clone(), network_loss=net_loss, network_dense_loss=net_dense, top1=top1,
            ))
            pending = (consumer, expected, i)
            report[-1].seconds = time.perf_counter() - t0
            if checkpoint is not None:
                r = report[-1]
                finished.append(dict(keep=r.kept, scale=r.scale, se_means=se_means, selection=sel,
                                     row={k: getattr(r, k) for k in LayerReport._PLAIN}))
                resume.write(checkpoint, fingerprint, finished, generator)
            bar.group_done()
        if pending:
            t0 = time.perf_counter()
            _check_fold(runner, pending, {}, report)
            report[pending[2]].seconds += time.perf_counter() - t0
            if checkpoint is not None and finished:
                finished[-1]["row"]["fold_error"] = report[pending[2]].fold_error
                finished[-1]["row"]["seconds"] = report[pending[2]].seconds
                resume.write(checkpoint, fingerprint, finished, generator)
        del runner, original, network

        one = batches[0][:1]
        params = (fold.count_parameters(reference), fold.count_parameters(pruned))
        flops = (fold.count_flops(reference, one), fold.count_flops(pruned, one))
    flags = {n: m.training for n, m in model.named_modules()}
    for n, m in pruned.named_modules():
        m.training = flags.get(n, model.training)
    result = PruneResult(model=pruned, report=report, selections=selections, groups=groups, skipped=skipped,
                         params=params, flops=flops, criterion=criterion, seconds=time.perf_counter() - t_start)
    say(f"done: {len(report)} groups, parameters {params[0]:,} -> {params[1]:,}, FLOPs {flops[0]:,} -> {flops[1]:,}, "
        f"{result.seconds:.1f} s")
    return result


def _check_finite(t, what, g):
    """ValueError when an activation computed from the (finite) calibration data is not finite."""
    if not (t.is_floating_point() or t.is_complex()):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        first = tuple(int(v) for v in (~finite).nonzero()[0])
        raise ValueError(
            f"group {g.name!r}: {what} on the calibration batches contains NaN or Inf (first at index {first}); "
            f"the calibration data are finite, so the model overflows or divides by zero on them: check its "
            f"weights, or pass inputs of the scale it was trained on")


def _with_bias(out, layer):
    return out if layer.bias is None else out + _channel_view(layer, layer.bias.to(out.dtype))


def _expected(X, layer, keep, scale, g):
    """The selected subnetwork's consumer output (+ bias): what the folded consumer must give."""
    s = torch.zeros(g.channels, dtype=torch.float64)
    s[keep] = scale
    return _with_bias(consumer_output(X, layer, s.to(X.device)), layer)


def _fingerprint(model, batches, labels, groups, budgets, settings) -> dict:
    """What a checkpoint must match to be resumed (see gfs.pruning.resume)."""
    return {
        "model": type(model).__name__,
        "weights": resume.digest(sorted(model.state_dict().items())),
        "calibration": resume.digest(list(batches) + (list(labels) if labels is not None else [])),
        "groups": [[g.name, g.producer, g.consumer, g.channels, budgets[g.name]] for g in groups],
        **{k: v for k, v in settings.items()},
    }


def _check_fold(runner, pending, got, report):
    """fold_error of the group whose consumer is pending[0], from the pruned network's output."""
    node, expected, idx = pending
    out = got.get(("out", node))
    if out is None:
        p = runner.pos[node]
        out = runner.run(runner.start_for(p), p + 1, outputs=[node])[("out", node)]
    err = (out.double() - expected.double()).abs().max()
    report[idx].fold_error = float(err / expected.double().abs().max().clamp_min(1e-30))
