"""Today's gfs.prune run, as it was before issue 16 (commit a18d926), for the tests that compare
the new run with it: the recomputing path. Every group's consumer is run twice on its captured
input for the report's losses, the fold check compares whole outputs, and the graph runner copies
every checkpoint it takes and every one it resumes from. Only the class names and the imports
differ from that code.

    from prune_reference import reference_prune
    result = reference_prune(model, x, ratio=0.5)   # gfs.prune's arguments
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from gfs.pruning import api, resume
from gfs.pruning.capture import _attr, as_batches
from gfs.pruning.criteria import CRITERIA, Context, Decision, consumer_output, remove_bias
from gfs.pruning.fold import apply as fold_into
from gfs.pruning.fold import count_flops, count_parameters
from gfs.pruning.groups import _find
from gfs.pruning.loss import NetworkLoss
from gfs.pruning.result import LayerReport, PruneResult
from gfs.pruning.run import (
    _budgets,
    _check_finite,
    _choose,
    _device,
    _fingerprint,
    _float_dtype,
    _Progress,
    _subnetwork,
    _with_bias,
)


def reference_prune(model, calibration, **kwargs):
    """gfs.prune through :class:`RecomputingPruneRun` (the same argument checks)."""
    saved = api.PruneRun
    api.PruneRun = RecomputingPruneRun
    try:
        return api.prune(model, calibration, **kwargs)
    finally:
        api.PruneRun = saved


def _clone(env: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in env.items()}


class OldGraphRunner:
    """Runs a traced graph on a live model segment by segment, one batch at a time.

    The graph comes from torch.fx (gfs.pruning.groups); ``call_module`` nodes look their module up
    in ``root`` *when they run*, so modules replaced in ``root`` after pruning a group are used
    by the next segment. Values no longer needed are freed as the run goes.

    Checkpoints make the layer-by-layer loop cost about one forward pass in all instead of one
    per group: ``run(start, stop, ...)`` resumes from the checkpoint taken at node ``start``
    (position 0: the input) and takes new checkpoints at the positions asked for. A checkpoint at
    position q holds, per batch, the values of the nodes before q still needed at or after q; it
    stays valid until a module at a position >= q changes (see :meth:`invalidate_after`).
    """

    def __init__(self, graph, root: nn.Module, batches):
        self.nodes = list(graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(
                f"gfs.prune supports models with one tensor input; the traced graph has "
                f"{len(placeholders)} inputs ({', '.join(n.name for n in placeholders)})"
            )
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.pos[u] for u in n.users), default=self.pos[n]) for n in self.nodes}
        self.root = root
        self.batches = batches
        self.checkpoints: dict = {0: [{} for _ in batches]}

    def start_for(self, position: int) -> int:
        """The latest checkpoint at or before ``position``."""
        return max(q for q in self.checkpoints if q <= position)

    def invalidate_after(self, position: int) -> None:
        """A module at node ``position`` changed: checkpoints after it are stale."""
        for q in [q for q in self.checkpoints if q > position]:
            del self.checkpoints[q]

    def keep_only(self, positions) -> None:
        """Drop checkpoints that no future run needs: keep those in ``positions`` (and 0), and the
        latest one before their minimum (a start for runs that need an earlier one)."""
        positions = set(positions)
        low = min(positions, default=0)
        below = [q for q in self.checkpoints if q < low]
        keep = positions | {0} | ({max(below)} if below else set())
        for q in [q for q in self.checkpoints if q not in keep]:
            del self.checkpoints[q]

    def _value(self, node, env):
        return fx.node.map_arg(node.args, lambda a: env[a]), fx.node.map_arg(node.kwargs, lambda a: env[a])

    def _eval(self, node, env, x):
        """The value of ``node`` given the values it reads in ``env`` (x: the model input)."""
        if node.op == "placeholder":
            return x
        args, kwargs = self._value(node, env)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return _attr(self.root, node.target)
        raise RuntimeError(f"unexpected node {node.op}")  # pragma: no cover

    def _free(self, node, env, i):
        for a in node.all_input_nodes:
            if self.last_use[a] <= i:
                env.pop(a, None)
        if self.last_use[node] <= i:
            env.pop(node, None)

    @torch.no_grad()
    def run(self, start: int, stop: int, *, inputs=(), outputs=(), checkpoint_at=(), clone_start=True) -> dict:
        """Run nodes [start, stop) on every batch, from the checkpoint at ``start``.

        inputs: nodes whose first argument to record (the node at ``stop`` included: its input is
        recorded without running it); outputs: nodes whose result to record (cloned).
        Returns {("in" or "out", node): tensor concatenated over batches}.
        """
        inputs, outputs = set(inputs), set(outputs)
        want = {q for q in checkpoint_at if start < q <= stop}
        store: dict = {}
        base = self.checkpoints[start]
        for b, x in enumerate(self.batches):
            env = _clone(base[b]) if clone_start else base[b]
            for i in range(start, stop):
                if i in want:
                    self.checkpoints.setdefault(i, [None] * len(self.batches))[b] = _clone(env)
                node = self.nodes[i]
                if node.op == "output":
                    break
                if node in inputs:
                    store.setdefault(("in", node), []).append(self._value(node, env)[0][0])
                val = self._eval(node, env, x)
                if node in outputs:
                    store.setdefault(("out", node), []).append(val.clone())
                env[node] = val
                self._free(node, env, i)
            if stop < len(self.nodes) and self.nodes[stop] in inputs:  # the input of the node run stops at
                store.setdefault(("in", self.nodes[stop]), []).append(self._value(self.nodes[stop], env)[0][0])
            if stop in want:
                self.checkpoints.setdefault(stop, [None] * len(self.batches))[b] = _clone(env)
        return {k: torch.cat(v, 0) for k, v in store.items()}

    def run_tail(self, start: int, env: dict):
        """Run nodes [start, end) from the values in ``env`` (consumed: values are freed as the
        run goes) and return the model's output. No gradient mode is set: the caller chooses."""
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "output":
                return fx.node.map_arg(node.args[0], lambda a: env[a])
            env[node] = self._eval(node, env, None)
            self._free(node, env, i)
        raise RuntimeError("the traced graph has no output node")  # pragma: no cover

    def input_dependent(self) -> set:
        """The nodes whose value depends on the model input (the others are constants)."""
        dep = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
                dep.add(n)
        return dep


@dataclass
class Captured:
    """What :meth:`PruneRun.capture` takes from one pass over the calibration batches."""

    X: torch.Tensor  # the consumer's input, from the network pruned so far
    target: torch.Tensor  # the original network's consumer output, minus bias
    se_means: dict  # {squeeze-excitation fc1: mean of its input per channel}, folded into a gate's bias


class RecomputingPruneRun:
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
        imitate="output",
    ):
        if imitate != "output":  # (the recomputing path predates imitate=)
            raise NotImplementedError("the reference path imitates the consumer's output only")
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
        self.runner = OldGraphRunner(scan.graph, self.pruned, self.batches)  # the network pruned so far
        self.original = OldGraphRunner(
            scan.graph, self.reference, self.batches
        )  # the original, run once, front to back
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
