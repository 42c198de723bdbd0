"""gfs.pruning.finetune: training leaves the caller's model alone (unless inplace), learns, is
reproducible, restores flags and random state; evaluate and time_forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from gfs.pruning.finetune import evaluate, finetune, time_forward

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()  # 4 classes
    return DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    ), DataLoader(TensorDataset(x, y), batch_size=64)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


def test_finetune_copies_learns_and_records_history():
    train, test = _data()
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    res = finetune(net, train, 6, lr=0.1, eval_loader=test, progress=False)
    assert res.model is not net and not res.model.training
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # untouched
    assert [h["epoch"] for h in res.history] == list(range(1, 7))
    assert res.history[0]["lr"] == pytest.approx(0.1) and res.history[-1]["lr"] < 0.02  # cosine decay
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[-1]["test_accuracy"] > 0.85 and evaluate(res.model, test)["accuracy"] > 0.85
    assert evaluate(net, test)["accuracy"] < res.history[-1]["test_accuracy"]


def test_finetune_is_reproducible_and_keeps_the_callers_random_state():
    train, _ = _data()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = finetune(_net(), _data()[0], 2, lr=0.05, seed=7, progress=False).model
    torch.set_rng_state(state)
    b = finetune(_net(), _data()[0], 2, lr=0.05, seed=7, progress=False).model
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(u, v), k
    net = _net()  # (seeds torch itself)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    finetune(net, train, 1, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_finetune_inplace_and_zero_epochs():
    train, _ = _data()
    net = _net()
    before = net[0].weight.clone()
    res = finetune(net, train, 1, lr=0.05, inplace=True, progress=False)
    assert res.model is net and not torch.equal(net[0].weight, before)
    same = finetune(net, train, 0, progress=False)
    assert same.history == [] and same.model is not net and torch.equal(same.model[0].weight, net[0].weight)


def test_finetune_warmup_and_progress_bar():
    from rich.console import Console

    train, _ = _data()
    console = Console(record=True, width=100)
    res = finetune(_net(), train, 2, lr=0.05, warmup=0.5, progress=True, description="tuning", console=console)
    assert res.history[0]["lr"] < 0.01  # warming up from ~0
    assert "tuning" in console.export_text()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=-1), "epochs must be >= 0"),
        (dict(epochs=1.5), "epochs must be an int"),
        (dict(epochs=1, lr=0), "lr must be > 0"),
        (dict(epochs=1, lr=float("nan")), "lr must be > 0"),
        (dict(epochs=1, warmup=1.0), "warmup and label_smoothing"),
        (dict(epochs=1, seed="a"), "seed must be an int"),
    ],
)
def test_finetune_validates_arguments(kwargs, match):
    train, _ = _data()
    with pytest.raises((ValueError, TypeError), match=match):
        finetune(_net(), train, **kwargs)


def test_finetune_rejects_bad_inputs_and_diverging_loss():
    train, _ = _data()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        finetune("net", train, 1)
    with pytest.raises(ValueError, match="train_loader is empty"):
        finetune(_net(), [], 1)
    with pytest.raises(TypeError, match=r"\(x, y\) pair"):
        finetune(_net(), [torch.randn(4, 6)], 1, progress=False)
    with pytest.raises(FloatingPointError, match="lower lr"):
        finetune(_net(), train, 1, lr=1e30, momentum=0.0, progress=False)


def test_evaluate_restores_flags_and_counts():
    _, test = _data()
    net = _net()
    net.train()
    net[1].eval()  # a mixed state must come back as it was
    flags = [m.training for m in net.modules()]
    before = net[1].running_mean.clone()
    ev = evaluate(net, test)
    assert [m.training for m in net.modules()] == flags and torch.equal(net[1].running_mean, before)
    assert ev["samples"] == 256 and 0 <= ev["accuracy"] <= 1 and ev["loss"] > 0


def test_time_forward():
    net = _net()
    net.train()
    t = time_forward(net, torch.randn(64, 6), repeats=3, warmup=1)
    assert 0 < t < 1 and net.training
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_forward(net, torch.randn(2, 6), repeats=0)
