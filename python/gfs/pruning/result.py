"""What gfs.prune returns: a :class:`PruneResult` (the pruned model, totals, a table) holding one
:class:`LayerReport` per pruned channel group."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


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
    phases : dict
        Those seconds by phase (see :class:`PruneResult`'s ``timings``); not saved in a
        checkpoint (empty for a group replayed from one).
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
    phases: dict = field(default_factory=dict, repr=False, compare=False)

    _PLAIN = (
        "name",
        "producer",
        "consumer",
        "channels_before",
        "channels_after",
        "loss",
        "dense_loss",
        "gap",
        "fold_error",
        "sampled",
        "seconds",
        "network_loss",
        "network_dense_loss",
        "top1",
    )

    def row(self) -> dict:
        """The plain attributes (every one but ``kept`` and ``scale``)."""
        return {k: getattr(self, k) for k in self._PLAIN}

    def as_dict(self) -> dict:
        d = self.row()
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
    timings : dict
        Seconds by phase over the whole run: ``setup`` (copies of the model, tracing),
        ``original`` and ``pruned`` (the forward passes of the original network and of the
        network pruned so far), ``inputs`` (concatenating and checking the captured
        activations), ``statistics`` (the layer statistics of "local"), ``select`` (gfs.select,
        or the criterion's decision), ``losses`` (the report's), ``fold``, ``fold check``,
        ``save`` (the checkpoint), ``finish`` (parameters and FLOPs).
    memory : dict
        ``checkpoint_bytes``: the most storage the two networks' checkpoints (live activations
        kept between passes) held at once; ``budget_bytes``: the bound above which checkpoints
        are not kept (``checkpoints_skipped``: how many were not, their values recomputed);
        ``checkpoints_spoiled``: checkpoints changed in place by the model and recomputed.
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
    timings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)

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
        if self.timings:
            order = sorted(self.timings.items(), key=lambda kv: -kv[1])
            lines.append("seconds by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in order))
        return "\n".join(lines)

    def __repr__(self) -> str:
        pb, pa = self.params
        fb, fa = self.flops
        return (
            f"PruneResult(criterion={self.criterion!r}, groups={len(self.report)}, params={pb}->{pa}, "
            f"flops={fb}->{fa}, seconds={self.seconds:.3g})"
        )


def _clip(s, n):
    return s if len(s) <= n else "..." + s[-(n - 3) :]
