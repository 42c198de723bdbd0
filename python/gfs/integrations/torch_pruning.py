"""gfs as the selection-and-compensation engine inside Torch-Pruning (``pip install 'gfs[torch-pruning]'``).

Torch-Pruning's DependencyGraph finds the coupled channels of any model (residual streams,
concatenations, grouped convolutions, attention); gfs chooses which of them to keep and folds the
selection's weights into the layers that read them::

    import torch_pruning as tp
    from gfs.integrations.torch_pruning import GFSImportance

    imp = GFSImportance()                                   # mode="sequential" (default) or "one-shot"
    pruner = tp.pruner.BasePruner(model, example_inputs, importance=imp, pruning_ratio=0.5)
    imp.calibrate(pruner, calibration_batches)              # or: with imp.calibrate(pruner): model(x) ...
    pruner.step()                                           # Torch-Pruning removes the channels gfs ranks last
    imp.compensate()                                        # the kept channels re-weighted in their consumers

or, in one call on a copy, :func:`prune`. Any pruning ratio, ``round_to``, ``iterative_steps``,
local or global pruning keeps exactly gfs's first picks of every group.

The problem of a group (docs/design.md sections 1-2). A Torch-Pruning group is a set of channels
removed together. Its *consumers* are the layers that read those channels and mix them
(nn.Linear, nn.Conv2d, grouped or dense, and the input projection of a self-attention
nn.MultiheadAttention; depthwise convolutions, norms and activations on the way are per-channel).
Candidate j is the group's channel j (with channel groups, e.g. a grouped convolution or
GroupNorm, where Torch-Pruning removes the same offset in every group: the offset j); u_j is N
times its share of every consumer's output, so the dense network is the uniform average; the
target is each consumer's output. With several consumers (a residual stream, a concatenation)
the objective is the sum over all of them: their Gram statistics (gfs.stats.linear_stats /
conv2d_stats, summed over all calibration batches, no N x M tensor) are summed. Inputs of a
consumer that belong to other groups are held fixed. gfs.select then orders all N candidates
(greedy forward selection without replacement, the ``step`` rule, ties to the lowest index).

Scores. The score of the t-th pick (t = 0, 1, ...) is the relative imitation error of the group's
subnetwork *before* that pick, ``(loss_{t-1} - dense) / (empty - dense)`` (loss_{-1} = empty = the
loss of the empty subnetwork, dense = the loss of all N channels; losses as gfs.select reports
them), made non-increasing (a running minimum) and then strictly decreasing (each score at least
1e-12 relative below the one before), so a score's ORDER is the greedy pick order: pruning the
lowest scores keeps exactly gfs's first picks, at any ratio. The values are comparable across
layers: they are scale-free fractions in [0, 1], the first pick of every group scores 1. Under
global pruning Torch-Pruning keeps every channel scoring above one threshold tau: each group
keeps the shortest prefix of its greedy order whose relative imitation error is at most tau
(equal relative error in every layer, tau set by the overall budget).

Modes. ``"sequential"`` (the default): groups are solved in forward order (by their first
consumer), each on the network pruned so far (a copy of the model, pruned and compensated group
by group through Torch-Pruning itself), its target the original network's consumer outputs:
later layers correct what earlier pruning changed, as gfs.prune does, and on the models gfs.prune
takes it keeps the same channels and gives the same pruned network. The budget of every group is
Torch-Pruning's own (its ratio, round_to, channel groups): one dry run of the pruner's step with
provisional scores (for global / isomorphic pruning, the one-shot scores; the sequential scores
returned are then those values re-assigned in the sequential pick order, so the global threshold
gives the same budgets). ``"one-shot"``: every group on the dense network, Torch-Pruning's usual
way: one forward pass per group, no copy; the budgets need not be known in advance. Sequential is
the default because pruning many layers at once compounds their errors, and solving each layer
on the already-pruned inputs is what keeps gfs's accuracy before fine-tuning; it costs about two
forward passes over the calibration data per group and one copy of the model.

Compensation. After ``pruner.step()``, :meth:`GFSImportance.compensate` reads from
Torch-Pruning's pruning history which channels went, and multiplies the kept input channels of
every consumer by ``N w_j`` (w the selection's weights at the budget that was kept; N / k for the
uniform step), in the consumer's weights (as gfs.pruning's fold does). The user never handles
channel indices.

Limits. A group none of whose layers reads its channels (the classifier's outputs) gets no score
(None: Torch-Pruning leaves it whole); so does a group read by a layer gfs does not model (Conv1d,
ConvTranspose, LSTM, cross-attention), with a warning naming it. Normalisations over channels
(LayerNorm, GroupNorm) between a producer and its consumers see fewer channels once pruned; the
sequential mode solves the next groups on that pruned network, but the local problem itself
treats the consumer's inputs as given. In nn.MultiheadAttention, Torch-Pruning removes the same
indices from the embedding, the q/k/v and the output projection; gfs scores and compensates the
input projection (q, k, v from the embedding) and leaves the value dimensions read by the output
projection uncompensated.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import _validation as check
from ..select import select
from ..selection import Selection
from ..stats import GramStats
from . import _layers

try:
    import torch_pruning as tp
except ImportError as exc:  # pragma: no cover - the optional extra
    raise ImportError(
        "gfs.integrations.torch_pruning needs Torch-Pruning: pip install 'gfs[torch-pruning]' "
        "(or pip install 'torch-pruning>=1.6,<1.7')"
    ) from exc

__all__ = ["GFSImportance", "Calibration", "GroupReport", "prune", "repair_model", "MODES"]

MODES = ("sequential", "one-shot")
_SPACING = 1e-12  # relative gap that makes tied scores strictly decreasing


# ---- what a group is, for gfs -----------------------------------------------------------------


@dataclass
class _Consumer:
    module: nn.Module
    name: str
    channels: int  # the module's input channels when the group was read
    positions: torch.Tensor  # its input channels in the group
    cands: torch.Tensor  # the candidate of each
    roots: torch.Tensor  # the root index of each


@dataclass
class _Group:
    key: tuple  # (root module name, out-channel pruning)
    name: str
    root: nn.Module
    fn: object  # the root's pruning function
    roots: list  # the group's root indices
    ch_groups: int
    size: int  # N, the number of candidates
    consumers: list
    cand_of_root: dict

    def root_indices(self, cands) -> list:
        """The root indices of candidates ``cands`` (every channel group's copy)."""
        cands = set(int(c) for c in cands)
        return sorted(r for i, r in enumerate(self.roots) if i % self.size in cands)

    def expand(self, cand_scores: torch.Tensor) -> torch.Tensor:
        """Scores of the group's channels (length len(roots)) from the candidates' scores."""
        idx = torch.arange(len(self.roots)) % self.size
        return cand_scores.double().cpu()[idx]


def _key(group, DG) -> tuple:
    dep = group[0].dep
    return (DG._module2name.get(dep.target.module, str(dep.target.module)), DG.is_out_channel_pruning_fn(dep.handler))


def _channel_groups(group, DG, pruner) -> int:
    if pruner is not None and pruner.DG is DG:
        return int(pruner._get_channel_groups(group))
    found = []
    for dep, _ in group:
        m = dep.target.module
        p = DG.get_pruner_of_module(m) if isinstance(m, nn.Module) else None
        if p is None or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels):
            continue
        n = p.get_out_channel_groups(m) if DG.is_out_channel_pruning_fn(dep.handler) else p.get_in_channel_groups(m)
        if n and n > 1:
            found.append(int(n))
    return max(found, default=1)


def _analyse(group, DG, ch_groups: int) -> _Group | str:
    """The group as a gfs problem, or the reason it cannot be one."""
    dep0, item0 = group[0].dep, group[0]
    roots = [int(r) for r in (item0.root_idxs if item0.root_idxs is not None else item0.idxs)]
    key = _key(group, DG)
    if not roots:
        return "no channels"
    if len(roots) % ch_groups:
        ch_groups = 1
    size = len(roots) // ch_groups
    cand_of_root = {r: i % size for i, r in enumerate(roots)}
    consumers: dict = {}
    bad = []
    for item in group:
        dep, m = item.dep, item.dep.target.module
        if not isinstance(m, nn.Module) or not DG.is_in_channel_pruning_fn(dep.handler):
            continue
        kind = _layers.kind(m)
        if kind is None:
            # a per-channel layer (norm, activation, depthwise conv, op) prunes its inputs and
            # outputs alike; a layer that mixes channels has distinct functions
            mixes = not DG.is_out_channel_pruning_fn(dep.handler) or isinstance(m, (nn.MultiheadAttention, nn.RNNBase))
            if mixes:
                bad.append(f"{DG._module2name.get(m, type(m).__name__)}: {_layers.why_not(m)}")
            continue
        name = DG._module2name.get(m, type(m).__name__)
        rts = item.root_idxs if item.root_idxs is not None else [None] * len(item.idxs)
        if any(r is None or int(r) not in cand_of_root for r in rts):
            bad.append(f"{name}: Torch-Pruning maps some of its inputs to no channel of the group")
            continue
        roots_of = [int(r) for r in rts]  # type: ignore[arg-type]
        pos = [int(p) for p in item.idxs]
        if id(m) in consumers:  # (Torch-Pruning merges the items of one layer; be safe)
            c = consumers[id(m)]
            c.positions = torch.cat([c.positions, torch.tensor(pos)])
            c.roots = torch.cat([c.roots, torch.tensor(roots_of)])
            c.cands = torch.tensor([cand_of_root[int(r)] for r in c.roots.tolist()])
            continue
        consumers[id(m)] = _Consumer(
            module=m,
            name=name,
            channels=_layers.in_channels(m),
            positions=torch.tensor(pos, dtype=torch.long),
            cands=torch.tensor([cand_of_root[r] for r in roots_of], dtype=torch.long),
            roots=torch.tensor(roots_of, dtype=torch.long),
        )
    if bad:
        return "read by a layer gfs does not model (" + "; ".join(bad[:3]) + ")"
    if not consumers:
        return "no layer reads its channels (e.g. the model's outputs)"
    return _Group(
        key=key,
        name=key[0],
        root=dep0.target.module,
        fn=dep0.handler,
        roots=roots,
        ch_groups=ch_groups,
        size=size,
        consumers=list(consumers.values()),
        cand_of_root=cand_of_root,
    )


# ---- running the model ---------------------------------------------------------------------------


class _Stop(Exception):
    """Raised in a hook once everything wanted from a forward pass is captured."""


class _SharedLayer(ValueError):
    """A consumer runs more than once in one forward pass."""


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


def _capture(model: nn.Module, batches, modules: list, *, outputs: bool):
    """Per batch, ``{id(module): (input, output or None)}`` from one forward pass of ``model`` in
    eval mode, stopped once the last of ``modules`` has run."""
    want = {id(m): m for m in modules}
    names = {id(m): n for n, m in model.named_modules()}
    got: dict = {}

    def hook(mod, a, kw, out):
        if id(mod) in got:
            raise _SharedLayer(
                f"layer {names.get(id(mod), type(mod).__name__)!r} runs more than once in one forward pass "
                f"(shared weights): gfs cannot take it as a consumer"
            )
        x = _layers.input_of(mod, a, kw)
        got[id(mod)] = (x.detach(), out.detach() if outputs and isinstance(out, torch.Tensor) else None)
        if len(got) == len(want):
            raise _Stop

    for args, kwargs in batches:
        got.clear()
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in want.values()]
        try:
            with torch.no_grad(), _evaluating(model):
                model(*args, **kwargs)
        except _Stop:
            pass
        except (_SharedLayer, _layers.NotSelfAttention):
            raise
        except Exception as exc:
            raise RuntimeError(
                f"the model failed on a calibration batch ({type(exc).__name__}: {exc}); in mode='sequential' "
                f"this is the network pruned so far: a model that keeps channel counts in attributes its forward "
                f"reads needs GFSImportance(repair=...) (what you run after pruner.step()), or use mode='one-shot'"
            ) from exc
        finally:
            for h in handles:
                h.remove()
        if len(got) < len(want):
            missing = [names.get(i, "?") for i in want if i not in got]
            raise ValueError(f"layers {missing} did not run on a calibration batch; gfs needs their inputs")
        yield dict(got)


def _forward_positions(model: nn.Module, batch) -> dict:
    """{id(module): the order of its first call} on one calibration batch."""
    pos: dict = {}

    def pre(mod, args):
        pos.setdefault(id(mod), len(pos))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    try:
        with torch.no_grad(), _evaluating(model):
            model(*batch[0], **batch[1])
    finally:
        for h in handles:
            h.remove()
    return pos


def _problem(g: _Group, source: nn.Module, batches, reference=None, ref_modules=None, rows=None) -> GramStats:
    """The group's local imitation problem as GramStats over its N candidates.

    Consumer inputs come from ``source``. Targets: without ``reference`` each consumer's output
    itself (the dense network, one-shot); with it, the output of the matching layer of
    ``reference`` (the original network, sequential) at the output channels the consumer still
    has (``rows``: {consumer name: the original indices of its remaining outputs}, where some were
    pruned), less the contribution of the consumer's inputs that belong to other groups (held
    fixed)."""
    accs: dict = {}
    full = {id(c.module): len(set(c.positions.tolist())) == c.channels for c in g.consumers}
    masks: dict = {}
    refs = _capture(reference, batches, ref_modules, outputs=True) if reference is not None else None
    for got in _capture(source, batches, [c.module for c in g.consumers], outputs=False):
        ref = next(refs) if refs is not None else None
        for i, c in enumerate(g.consumers):
            m = c.module
            x, _ = got[id(m)]
            if id(m) not in accs:
                accs[id(m)] = _layers.Accumulator(m, x.device)
                mask = torch.zeros(c.channels, dtype=torch.float64)
                mask[c.positions] = 1.0
                masks[id(m)] = mask
            mask = masks[id(m)]
            if ref is None:
                y = None if full[id(m)] else _layers.output(m, x, mask)
            else:
                rm = ref_modules[i]
                xr, outr = ref[id(rm)]
                t = _layers.target_of(rm, xr, outr)
                if rows is not None and c.name in rows:
                    t = t.index_select(_layers.channel_dim(m), rows[c.name].to(t.device))
                y = t if full[id(m)] else t - _layers.output(m, x, 1.0 - mask)
            accs[id(m)].add(x, y)
    N = g.size
    first = next(iter(accs.values()))
    device = first.gram.device
    G = torch.zeros(N, N, dtype=torch.float64, device=device)
    b = torch.zeros(N, dtype=torch.float64, device=device)
    yy, count, low = 0.0, 0, False
    for c in g.consumers:
        acc = accs[id(c.module)]
        Gi, bi, yyi, ni = acc.result()
        pos, cand = c.positions.to(device), c.cands.to(device)
        f = N / c.channels
        if N == c.channels and torch.equal(c.positions, torch.arange(N)) and torch.equal(c.cands, torch.arange(N)):
            G += Gi
            b += bi
        else:
            rows = torch.zeros(N, pos.numel(), dtype=torch.float64, device=device).index_add_(0, cand, Gi[pos][:, pos])
            G += torch.zeros(N, N, dtype=torch.float64, device=device).index_add_(1, cand, rows) * (f * f)
            b += torch.zeros(N, dtype=torch.float64, device=device).index_add_(0, cand, bi[pos]) * f
        yy += yyi
        count += ni
        low = low or acc.gram.precision == torch.float32
    stats = GramStats(N, device=device)
    stats.G.copy_((G + G.T) * 0.5)  # (exactly symmetric already where no candidates were merged)
    stats.b.copy_(b)
    stats.yy, stats.count = yy, count
    if low:
        stats.precision = torch.float32
    return stats


# ---- scores and weights ----------------------------------------------------------------------


def _relative(sel: Selection, stats: GramStats) -> torch.Tensor:
    """(N + 1,) relative imitation error after t = 0, 1, ..., N picks: (loss - dense) / (empty - dense)."""
    N = stats.n
    empty = stats.yy / stats.count
    dense = sel.dense_loss
    losses = torch.cat([torch.tensor([empty], dtype=torch.float64), sel.losses.double().cpu()])
    span = empty - dense
    if not math.isfinite(span) or span <= 1e-12 * max(abs(empty), 1e-300):
        return 1.0 - torch.arange(N + 1, dtype=torch.float64) / N  # nothing to imitate: the rank
    return (losses - dense).clamp_min(0.0) / span


def _strictly_decreasing(values: torch.Tensor) -> torch.Tensor:
    v = torch.cummin(values.double(), 0).values.tolist()
    for t in range(1, len(v)):
        v[t] = min(v[t], v[t - 1] - _SPACING * (1.0 + abs(v[t - 1])))
    return torch.tensor(v, dtype=torch.float64)


def _order_scores(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Candidate scores: the t-th pick gets values[t]."""
    scores = torch.empty(len(order), dtype=torch.float64)
    scores[order.cpu()] = values
    return scores


@dataclass
class _Record:
    group: _Group
    sel: Selection
    scores: torch.Tensor  # per candidate
    relative: torch.Tensor  # (N + 1,)
    history: int  # len(DG._pruning_history) when scored
    DG: object
    stats: GramStats | None = None  # kept for step="refit" (its prefix weights need a re-fit)
    used: tuple | None = None  # sequential: (k, weights) folded into the working copy

    def weights(self, k: int) -> torch.Tensor:
        """The selection's weights after its first k picks (what gfs.select returns for k)."""
        N = self.group.size
        order = self.sel.indices[:k].cpu()
        if self.used is not None and self.used[0] == k:
            return self.used[1]
        w = torch.zeros(N, dtype=torch.float64)
        if self.sel.step == "uniform":
            w[order] = 1.0 / k
        elif self.sel.step == "line_search":  # w <- (1 - gamma) w + gamma e_j, step 0: gamma = 1
            for j, gamma in zip(order.tolist(), self.sel.notes["gammas"][:k].tolist(), strict=True):
                w *= 1.0 - gamma
                w[j] += gamma
        else:
            assert self.stats is not None
            w = select(self.stats, k=k, replacement=False, step=self.sel.step).weights.double().cpu()
        return w


@dataclass
class GroupReport:
    """One compensated group: ``name`` (its root layer), ``consumers`` (the layers whose inputs
    were re-weighted), ``channels`` (before, after), ``relative_error`` (the subnetwork's
    (loss - dense) / (empty - dense) on the calibration data; 0 for the dense network, 1 for
    none), ``loss`` and ``dense_loss`` (per output entry, as gfs.select reports them)."""

    name: str
    consumers: list
    channels: tuple
    relative_error: float
    loss: float
    dense_loss: float


@dataclass
class _Probe:
    scores: str  # "order" (provisional) or "one-shot"
    groups: dict = field(default_factory=dict)
    oneshot: dict = field(default_factory=dict)


# ---- the importance --------------------------------------------------------------------------


class GFSImportance(tp.importance.Importance):
    """Greedy forward selection as a Torch-Pruning importance, with compensation.

    Parameters
    ----------
    mode : {"sequential", "one-shot"}
        "sequential" (default): each group solved on the network pruned so far (gfs.prune's
        way); "one-shot": all groups on the dense network (Torch-Pruning's usual way). See the
        module notes for why sequential is the default.
    step : {"uniform", "line_search", "refit"}
        The greedy step rule (gfs.select); the selection is without replacement.
    backend : str
        gfs.select's backend for the Gram engine ("auto").
    repair : callable, optional
        ``repair(model)`` after channels were removed from a model, for models that keep channel
        counts in attributes their forward reads (what you would run after ``pruner.step()``).
        The sequential mode runs the network pruned so far, so it calls it after every group;
        torchvision's VisionTransformer (``hidden_dim``) is repaired without it.

    Use :meth:`calibrate` before ``pruner.step()`` and :meth:`compensate` after it. Calling the
    object on a group returns one score per channel of the group's root (higher: kept longer),
    or None for a group gfs cannot model (Torch-Pruning then leaves it whole).

    Attributes
    ----------
    report : list of GroupReport
        The groups the last :meth:`compensate` re-weighted.
    skipped : dict
        {group root name: why it got no score}.

    Examples
    --------
    >>> import torch, torch_pruning as tp
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> imp = GFSImportance()
    >>> pruner = tp.pruner.BasePruner(net, torch.randn(1, 8), importance=imp, pruning_ratio=0.5)
    >>> _ = imp.calibrate(pruner, [torch.randn(32, 8)])
    >>> pruner.step()
    >>> [r.channels for r in imp.compensate()]
    [(16, 8)]
    >>> net[0].out_features, net[2].in_features
    (8, 8)
    """

    def __init__(self, mode: str = "sequential", *, step: str = "uniform", backend: str = "auto", repair=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check.check_options(step, None, False)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string (gfs.select's backend), got {type(backend).__name__}")
        if repair is not None and not callable(repair):
            raise TypeError(f"repair must be a function of the model (or None), got {type(repair).__name__}")
        self.mode, self.step, self.backend, self.repair = mode, step, backend, repair
        self._pruner = None
        self._model: nn.Module | None = None
        self._batches: list | None = None
        self._solved: tuple | None = None  # sequential: the step whose groups are solved
        self._records: dict = {}  # group key -> _Record, the groups scored since the last compensate
        self._probe: _Probe | None = None
        self.report: list = []
        self.skipped: dict = {}

    # ---- calibration -------------------------------------------------------------------------

    def calibrate(self, target, data=None) -> Calibration:
        """Give the calibration data: ``imp.calibrate(pruner, batches)`` records them now, and
        ``with imp.calibrate(pruner): model(x) ...`` records the inputs of every call of the
        model inside the block (the model runs in eval mode there; its flags are restored).

        Parameters
        ----------
        target : a Torch-Pruning pruner (BasePruner and subclasses), or nn.Module
            The pruner whose model will be pruned. A bare model is enough for mode="one-shot";
            the sequential mode needs the pruner (its budgets and dependency graph).
        data : Tensor, DataLoader or iterable of batches, optional
            Batches x or (x, y, ...) (x is passed to the model; y is ignored); kept in memory,
            every later step uses all of them. Floating-point inputs must be finite.

        Returns
        -------
        Calibration
            Its ``batches`` is the number recorded; it is a context manager.
        """
        pruner = target if hasattr(target, "DG") and hasattr(target, "model") else None
        model = pruner.model if pruner is not None else target
        if not isinstance(model, nn.Module):
            raise TypeError(f"calibrate takes a Torch-Pruning pruner or an nn.Module, got {type(target).__name__}")
        if self.mode == "sequential" and pruner is None:
            raise TypeError(
                "mode='sequential' needs the pruner, not the model: imp.calibrate(pruner, batches) (its budgets and "
                "dependency graph decide the network pruned so far); or use GFSImportance(mode='one-shot')"
            )
        self._pruner, self._model, self._batches = pruner, model, []
        self._solved, self._records = None, {}
        cal = Calibration(self, model)
        if data is not None:
            cal.feed(data)
            if not self._batches:
                raise ValueError("calibration data is empty: pass at least one batch")
        return cal

    # ---- scoring -----------------------------------------------------------------------------

    def __call__(self, group, **kwargs):
        DG = group._DG
        if self._probe is not None:
            return self._probe_call(group, DG)
        if not self._batches:
            raise RuntimeError(
                "GFSImportance has no calibration data: call imp.calibrate(pruner, batches) before pruner.step()"
            )
        pruner = self._pruner
        if self.mode == "one-shot" or pruner is None or pruner.DG is not DG:
            if self.mode == "sequential":
                warnings.warn(
                    "GFSImportance: a group outside the calibrated pruner's step is scored one-shot "
                    "(on the network as it is)",
                    stacklevel=2,
                )
            info = self._info(group, DG, pruner)
            if isinstance(info, str):
                return None
            rec = self._score_oneshot(info, DG)
            self._records[info.key] = rec
            return info.expand(rec.scores)
        step = (pruner.current_step, len(DG._pruning_history), id(DG))
        if self._solved != step:
            self._solved = step
            self._solve(pruner)
        rec = self._records.get(_key(group, DG))
        return None if rec is None else rec.group.expand(rec.scores)

    def _info(self, group, DG, pruner) -> _Group | str:
        info = _analyse(group, DG, _channel_groups(group, DG, pruner))
        if isinstance(info, str):
            name = _key(group, DG)[0]
            self.skipped[name] = info
            if info.startswith("read by"):
                warnings.warn(f"GFSImportance: group {name!r} left whole: {info}", stacklevel=3)
        return info

    def _score_oneshot(self, info: _Group, DG) -> _Record:
        stats = _problem(info, self._model if self._model is not None else DG.model, self._batches)
        return self._record(info, stats, DG)

    def _record(self, info: _Group, stats: GramStats, DG) -> _Record:
        sel = select(stats, k=info.size, replacement=False, step=self.step, backend=self.backend)
        rel = _relative(sel, stats)
        scores = _order_scores(sel.indices, _strictly_decreasing(rel[:-1]))
        return _Record(
            group=info,
            sel=sel,
            scores=scores,
            relative=rel,
            history=len(DG._pruning_history),
            DG=DG,
            stats=stats if self.step == "refit" else None,
        )

    # ---- the dry run that gives each group's budget --------------------------------------------

    def _probe_call(self, group, DG):
        probe = self._probe
        assert probe is not None
        info = self._info(group, DG, self._pruner)
        key = _key(group, DG)
        probe.groups[key] = info
        if isinstance(info, str):
            return None
        if probe.scores == "one-shot":
            rec = self._score_oneshot(info, DG)
            probe.oneshot[key] = _strictly_decreasing(rec.relative[:-1])
            return info.expand(rec.scores)
        return info.expand(torch.arange(info.size, 0, -1, dtype=torch.float64))

    def _dry_run(self, pruner) -> dict:
        """{group key: root indices the pruner removes} from its own step logic, run with
        provisional scores and nothing pruned."""
        scoped = any(len(scope) > 1 for _, scope in pruner._layer_to_scope.values())
        needs_values = bool(pruner.global_pruning or pruner.isomorphic or scoped)
        self._probe = _Probe("one-shot" if needs_values else "order")
        saved = {
            a: copy.copy(getattr(pruner, a))
            for a in ("num_heads", "out_channel_groups", "in_channel_groups", "_scope_initial_channels")
        }
        removed: dict = {}
        try:
            for g in pruner._prune():
                key = _key(g, pruner.DG)
                removed.setdefault(key, set()).update(int(i) for i in g[0].idxs)
        finally:
            for a, v in saved.items():
                setattr(pruner, a, v)
        return removed

    # ---- sequential ----------------------------------------------------------------------------

    def _solve(self, pruner) -> None:
        if pruner.prune_num_heads and pruner.head_pruning_ratio > 0:
            raise ValueError(
                "GFSImportance(mode='sequential') does not model whole-head removal (prune_num_heads with a "
                "head_pruning_ratio); use GFSImportance(mode='one-shot')"
            )
        DG = pruner.DG
        try:
            removed = self._dry_run(pruner)
            probe = self._probe
        finally:
            self._probe = None
        assert probe is not None and self._batches is not None
        infos = {k: v for k, v in probe.groups.items() if not isinstance(v, str)}
        positions = _forward_positions(pruner.model, self._batches[0])
        first = {k: min(positions.get(id(c.module), math.inf) for c in g.consumers) for k, g in infos.items()}
        order = sorted(infos, key=lambda k: (first[k], k[0]))
        work, wDG = _clone_with_graph(pruner.model, DG)
        wmods = dict(work.named_modules())
        rmods = dict(pruner.model.named_modules())
        rows: dict = {}  # consumer name -> the original indices of its outputs left in the copy
        for key in order:
            info = infos[key]
            wgroup = wDG.get_pruning_group(wmods[info.name], info.fn, list(info.roots))
            winfo = _analyse(wgroup, wDG, info.ch_groups)
            if isinstance(winfo, str):  # pragma: no cover - the same structure as the original's
                raise RuntimeError(f"group {info.name!r} on the pruned copy: {winfo}")
            refs = [rmods[c.name] for c in winfo.consumers]
            stats = _problem(winfo, work, self._batches, pruner.model, refs, rows)
            rec = self._record(winfo, stats, DG)
            rec.group = info  # positions and modules of the model the pruner prunes (for compensate)
            if key in probe.oneshot:  # global budgets: the one-shot values, in the sequential order
                rec.scores = _order_scores(rec.sel.indices, probe.oneshot[key])
            drop = removed.get(key, set())
            n_drop = len({info.cand_of_root[r] for r in drop if r in info.cand_of_root})
            k = info.size - n_drop
            if 0 < k < info.size:
                w = rec.weights(k)
                rec.used = (k, w)
                dropped = rec.sel.indices[k:].tolist()
                _prune_and_fold(wDG, wmods[info.name], winfo, dropped, w, rows)
                repair_model(work, self.repair)
            self._records[key] = rec

    # ---- compensation --------------------------------------------------------------------------

    def compensate(self) -> list:
        """Fold the selection's weights into the consumers of every group the last
        ``pruner.step()`` pruned: consumer input channel j (kept) is multiplied by N w_j, in its
        weights. Reads the pruner's history for what was removed; call once after each step.
        Then the model's attributes are repaired (:func:`repair_model` with ``repair``).

        Returns
        -------
        list of GroupReport
            One per re-weighted group (also in ``self.report``).
        """
        records = self._records
        if not records:
            raise RuntimeError("nothing to compensate: call imp.compensate() after pruner.step()")
        latest = max(r.history for r in records.values())
        stale = [k for k, r in records.items() if r.history != latest]
        if stale:
            warnings.warn(
                f"GFSImportance.compensate: {len(stale)} group(s) scored in an earlier step were never "
                f"compensated and are skipped (call compensate() after every step)",
                stacklevel=2,
            )
        records = {k: r for k, r in records.items() if r.history == latest}
        DG = next(iter(records.values())).DG
        removed: dict = {}
        for name, is_out, idxs in DG._pruning_history[latest:]:
            removed.setdefault((name, bool(is_out)), set()).update(int(i) for i in idxs)
        plans: dict = {}
        report = []
        for key, rec in records.items():
            g = rec.group
            drop = removed.get(key)
            if not drop:
                continue
            drop_c = {g.cand_of_root[r] for r in drop if r in g.cand_of_root}
            kept = [c for c in range(g.size) if c not in drop_c]
            k = len(kept)
            if k == 0:
                continue
            if set(rec.sel.indices[:k].tolist()) == set(kept):
                w = rec.weights(k)
                rel = float(rec.relative[k])
            else:
                warnings.warn(
                    f"GFSImportance.compensate: group {g.name!r} kept channels that are not gfs's first {k} picks; "
                    f"they are averaged uniformly (scale N / k)",
                    stacklevel=2,
                )
                w = torch.zeros(g.size, dtype=torch.float64)
                w[kept] = 1.0 / k
                rel = float("nan")
            for c in g.consumers:
                plan = plans.setdefault(id(c.module), (c.module, c.name, c.channels, set(), {}))
                for p, cand, root in zip(c.positions.tolist(), c.cands.tolist(), c.roots.tolist(), strict=True):
                    if root in drop:
                        plan[3].add(p)
                    else:
                        plan[4][p] = g.size * float(w[cand])
            dense = rec.sel.dense_loss
            loss = float(rec.sel.losses[k - 1])
            report.append(
                GroupReport(
                    name=g.name,
                    consumers=[c.name for c in g.consumers],
                    channels=(len(g.roots), len(g.roots) - len(drop)),
                    relative_error=rel,
                    loss=loss,
                    dense_loss=dense,
                )
            )
        for module, name, C, gone, scales in plans.values():
            survivors = [p for p in range(C) if p not in gone]
            now = _layers.in_channels(module)
            if len(survivors) != now:
                raise RuntimeError(
                    f"compensate: layer {name!r} has {now} input channels; gfs expected {len(survivors)} "
                    f"({C} before the step, {len(gone)} removed): was it pruned by another importance or by hand?"
                )
            new = {p: i for i, p in enumerate(survivors)}
            s = torch.ones(now, dtype=torch.float64)
            for p, v in scales.items():
                s[new[p]] = v
            _layers.scale_inputs(module, s)
        self.report = report
        self._records = {}
        repair_model(DG.model, self.repair)
        return report


def _prune_and_fold(DG, root: nn.Module, g: _Group, dropped_cands: list, w: torch.Tensor, rows: dict) -> None:
    """Remove candidates ``dropped_cands`` of group ``g`` from the working copy through its
    dependency graph, and scale the kept inputs of its consumers by N w. ``rows`` ({layer name:
    original indices of its remaining outputs}) follows the output channels removed from layers
    that are consumers (of other groups)."""
    drop = set(g.root_indices(dropped_cands))
    plans = []
    for c in g.consumers:
        gone = {p for p, r in zip(c.positions.tolist(), c.roots.tolist(), strict=True) if r in drop}
        scales = {
            p: g.size * float(w[cand])
            for p, cand, r in zip(c.positions.tolist(), c.cands.tolist(), c.roots.tolist(), strict=True)
            if r not in drop
        }
        plans.append((c.module, c.channels, gone, scales))
    group = DG.get_pruning_group(root, g.fn, sorted(drop))
    for item in group:
        m = item.dep.target.module
        if (
            not isinstance(m, nn.Module)
            or _layers.kind(m) is None
            or not DG.is_out_channel_pruning_fn(item.dep.handler)
        ):
            continue
        name = DG._module2name[m]
        out = _layers.weight(m).shape[0]
        idxs = [int(i) for i in item.idxs]
        if isinstance(m, nn.MultiheadAttention):  # the embedding dims go from q, k and v alike
            E = out // 3
            idxs = [i + j * E for j in range(3) for i in idxs]
        alive = rows.get(name, torch.arange(out))
        keep = torch.ones(len(alive), dtype=torch.bool)
        keep[idxs] = False
        rows[name] = alive[keep]
    group.prune(record_history=False)
    for module, C, gone, scales in plans:
        survivors = [p for p in range(C) if p not in gone]
        new = {p: i for i, p in enumerate(survivors)}
        s = torch.ones(len(survivors), dtype=torch.float64)
        for p, v in scales.items():
            s[new[p]] = v
        _layers.scale_inputs(module, s)


def repair_model(model: nn.Module, extra=None) -> nn.Module:
    """Make a pruned model's attributes agree with its layers: torchvision's VisionTransformer
    reads ``hidden_dim`` in forward (set to its patch projection's output channels); then
    ``extra(model)`` when given. Returns the model."""
    for m in model.modules():
        proj = getattr(m, "conv_proj", None)
        if hasattr(m, "hidden_dim") and isinstance(proj, nn.Conv2d):
            setattr(m, "hidden_dim", proj.out_channels)  # noqa: B010
    if extra is not None:
        extra(model)
    return model


def _clone_with_graph(model: nn.Module, DG):
    """A deep copy of the model and a copy of its dependency graph pointing at the copy's modules
    (the pruning functions, the autograd nodes it was traced from and the ops module are shared;
    the graph is rebuilt node by node: a recursive deep copy of a large graph overflows the stack)."""
    memo: dict = {id(DG.ops): DG.ops}
    for p in list(DG.REGISTERED_PRUNERS.values()) + list(DG.CUSTOMIZED_PRUNERS.values()):
        if p is not None:
            memo[id(p)] = p
    for node in DG.module2node.values():  # autograd nodes (of the graph and of its ops): not copyable
        for obj in (node.grad_fn, getattr(node.module, "_grad_fn", None), getattr(node.module, "grad_fn", None)):
            if obj is not None and not isinstance(obj, torch.Tensor):
                memo[id(obj)] = obj
    work = copy.deepcopy(model, memo)
    mapped = lambda obj: memo.get(id(obj), obj)  # noqa: E731
    nodes: dict = {}
    for node in DG.module2node.values():
        twin = object.__new__(type(node))
        twin.__dict__.update(node.__dict__)
        twin.module = copy.deepcopy(node.module, memo)  # the copy's module, or a copy of a Torch-Pruning op
        nodes[id(node)] = twin
    for node in DG.module2node.values():
        twin = nodes[id(node)]
        twin.inputs = [nodes[id(n)] for n in node.inputs]
        twin.outputs = [nodes[id(n)] for n in node.outputs]
        twin.dependencies = []
        for dep in node.dependencies:
            d = type(dep)(dep.trigger, dep.handler, nodes[id(dep.source)], nodes[id(dep.target)])
            d.index_mapping = copy.deepcopy(dep.index_mapping, memo)
            twin.dependencies.append(d)
    graph = object.__new__(type(DG))
    graph.__dict__.update(DG.__dict__)
    graph.model = work
    graph.module2node = {nodes[id(n)].module: nodes[id(n)] for n in DG.module2node.values()}
    graph._module2name = {mapped(m): name for m, name in DG._module2name.items()}
    graph._param_to_name = {mapped(p): name for p, name in DG._param_to_name.items()}
    graph.unwrapped_parameters = [type(u)(mapped(u[0]), u[1]) for u in DG.unwrapped_parameters]
    graph.ignored_params = [mapped(p) for p in DG.ignored_params]
    graph.IGNORED_LAYERS_IN_TRACING = [mapped(m) for m in DG.IGNORED_LAYERS_IN_TRACING]
    graph.CUSTOMIZED_PRUNERS = {mapped(k): v for k, v in DG.CUSTOMIZED_PRUNERS.items()}
    graph._pruning_history = []
    return work, graph


# ---- calibration -------------------------------------------------------------------------------


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_detached(o) for o in obj)
    if isinstance(obj, list):
        return [_detached(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _check_finite(obj, what: str) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            raise ValueError(f"{what} contains NaN or Inf; remove or impute those samples before pruning")
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _check_finite(o, what)
    elif isinstance(obj, dict):
        for o in obj.values():
            _check_finite(o, what)


class Calibration:
    """Records calibration batches for a :class:`GFSImportance` (made by its ``calibrate``).

    As a context manager it records the inputs of every call of the model inside the block (the
    model in eval mode there; the training flags are restored on exit); :meth:`feed` passes
    batches itself. ``batches``: how many are recorded.
    """

    def __init__(self, importance: GFSImportance, model: nn.Module):
        self._imp, self._model = importance, model
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._evaluating: contextlib.AbstractContextManager | None = None

    @property
    def batches(self) -> int:
        return len(self._imp._batches or [])

    def _add(self, args: tuple, kwargs: dict) -> None:
        if self._imp._batches is None:
            self._imp._batches = []
        n = len(self._imp._batches)
        _check_finite((args, kwargs), f"calibration batch {n}")
        self._imp._batches.append((_detached(tuple(args)), _detached(dict(kwargs))))

    def feed(self, data) -> Calibration:
        """Record ``data``: a tensor (one batch) or an iterable of batches, each x or (x, y, ...)."""
        device = next((t.device for t in list(self._model.parameters()) + list(self._model.buffers())), None)
        if isinstance(data, torch.Tensor):
            data = [data]
        elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise TypeError(
                f"calibration data must be a tensor, a DataLoader or an iterable of batches, got {type(data).__name__}"
            )
        for i, b in enumerate(data):
            x = b[0] if isinstance(b, (tuple, list)) and len(b) > 0 else b
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"calibration batch {i} is a {type(b).__name__}; pass tensors x or (x, y) tuples")
            if x.dim() == 0 or x.shape[0] == 0:
                raise ValueError(f"calibration batch {i} has shape {tuple(x.shape)}; it needs at least one sample")
            self._add((x.to(device) if device is not None else x,), {})
        return self

    def _hook(self, module, args, kwargs):
        self._add(args, kwargs)

    def __enter__(self) -> Calibration:
        self._evaluating = _evaluating(self._model)
        self._evaluating.__enter__()
        self._handle = self._model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._evaluating is not None:
            self._evaluating.__exit__(*exc)
            self._evaluating = None


# ---- one call ---------------------------------------------------------------------------------


def prune(
    model: nn.Module,
    calibration,
    *,
    pruning_ratio: float = 0.5,
    example_inputs=None,
    mode: str = "sequential",
    step: str = "uniform",
    backend: str = "auto",
    repair=None,
    inplace: bool = False,
    pruner: type | None = None,
    **pruner_options,
) -> nn.Module:
    """Prune ``model`` through Torch-Pruning with gfs scores and compensation, in one call.

    Parameters
    ----------
    model : nn.Module
        Not modified unless ``inplace=True`` (a deep copy is pruned).
    calibration : Tensor, DataLoader or iterable of batches x or (x, y, ...)
    pruning_ratio : float
        Torch-Pruning's: the fraction of each group's channels REMOVED (gfs.prune's ``ratio``
        is the fraction kept).
    example_inputs : Tensor, optional
        For Torch-Pruning's tracing; default: the first sample of the first calibration batch.
    mode, step, backend, repair
        :class:`GFSImportance`'s (``repair`` also runs on the result).
    pruner : Torch-Pruning pruner class, optional
        Default ``tp.pruner.BasePruner``.
    **pruner_options
        Passed to the pruner (``ignored_layers``, ``global_pruning``, ``round_to``,
        ``pruning_ratio_dict``, ...); layers named in them are mapped to the copy.

    Returns
    -------
    nn.Module
        The pruned model (the copy), its modules' training flags as the input's.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
    ...                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    >>> small = prune(net, torch.randn(16, 3, 12, 12), pruning_ratio=0.5)
    >>> small[0].out_channels, small[3].out_channels, net[0].out_channels
    (8, 4, 16)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(pruning_ratio, bool) or not isinstance(pruning_ratio, numbers.Real) or not 0 <= pruning_ratio < 1:
        raise ValueError(
            f"pruning_ratio must be a number in [0, 1) (the fraction of channels removed), got {pruning_ratio!r}"
        )
    flags = {n: m.training for n, m in model.named_modules()}
    if inplace:
        target, options = model, dict(pruner_options)
    else:
        target, options = copy.deepcopy((model, dict(pruner_options)))
    imp = GFSImportance(mode, step=step, backend=backend, repair=repair)
    recorder = Calibration(imp, target)
    imp._batches = []
    recorder.feed(calibration)
    if not imp._batches:
        raise ValueError("calibration is empty: pass at least one batch of inputs")
    if example_inputs is None:
        example_inputs = imp._batches[0][0][0][:1]
    cls = pruner or tp.pruner.BasePruner
    with torch.enable_grad():
        p = cls(target, example_inputs, importance=imp, pruning_ratio=float(pruning_ratio), **options)
    batches = imp._batches
    imp.calibrate(p if mode == "sequential" else target)
    imp._batches = batches
    p.step()
    imp.compensate()
    repair_model(target, imp.repair)
    for n, m in target.named_modules():
        m.training = flags.get(n, model.training)
    return target
