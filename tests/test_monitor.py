"""gfs.monitor.EarlyTicketMonitor: plateau detection where the plateau is known."""

import pytest
import torch

from gfs.monitor import EarlyTicketMonitor, layer_features, linear_features

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_features_average_to_the_layer_output():
    layer = torch.nn.Linear(7, 3)
    x = torch.randn(5, 7)
    U, y = linear_features(layer, x)
    assert U.shape == (7, 5 * 3) and y.shape == (15,)
    with torch.no_grad():
        assert torch.allclose(U.mean(0), (layer(x) - layer.bias).reshape(-1), atol=1e-5)
    assert torch.allclose(y, U.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        linear_features(layer, torch.randn(5, 6))


def test_controlled_plateau_is_found_exactly():
    """The candidates are c(t) U0 and the target c(t) y0: greedy selection is scale-invariant, so
    the pruned loss is c(t)^2 L0. c falls linearly until step T0 and is constant after, so the
    loss plateaus at T0 and the monitor must say so at T0 + patience * every, not before."""
    g = torch.Generator().manual_seed(0)
    U0, y0 = torch.randn(20, 50, generator=g), torch.randn(50, generator=g)
    T0, every, patience = 100, 10, 3
    clock = {"t": 0}

    def features():
        c = 2.0 - min(clock["t"], T0) / T0
        return c * U0, c * y0

    seen = []
    mon = EarlyTicketMonitor(
        features,
        k=5,
        every=every,
        patience=patience,
        rtol=1e-4,
        on_plateau=lambda m, chk: seen.append(chk.step),
        select_kwargs={"backend": "torch"},
    )
    for t in range(1, 200):
        clock["t"] = t
        chk = mon.step()
        assert (chk is None) == (t % every != 0)
        if t < T0 + patience * every:
            assert not mon.plateaued
    assert mon.plateau_step == T0 + patience * every and seen == [T0 + patience * every]
    assert all(not c.stable for c in mon.history if c.step <= T0)
    assert mon.ticket is not None and mon.ticket.k == 5
    losses = dict(mon.losses())
    assert abs(losses[150] - losses[100]) <= 1e-6 * losses[100] and losses[50] > 2 * losses[100]
    assert "plateau at step 130" in repr(mon)


def test_training_run_frozen_at_known_step():
    """A real two-layer training loop whose learning rate drops to 0 at step T0: the monitor of its
    hidden layer reports the plateau exactly `patience` checks after T0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    X = torch.randn(256, 8)
    Y = torch.sin(X[:, :1] * 2) + X[:, 1:2] ** 2
    calib = X[:64]
    T0, every, patience = 60, 10, 2
    mon = EarlyTicketMonitor.for_linear(
        model, model[2], calib, k=8, every=every, patience=patience, rtol=1e-9, select_kwargs={"backend": "torch"}
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(1, 121):
        if step == T0 + 1:
            for group in opt.param_groups:
                group["lr"] = 0.0
        idx = torch.randint(0, 256, (32,))
        loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step()
        assert model.training  # the monitor's eval pass restores the mode
    assert mon.plateau_step == T0 + patience * every
    assert [c.stable for c in mon.history][: T0 // every] == [False] * (T0 // every)
    assert mon.history[-1].distinct <= 8 and mon.history[-1].dense_loss >= 0


def test_custom_metric_and_layer_features():
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    x = torch.randn(10, 4)
    U, y = layer_features(model, model[2], x)
    assert U.shape == (16, 20)
    mon = EarlyTicketMonitor(
        lambda m: layer_features(m, m[2], x),
        k=4,
        model=model,
        every=1,
        patience=1,
        metric=lambda sel, U, y: float(sel.support.numel()),
        select_kwargs={"backend": "torch"},
    )
    first, second = mon.step(), mon.step()
    assert first.loss == second.loss <= 4 and second.plateau and mon.plateau_step == 2
    with pytest.raises(ValueError):
        EarlyTicketMonitor(lambda: None, k=1, every=0)
