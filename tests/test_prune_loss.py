"""criterion "loss": greedy forward selection on the whole network's calibration loss.

Checked against brute force: the network with the consumer's input channels scaled (a masked copy
of the original, built independently of gfs.pruning.loss) run on the calibration data.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gfs.pruning import loss as loss_module
from gfs.pruning import prune
from test_prune import build, close, eval_copy, masked, outputs_at, snapshot

tv = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")


def labelled(name, seed=1):
    model, x = build(name)
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    return model, x, y


def scaled_net(model, consumer, s):
    """A copy of the original with consumer input column j times s[j]."""
    net = eval_copy(model)
    layer = net.get_submodule(consumer)
    with torch.no_grad():
        shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
        layer.weight.copy_((layer.weight.double() * s.view(shape)).to(layer.weight.dtype))
    return net


def brute_loss(model, consumer, s, x, y=None):
    with torch.no_grad():
        out = scaled_net(model, consumer, s)(x)
        if y is not None:
            return float(F.cross_entropy(out, y))
        ref = eval_copy(model)(x)
        return float(((out.double() - ref.double()) ** 2).mean())


def brute_pick(model, consumer, N, chosen, x, y=None, among=None):
    """(j, loss): the candidate whose addition to ``chosen`` gives the lowest network loss."""
    best = None
    for j in among if among is not None else range(N):
        if j in chosen:
            continue
        s = torch.zeros(N, dtype=torch.float64)
        s[list(chosen) + [j]] = N / (len(chosen) + 1)
        lo = brute_loss(model, consumer, s, x, y)
        if best is None or lo < best[1]:
            best = (j, lo)
    return best


def test_prunes_and_folds_exactly_and_leaves_the_input_alone():
    model, x, y = labelled("cnn")
    model.train()
    before = snapshot(model)
    result = prune(model, [(x, y)], keep=3, criterion="loss", shortlist=5, progress=False)
    state, flags, ids = before
    after = snapshot(model)
    assert all(torch.equal(state[k], after[0][k]) for k in state) and flags == after[1] and ids == after[2]
    assert all(p.grad is None for p in model.parameters())  # the shortlist's gradients reach the scales only
    assert [r.channels_after for r in result.report] == [3, 3, 3]
    for r in result.report:
        assert torch.allclose(r.scale, torch.full((3,), r.channels_before / 3, dtype=torch.float64))
        assert r.gap is None and r.network_loss is not None and r.top1 is not None
        sel = result.selections[r.name]
        assert sel.engine == "network" and sel.support.tolist() == r.kept.tolist()
    consumers = [r.consumer for r in result.report]
    y_mask, _ = outputs_at(masked(model, result), x, consumers)
    y_pruned, _ = outputs_at(eval_copy(result.model), x, consumers)
    assert close(y_pruned, y_mask)
    assert max(r.fold_error for r in result.report) < 1e-4
    # the last group's network loss is the pruned model's cross-entropy
    with torch.no_grad():
        assert abs(result.report[-1].network_loss - float(F.cross_entropy(eval_copy(result.model)(x), y))) < 1e-4


@pytest.mark.parametrize("labels", [True, False])
def test_first_picks_are_the_lowest_whole_network_loss_cnn(labels):
    model, x, y = labelled("cnn")
    cal = [(x, y)] if labels else x
    result = prune(model, cal, keep=2, criterion="loss", layers="0", progress=False)
    r, sel = result.report[0], result.selections["0"]
    N = r.channels_before
    j0, l0 = brute_pick(model, "4", N, [], x, y if labels else None)
    j1, l1 = brute_pick(model, "4", N, [j0], x, y if labels else None)
    assert sel.indices.tolist() == [j0, j1]
    assert sel.losses.tolist() == pytest.approx([l0, l1], rel=1e-5, abs=1e-9)
    assert sel.notes["kind"] == ("cross_entropy" if labels else "mse")
    assert sel.dense_loss == pytest.approx(
        brute_loss(model, "4", torch.ones(N, dtype=torch.float64), x, y if labels else None), rel=1e-5, abs=1e-9
    )


def test_first_pick_resnet18_stacks_the_skip_tensor():
    """The residual block's skip tensor is live at the consumer: stacked candidates must each get
    it (repeated), so the stacked pick equals brute force, for any loss_batch."""
    model, x, y = labelled("resnet18")
    kwargs = dict(keep=2, criterion="loss", layers="layer1.0.conv1", progress=False)
    a = prune(model, [(x, y)], loss_batch=7, **kwargs)
    b = prune(model, [(x[:2], y[:2]), (x[2:], y[2:])], loss_batch=1, **{**kwargs, "keep": 1})
    sel = a.selections["layer1.0.conv1"]
    assert sel.indices[0] == b.selections["layer1.0.conv1"].indices[0]
    assert float(sel.losses[0]) == pytest.approx(float(b.selections["layer1.0.conv1"].losses[0]), rel=1e-5)
    j0, l0 = brute_pick(model, "layer1.0.conv2", 64, [], x, y)
    assert sel.indices[0] == j0 and float(sel.losses[0]) == pytest.approx(l0, rel=1e-5)
    assert a.report[0].fold_error < 1e-4


def _evaluated(monkeypatch):
    """Record, per call of ConsumerTail.evaluate, which channels are candidates (the rows beyond
    the dense evaluation)."""
    seen = []
    real = loss_module.ConsumerTail.evaluate

    def spy(self, scales):
        if scales.shape[0] > 1 or not bool((scales == 1).all()):
            chosen = set(torch.nonzero((scales > 0).all(0)).flatten().tolist())
            seen.append(sorted(set(torch.nonzero(scales > 0)[:, 1].tolist()) - chosen))
        return real(self, scales)

    monkeypatch.setattr(loss_module.ConsumerTail, "evaluate", spy)
    return seen


def test_random_candidate_subsets_are_random_and_seeded(monkeypatch):
    model, x, y = labelled("cnn")
    seen = _evaluated(monkeypatch)
    runs = {}
    for seed in (0, 0, 5):
        seen.clear()
        res = prune(model, [(x, y)], keep=3, criterion="loss", layers="4", loss_candidates=6, seed=seed, progress=False)
        runs.setdefault(seed, []).append((list(seen), res.report[0].kept.tolist()))
    (first, kept), (again, kept2) = runs[0]
    assert first == again and kept == kept2  # seeded: reproducible
    assert all(len(c) == 6 for c in first) and first[0] != list(range(6))  # not the lowest indices
    assert runs[5][0][0] != first
    sel_steps = [c for c in first]
    chosen = []
    for cand in sel_steps:  # each pick is the best of its subset (brute force)
        j, _ = brute_pick(model, "7", 24, chosen, x, y, among=cand)
        chosen.append(j)
    assert sorted(chosen) == kept


def test_tolerance_stops_early():
    model, x, y = labelled("cnn")
    for tol in (0.5, 0.0):
        res = prune(model, x, ratio=1.0, criterion="loss", tolerance=tol, progress=False)
        for r in res.report:
            top1 = res.selections[r.name].notes["top1"]
            threshold = (1 - tol) * res.selections[r.name].notes["original_top1"]
            assert res.selections[r.name].notes["original_top1"] == 1.0  # agreement with itself
            assert all(t < threshold for t in top1[:-1].tolist())  # it went on while below
            if r.channels_after < r.channels_before:
                assert r.top1 >= threshold
        if tol == 0.5:
            assert any(r.channels_after < r.channels_before // 2 for r in res.report)


def test_shortlist_and_gradient():
    """The gradient w.r.t. the scales matches finite differences (float64 network); a shortlist
    evaluates T candidates a step, those with the lowest predicted change; shortlist >= N is the
    full search."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        )
        .double()
        .eval()
    )
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    from gfs.pruning.capture import GraphRunner
    from gfs.pruning.groups import find_groups

    scan = find_groups(model, x)
    net = copy.deepcopy(model)
    runner = GraphRunner(scan.graph, net, [x])
    node = next(n for n in scan.graph.nodes if n.target == "2")
    runner.run(0, runner.pos[node], checkpoint_at=[runner.pos[node]])
    tail = loss_module.NetworkLoss(runner, [model(x)], [y]).at(node, 1)
    s = torch.zeros(8, dtype=torch.float64)
    s[[1, 4]] = 4.0
    g = tail.gradient(s)
    h = 1e-6
    E = torch.eye(8, dtype=torch.float64)
    fd = (tail.evaluate(s + h * E)[0] - tail.evaluate(s - h * E)[0]) / (2 * h)
    assert torch.allclose(g, fd, rtol=1e-5, atol=1e-9)

    full = prune(model, [(x, y)], keep=3, criterion="loss", layers="0", progress=False)
    same = prune(model, [(x, y)], keep=3, criterion="loss", layers="0", shortlist=8, progress=False)
    short = prune(model, [(x, y)], keep=3, criterion="loss", layers="0", shortlist=2, progress=False)
    assert same.report[0].kept.tolist() == full.report[0].kept.tolist()
    assert short.selections["0"].notes["evaluated"] == 2 * 3 and full.selections["0"].notes["evaluated"] == 8 + 7 + 6
    assert short.report[0].fold_error < 1e-10


class BatchMixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc2(self.fc1(x).relu())
        return h - h.mean(0, keepdim=True)  # mixes the samples of a batch


def test_stacking_that_would_mix_candidates_is_refused():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match="mixes samples of a batch.*loss_batch=1"):
        prune(BatchMixing(), x, keep=2, criterion="loss", progress=False)
    assert prune(BatchMixing(), x, keep=2, criterion="loss", loss_batch=1, progress=False).report[0].channels_after == 2


def test_loss_argument_errors():
    model, x, y = labelled("cnn")
    cases = [
        (dict(criterion="local", loss_candidates=4), ValueError, "loss_candidates= applies to criterion 'loss'"),
        (dict(criterion="l1", shortlist=4), ValueError, "shortlist= applies to criterion 'loss'"),
        (dict(criterion="local", tolerance=0.1), ValueError, "tolerance= applies"),
        (dict(criterion="random", loss_batch=4), ValueError, "loss_batch= applies"),
        (dict(criterion="loss", loss_candidates=0), ValueError, "loss_candidates must be >= 1"),
        (dict(criterion="loss", loss_batch=2.5), TypeError, "loss_batch must be an int"),
        (dict(criterion="loss", shortlist=True), TypeError, "shortlist must be an int"),
        (dict(criterion="loss", tolerance=1.0), ValueError, r"tolerance must be in \[0, 1\)"),
        (dict(criterion="loss", tolerance="a"), TypeError, "tolerance must be a number"),
        (dict(criterion="loss", step="line_search"), ValueError, "step='line_search' applies to criterion 'local'"),
        (dict(criterion="loss", replacement=True), ValueError, "replacement= and eps= apply"),
    ]
    for kwargs, err, msg in cases:
        with pytest.raises(err, match=msg):
            prune(model, x, keep=2, progress=False, **kwargs)
    with pytest.raises(ValueError, match="some batches are"):
        prune(model, [(x[:4], y[:4]), x[4:]], keep=2, criterion="loss", progress=False)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        prune(model, [(x, y + 10)], keep=2, criterion="loss", progress=False)
    reg = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0))
    with pytest.raises(ValueError, match="tolerance= needs a classifier"):
        prune(reg, torch.randn(6, 4), keep=2, criterion="loss", tolerance=0.1, progress=False)
    assert prune(reg, torch.randn(6, 4), keep=2, criterion="loss", progress=False).report[0].channels_after == 2
