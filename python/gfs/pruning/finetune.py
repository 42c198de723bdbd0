"""Training, fine-tuning, evaluating and timing (pruned) classifiers.

    from gfs.pruning.finetune import finetune, evaluate, time_forward
    tuned = finetune(result.model, train_loader, epochs=2, lr=0.01)   # a new, trained model
    tuned.model, tuned.history                                        # per-epoch loss / accuracy
    evaluate(tuned.model, test_loader)                                # {"accuracy", "loss", "samples"}

:func:`finetune` is plain supervised training (SGD with momentum, cosine learning-rate decay per
step, cross-entropy); it also pre-trains a network from scratch (a larger ``lr``). It works on a
deep copy of the model unless ``inplace=True``, so the caller's model (e.g. the dense network
a pruning run started from) is never changed behind its back.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["finetune", "evaluate", "time_forward", "FinetuneResult"]


@dataclass
class FinetuneResult:
    """The result of :func:`finetune`.

    Attributes
    ----------
    model : nn.Module
        The trained model (a new one unless ``inplace=True``), left in eval mode.
    history : list of dict
        One entry per epoch: ``epoch``, ``lr`` (at the epoch's start), ``train_loss`` and
        ``train_accuracy`` (running means over the epoch's batches, in training mode),
        ``seconds``; with an ``eval_loader`` also ``test_loss`` and ``test_accuracy``.
    seconds : float
        Wall time of the whole call.
    """

    model: nn.Module
    history: list = field(default_factory=list)
    seconds: float = 0.0


def _check_loader(loader, name):
    try:
        n = len(loader)
    except TypeError:
        n = None
    if n == 0:
        raise ValueError(f"{name} is empty: it yields no batches")
    if isinstance(loader, (torch.Tensor, str, bytes)) or not hasattr(loader, "__iter__"):
        raise TypeError(f"{name} must be a DataLoader or an iterable of (x, y) batches, got {type(loader).__name__}")


def _check_number(value, name, *, low=0.0, low_open=False, integer=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < low or (low_open and value == low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    return value


def _device_of(model):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _split(batch, where):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{where}: each batch must be an (x, y) pair of tensors, got {type(batch).__name__}")
    return batch[0], batch[1]


@contextmanager
def _modes(model, train: bool):
    """Put every module in train / eval mode, and restore each module's own flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def _progress(progress, console):
    """A rich Progress (or None): ``progress`` is a bool or an existing rich Progress."""
    if progress is False or progress is None:
        return None, False
    from .._progress import progress_bar

    if not isinstance(progress, bool):  # the caller's Progress: use it, don't start / stop it
        return progress, False
    return progress_bar("{task.description}", "{task.fields[info]}", remaining=True, console=console), True


def finetune(
    model: nn.Module,
    train_loader,
    epochs: int,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = True,
    warmup: float = 0.0,
    label_smoothing: float = 0.0,
    eval_loader=None,
    seed: int = 0,
    inplace: bool = False,
    progress=True,
    description: str = "fine-tuning",
    console=None,
) -> FinetuneResult:
    """Train ``model`` with SGD + momentum and a cosine learning-rate schedule.

    The learning rate rises linearly over the first ``warmup`` fraction of the steps (none by
    default), then follows a cosine from ``lr`` to 0 over the remaining steps, updated every
    batch. The loss is cross-entropy. BatchNorm statistics are updated (training mode), and the
    returned model is in eval mode.

    Parameters
    ----------
    model : nn.Module
        A classifier: ``model(x)`` gives (batch, classes) logits.
    train_loader : DataLoader or iterable of (x, y) batches
        Iterated once per epoch (a shuffling DataLoader gives a new order each epoch).
    epochs : int
        Passes over ``train_loader``; 0 returns (a copy of) the model untouched.
    lr : float
        Peak learning rate (e.g. 0.01 to fine-tune a pruned network, 0.05 to train from scratch).
    momentum, weight_decay, nesterov : SGD settings (weight decay on every parameter).
    warmup : float in [0, 1)
        Fraction of the steps spent warming the learning rate up from 0.
    label_smoothing : float in [0, 1)
    eval_loader : DataLoader, optional
        Evaluated (:func:`evaluate`) after every epoch; the numbers go into the history.
    seed : int
        Seeds torch's global generator for the call (dropout), inside a forked RNG state: the
        caller's random state is left as it was. The batch order is the loader's.
    inplace : bool
        Train ``model`` itself. Default False: a deep copy is trained and ``model`` is not
        modified.
    progress : bool or rich.progress.Progress
        A progress bar over the batches (True: a new one on ``console``).
    description : str
        Label of the progress bar.

    Returns
    -------
    FinetuneResult
        ``.model`` (trained, eval mode), ``.history`` (one dict per epoch), ``.seconds``.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_loader(train_loader, "train_loader")
    _check_number(epochs, "epochs", integer=True)
    _check_number(lr, "lr", low_open=True)
    _check_number(momentum, "momentum")
    _check_number(weight_decay, "weight_decay")
    _check_number(warmup, "warmup")
    _check_number(label_smoothing, "label_smoothing")
    if warmup >= 1 or label_smoothing >= 1:
        raise ValueError(f"warmup and label_smoothing must lie in [0, 1), got {warmup} and {label_smoothing}")
    if eval_loader is not None:
        _check_loader(eval_loader, "eval_loader")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    net = model if inplace else copy.deepcopy(model)
    history = []
    if epochs == 0:
        net.eval()
        return FinetuneResult(net, history, time.perf_counter() - t_start)
    device = _device_of(net)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=False everywhere)")
    opt = torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
    )
    try:
        per_epoch = len(train_loader)
    except TypeError:
        per_epoch = None
    total = per_epoch * epochs if per_epoch else None
    warm = int(round(warmup * total)) if total else 0

    def rate(step):
        if total is None:
            return 1.0
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    bar, own = _progress(progress, console)
    task = bar.add_task(description, total=total, info="") if bar is not None else None
    if own:
        bar.start()
    step = 0
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(int(seed))
            for epoch in range(epochs):
                t0 = time.perf_counter()
                start_lr = opt.param_groups[0]["lr"]
                loss_sum, correct, seen = 0.0, 0, 0
                net.train()
                for batch in train_loader:
                    x, y = _split(batch, "train_loader")
                    x, y = x.to(device), y.to(device)
                    opt.zero_grad(set_to_none=True)
                    logits = net(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"{description}: the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                            f"lower lr (now {opt.param_groups[0]['lr']:.3g})"
                        )
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    n = y.shape[0]
                    loss_sum += loss.item() * n
                    correct += int((logits.detach().argmax(1) == y).sum())
                    seen += n
                    if bar is not None:
                        bar.update(
                            task,
                            advance=1,
                            info=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.3f} acc {correct / seen:.1%}",
                        )
                entry = {
                    "epoch": epoch + 1,
                    "lr": start_lr,
                    "train_loss": loss_sum / max(seen, 1),
                    "train_accuracy": correct / max(seen, 1),
                }
                if eval_loader is not None:
                    ev = evaluate(net, eval_loader)
                    entry.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
                entry["seconds"] = time.perf_counter() - t0
                history.append(entry)
    finally:
        if own:
            bar.stop()
    net.eval()
    return FinetuneResult(net, history, time.perf_counter() - t_start)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, progress=False, description: str = "evaluating", console=None) -> dict:
    """Accuracy and mean cross-entropy of ``model`` on ``loader``, in eval mode.

    Every module's training flag is restored afterwards; nothing else about the model changes.

    Parameters
    ----------
    model : nn.Module
        A classifier giving (batch, classes) logits.
    loader : DataLoader or iterable of (x, y) batches
    progress : bool or rich.progress.Progress

    Returns
    -------
    dict
        ``accuracy`` (fraction in [0, 1]), ``loss`` (mean cross-entropy), ``samples``, ``seconds``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_loader(loader, "loader")
    t0 = time.perf_counter()
    device = _device_of(model)
    bar, own = _progress(progress, console)
    try:
        total = len(loader)
    except TypeError:
        total = None
    task = bar.add_task(description, total=total, info="") if bar is not None else None
    if own:
        bar.start()
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        with _modes(model, False):
            for batch in loader:
                x, y = _split(batch, "loader")
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                seen += y.shape[0]
                if bar is not None:
                    bar.update(task, advance=1, info=f"acc {correct / seen:.1%}")
    finally:
        if own:
            bar.stop()
    if seen == 0:
        raise ValueError("loader yielded no samples")
    return {"accuracy": correct / seen, "loss": loss_sum / seen, "samples": seen, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def time_forward(
    model: nn.Module, batch: torch.Tensor, *, repeats: int = 10, warmup: int = 2, min_seconds: float = 0.0
) -> float:
    """Wall time of one forward pass on ``batch`` in eval mode: the best of ``repeats`` runs
    (what a busy machine disturbs least), after ``warmup`` untimed runs. With ``min_seconds``,
    runs go on until that much time has been spent timing. Training flags are restored.

    Returns
    -------
    float
        Seconds per batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a tensor of inputs, got {type(batch).__name__}")
    _check_number(repeats, "repeats", low=1, integer=True)
    _check_number(warmup, "warmup", integer=True)
    batch = batch.to(_device_of(model))
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    best, spent, n = float("inf"), 0.0, 0
    with _modes(model, False):
        for _ in range(warmup):
            model(batch)
        while n < repeats or spent < min_seconds:
            sync()
            t0 = time.perf_counter()
            model(batch)
            sync()
            dt = time.perf_counter() - t0
            best, spent, n = min(best, dt), spent + dt, n + 1
    return best
