"""One gfs.prune call as an object: :class:`PruneRun` holds the state of a run (the channel
groups and their budgets, the two graph runners, the checkpoint, the report so far, the progress
bars) and prunes one group at a time, in phases that are methods.

    run = PruneRun(model, calibration, keep=None, ratio=0.5, ...)  # plan: trace, groups, runners
    result = run_all(run)          # that is:
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
  the decision and of the dense consumer; and what the folded consumer must give);
- a group finished before (a resumed run): :meth:`~PruneRun.replay`, its stored decision and
  row (and, when its fold was not checked yet, what the folded consumer must give, from one
  capture of the consumer's input);
- then, either way, :meth:`~PruneRun.fold` (new, smaller modules, gfs.pruning.fold) and
  :meth:`~PruneRun.record` (report, selection, pending fold check); a new decision is then
  written to the checkpoint (:meth:`~PruneRun.save`).

What it costs (issue 16). Each network runs forward once over the calibration data, not once
per group: the original network from one consumer to the next (its live values are kept
between groups), the pruned network from the latest checkpoint before the group's producer (the
values live there, kept by reference: GraphRunner) to its consumer; after a fold only the
group's own segment, producer to consumer, runs again, with the new modules (ResNet-50 at ratio
0.5: 0.99 and 0.90 forward passes of FLOPs; benchmarks/prune_resnet50.py). Memory: what is kept
between passes is the values live at the checkpoints, the original network's after its last
consumer and the pruned network's at the group's producer (and at the next one); for ResNet-50
at 224 x 224 at most 10.7 MiB per calibration image (a layer1 residual-stream tensor, 256 x 56 x
56 floats, is 3.1 MiB), 690 MiB for 64 images, plus the current group's consumer input and
target. Above ``ACTIVATION_BUDGET`` (default: half the free memory) checkpoints are not taken
and the values are recomputed from an earlier one, at worst from the input. The reported
losses of "local" come from its statistics (no forward pass, see :meth:`PruneRun.measure`); the
fold check (:class:`FoldCheck`) compares the folded consumer's output, taken on the next pass,
with the masked original's on every output position when that is cheap and on a sample of
positions (the image borders among them) otherwise. ``PruneResult.timings`` and each row's
``phases`` say where the time went.

Arguments are validated by gfs.prune (gfs.pruning.api) before they get here.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..stats import GramStats
from . import resume
from .capture import GraphRunner, as_batches
from .criteria import CRITERIA, Context, Decision, _channel_view, _output_view, consumer_output, keep_count
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
    pending : FoldCheck or None
        The fold check of the last folded group, done on the next pass of the pruned network.
    clock : Clock
        Seconds per phase, in all and for the current group.
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
        ranks=None,
    ):
        self.t_start = time.perf_counter()
        self.clock = Clock()
        self.ranks = ranks  # data-parallel calibration: this rank's side (gfs.pruning.parallel), or None
        if ranks is not None:
            progress = progress and ranks.rank == 0
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
        if isinstance(keep, dict) and layers is None:  # the mapping names the groups to prune
            self.groups = _choose(scan, list(keep), self.name, what="keep=")
        else:
            self.groups = _choose(scan, layers, self.name)
        self.budgets = _budgets(self.groups, keep, ratio)
        self.skipped = {n: r for n, r in scan.rejected.items()}
        self.skipped.update({g.name: "not in layers=" for g in scan.groups if g not in self.groups})

        self.pruned = copy.deepcopy(model).eval()
        self.generator = torch.Generator().manual_seed(int(seed))
        self.node_of = {n.target: n for n in scan.graph.nodes if n.op == "call_module"}
        budget = ACTIVATION_BUDGET if ACTIVATION_BUDGET is not None else _free_memory(self.batches[0].device) // 2
        self.runner = GraphRunner(scan.graph, self.pruned, self.batches, budget=budget)  # the network pruned so far
        self.original = GraphRunner(scan.graph, self.reference, self.batches, budget=budget)  # run once, front to back
        self.runner.peers, self.original.peers = [self.original], [self.runner]  # one budget for both
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
        self.settings = dict(
            criterion=criterion, keep=keep, ratio=ratio, seed=int(seed), **self.options, **loss_options
        )
        self.out_scales = {}  # {consumer: weight per output channel}, imitate="normalized" / "recalibrated"
        self.centre = imitate == "recalibrated"  # and each output channel's mean free
        if imitate in ("normalized", "recalibrated"):
            self.settings["imitate"] = imitate  # (absent for "output": earlier checkpoints stay valid)
            self.out_scales = _norm_scales(self.reference, scan.graph, [g.consumer for g in self.groups])
        if checkpoint is not None:
            self.fingerprint = _fingerprint(
                self.reference,
                self.batches,
                self.labels if self.crit.needs_network else None,
                self.groups,
                self.budgets,
                self.settings,
            )
        self.say = (lambda s: print(f"[gfs.prune] {s}", file=sys.stderr, flush=True)) if progress else (lambda s: None)
        self.producers = [self.runner.pos[self.node_of[g.producer]] for g in self.groups]
        self.done, self.report, self.selections = [], [], {}
        self._folded = []  # per group in the report: (se_means, selection), what a checkpoint adds to its row
        self.pending = None
        self.bar = _Progress(bool(progress), len(self.groups), self.crit.needs_network)
        self.clock.add("setup", time.perf_counter() - self.t_start)

    # ---- the run -----------------------------------------------------------------------------

    def start(self) -> None:
        """Fresh or resumed: read the checkpoint, if there is one, for the finished groups'
        decisions and the seeded generator's state after them. (Data-parallel: every rank reads
        it, and the ranks agree on how many groups it holds.)"""
        if self.checkpoint is not None:
            error = None
            try:
                found = resume.read(self.checkpoint, self.fingerprint)
            except Exception as exc:
                if self.ranks is None:
                    raise
                found, error = None, exc
            if found is not None:
                self.done, state = found
                self.generator.set_state(state)
            if self.ranks is not None:
                with self.clock("exchange"):
                    what = f"gfs.prune (reading the checkpoint {self.checkpoint}; every rank must see the same file)"
                    self.ranks.check({"groups_in_checkpoint": len(self.done)}, error, what)
        samples = sum(b.shape[0] for b in self.batches)
        if self.ranks is not None:
            ranks = self.ranks
            samples_text = f"{ranks.total} calibration samples on {ranks.world} ranks (data-parallel; {samples} here)"
        else:
            samples_text = f"{samples} calibration samples"
        self.say(
            f"{self.name}: {len(self.groups)} channel groups to prune with criterion {self.criterion!r}, "
            f"{len(self.skipped)} layers left whole, {samples_text}"
            + (f"; resuming after {len(self.done)} groups from {self.checkpoint}" if self.done else "")
        )

    # ---- data-parallel calibration: what the ranks agree on at the start --------------------

    def rank_settings(self) -> tuple[dict, dict]:
        """(options every rank must share, this rank's facts) for the first agreement of a
        data-parallel run (gfs.pruning.parallel)."""
        from .parallel import _model_digest, digest

        x = self.batches[0]
        options = {
            **self.settings,
            "model": self.name,
            "weights": _model_digest(self.reference),
            "groups": digest([[g.name, g.producer, g.consumer, g.channels, self.budgets[g.name]] for g in self.groups]),
            "input": [str(x.dtype), x.device.type, list(x.shape[1:])],
            "checkpoint": self.checkpoint,
        }
        facts = {"samples": sum(b.shape[0] for b in self.batches)}
        if self.fingerprint is not None:
            facts["calibration"] = self.fingerprint["calibration"]
        return options, facts

    def join(self, table: list) -> None:
        """After the first agreement: the checkpoint's fingerprint covers every rank's batches."""
        if self.fingerprint is not None:
            from .parallel import digest

            self.fingerprint["calibration"] = digest([f["calibration"] for f in table])
            self.fingerprint["ranks"] = [f["samples"] for f in table]

    def step(self, i: int) -> LayerReport:
        """Prune group i (the groups before it are pruned): decide anew, or replay the decision
        of a resumed run; fold; record. Returns its report row."""
        t0 = time.perf_counter()
        self.clock.group = {}
        g = self.groups[i]
        self.bar.group(g, self.budgets[g.name])
        fresh = i >= len(self.done)
        if fresh:
            if self.ranks is not None:
                self.ranks.begin(g.name)
            try:
                captured = self.capture(i)
                decision = self.decide(i, captured)
                row, expected = self.measure(i, captured, decision)
            except Exception as exc:
                if self.ranks is not None and not self.ranks.exchanged:
                    self.ranks.fail(exc)  # before the ranks' exchange: raised on every rank
                raise
            se_means = captured.se_means
            del captured
        else:
            decision, se_means, row, expected = self.replay(i)
        self.fold(i, decision, se_means)
        self.record(i, row, decision.selection, se_means, expected)
        if fresh:
            with self.clock("save"):
                self.save()
            row.seconds = time.perf_counter() - t0
            row.phases = dict(self.clock.group)
        self.bar.group_done()
        return row

    def finish(self) -> PruneResult:
        """The last group's fold check, the parameters and FLOPs before and after, the training
        flags of the input model's modules: the PruneResult."""
        if self.ranks is not None:
            self._finish_ranks()
        elif self.pending:
            t0 = time.perf_counter()
            self.clock.group = {}
            idx = self.pending.index
            self.check_fold()
            with self.clock("save"):
                self.save()
            self.report[idx].seconds += time.perf_counter() - t0
            for k, v in self.clock.group.items():
                self.report[idx].phases[k] = self.report[idx].phases.get(k, 0.0) + v
        memory = {
            "checkpoint_bytes": self.runner.peak_bytes + self.original.peak_bytes,
            "budget_bytes": self.runner.budget,
            "checkpoints_skipped": self.runner.skipped + self.original.skipped,
            "checkpoints_spoiled": self.runner.spoiled + self.original.spoiled,
        }
        self.runner = self.original = self.network = None
        t0 = time.perf_counter()
        one = self.batches[0][:1]
        params = (count_parameters(self.reference), count_parameters(self.pruned))
        flops = (count_flops(self.reference, one), count_flops(self.pruned, one))
        flags = {n: m.training for n, m in self.model.named_modules()}
        for n, m in self.pruned.named_modules():
            m.training = flags.get(n, self.model.training)
        self.clock.add("finish", time.perf_counter() - t0)
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
            timings=dict(self.clock.total),
            memory=memory,
        )
        self.say(
            f"done: {len(self.report)} groups, parameters {params[0]:,} -> {params[1]:,}, FLOPs {flops[0]:,} -> "
            f"{flops[1]:,}, {result.seconds:.1f} s"
        )
        return result

    def _finish_ranks(self) -> None:
        """Data-parallel: the last fold check, the last agreement (the ranks' pruned models
        compared), the checkpoint's last write (rank 0; its failure raised on every rank)."""
        t0 = time.perf_counter()
        self.clock.group = {}
        idx = self.pending.index if self.pending else None
        if self.pending:
            self.check_fold()
        with self.clock("exchange"):
            self._fold_errors(self.ranks.final(self.pruned))
        if idx is None:
            return
        with self.clock("save"):
            self.save()
        if self.checkpoint is not None:
            with self.clock("exchange"):
                self.ranks.check({}, None, "gfs.prune (the checkpoint's last write, on rank 0)")
        self.report[idx].seconds += time.perf_counter() - t0
        for k, v in self.clock.group.items():
            self.report[idx].phases[k] = self.report[idx].phases.get(k, 0.0) + v

    # ---- the phases of one group ---------------------------------------------------------------

    def capture(self, i: int) -> Captured:
        """One pass of the pruned network from the latest checkpoint before group i's producer to
        its consumer (its input X, the squeeze-excitation inputs; the pending fold check's output
        on the way), and of the original network from the consumer before to this one's output
        (the target, minus bias)."""
        g = self.groups[i]
        consumer = self.node_of[g.consumer]
        pc = self.runner.pos[consumer]
        layer = self.pruned.get_submodule(g.consumer)
        se_fc1 = [self.node_of[m.name] for m in g.members if m.kind == "se"]
        at_consumer = [pc] if self.network is not None else []  # criterion "loss" runs the network from there
        start = self.runner.start_for(self.producers[i])
        got = self._run_pruned(
            start,
            pc,
            inputs=[consumer, *se_fc1],
            checkpoint_at=self.producers[i:] + at_consumer,
            force=at_consumer,
            # the start is not needed again when a checkpoint at the producer replaces it (else,
            # within the budget, it is the start of the pass after the fold)
            consume=start < self.producers[i] and start not in self.producers[i:],
        )
        target = self._run_original(consumer)
        with self.clock("inputs"):
            X = got[("in", consumer)]
            if layer.bias is not None:  # the target is the output minus bias (in place: the copy is ours)
                target.sub_(_channel_view(layer, layer.bias.to(target.dtype)))
            if self.crit.needs_data:
                _check_finite(X, f"the input of its consumer {g.consumer!r} (the network pruned so far)", g)
                _check_finite(target, f"the original network's output of {g.consumer!r}", g)
            if self.ranks is None:
                se_means = {n.target: got[("in", n)].double().mean(dim=(0, 2, 3)) for n in se_fc1}
            else:  # this rank's sums and count; the means of all ranks' come from the exchange
                se_means = {n.target: _sums_per_channel(got[("in", n)]) for n in se_fc1}
        return Captured(X, target, se_means)

    def _run_pruned(self, start: int, stop: int, **kwargs) -> dict:
        """Run the pruned network [start, stop); the pending fold check reads its consumer's
        output on the way (and is finished after the pass when it was reached)."""
        t0 = time.perf_counter()
        check = self.pending
        taps = {check.node: check.tap} if check is not None else None
        spent = check.seconds if check is not None else 0.0
        got = self.runner.run(start, stop, taps=taps, **kwargs)
        tapped = (check.seconds - spent) if check is not None else 0.0
        self.clock.add("pruned", time.perf_counter() - t0 - tapped)
        self.clock.add("fold check", tapped)
        if check is not None and check.complete():
            self._finish_check()
        return got

    def _run_original(self, consumer) -> torch.Tensor:
        """The original network's output of ``consumer`` on every batch (one tensor), running from
        the latest checkpoint before it; its live values after the consumer are kept for the
        next group."""
        with self.clock("original"):
            stop = self.original.pos[consumer] + 1
            out = _Gather([x.shape[0] for x in self.batches])
            self.original.run(
                self.original.start_for(stop), stop, taps={consumer: out.add}, checkpoint_at=[stop], consume=True
            )
            self.original.keep_only([stop])
            return out.tensor

    def decide(self, i: int, captured: Captured) -> Decision:
        """Statistics and selection: the criterion's decision for group i (the kept channels and
        their scales; for "local" the Gram layer statistics and gfs.select, for "loss" the whole
        network's loss from the consumer on)."""
        t0 = time.perf_counter()
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
            reduce=(lambda stats: self._exchange(i, captured, stats=stats)) if self.ranks is not None else None,
            out_scale=self.out_scales.get(g.consumer),
            centre=self.centre,
            **self.options,
        )
        exchanged = self.clock.total.get("exchange", 0.0)
        try:
            decision = self.crit.decide(ctx)
        except ValueError as exc:  # say which group (the message is the selection's or the statistics')
            raise ValueError(
                f"group {g.name!r} (consumer {g.consumer!r}), criterion {self.criterion!r}: {exc}"
            ) from exc
        spent = time.perf_counter() - t0
        parts = {k: v for k, v in decision.timings.items() if k in ("statistics", "select")}
        if "statistics" in parts:  # (data-parallel: the exchange inside is its own phase)
            parts["statistics"] -= self.clock.total.get("exchange", 0.0) - exchanged
            spent -= self.clock.total.get("exchange", 0.0) - exchanged
        for k, v in parts.items():
            self.clock.add(k, v)
        self.clock.add("select", spent - sum(parts.values()))  # the criterion's own time
        return decision

    def _imitated(self, g, layer):
        """The consumer's output error as the criterion imitates it: as it is (imitate="output",
        or no BatchNorm after the consumer), weighted per output channel ("normalized"), and
        with each output channel's mean over the positions removed ("recalibrated")."""
        c = self.out_scales.get(g.consumer)
        if c is None:
            return lambda t: t

        def imitated(t):
            t = t * _output_view(layer, t, c.to(device=t.device, dtype=t.dtype))
            if self.centre:  # over the positions: (B, H, W) of a Conv2d's output, the rows of a Linear's
                t = t - t.mean((0, 2, 3) if isinstance(layer, nn.Conv2d) else tuple(range(t.dim() - 1)), keepdim=True)
            return t

        return imitated

    def measure(self, i: int, captured: Captured, decision: Decision):
        """The report row of a new decision (fold_error still NaN, seconds 0), and the fold check
        of the folded consumer: ``(LayerReport, FoldCheck)``.

        The row's consumer-output losses, of the subnetwork and of the dense consumer on the
        captured input: for a criterion that built the Gram statistics ("local"), from them,
        ``(||y||^2 - 2 w.b + w'Gw) / M`` with w the kept channels' weights (scale / N, 0 for the
        dropped) or 1 / N (dense), exact up to the rounding of the statistics (their float32
        products: about 1e-5 of ||y||^2 / M; a loss that rounds below 0 is 0); for the others,
        by running the consumer on the captured input twice."""
        g = self.groups[i]
        layer = self.pruned.get_submodule(g.consumer)
        X, target = captured.X, captured.target
        error = self._imitated(g, layer)  # the losses are those of the output the criterion imitated
        with self.clock("losses"):
            if isinstance(decision.stats, GramStats):
                loss, dense_loss = _stats_losses(decision.stats, decision.keep, decision.scale, g.channels)
            elif self.ranks is None:
                sub = _subnetwork(X, layer, decision.keep, decision.scale, g)
                dense = consumer_output(X, layer)
                loss = float((error(target.double() - sub.double()) ** 2).mean())
                dense_loss = float((error(target.double() - dense.double()) ** 2).mean())
                del sub, dense
            else:  # data-parallel: the sums of every rank's squared errors, from the exchange
                sub = _subnetwork(X, layer, decision.keep, decision.scale, g)
                dense = consumer_output(X, layer)
                sums = [
                    float((error(target.double() - sub.double()) ** 2).sum()),
                    float((error(target.double() - dense.double()) ** 2).sum()),
                    target.numel(),
                ]
                del sub, dense
                per_rank = self._exchange(i, captured, sums=sums)
                total = [sum(s[c] for s in per_rank) for c in range(3)]
                loss, dense_loss = total[0] / max(1, total[2]), total[1] / max(1, total[2])
        decision.stats = None
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
        with self.clock("fold check"):
            check = FoldCheck(
                i,
                self.node_of[g.consumer],
                X,
                layer,
                decision.keep,
                decision.scale,
                g,
                self.batches,
                share=self._share(),
            )
        return row, check

    def _share(self):
        """(this rank's first sample, samples on all ranks) of a data-parallel run; else None."""
        return None if self.ranks is None else (self.ranks.offset, self.ranks.total)

    def _exchange(self, i: int, captured: Captured, *, stats=None, sums=None):
        """Data-parallel: group i's exchange (gfs.pruning.parallel): errors and fold checks
        agreed, the squeeze-excitation sums and the statistics (or the report's loss sums)
        summed over the ranks. Returns the statistics of all ranks' batches, or every rank's
        ``sums``."""
        g = self.groups[i]
        error = None
        if stats is not None and not isinstance(stats, GramStats):
            error = ValueError(
                f"data-parallel calibration sums the Gram layer statistics, but the consumer {g.consumer!r} needs "
                f"the materialised problem (its padding mode or grouping, or backend={self.options['backend']!r}, "
                f"which runs the streaming engine only); prune in one process, or pass backend='auto'"
            )
        with self.clock("exchange"):
            folds, per_rank = self.ranks.exchange(error, sums)
            self._fold_errors(folds)
            if captured.se_means:
                names = list(captured.se_means)
                flat = torch.cat([captured.se_means[n] for n in names])
                flat = self.ranks.sum(flat)
                at = 0
                for n in names:
                    width = captured.se_means[n].numel()
                    part = flat[at : at + width]
                    captured.se_means[n] = part[:-1] / part[-1]  # the sums over the count
                    at += width
            if stats is not None:
                return self.ranks.sum_stats(stats)
        return per_rank

    def _fold_errors(self, folds: dict) -> None:
        for index, value in folds.items():
            self.report[index].fold_error = value

    def replay(self, i: int):
        """A group finished before the run was interrupted: its stored decision, squeeze-excitation
        means and report row; and, when its fold was not checked yet (the last one finished),
        its fold check, from one capture of the consumer's input.
        Returns ``(decision, se_means, row, FoldCheck or None)``."""
        g, d = self.groups[i], self.done[i]
        row = LayerReport(**d["row"], kept=d["keep"], scale=d["scale"])
        check = None
        if math.isnan(row.fold_error):  # its fold is checked on the next pass
            consumer = self.node_of[g.consumer]
            got = self._run_pruned(
                self.runner.start_for(self.producers[i]),
                self.runner.pos[consumer],
                inputs=[consumer],
                checkpoint_at=self.producers[i:],
            )
            layer = self.pruned.get_submodule(g.consumer)
            with self.clock("fold check"):
                check = FoldCheck(i, consumer, got[("in", consumer)], layer, d["keep"], d["scale"], g, self.batches)
        return Decision(keep=d["keep"], scale=d["scale"], selection=d["selection"]), d["se_means"], row, check

    def fold(self, i: int, decision: Decision, se_means: dict) -> None:
        """Fold the decision into new, smaller modules of the pruned network; the runner's
        checkpoints after the producer are stale."""
        with self.clock("fold"):
            fold_into(self.pruned, self.groups[i], decision.keep, decision.scale, se_means)
            self.runner.invalidate_after(self.producers[i])
            self.runner.keep_only(self.producers[i + 1 :] or self.producers[i:])  # (the last: for its fold check)

    def check_fold(self) -> None:
        """Finish the pending fold check: when the last pass did not reach its consumer, one
        more pass of the pruned network from the latest checkpoint before it."""
        check = self.pending
        if check is None:
            return
        if not check.complete():
            p = self.runner.pos[check.node]
            self._run_pruned(self.runner.start_for(p), p + 1)
        if self.pending is not None:  # pragma: no cover - the pass above reaches the consumer
            raise RuntimeError("the fold check's pass did not reach its consumer")

    def _finish_check(self) -> None:
        with self.clock("fold check"):
            check, self.pending = self.pending, None
            if self.ranks is None:
                self.report[check.index].fold_error = check.error()
            else:  # this rank's part; the ranks' maxima at the next exchange
                self.ranks.folds.append([check.index, *check.parts()])

    def record(self, i: int, row: LayerReport, selection, se_means: dict, check) -> None:
        """Group i is folded: its row and selection join the report, and its fold check waits
        for the next pass (when ``check`` is given). A fold check still pending (its consumer
        after this group's: not reached by this group's pass) is finished first."""
        g = self.groups[i]
        self.report.append(row)
        if selection is not None:
            self.selections[g.name] = selection
        self._folded.append((se_means, selection))
        if check is not None:
            if self.pending is not None:  # pragma: no cover - consumers come in forward order
                self.check_fold()
            self.pending = check

    def save(self) -> None:
        """Write the checkpoint (when there is one): every group in the report and the seeded
        generator's state (see gfs.pruning.resume)."""
        if self.checkpoint is None:
            return
        if self.ranks is not None:  # data-parallel: rank 0 writes; a failure is raised at the next exchange
            if self.ranks.rank != 0:
                return
            try:
                self._write()
            except Exception as exc:
                self.ranks.error = exc
            return
        self._write()

    def _write(self) -> None:
        done = [
            dict(keep=r.kept, scale=r.scale, se_means=se_means, selection=selection, row=r.row())
            for r, (se_means, selection) in zip(self.report, self._folded, strict=True)
        ]
        resume.write(self.checkpoint, self.fingerprint, done, self.generator)


# ---- the fold check, losses from statistics, timings ---------------------------------------------

# The fold check runs on every output position when that costs at most FULL_CHECK_MACS
# multiply-adds (and always for a group with squeeze-excitation, whose fold is an approximation:
# its error is measured everywhere); otherwise on as many output positions as that many
# multiply-adds pay for, at least CHECK_POSITIONS (all output channels of each), half of them on
# the border of the output maps, where padding enters. The sample is drawn from its own
# generator, seeded by the group's index (the run's seeded generator is not touched).
FULL_CHECK_MACS = 1 << 26
CHECK_POSITIONS = 64
_CHECK_SEED = 0x9E3779B9


class FoldCheck:
    """Does the folded consumer give the selected subnetwork's output (the masked original: the
    consumer with input column j times ``scale_j``, 0 for the dropped channels, on the input of
    the network pruned before the group)?

    Built before the fold, from the consumer's input X and the decision: the expected output,
    ``consumer(X * s) + bias``, on every output position (the consumer run on X, as the runs of
    the consumer before did) when that is cheap or the group has squeeze-excitation, else on a
    sample of positions (float64 sums over the gathered input patches). Read on the next pass of
    the pruned network: :meth:`tap` takes the folded consumer's output, batch by batch, at the
    same positions; :meth:`error` is ``max |folded - expected| / max |expected|``.

    Why a sample still catches a wrong fold: a fold changes weights, never data, so a wrong one
    (a channel dropped or kept in the wrong place, a scale on the wrong column, a slice of the
    producer, a norm or a depthwise layer that does not match the consumer's) changes the output
    at every position where the affected channels are non-zero; the sample has all output
    channels of at least 64 positions spread over the images (about 1,800 of the 200,704 of a
    ResNet-50 layer1 3x3 consumer on 64 images), half of them on the border, where a padding or
    stride mistake would show first.
    """

    def __init__(self, index: int, node, X: torch.Tensor, layer: nn.Module, keep, scale, g, batches, share=None):
        self.index, self.node = index, node
        self.seconds = 0.0
        self.sizes = [x.shape[0] for x in batches]
        self.seen = 0
        self.err = torch.zeros((), dtype=torch.float64)
        conv = isinstance(layer, nn.Conv2d)
        N = g.channels
        Cout = layer.weight.shape[0]
        K = layer.weight[0, 0].numel() if conv else 1
        positions = _positions(X, layer)
        first = 0  # data-parallel (share = (this rank's first sample, all samples)): X is this rank's
        if share is not None:  # samples; the choice of positions is made for all ranks' samples
            per = math.prod(positions) // max(1, X.shape[0]) if X.dim() > 1 else 1
            first = share[0] * per
            positions = (share[1], *positions[1:]) if conv else (share[1] * per,)
        total = math.prod(positions)
        se = any(m.kind == "se" for m in g.members)
        full = (
            se
            or total * N * K * Cout <= FULL_CHECK_MACS
            or (conv and layer.padding_mode != "zeros")
            or (conv and not isinstance(layer.padding, tuple))
        )
        if full or total <= CHECK_POSITIONS:
            self.positions = None
            self.expected = _with_bias(_subnetwork(X, layer, keep, scale, g), layer)
            self.scale_of = self.expected.double().abs().max()
            return
        m = min(total, max(CHECK_POSITIONS, FULL_CHECK_MACS // (N * K * Cout)))
        gen = torch.Generator().manual_seed(_CHECK_SEED + index)
        self.positions = _sample_positions(positions if conv else None, total, m, gen)
        if share is not None:  # those on this rank's samples, numbered from its first
            here = math.prod(_positions(X, layer))
            mine = (self.positions >= first) & (self.positions < first + here)
            self.positions = self.positions[mine] - first
        s = torch.zeros(N, dtype=torch.float64)
        s[keep] = scale.double()
        self.expected = _expected_at(X, layer, s, self.positions)  # (m, Cout) float64
        self.scale_of = self.expected.abs().max() if self.expected.numel() else torch.zeros((), dtype=torch.float64)
        self.conv = conv
        # per batch: the sampled positions that fall in it, relative to the batch
        samples = X.shape[0] if share is None else share[1]
        per_sample = positions[1] * positions[2] if conv else (total // samples if X.dim() > 1 else 1)
        self.got: list = []  # per batch: the folded consumer's output at the sampled positions
        self.rows = []  # per batch: (rows of expected, where they are in the batch's output)
        lo = 0
        for n in self.sizes:
            sel = (self.positions >= lo * per_sample) & (self.positions < (lo + n) * per_sample)
            local = self.positions[sel] - lo * per_sample
            if conv:  # flat offsets in the (n, Cout, Ho, Wo) output: one gather of (positions, Cout)
                img, pixel = local // per_sample, local % per_sample
                local = (img * (Cout * per_sample) + pixel)[:, None] + torch.arange(Cout) * per_sample
            self.rows.append((sel.nonzero().flatten(), local.to(X.device)))
            lo += n

    def tap(self, b: int, out: torch.Tensor) -> None:
        """The folded consumer's output on batch b (run by the pruned network's pass)."""
        t0 = time.perf_counter()
        if self.positions is None:
            start = sum(self.sizes[:b])
            exp = self.expected[start : start + out.shape[0]]
            if out.numel():
                self.err = torch.maximum(self.err, (out.double() - exp.double()).abs().max().cpu())
        else:  # keep the sampled outputs (small); compared with the expected ones at the end
            local = self.rows[b][1]
            self.got.append(torch.take(out, local) if self.conv else out.reshape(-1, out.shape[-1])[local])
        self.seen += 1
        self.seconds += time.perf_counter() - t0

    def complete(self) -> bool:
        return self.seen >= len(self.sizes)

    def error(self) -> float:
        """max |folded - expected| / max |expected| over the positions checked."""
        self.parts()
        return float(self.err / self.scale_of.cpu().clamp_min(1e-30))

    def parts(self) -> tuple[float, float]:
        """(max |folded - expected|, max |expected|) over the positions checked (data-parallel:
        this rank's; their maxima over the ranks give the fold error)."""
        if self.positions is not None and self.got:
            got = torch.cat(self.got).cpu().double()  # (m, Cout), in the order of the positions
            if got.numel():
                self.err = torch.maximum(self.err, (got - self.expected).abs().max())
            self.got = []
        return float(self.err), float(self.scale_of.cpu())


def _positions(X, layer):
    """The consumer's output positions: (B, Ho, Wo) for a Conv2d, (rows,) for a Linear."""
    if isinstance(layer, nn.Linear):
        return (X.reshape(-1, X.shape[-1]).shape[0],)
    pads = layer._reversed_padding_repeated_twice
    Hp, Wp = X.shape[2] + pads[2] + pads[3], X.shape[3] + pads[0] + pads[1]
    kh, kw = layer.kernel_size
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    return X.shape[0], (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1


def _sample_positions(shape, total: int, m: int, gen) -> torch.Tensor:
    """m distinct flat output positions (sorted), drawn with ``gen``: for a conv output of
    ``shape`` (B, Ho, Wo) half of them on the border of the maps, the rest uniformly."""
    picks = []
    rest = m
    if shape is not None:
        B, Ho, Wo = shape
        hh, ww = torch.meshgrid(torch.arange(Ho), torch.arange(Wo), indexing="ij")
        frame = ((hh == 0) | (hh == Ho - 1) | (ww == 0) | (ww == Wo - 1)).flatten().nonzero().flatten()
        k = min(m // 2, B * frame.numel())
        pick = torch.randperm(B * frame.numel(), generator=gen)[:k]
        picks.append((pick // frame.numel()) * (Ho * Wo) + frame[pick % frame.numel()])
        rest = m - k
    picks.append(torch.randperm(total, generator=gen)[:rest])
    return torch.unique(torch.cat(picks))


def _expected_at(X, layer, s, positions) -> torch.Tensor:
    """(len(positions), Cout) float64: the consumer's output with input channel j times s[j], plus
    its bias, at the flat output positions (Conv2d with zero padding, or Linear)."""
    W = layer.weight.detach().double()
    W = W * s.to(W.device).view(1, -1, *([1] * (W.dim() - 2)))  # column j times s[j]
    if isinstance(layer, nn.Linear):
        rows = X.reshape(-1, X.shape[-1])[positions.to(X.device)].double()
        out = rows @ W.T
    else:
        _, Ho, Wo = _positions(X, layer)
        p = positions.to(X.device)
        b, rest = p // (Ho * Wo), p % (Ho * Wo)
        h, w = rest // Wo, rest % Wo
        (sh, sw), (dh, dw), (ph, pw) = layer.stride, layer.dilation, layer.padding
        H, Wd = X.shape[2], X.shape[3]
        kh, kw = layer.kernel_size
        C = X.shape[1]
        X = X.contiguous()
        ki = torch.arange(kh, device=X.device).repeat_interleave(kw)  # the kernel taps, row-major like W
        kj = torch.arange(kw, device=X.device).repeat(kh)
        hi, wi = (h * sh)[:, None] + ki * dh - ph, (w * sw)[:, None] + kj * dw - pw  # (m, taps)
        ok = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < Wd)
        at = (b * (C * H * Wd))[:, None] + hi.clamp(0, H - 1) * Wd + wi.clamp(0, Wd - 1)
        channel = torch.arange(C, device=X.device) * (H * Wd)
        patches = torch.take(X, at[:, None, :] + channel[None, :, None]).double()  # (m, C, taps): one gather
        patches = (patches * ok[:, None, :]).reshape(len(p), -1)  # zero padding; columns like W's
        out = patches @ W.reshape(W.shape[0], -1).T
    if layer.bias is not None:
        out += layer.bias.detach().double()
    return out.cpu()


def _sums_per_channel(t: torch.Tensor) -> torch.Tensor:
    """(C + 1,) float64: the sums of t (B, C, H, W) per channel, and the count of each sum."""
    count = torch.tensor([t.numel() // max(1, t.shape[1])], dtype=torch.float64, device=t.device)
    return torch.cat([t.double().sum(dim=(0, 2, 3)), count])


def _stats_losses(stats: GramStats, keep, scale, N: int):
    """(loss, dense loss) of the consumer output from its Gram statistics: (||y||^2 - 2 w.b + w'Gw)
    / M with w the weights of the kept channels (scale / N), and with w = 1 / N; at least 0."""
    G, b = stats.G, stats.b
    w = torch.zeros(N, dtype=torch.float64, device=G.device)
    w[keep.to(G.device)] = scale.to(device=G.device, dtype=torch.float64) / N
    loss = (stats.yy - 2.0 * float(w @ b) + float(w @ (G @ w))) / stats.count
    return max(0.0, loss), max(0.0, stats.dense_loss)


class _Gather:
    """A layer's output over the calibration batches, copied batch by batch (as each is computed,
    before a later node could change it in place) into one tensor."""

    def __init__(self, sizes):
        self.sizes, self.tensor, self.at = sizes, None, 0

    def add(self, b: int, value: torch.Tensor) -> None:
        if self.tensor is None:
            self.tensor = torch.empty((sum(self.sizes), *value.shape[1:]), dtype=value.dtype, device=value.device)
        self.tensor[self.at : self.at + value.shape[0]].copy_(value)
        self.at += value.shape[0]


class Clock:
    """Seconds per phase: ``total`` for the run, ``group`` for the current group.

    Phases: setup (copies of the model, tracing), original (the original network's forward
    passes), pruned (the pruned network's), inputs (concatenating and checking the captured
    activations), statistics (the layer statistics of "local"), select (gfs.select, or the
    criterion's decision), losses (the report's), fold, fold check, save (the checkpoint),
    finish (parameters and FLOPs)."""

    def __init__(self):
        self.total: dict = {}
        self.group: dict = {}

    def add(self, name: str, seconds: float) -> None:
        self.total[name] = self.total.get(name, 0.0) + seconds
        self.group[name] = self.group.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)


# Bytes of live activations the runners may keep in checkpoints (None: half the free memory of
# the calibration data's device, measured when the run starts).
ACTIVATION_BUDGET: int | None = None


def _free_memory(device) -> int:
    """Free memory of ``device`` in bytes (host: available physical memory; 8 GiB if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:  # pragma: no cover
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


# ---- helpers -----------------------------------------------------------------------------------


def _choose(scan, layers, model_name, what="layers") -> list:
    """The groups ``layers`` (names or glob patterns) selects; ``what`` names the argument in errors."""
    if layers is None:
        if not scan.groups:
            raise UnsupportedModelError(
                f"{model_name} has no channel group gfs.prune can prune; for each Conv2d / Linear:\n"
                f"{describe_rejected(scan)}\nTorch-Pruning's dependency graph handles these structures (grouped "
                f"convolutions, attention, concatenations, residual streams): prune through "
                f"gfs.integrations.torch_pruning.GFSImportance (pip install 'gfs[torch-pruning]')"
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
                    f"{what}: pattern {pat!r} matches no prunable layer of {model_name}; prunable: {_few(by_name)}"
                )
            chosen.update(hits)
        elif pat in by_name:
            chosen.add(pat)
        elif pat in scan.rejected:
            raise UnsupportedModelError(
                f"{what}: {pat!r} cannot be pruned: {scan.rejected[pat]}; Torch-Pruning's dependency graph "
                f"handles such structures: prune through gfs.integrations.torch_pruning.GFSImportance "
                f"(pip install 'gfs[torch-pruning]')"
            )
        else:
            raise ValueError(
                f"{what}: {model_name} has no prunable layer named {pat!r} (groups are named by the layer "
                f"whose output channels go); prunable: {_few(by_name)}"
            )
    return [g for g in scan.groups if g.name in chosen]


def _budgets(groups, keep, ratio) -> dict:
    """{group name: channels it keeps} from keep= (an int, or a mapping that must name exactly
    these groups) or ratio=; ValueError when a count is more than its group has."""
    if isinstance(keep, dict):
        names = [g.name for g in groups]
        missing, extra = [n for n in names if n not in keep], [n for n in keep if n not in names]
        if missing or extra:
            raise ValueError(
                "keep= must name exactly the groups pruned (those layers= selects): "
                + (f"no count for {_few(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"not among them: {_few(extra)}" if extra else "")
            )
    budgets = {}
    for g in groups:
        k = keep[g.name] if isinstance(keep, dict) else keep_count(g.channels, keep, ratio)
        if k > g.channels:
            asked = f"keep[{g.name!r}]={k}" if isinstance(keep, dict) else f"keep={keep}"
            raise ValueError(
                f"{asked} is more than the {g.channels} channels of group {g.name!r}; "
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
    if t.is_floating_point() and t.numel():  # one reduction, no temporary: NaN and +-Inf reach the ends
        lo, hi = torch.aminmax(t)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
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

        from .._progress import progress_bar

        console = Console(stderr=True)
        if not (console.is_terminal or console.is_jupyter):  # a log file: no bar (it would only add a blank line)
            return
        self.bar = progress_bar(r"\[gfs.prune] {task.description}", console=console, transient=True)
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


def _norm_scales(model: nn.Module, graph, consumers) -> dict:
    """{consumer: gamma / sqrt(running_var + eps)} for each consumer whose output goes to a
    BatchNorm and nowhere else (the BatchNorm of ``model``, the original network, in eval mode):
    an error of the consumer's output on channel o is that much of the BatchNorm's output
    error. Consumers without one are left out (their output is imitated as it is)."""
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in consumers or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module":
            continue
        bn = model.get_submodule(user.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
            continue
        scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double()
        found[node.target] = scale  # (float64; converted where it is used)
    return found


def run_all(run) -> PruneResult:
    """The whole prune on a planned run (a PruneRun, or any object with its start / step / finish,
    groups and bar): start, step on every group in forward order, finish."""
    run.start()
    with torch.no_grad(), run.bar:
        for i in range(len(run.groups)):
            run.step(i)
        return run.finish()
