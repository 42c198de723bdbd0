"""One gfs.prune call as an object: :class:`PruneRun` holds the state of a run (the channel
groups and their budgets, the two graph runners, the checkpoint, the report so far, the progress
bars) and prunes one group at a time, in phases that are methods.

    run = PruneRun(model, calibration, keep=None, ratio=0.5, ...)  # plan: trace, groups, runners
    run.start()                    # a checkpoint's finished groups (resumed run), or none
    with torch.no_grad(), run.bar:
        for i in range(len(run.groups)):
            run.step(i)
        result = run.finish()      # the last fold check, params, FLOPs: a PruneResult

:meth:`PruneRun.step` on group i:

- a group not finished before: :meth:`~PruneRun.capture` (the consumer's input X from the
  network pruned so far, the original network's consumer output minus bias as the target, the
  squeeze-excitation inputs' means; the pending fold check of the group before runs on the same
  pass: :meth:`~PruneRun.check_fold`), :meth:`~PruneRun.decide` (statistics and selection: the
  criterion's Decision; for "local" the Gram layer statistics, then gfs.select, see
  gfs.pruning.criteria), :meth:`~PruneRun.measure` (the report row: consumer-output losses of
  the decision and of the dense consumer; and the output the folded consumer must give);
- a group finished before (a resumed run): :meth:`~PruneRun.replay`, its stored decision and
  row (and, when its fold was not checked yet, that expected output from one capture);
- then, either way, :meth:`~PruneRun.fold` (new, smaller modules, gfs.pruning.fold) and
  :meth:`~PruneRun.record` (report, selection, pending fold check); a new decision is then
  written to the checkpoint (:meth:`~PruneRun.save`).

Arguments are validated by gfs.prune (gfs.pruning.api) before they get here.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import resume
from .capture import GraphRunner, as_batches
from .criteria import CRITERIA, Context, Decision, _channel_view, consumer_output, keep_count, remove_bias
from .fold import apply as fold_into
from .fold import count_flops, count_parameters
from .groups import UnsupportedModelError, _find, describe_rejected
from .loss import NetworkLoss
from .result import LayerReport, PruneResult


@dataclass
class Captured:
    """What :meth:`PruneRun.capture` takes from one pass over the calibration batches."""

    X: torch.Tensor  # the consumer's input, from the network pruned so far
    target: torch.Tensor  # the original network's consumer output, minus bias
    se_means: dict  # {squeeze-excitation fc1: mean of its input per channel}, folded into a gate's bias


class PruneRun:
    """The state of one gfs.prune call, and its phases as methods (see the module notes).

    Attributes
    ----------
    groups : list of ChannelGroup
        The groups to prune, in forward order; ``budgets[g.name]`` the channels each keeps.
    report : list of LayerReport
        One row per group done so far; ``selections`` the gfs.Selection of each (by name).
    done : list of dict
        The finished groups read from the checkpoint (a resumed run; empty otherwise).
    pending : tuple or None
        (consumer node, expected output, report index) of the last folded group whose fold is
        checked on the next pass.
    bar : progress bars (a context manager).
    """

    def __init__(
        self,
        model: nn.Module,
        calibration,
        *,
        keep,
        ratio,
        criterion,
        step,
        replacement,
        eps,
        layers,
        progress,
        seed,
        backend,
        loss_options: dict,
        checkpoint,
    ):
        self.t_start = time.perf_counter()
        self.model = model
        self.name = type(model).__name__
        self.criterion = criterion
        self.crit = CRITERIA[criterion]()
        self.options = dict(step=step, replacement=bool(replacement), eps=eps, backend=backend)
        self.loss_options = loss_options
        self.batches, self.labels = as_batches(calibration, _device(model), with_labels=True, dtype=_float_dtype(model))
        example = self.batches[0][: min(2, self.batches[0].shape[0])]

        self.reference = copy.deepcopy(model).eval()  # the original network: targets
        scan = _find(self.reference, example)
        self.groups = _choose(scan, layers, self.name)
        self.budgets = _budgets(self.groups, keep, ratio)
        self.skipped = {n: r for n, r in scan.rejected.items()}
        self.skipped.update({g.name: "not in layers=" for g in scan.groups if g not in self.groups})

        self.pruned = copy.deepcopy(model).eval()
        self.generator = torch.Generator().manual_seed(int(seed))
        self.node_of = {n.target: n for n in scan.graph.nodes if n.op == "call_module"}
        self.runner = GraphRunner(scan.graph, self.pruned, self.batches)  # the network pruned so far
        self.original = GraphRunner(scan.graph, self.reference, self.batches)  # the original, run once, front to back
        self.network = None
        if self.crit.needs_network:
            with torch.no_grad():
                outputs = [self.reference(x) for x in self.batches]
            self.network = NetworkLoss(self.runner, outputs, self.labels, batch=loss_options["loss_batch"])
            if loss_options["tolerance"] is not None and not self.network.classifier:
                raise ValueError(
                    "tolerance= needs a classifier (an output of shape (batch, classes)): the stop "
                    "compares the pruned network's top-1 with the original's"
                )
        self.checkpoint, self.fingerprint = checkpoint, None
        if checkpoint is not None:
            self.fingerprint = _fingerprint(
                self.reference,
                self.batches,
                self.labels if self.crit.needs_network else None,
                self.groups,
                self.budgets,
                dict(criterion=criterion, keep=keep, ratio=ratio, seed=int(seed), **self.options, **loss_options),
            )
        self.say = (lambda s: print(f"[gfs.prune] {s}", file=sys.stderr, flush=True)) if progress else (lambda s: None)
        self.at = 0  # the original network has run up to this node
        self.producers = [self.runner.pos[self.node_of[g.producer]] for g in self.groups]
        self.done, self.report, self.selections = [], [], {}
        self._folded = []  # per group in the report: (se_means, selection), what a checkpoint adds to its row
        self.pending = None
        self.bar = _Progress(bool(progress), len(self.groups), self.crit.needs_network)

    # ---- the run -----------------------------------------------------------------------------

    def start(self) -> None:
        """Fresh or resumed: read the checkpoint, if there is one, for the finished groups'
        decisions and the seeded generator's state after them."""
        if self.checkpoint is not None:
            found = resume.read(self.checkpoint, self.fingerprint)
            if found is not None:
                self.done, state = found
                self.generator.set_state(state)
        self.say(
            f"{self.name}: {len(self.groups)} channel groups to prune with criterion {self.criterion!r}, "
            f"{len(self.skipped)} layers left whole, {sum(b.shape[0] for b in self.batches)} calibration samples"
            + (f"; resuming after {len(self.done)} groups from {self.checkpoint}" if self.done else "")
        )

    def step(self, i: int) -> LayerReport:
        """Prune group i (the groups before it are pruned): decide anew, or replay the decision
        of a resumed run; fold; record. Returns its report row."""
        t0 = time.perf_counter()
        g = self.groups[i]
        self.bar.group(g, self.budgets[g.name])
        fresh = i >= len(self.done)
        if fresh:
            captured = self.capture(i)
            decision = self.decide(i, captured)
            row, expected = self.measure(i, captured, decision)
            se_means = captured.se_means
            del captured
        else:
            decision, se_means, row, expected = self.replay(i)
        self.fold(i, decision, se_means)
        self.record(i, row, decision.selection, se_means, expected)
        if fresh:
            row.seconds = time.perf_counter() - t0
            self.save()
        self.bar.group_done()
        return row

    def finish(self) -> PruneResult:
        """The last group's fold check, the parameters and FLOPs before and after, the training
        flags of the input model's modules: the PruneResult."""
        if self.pending:
            t0 = time.perf_counter()
            idx = self.pending[2]
            self.check_fold()
            self.report[idx].seconds += time.perf_counter() - t0
            self.save()
        self.runner = self.original = self.network = None
        one = self.batches[0][:1]
        params = (count_parameters(self.reference), count_parameters(self.pruned))
        flops = (count_flops(self.reference, one), count_flops(self.pruned, one))
        flags = {n: m.training for n, m in self.model.named_modules()}
        for n, m in self.pruned.named_modules():
            m.training = flags.get(n, self.model.training)
        result = PruneResult(
            model=self.pruned,
            report=self.report,
            selections=self.selections,
            groups=self.groups,
            skipped=self.skipped,
            params=params,
            flops=flops,
            criterion=self.criterion,
            seconds=time.perf_counter() - self.t_start,
        )
        self.say(
            f"done: {len(self.report)} groups, parameters {params[0]:,} -> {params[1]:,}, FLOPs {flops[0]:,} -> "
            f"{flops[1]:,}, {result.seconds:.1f} s"
        )
        return result

    # ---- the phases of one group ---------------------------------------------------------------

    def capture(self, i: int) -> Captured:
        """One pass of the pruned network from the latest checkpoint to group i's consumer (its
        input X, the squeeze-excitation inputs; the pending fold check's output on the way), and
        of the original network to the consumer's output (the target, minus bias)."""
        g = self.groups[i]
        consumer = self.node_of[g.consumer]
        pc = self.runner.pos[consumer]
        layer = self.pruned.get_submodule(g.consumer)
        se_fc1 = [self.node_of[m.name] for m in g.members if m.kind == "se"]
        got = self.runner.run(
            self.runner.start_for(self.producers[i]),
            pc,
            inputs=[consumer, *se_fc1],
            outputs=[self.pending[0]] if self.pending else (),
            checkpoint_at=self.producers[i:] + ([pc] if self.network is not None else []),
        )
        if self.pending:
            self.check_fold(got)
        ref = self.original.run(self.at, pc + 1, outputs=[consumer], checkpoint_at=[pc + 1], clone_start=False)
        self.original.keep_only([pc + 1])
        self.at = pc + 1
        X = got[("in", consumer)]
        target = remove_bias(ref[("out", consumer)], layer)
        if self.crit.needs_data:
            _check_finite(X, f"the input of its consumer {g.consumer!r} (the network pruned so far)", g)
            _check_finite(target, f"the original network's output of {g.consumer!r}", g)
        se_means = {n.target: got[("in", n)].double().mean(dim=(0, 2, 3)) for n in se_fc1}
        return Captured(X, target, se_means)

    def decide(self, i: int, captured: Captured) -> Decision:
        """Statistics and selection: the criterion's decision for group i (the kept channels and
        their scales; for "local" the Gram layer statistics and gfs.select, for "loss" the whole
        network's loss from the consumer on)."""
        g = self.groups[i]
        layer = self.pruned.get_submodule(g.consumer)
        tail = None
        if self.network is not None:
            tail = self.network.at(self.node_of[g.consumer], 1 if isinstance(layer, nn.Conv2d) else -1)
        opts = self.loss_options
        ctx = Context(
            group=g,
            X=captured.X,
            layer=layer,
            target=captured.target,
            producer=self.pruned.get_submodule(g.producer),
            keep=self.budgets[g.name],
            generator=self.generator,
            network=tail,
            loss_candidates=opts.get("loss_candidates"),
            shortlist=opts.get("shortlist"),
            tolerance=opts.get("tolerance"),
            on_step=self.bar.step,
            **self.options,
        )
        try:
            return self.crit.decide(ctx)
        except ValueError as exc:  # say which group (the message is the selection's or the statistics')
            raise ValueError(
                f"group {g.name!r} (consumer {g.consumer!r}), criterion {self.criterion!r}: {exc}"
            ) from exc

    def measure(self, i: int, captured: Captured, decision: Decision):
        """The report row of a new decision (consumer-output losses of the subnetwork and of the
        dense consumer on the captured input; fold_error still NaN, seconds 0), and the output
        the folded consumer must give: ``(LayerReport, expected)``."""
        g = self.groups[i]
        layer = self.pruned.get_submodule(g.consumer)
        X, target = captured.X, captured.target
        sub = _subnetwork(X, layer, decision.keep, decision.scale, g)
        dense = consumer_output(X, layer)
        loss = float(((target.double() - sub.double()) ** 2).mean())
        dense_loss = float(((target.double() - dense.double()) ** 2).mean())
        sel = decision.selection
        net_loss = net_dense = top1 = None
        if sel is not None and sel.engine == "network":
            net_loss, net_dense, top1 = sel.loss, sel.dense_loss, float(sel.notes["top1"][-1])
        row = LayerReport(
            name=g.name,
            producer=g.producer,
            consumer=g.consumer,
            channels_before=g.channels,
            channels_after=int(decision.keep.numel()),
            loss=loss,
            dense_loss=dense_loss,
            gap=float(sel.gaps[-1]) if sel is not None and self.criterion == "local" else None,
            fold_error=float("nan"),
            sampled=decision.sampled,
            seconds=0.0,
            kept=decision.keep.clone(),
            scale=decision.scale.clone(),
            network_loss=net_loss,
            network_dense_loss=net_dense,
            top1=top1,
        )
        return row, _with_bias(sub, layer)

    def replay(self, i: int):
        """A group finished before the run was interrupted: its stored decision, squeeze-excitation
        means and report row; and, when its fold was not checked yet (the last one finished),
        the output its folded consumer must give, from one capture of the consumer's input.
        Returns ``(decision, se_means, row, expected or None)``."""
        g, d = self.groups[i], self.done[i]
        row = LayerReport(**d["row"], kept=d["keep"], scale=d["scale"])
        expected = None
        if math.isnan(row.fold_error):  # its fold is checked on the next pass
            consumer = self.node_of[g.consumer]
            got = self.runner.run(
                self.runner.start_for(self.producers[i]),
                self.runner.pos[consumer],
                inputs=[consumer],
                checkpoint_at=self.producers[i:],
            )
            layer = self.pruned.get_submodule(g.consumer)
            expected = _with_bias(_subnetwork(got[("in", consumer)], layer, d["keep"], d["scale"], g), layer)
        return Decision(keep=d["keep"], scale=d["scale"], selection=d["selection"]), d["se_means"], row, expected

    def fold(self, i: int, decision: Decision, se_means: dict) -> None:
        """Fold the decision into new, smaller modules of the pruned network; the runner's
        checkpoints after the producer are stale."""
        fold_into(self.pruned, self.groups[i], decision.keep, decision.scale, se_means)
        self.runner.invalidate_after(self.producers[i])
        self.runner.keep_only(self.producers[i + 1 :] or self.producers[i:])  # (the last: for its fold check)

    def check_fold(self, got=None) -> None:
        """fold_error of the pending group, from the pruned network's output of its consumer
        (taken from ``got``, the current pass, when it holds it; else one more pass)."""
        node, expected, idx = self.pending
        out = (got or {}).get(("out", node))
        if out is None:
            p = self.runner.pos[node]
            out = self.runner.run(self.runner.start_for(p), p + 1, outputs=[node])[("out", node)]
        err = (out.double() - expected.double()).abs().max()
        self.report[idx].fold_error = float(err / expected.double().abs().max().clamp_min(1e-30))
        self.pending = None

    def record(self, i: int, row: LayerReport, selection, se_means: dict, expected) -> None:
        """Group i is folded: its row and selection join the report, and its fold check waits
        for the next pass (when ``expected`` is given)."""
        g = self.groups[i]
        self.report.append(row)
        if selection is not None:
            self.selections[g.name] = selection
        self._folded.append((se_means, selection))
        if expected is not None:
            self.pending = (self.node_of[g.consumer], expected, i)

    def save(self) -> None:
        """Write the checkpoint (when there is one): every group in the report and the seeded
        generator's state (see gfs.pruning.resume)."""
        if self.checkpoint is None:
            return
        done = [
            dict(keep=r.kept, scale=r.scale, se_means=se_means, selection=selection, row=r.row())
            for r, (se_means, selection) in zip(self.report, self._folded, strict=True)
        ]
        resume.write(self.checkpoint, self.fingerprint, done, self.generator)


# ---- helpers -----------------------------------------------------------------------------------


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
                raise ValueError(
                    f"layers: pattern {pat!r} matches no prunable layer of {model_name}; prunable: {_few(by_name)}"
                )
            chosen.update(hits)
        elif pat in by_name:
            chosen.add(pat)
        elif pat in scan.rejected:
            raise UnsupportedModelError(f"layers: {pat!r} cannot be pruned: {scan.rejected[pat]}")
        else:
            raise ValueError(
                f"layers: {model_name} has no prunable layer named {pat!r} (groups are named by the layer "
                f"whose output channels go); prunable: {_few(by_name)}"
            )
    return [g for g in scan.groups if g.name in chosen]


def _budgets(groups, keep, ratio) -> dict:
    """{group name: channels it keeps}; ValueError when keep= is more than a group has."""
    budgets = {}
    for g in groups:
        k = keep_count(g.channels, keep, ratio)
        if k > g.channels:
            raise ValueError(
                f"keep={keep} is more than the {g.channels} channels of group {g.name!r}; "
                f"use a smaller keep, ratio=, or layers= to leave that group out"
            )
        budgets[g.name] = k
    return budgets


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
            f"weights, or pass inputs of the scale it was trained on"
        )


def _with_bias(out, layer):
    return out if layer.bias is None else out + _channel_view(layer, layer.bias.to(out.dtype))


def _subnetwork(X, layer, keep, scale, g):
    """The consumer's output (no bias) with the kept input channels scaled and the others zeroed:
    the selected subnetwork's."""
    s = torch.zeros(g.channels, dtype=torch.float64)
    s[keep] = scale
    return consumer_output(X, layer, s.to(X.device))


def _fingerprint(model, batches, labels, groups, budgets, settings) -> dict:
    """What a checkpoint must match to be resumed (see gfs.pruning.resume)."""
    return {
        "model": type(model).__name__,
        "weights": resume.digest(sorted(model.state_dict().items())),
        "calibration": resume.digest(list(batches) + (list(labels) if labels is not None else [])),
        "groups": [[g.name, g.producer, g.consumer, g.channels, budgets[g.name]] for g in groups],
        **{k: v for k, v in settings.items()},
    }


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
        self.bar = Progress(
            TextColumn(r"\[gfs.prune] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
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
