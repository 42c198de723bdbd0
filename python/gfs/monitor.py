"""Early-ticket monitor: watch, during training, how well a small subnetwork found by greedy
forward selection imitates the dense layer, and say when that has stopped improving.

"How much pre-training is enough?" (Section 3): after some number of pre-training iterations,
pruning by GFS finds a good subnetwork, and more pre-training changes little. The monitor makes
that observable in a user's own training loop: every `every` steps it builds the selection
problem of one layer on a held calibration batch, runs `gfs.select`, records the pruned loss, and
reports a plateau once the loss has changed by less than `rtol` (relative) for `patience`
consecutive checks.

    monitor = EarlyTicketMonitor.for_linear(model, model.fc2, calib_x, k=32, every=100)
    for step, (x, y) in enumerate(loader, 1):
        ...; opt.step()
        check = monitor.step()
        if check is not None and check.plateau:
            print(f"ticket ready at step {check.step}: loss {check.loss:.4g}"); break
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def linear_features(layer: torch.nn.Linear, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection problem of a Linear layer's *input* units (the neurons of the layer before it).

    With inputs X (B, N) and weight W (out, N), candidate j's contribution to the output is
    X[:, j] W[:, j]^T (B x out). Scaled by N, the candidates average to the layer's output:
    u_j = N * X[:, j, None] * W[None, :, j] (flattened to B * out entries), y = X W^T (the bias
    left out: it is not pruned). So `gfs.select(U, y, k)` picks k input units of the layer, each
    with weight count / k, and the subnetwork is sum_j w_j u_j.

    For a two-layer network Linear(d, N) -> act -> Linear(N, c), call it with the second layer
    and the hidden activations: the candidates are the hidden neurons.
    """
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"layer must be a torch.nn.Linear, got {type(layer).__name__}")
    with torch.no_grad():
        X = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        W = layer.weight.detach().float()
        if X.shape[1] != W.shape[1]:
            raise ValueError(f"inputs have {X.shape[1]} features, the layer takes {W.shape[1]}")
        N = W.shape[1]
        U = (N * X.T[:, :, None] * W.T[:, None, :]).reshape(N, -1)
        y = (X @ W.T).reshape(-1)
    return U, y


def layer_features(
    model: torch.nn.Module, layer: torch.nn.Linear, calibration_inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model(calibration_inputs)` (eval mode, no grad), capture what enters `layer`, and
    return `linear_features(layer, captured)`. The model's train/eval mode is restored."""
    captured = []
    handle = layer.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach()))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(calibration_inputs)
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise RuntimeError("the layer was not called in model(calibration_inputs); is it part of the model's forward?")
    return linear_features(layer, captured[-1])


@dataclass
class TicketCheck:
    """One check of the monitor.

    step : the training step it was taken at.
    loss : the pruned loss ||y - z||^2 / M of the selection (or the custom metric).
    dense_loss, gap, distinct : from the Selection (the Frank-Wolfe gap; distinct units kept).
    change : |loss - previous loss| / |previous loss| (None at the first check).
    stable : change within tolerance (|loss - previous| <= rtol |previous| + atol).
    plateau : stable for the last `patience` checks in a row.
    """

    step: int
    loss: float
    dense_loss: float
    gap: float
    distinct: int
    change: float | None
    stable: bool
    plateau: bool
    selection: object = field(default=None, repr=False)


class EarlyTicketMonitor:
    """Every `every` steps, select a k-unit subnetwork of a layer and watch its loss plateau.

    Parameters
    ----------
    features_fn : callable(model) -> (U, y)
        The selection problem on a held calibration batch: U (N, M) candidates, y (M,) target.
        `EarlyTicketMonitor.for_linear` builds one for a Linear layer.
    k : int
        Selection steps (units kept, at most).
    model : torch.nn.Module, optional
        Passed to features_fn (run under torch.no_grad()).
    every : int
        Check every `every` calls of `step()` (steps every, 2 every, ...).
    patience : int
        Checks in a row that must be stable (R) before a plateau is reported.
    rtol, atol : float
        A check is stable when |loss - previous| <= rtol * |previous| + atol.
    metric : callable(selection, U, y) -> float, optional
        What to watch instead of the selection's loss (e.g. the pruned accuracy on the batch).
    on_plateau : callable(monitor, check), optional
        Called once, at the first plateau.
    select_kwargs : dict
        Passed to gfs.select (replacement, step, backend, ...).
    keep_selections : bool
        Keep each check's Selection in the history (the plateau's is always kept as `ticket`).

    Attributes
    ----------
    history : list of TicketCheck.   plateau_step : first step with a plateau, or None.
    ticket : the Selection at plateau_step.   steps : calls of step() so far.
    """

    def __init__(
        self,
        features_fn: Callable,
        k: int,
        *,
        model: torch.nn.Module | None = None,
        every: int = 100,
        patience: int = 3,
        rtol: float = 0.01,
        atol: float = 0.0,
        metric: Callable | None = None,
        on_plateau: Callable | None = None,
        select_kwargs: dict | None = None,
        keep_selections: bool = False,
    ):
        if every < 1 or patience < 1:
            raise ValueError(f"every and patience must be >= 1, got every={every}, patience={patience}")
        if rtol < 0 or atol < 0:
            raise ValueError("rtol and atol must be >= 0")
        self.features_fn, self.k, self.model = features_fn, int(k), model
        self.every, self.patience, self.rtol, self.atol = int(every), int(patience), float(rtol), float(atol)
        self.metric, self.on_plateau = metric, on_plateau
        self.select_kwargs = dict(select_kwargs or {})
        self.keep_selections = keep_selections
        self.history: list[TicketCheck] = []
        self.plateau_step: int | None = None
        self.ticket = None
        self.steps = 0

    @classmethod
    def for_linear(
        cls, model: torch.nn.Module, layer: torch.nn.Linear, calibration_inputs, k: int, **kwargs
    ) -> EarlyTicketMonitor:
        """A monitor of the input units of `layer` (e.g. the hidden neurons of a two-layer
        network: pass its output Linear), on `calibration_inputs` (see `layer_features`)."""
        return cls(lambda m: layer_features(m, layer, calibration_inputs), k, model=model, **kwargs)

    @property
    def plateaued(self) -> bool:
        """A plateau has been reported (at plateau_step)."""
        return self.plateau_step is not None

    def step(self, step: int | None = None) -> TicketCheck | None:
        """Call once per training step. Returns the check when one was due, else None.
        `step` overrides the internal counter (e.g. the global step of a resumed run)."""
        self.steps = self.steps + 1 if step is None else int(step)
        if self.steps % self.every:
            return None
        return self.check(self.steps)

    def check(self, step: int | None = None) -> TicketCheck:
        """Select now and record the check (also usable outside the every-`every` schedule)."""
        import gfs

        step = self.steps if step is None else int(step)
        with torch.no_grad():
            U, y = self.features_fn(self.model) if self.model is not None else self.features_fn()
        sel = gfs.select(U, y, self.k, **self.select_kwargs)
        value = float(self.metric(sel, U, y)) if self.metric is not None else sel.loss
        prev = self.history[-1].loss if self.history else None
        if prev is None:
            change, stable = None, False
        else:
            diff = abs(value - prev)
            change = diff / abs(prev) if prev != 0 else (0.0 if diff == 0 else math.inf)
            stable = diff <= self.rtol * abs(prev) + self.atol
        run = 0
        for c in reversed(self.history):
            if not c.stable:
                break
            run += 1
        plateau = stable and run + 1 >= self.patience
        check = TicketCheck(
            step=step,
            loss=value,
            dense_loss=sel.dense_loss,
            gap=float(sel.gaps[-1]),
            distinct=int(sel.support.numel()),
            change=change,
            stable=stable,
            plateau=plateau,
            selection=sel if (self.keep_selections or plateau) else None,
        )
        self.history.append(check)
        if plateau and self.plateau_step is None:
            self.plateau_step, self.ticket = step, sel
            if self.on_plateau is not None:
                self.on_plateau(self, check)
        return check

    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) of every check."""
        return [(c.step, c.loss) for c in self.history]

    def __repr__(self) -> str:
        last = f", last loss {self.history[-1].loss:.4g}" if self.history else ""
        where = f"plateau at step {self.plateau_step}" if self.plateaued else "no plateau yet"
        return (
            f"EarlyTicketMonitor(k={self.k}, every={self.every}, patience={self.patience}, rtol={self.rtol}: "
            f"{len(self.history)} checks, {where}{last})"
        )


__all__ = ["EarlyTicketMonitor", "TicketCheck", "linear_features", "layer_features"]
