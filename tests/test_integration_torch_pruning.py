"""gfs inside Torch-Pruning (gfs.integrations.torch_pruning): GFSImportance's scores keep gfs's
picks at any budget, its compensation folds the selection's weights into the consumers, the
sequential mode is gfs.prune's result, and groups with several consumers sum their problems."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import gfs
from gfs.pruning import find_groups, gram_statistics
from gfs.stats import conv2d_stats

tp = pytest.importorskip("torch_pruning")
tv = pytest.importorskip("torchvision")

from gfs.integrations.torch_pruning import GFSImportance, prune  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _calibration(n=2, b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(n)]


def _randomise_bn(model, seed=0):
    """BatchNorm statistics and affine parameters away from the identity (weights=None models)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model


def _tp_prune(model, calib, imp, **options):
    pruner = tp.pruner.BasePruner(model, calib[0][:1], importance=imp, **options)
    imp.calibrate(pruner, calib)
    pruner.step()
    return imp.compensate()


def _gfs_groups_only(model, calib):
    """ignored_layers restricting Torch-Pruning to the channel groups gfs.prune finds."""
    producers = {g.producer for g in find_groups(model, calib[0]).groups}
    return [
        m
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or (type(m) is nn.Conv2d and m.groups == 1)) and n not in producers
    ]


# ---- the sequential mode is gfs.prune ---------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_sequential_keeps_gfs_prune_channels_and_outputs(name):
    torch.manual_seed(0)
    net = _randomise_bn(getattr(tv.models, name)(weights=None, num_classes=10).eval())
    calib = _calibration()
    ref = gfs.prune(net, calib, ratio=0.5, progress=False)

    model = copy.deepcopy(net)
    report = _tp_prune(model, calib, GFSImportance(), pruning_ratio=0.5, ignored_layers=_gfs_groups_only(model, calib))
    assert len(report) == len(ref.report)

    # the same channels: every layer has the shape gfs.prune gives it, and the kept filters are the same
    mine, theirs = dict(model.named_parameters()), dict(ref.model.named_parameters())
    assert mine.keys() == theirs.keys()
    for n, p in theirs.items():
        assert mine[n].shape == p.shape, n
    original = dict(net.named_parameters())
    for row in ref.report:  # the producers keep the filters gfs.prune keeps (where their inputs are whole)
        W, kept = original[row.producer + ".weight"], mine[row.producer + ".weight"]
        if kept.shape[1] == W.shape[1]:
            assert torch.equal(kept, W[row.kept]), row.producer
    # compensation: the consumers carry gfs.prune's folded weights, so the networks agree
    for n, p in theirs.items():
        torch.testing.assert_close(mine[n], p, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.model.eval()(x), rtol=1e-5, atol=1e-5)


# ---- one-shot: gfs on the dense network ----------------------------------------------------------


def _inputs_of(model, layer, calib):
    got = []
    h = layer.register_forward_hook(lambda m, a, o: got.append(a[0].detach()))
    with torch.no_grad():
        for x in calib:
            model(x)
    h.remove()
    return torch.cat(got)


def test_one_shot_keeps_gfs_selection_on_the_dense_network():
    torch.manual_seed(1)
    net = _randomise_bn(tv.models.resnet18(weights=None, num_classes=10).eval())
    calib = _calibration(seed=1)
    groups = find_groups(net, calib[0]).groups
    expected = {}
    for g in groups:
        layer = net.get_submodule(g.consumer)
        X = _inputs_of(net, layer, calib)
        with torch.no_grad():
            target = layer._conv_forward(X, layer.weight, None)
        sel = gfs.select(gram_statistics(X, layer, target), k=g.channels // 2, replacement=False)
        expected[g.producer] = sel.support
    model = copy.deepcopy(net)
    report = _tp_prune(
        model, calib, GFSImportance("one-shot"), pruning_ratio=0.5, ignored_layers=_gfs_groups_only(model, calib)
    )
    assert {r.name for r in report} == set(expected)
    for name, keep in expected.items():
        W = net.get_submodule(name).weight
        assert torch.equal(model.get_submodule(name).weight, W[keep]), name


# ---- scores: the order is the greedy order, at any budget ------------------------------------------


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.b = nn.Conv2d(24, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.bn(self.a(x)))))
        return self.head(h.mean((2, 3)))


def _selection_of(model, calib, consumer, k=None):
    """gfs.select on the dense consumer's Gram statistics, all N steps (the greedy order)."""
    layer = model.get_submodule(consumer)
    X = _inputs_of(model, layer, calib)
    stats = conv2d_stats(X, layer.weight.detach(), None, None, padding=layer.padding)
    return gfs.select(stats, k=k or stats.n, replacement=False)


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
@pytest.mark.parametrize(
    "options", [dict(pruning_ratio=0.25), dict(pruning_ratio=0.5), dict(pruning_ratio=0.7, round_to=4)]
)
def test_any_ratio_and_round_to_keep_the_first_picks(options, mode):
    torch.manual_seed(2)
    net = _randomise_bn(_Conv().eval())
    calib = _calibration(size=8)
    order = _selection_of(net, calib, "b").indices  # (one group: the sequential problem is the dense one)
    model = copy.deepcopy(net)
    _tp_prune(model, calib, GFSImportance(mode), ignored_layers=[model.b, model.head], **options)
    k = model.a.out_channels
    if "round_to" in options:
        assert k % options["round_to"] == 0
    keep = order[:k].sort().values
    assert torch.equal(model.a.weight, net.a.weight[keep])


def test_scores_decrease_along_the_pick_order_and_start_at_one():
    torch.manual_seed(3)
    net = _Conv().eval()
    calib = _calibration(size=8)
    imp = GFSImportance("one-shot")
    DG = tp.DependencyGraph().build_dependency(net, example_inputs=calib[0][:1])
    imp.calibrate(net, calib)
    group = DG.get_pruning_group(net.a, tp.prune_conv_out_channels, list(range(24)))
    scores = imp(group)
    order = _selection_of(net, calib, "b").indices
    assert scores.dtype == torch.float64 and scores.shape == (24,)
    assert float(scores[order[0]]) == 1.0
    assert bool((scores[order[:-1]] > scores[order[1:]]).all())
    assert torch.equal(torch.argsort(scores, descending=True), order)


# ---- compensation -----------------------------------------------------------------------------


def test_compensation_makes_the_consumer_the_selected_subnetwork():
    torch.manual_seed(4)
    net = _randomise_bn(_Conv().eval())
    calib = _calibration(size=8)
    sel = _selection_of(net, calib, "b", k=12)
    model = copy.deepcopy(net)
    report = _tp_prune(model, calib, GFSImportance("one-shot"), pruning_ratio=0.5, ignored_layers=[model.b, model.head])
    assert [r.channels for r in report] == [(24, 12)]
    # the consumer's output on the calibration data is gfs's subnetwork sum_j w_j u_j (plus the bias)
    X = _inputs_of(net, net.b, calib)
    U = gfs.stats.conv2d_contributions(X, net.b.weight.detach(), padding=1)
    expected = sel.output(U.reshape(24, -1)).reshape(U.shape[1:]) + net.b.bias.detach().view(1, -1, 1, 1)
    got = model.b(_inputs_of(model, model.b, calib))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert report[0].relative_error == pytest.approx(
        (sel.loss - sel.dense_loss) / (float((U.mean(0) ** 2).sum()) / U[0].numel() - sel.dense_loss), rel=1e-6
    )


def test_compensation_recovers_what_score_only_pruning_loses():
    torch.manual_seed(0)
    net = _randomise_bn(tv.models.resnet18(weights=None, num_classes=10).eval())
    calib = _calibration(n=2, b=8, seed=0)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        dense = net(x)
    errors = {}
    for compensate in (False, True):
        model = copy.deepcopy(net)
        imp = GFSImportance()
        pruner = tp.pruner.BasePruner(model, calib[0][:1], importance=imp, pruning_ratio=0.5, ignored_layers=[model.fc])
        imp.calibrate(pruner, calib)
        pruner.step()
        if compensate:
            imp.compensate()
        with torch.no_grad():
            errors[compensate] = float((model(x) - dense).norm() / dense.norm())
    assert errors[True] < 0.8 * errors[False]


# ---- groups with several consumers sum their problems ------------------------------------------


class _Branches(nn.Module):
    """stem -> (left, right) -> concat -> mix: the stem's channels have two consumers, and the
    concatenation's consumer reads two groups."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.left = nn.Conv2d(12, 8, 1)
        self.right = nn.Conv2d(12, 6, 3, padding=1)
        self.mix = nn.Conv2d(14, 5, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.mix(torch.cat([torch.relu(self.left(h)), torch.relu(self.right(h))], 1)).mean((2, 3))


def _scores_of(model, calib, root, fn=None):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=calib[0][:1])
    imp = GFSImportance("one-shot")
    imp.calibrate(model, calib)
    n = root.out_channels
    return imp(DG.get_pruning_group(root, fn or tp.prune_conv_out_channels, list(range(n))))


def test_a_group_with_two_consumers_sums_their_statistics():
    torch.manual_seed(6)
    net = _Branches().eval()
    calib = _calibration(size=8)
    h = torch.cat([torch.relu(net.stem(x)) for x in calib]).detach()
    stats = gfs.GramStats(12)
    for layer in (net.left, net.right):
        s = conv2d_stats(h, layer.weight.detach(), None, None, padding=layer.padding)
        stats.G.add_(s.G)
        stats.b += s.b
        stats.yy += s.yy
        stats.count += s.count
    order = gfs.select(stats, k=12, replacement=False).indices
    scores = _scores_of(net, calib, net.stem)
    assert torch.equal(torch.argsort(scores, descending=True), order)


def test_a_concatenated_group_imitates_its_share_of_the_consumer():
    torch.manual_seed(7)
    net = _Branches().eval()
    calib = _calibration(size=8)
    with torch.no_grad():
        parts = [
            torch.cat(
                [torch.relu(net.left(torch.relu(net.stem(x)))), torch.relu(net.right(torch.relu(net.stem(x))))], 1
            )
            for x in calib
        ]
    X = torch.cat(parts)
    W = net.mix.weight.detach()
    # the right branch's 6 channels are inputs 8..13 of mix; their share of its output is the target
    Xr, Wr = X[:, 8:], W[:, 8:]
    stats = conv2d_stats(Xr, Wr, None, None)
    order = gfs.select(stats, k=6, replacement=False).indices
    scores = _scores_of(net, calib, net.right)
    assert torch.equal(torch.argsort(scores, descending=True), order)
    # and Torch-Pruning + compensation give the mix layer the selection's weights on those inputs
    model = copy.deepcopy(net)
    _tp_prune(
        model, calib, GFSImportance("one-shot"), pruning_ratio=0.5, ignored_layers=[model.stem, model.left, model.mix]
    )
    keep = order[:3].sort().values
    sel = gfs.select(stats, k=3, replacement=False)
    torch.testing.assert_close(model.mix.weight[:, :8], W[:, :8])
    torch.testing.assert_close(model.mix.weight[:, 8:], Wr[:, keep] * (6 * sel.weights[keep]).float().view(1, -1, 1, 1))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        return self.c(torch.relu(self.g(torch.relu(self.a(x))))).mean((2, 3))


def test_grouped_convolution_consumer_keeps_offsets_and_compensates():
    torch.manual_seed(8)
    net = _Grouped().eval()
    calib = _calibration(size=8)
    X = _inputs_of(net, net.g, calib)
    W = net.g.weight.detach()
    # candidate o = channel offset o in each of the 4 groups (Torch-Pruning removes offsets alike)
    G = torch.zeros(4, 4, dtype=torch.float64)
    for a in range(4):
        s = conv2d_stats(X[:, 4 * a : 4 * a + 4], W[4 * a : 4 * a + 4], None, None, padding=1)
        G += s.G
    stats = gfs.GramStats(4)
    stats.G.copy_(G)
    stats.b.copy_(G.sum(1) / 4)
    stats.yy, stats.count = float(G.sum()) / 16, 4 * s.count
    sel = gfs.select(stats, k=2, replacement=False)
    model = copy.deepcopy(net)
    _tp_prune(model, calib, GFSImportance("one-shot"), pruning_ratio=0.5, ignored_layers=[model.g, model.c])
    keep = torch.tensor([4 * a + int(o) for a in range(4) for o in sel.support])
    assert torch.equal(model.a.weight, net.a.weight[keep])
    expected = W[:, sel.support] * (4 * sel.weights[sel.support]).float().view(1, -1, 1, 1)
    torch.testing.assert_close(model.g.weight, expected)


# ---- global pruning: comparable scores ------------------------------------------------------------


class _MLP(nn.Module):
    """Two hidden layers; the first has only 4 distinct units, each repeated 8 times with the same
    outgoing weights: 4 distinct candidates, whose uniform average is the dense layer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 3)
        with torch.no_grad():
            self.fc1.weight.copy_(self.fc1.weight[:4].repeat(8, 1))
            self.fc1.bias.copy_(self.fc1.bias[:4].repeat(8))
            self.fc2.weight.copy_(self.fc2.weight[:, :4].repeat(1, 8))

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _global(net, calib, ratio=0.5, mode="one-shot"):
    model = copy.deepcopy(net)
    imp = GFSImportance(mode)
    pruner = tp.pruner.BasePruner(
        model, calib[0][:1], importance=imp, pruning_ratio=ratio, global_pruning=True, ignored_layers=[model.out]
    )
    imp.calibrate(pruner, calib)
    pruner.step()
    imp.compensate()
    return model


def test_global_pruning_equalises_the_relative_imitation_error():
    torch.manual_seed(9)
    net = _MLP().eval()
    calib = [torch.randn(64, 10)]
    model = _global(net, calib)
    k1, k2 = model.fc1.out_features, model.fc2.out_features
    assert k1 + k2 == 32  # half of the 64 channels
    assert k1 == 4 and k2 == 28  # the redundant layer gives most: its first 4 picks imitate it exactly
    # the rule: each layer keeps the shortest prefix whose relative error is at most the common threshold
    imp = GFSImportance("one-shot")
    DG = tp.DependencyGraph().build_dependency(copy.deepcopy(net), example_inputs=calib[0][:1])
    imp.calibrate(DG.model, calib)
    s1 = imp(DG.get_pruning_group(DG.model.fc1, tp.prune_linear_out_channels, list(range(32))))
    s2 = imp(DG.get_pruning_group(DG.model.fc2, tp.prune_linear_out_channels, list(range(32))))
    tau = torch.cat([s1, s2]).sort().values[31]  # the 32nd lowest: Torch-Pruning's threshold
    assert (int((s1 > tau).sum()), int((s2 > tau).sum())) == (k1, k2)


def test_global_allocation_does_not_depend_on_layer_scale():
    torch.manual_seed(10)
    net = _MLP().eval()
    calib = [torch.randn(64, 10)]
    scaled = copy.deepcopy(net)
    with torch.no_grad():  # fc2 outputs x 100, out's inputs / 100: the same function
        scaled.fc2.weight.mul_(100)
        scaled.fc2.bias.mul_(100)
        scaled.out.weight.div_(100)
    a, b = _global(net, calib), _global(scaled, calib)
    assert (a.fc1.out_features, a.fc2.out_features) == (b.fc1.out_features, b.fc2.out_features)


def test_sequential_global_pruning_keeps_the_one_shot_budgets():
    torch.manual_seed(11)
    net = _MLP().eval()
    calib = [torch.randn(64, 10)]
    a, b = _global(net, calib, mode="one-shot"), _global(net, calib, mode="sequential")
    assert (a.fc1.out_features, a.fc2.out_features) == (b.fc1.out_features, b.fc2.out_features)


# ---- calibration, steps, the one call --------------------------------------------------------


def test_calibration_context_manager_records_the_calls_and_restores_flags():
    torch.manual_seed(12)
    net = _Conv()
    net.train()
    calib = _calibration(size=8)
    results = []
    for use_context in (True, False):
        model = copy.deepcopy(net)
        imp = GFSImportance()
        pruner = tp.pruner.BasePruner(
            model, calib[0][:1], importance=imp, pruning_ratio=0.5, ignored_layers=[model.head]
        )
        model.train()
        running = model.bn.running_mean.clone()
        if use_context:
            with imp.calibrate(pruner) as cal:
                for x in calib:
                    model(x)
            assert cal.batches == 2 and model.training and model.bn.training
            assert torch.equal(model.bn.running_mean, running)  # eval mode inside: statistics untouched
        else:
            imp.calibrate(pruner, calib)
        pruner.step()
        imp.compensate()
        results.append(model)
    for p, q in zip(results[0].parameters(), results[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_iterative_steps_compensate_after_each():
    torch.manual_seed(13)
    net = _randomise_bn(_Conv().eval())
    calib = _calibration(size=8)
    model = copy.deepcopy(net)
    imp = GFSImportance()
    pruner = tp.pruner.BasePruner(
        model, calib[0][:1], importance=imp, pruning_ratio=0.5, iterative_steps=2, ignored_layers=[model.head]
    )
    imp.calibrate(pruner, calib)
    sizes = []
    for _ in range(2):
        pruner.step()
        assert imp.compensate()
        sizes.append((model.a.out_channels, model.b.out_channels))
    assert sizes == [(18, 12), (12, 8)]
    assert model(calib[0]).shape == (4, 5)


def test_prune_leaves_the_input_model_untouched():
    torch.manual_seed(14)
    net = _randomise_bn(_Conv())
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = prune(net, _calibration(size=8), pruning_ratio=0.5, ignored_layers=[net.head])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.a.out_channels == 24 and small.a.out_channels == 12 and small.head.out_features == 5
    assert small.training and small.bn.training  # the input's flags
    inplace = prune(net, _calibration(size=8), pruning_ratio=0.5, inplace=True)
    assert inplace is net and net.a.out_channels == 12


def test_the_classifier_and_unmodelled_consumers_are_left_whole():
    class WithConv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.b = nn.Conv1d(8, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.b(torch.relu(self.a(x)).flatten(2)).mean(2))

    net = WithConv1d().eval()
    with pytest.warns(UserWarning, match="Conv1d"):
        small = prune(net, _calibration(size=8), pruning_ratio=0.5)
    assert small.a.out_channels == 8  # read by a Conv1d: left whole, with a warning
    assert small.b.out_channels == 2  # read by fc: pruned
    assert small.fc.out_features == 3  # the outputs: no consumer, no score


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="mode"):
        GFSImportance("greedy")
    net = _Conv().eval()
    calib = _calibration(size=8)
    imp = GFSImportance()
    pruner = tp.pruner.BasePruner(net, calib[0][:1], importance=imp, pruning_ratio=0.5)
    with pytest.raises(TypeError, match="needs the pruner"):
        imp.calibrate(net, calib)
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.step()
    with pytest.raises(RuntimeError, match="after pruner.step"):
        imp.compensate()
    with pytest.raises(ValueError, match="NaN"):
        imp.calibrate(pruner, [torch.full((2, 3, 8, 8), float("nan"))])
    with pytest.raises(ValueError, match="pruning_ratio"):
        prune(net, calib, pruning_ratio=1.5)
