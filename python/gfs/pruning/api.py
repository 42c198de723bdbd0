"""gfs.prune: a model and calibration data in, a physically smaller model and a report out.

The arguments are checked here, at the edge; the run itself is a gfs.pruning.run.PruneRun, one
channel group at a time (capture, statistics and selection, fold, fold check, report), fresh
and resumed runs alike.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping

import torch.nn as nn

from .. import _validation as check
from ..distributed.comm import DEFAULT_TIMEOUT
from .criteria import CRITERIA
from .parallel import ranks_for
from .result import LayerReport, PruneResult
from .run import PruneRun, run_all

__all__ = ["prune", "PruneResult", "LayerReport"]


# ---- validation ------------------------------------------------------------------------------


def _check_budget(keep, ratio):
    if (keep is None) == (ratio is None):
        raise ValueError(
            "pass exactly one of keep= (channels kept per group) or ratio= (fraction kept, in (0, 1]); "
            f"got keep={keep!r}, ratio={ratio!r}"
        )
    if isinstance(keep, Mapping):
        if not keep:
            raise ValueError("keep= is an empty mapping: name at least one group (its producer layer) and its count")
        counts = {}
        for name, count in keep.items():
            if not isinstance(name, str):
                raise TypeError(f"keep= mapping keys must be group names (str), got {type(name).__name__} {name!r}")
            if isinstance(count, bool) or not isinstance(count, numbers.Integral):
                raise TypeError(f"keep[{name!r}] must be an int (channels kept), got {type(count).__name__} {count!r}")
            if int(count) < 1:
                raise ValueError(f"keep[{name!r}] must be >= 1 (channels kept), got {count}")
            counts[name] = int(count)
        return counts, None
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral):
            raise TypeError(
                f"keep must be an int (channels kept per group) or a mapping {{group: channels}}, "
                f"got {type(keep).__name__} {keep!r}"
            )
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1 (channels kept per group), got {keep}")
        return int(keep), None
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
        raise TypeError(f"ratio must be a number in (0, 1] (fraction of channels kept), got {ratio!r}")
    if not 0 < float(ratio) <= 1:
        raise ValueError(f"ratio must be in (0, 1] (fraction of channels kept per group), got {ratio}")
    return None, float(ratio)


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
    given = [
        n
        for n, v in (
            ("loss_candidates", loss_candidates),
            ("loss_batch", loss_batch),
            ("shortlist", shortlist),
            ("tolerance", tolerance),
        )
        if v is not None
    ]
    if criterion != "loss":
        if given:
            raise ValueError(f"{given[0]}= applies to criterion 'loss' (whole-network loss) only, not {criterion!r}")
        return {}
    if step != "uniform":
        raise ValueError(
            f"step={step!r} applies to criterion 'local'; criterion 'loss' adds channels with the "
            f"uniform step (each kept channel scaled by N / kept)"
        )
    opts = dict(
        loss_candidates=_positive_int(loss_candidates, "loss_candidates", "candidates scored per step"),
        loss_batch=_positive_int(loss_batch, "loss_batch", "candidates per forward pass") or _LOSS_BATCH,
        shortlist=_positive_int(shortlist, "shortlist", "candidates evaluated exactly per step"),
    )
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance):
            raise TypeError(
                f"tolerance must be a number in [0, 1) (relative top-1 drop allowed) or None, got {tolerance!r}"
            )
        if not 0 <= float(tolerance) < 1:
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
        raise ValueError(
            f"checkpoint: {path!r} is a folder; pass a file path, e.g. {os.path.join(path, 'prune.ckpt')!r}"
        )
    return path


# ---- the driver ------------------------------------------------------------------------------


def prune(
    model: nn.Module,
    calibration,
    *,
    keep=None,
    ratio=None,
    criterion="local",
    step="uniform",
    replacement=False,
    eps=None,
    layers=None,
    progress=True,
    seed=0,
    backend="auto",
    loss_candidates=None,
    loss_batch=None,
    shortlist=None,
    tolerance=None,
    checkpoint=None,
    group=None,
    timeout=DEFAULT_TIMEOUT,
    imitate="output",
) -> PruneResult:
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
    keep : int or mapping {group name: int}, optional
        Channels kept per group (exactly one of keep / ratio). A mapping gives each group its own
        count (e.g. from a global allocation): it prunes the groups it names (their producer
        layers' names, as in the report) and leaves the others whole; with ``layers=`` it must
        name exactly the groups ``layers`` selects.
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
        kept when pruning ends; see gfs.pruning.resume. Data-parallel: rank 0 writes it, every
        rank reads it (a file system all ranks see).
    group : torch.distributed ProcessGroup, optional
        Data-parallel calibration (gfs.pruning.parallel). When torch.distributed is initialised
        (``group`` None: the world) with more than one rank, every rank calls gfs.prune with the
        same model and settings and *its own share* of the calibration batches (e.g. the
        batches ``rank::world`` or a contiguous block of them, at least one each); each rank
        runs the forward passes and layer statistics of its batches, the statistics are summed
        with one all-reduce per group, the selection runs once on the same statistics on every
        rank, and every rank returns the same pruned model (checked at the end by a SHA-256 of
        each rank's model). The result is the single-process run's on all the ranks' batches
        (in rank order) up to the rounding of the statistics' sums: the same kept channels
        (unless two candidates' scores tie within that rounding), and then, with
        ``step="uniform"`` and no replacement, the same model bit for bit; with "line_search" or
        "refit" the scales agree to rounding. Criterion "loss" is not data-parallel (it runs
        the network per candidate): use it in one process. gloo for CPU models, NCCL for one
        GPU per rank. A group of one rank is the single-process run.
    imitate : {"output", "normalized", "recalibrated"}
        Criterion "local": what each group's selection imitates. "output" (the default, the
        papers' local imitation): the consumer's output. Where the consumer's output goes to a
        BatchNorm and nowhere else (ResNet's conv2 -> bn2, MobileNetV2's projection), the other
        two imitate that BatchNorm's output instead. "normalized": the error on output channel o
        weighted by the BatchNorm's ``gamma_o / sqrt(running_var_o + eps)`` (the BatchNorm's
        output error exactly). "recalibrated": that weighted error with each output channel's
        mean over the positions removed, since a BatchNorm recalibration after pruning
        (running statistics re-estimated on training images, as ``gfs bench quality`` does
        before fine-tuning) re-estimates the means (the variances it also re-estimates are not
        modelled). Other consumers imitate their output. The report's losses are those of the
        error imitated.
        "recalibrated" is not data-parallel (the means are over all the batches).
    timeout : float seconds or timedelta
        Data-parallel: bounds every collective (default 5 minutes; the group's own timeout is
        restored afterwards). A rank that raises, or fails to write the checkpoint, makes every
        rank raise (naming it) at the next exchange; a rank that dies or stops answering ends the
        others with a gfs.distributed.CollectiveError.

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
    ranks = ranks_for(group, timeout)
    kwargs = dict(
        keep=keep,
        ratio=ratio,
        criterion=criterion,
        step=step,
        replacement=replacement,
        eps=eps,
        layers=layers,
        progress=progress,
        seed=seed,
        backend=backend,
        loss_candidates=loss_candidates,
        loss_batch=loss_batch,
        shortlist=shortlist,
        tolerance=tolerance,
        checkpoint=checkpoint,
        imitate=imitate,
    )
    if ranks is None:
        return run_all(_new_run(model, calibration, **kwargs))
    with ranks.bounded():
        made, error = None, None
        options: dict = {}
        facts: dict = {"samples": 0}
        try:
            if criterion == "loss":
                raise ValueError(
                    "criterion 'loss' is not data-parallel (it runs the rest of the network for every candidate on "
                    "every batch): run it in one process, or use criterion 'local'"
                )
            made = _new_run(model, calibration, ranks=ranks, **kwargs)
            options, facts = made.rank_settings()
        except Exception as exc:  # reported on every rank by the first agreement
            error = exc
        table = ranks.setup(options, facts, error)
        assert made is not None  # (the agreement raised on every rank otherwise)
        made.join(table)
        return run_all(made)


def _new_run(
    model,
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
    loss_candidates,
    loss_batch,
    shortlist,
    tolerance,
    checkpoint,
    imitate,
    ranks=None,
) -> PruneRun:
    """The arguments checked, and the PruneRun (planned: traced, groups, runners)."""
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
    if imitate not in ("output", "normalized", "recalibrated"):
        raise ValueError(f"imitate must be 'output', 'normalized' or 'recalibrated', got {imitate!r}")
    if imitate != "output" and criterion != "local":
        raise ValueError(f"imitate= applies to criterion 'local' (what its selection imitates), not {criterion!r}")
    if imitate == "recalibrated" and ranks is not None:
        raise ValueError(
            "imitate='recalibrated' is not data-parallel (each output channel's mean is over all the batches): "
            "run it in one process, or use imitate='normalized'"
        )
    run = PruneRun(
        model,
        calibration,
        keep=keep,
        ratio=ratio,
        criterion=criterion,
        step=step,
        replacement=replacement,
        eps=eps,
        layers=layers,
        progress=progress,
        seed=seed,
        backend=backend,
        loss_options=loss_opts,
        checkpoint=checkpoint,
        imitate=imitate,
        **({} if ranks is None else {"ranks": ranks}),
    )
    return run
