"""gfs.prune: channel groups, criteria, exact folding, unchanged inputs, save/load, errors.

Tiny inputs and random-init models (weights=None); every torchvision model is pruned once per
module (fixture) and the properties are checked on that result. The exactness checks compare
with an independently built *masked* copy of the original: each consumer's input column j
multiplied by the report's scale (0 for dropped channels), which is the selected subnetwork
sum_j w_j u_j without any slicing.
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import gfs
from gfs.pruning import UnsafeFileError, UnsupportedModelError, find_groups, group_statistics, load, prune, save
from gfs.pruning.criteria import consumer_output, remove_bias

tv = pytest.importorskip("torchvision")


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 24),
        nn.BatchNorm1d(24),
        nn.GELU(),
        nn.Linear(24, 10),
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1, bias=False),
        nn.BatchNorm2d(24),
        nn.ReLU(inplace=True),
        nn.Conv2d(24, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# name: (builder, input shape, calibration batch size)
ARCHS = {
    "resnet18": (lambda: tv.models.resnet18(weights=None, num_classes=10), (3, 32, 32), 4),
    "resnet50": (lambda: tv.models.resnet50(weights=None, num_classes=10), (3, 32, 32), 2),
    "mobilenet_v2": (lambda: tv.models.mobilenet_v2(weights=None, num_classes=10), (3, 32, 32), 4),
    # one calibration sample: the squeeze-excitation bias fold is then exact on it (see fold.py)
    "mobilenet_v3_small": (lambda: tv.models.mobilenet_v3_small(weights=None, num_classes=10), (3, 32, 32), 1),
    "mlp": (mlp, (3, 8, 8), 16),
    "cnn": (cnn, (3, 8, 8), 8),
}


def _randomise_bn(model, gen):
    """Non-trivial BatchNorm statistics, so that slicing them wrongly would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))


def build(name, train=False):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    make, shape, b = ARCHS[name]
    model = make()
    _randomise_bn(model, gen)
    model.train(train)
    x = torch.randn(b, *shape, generator=gen)
    return model, x


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        {n: id(m) for n, m in model.named_modules()},
    )


@pytest.fixture(scope="module")
def pruned():
    """{arch: (original, its snapshot before pruning, calibration x, PruneResult)}; the models are
    in training mode while pruned (BatchNorm would update its statistics if run in place)."""
    out = {}
    for name in ARCHS:
        model, x = build(name, train=True)
        before = snapshot(model)
        result = prune(model, x, ratio=0.5, progress=False)
        out[name] = (model, before, x, result)
    return out


def eval_copy(model):
    return copy.deepcopy(model).eval()


def masked(original, result):
    """The selected subnetworks without slicing: consumer columns times the scales, 0 if dropped."""
    m = eval_copy(original)
    with torch.no_grad():
        for r in result.report:
            layer = m.get_submodule(r.consumer)
            s = torch.zeros(r.channels_before, dtype=torch.float64)
            s[r.kept] = r.scale
            shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
            layer.weight.copy_((layer.weight.double() * s.view(shape)).to(layer.weight.dtype))
    return m


def outputs_at(model, x, names):
    got, handles = {}, []
    for n in names:
        handles.append(
            model.get_submodule(n).register_forward_hook(
                lambda mod, a, out, _n=n: got.__setitem__(_n, out.detach().clone())
            )
        )
    with torch.no_grad():
        y = model(x)
    for h in handles:
        h.remove()
    return y, got


def close(a, b, rtol=1e-4):
    return float((a - b).abs().max()) <= rtol * float(b.abs().max()) + 1e-30


# ---- groups -------------------------------------------------------------------------------


def test_groups_resnet_internal_channels_only():
    x = torch.randn(1, 3, 32, 32)
    g18 = find_groups(tv.models.resnet18(weights=None), x)
    assert g18.names() == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    assert all(g.consumer == g.name.replace("conv1", "conv2") for g in g18.groups)
    g50 = find_groups(tv.models.resnet50(weights=None), x)
    blocks = [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3), strict=True) for j in range(n)]
    assert g50.names() == [f"{b}.{c}" for b in blocks for c in ("conv1", "conv2")]
    # the residual stream (stem, conv3, downsample) is left whole, with the reason
    assert "residual" in g50.rejected["layer1.0.conv3"] and "layer1.0.downsample.0" in g50.rejected
    assert "conv1" in g50.rejected


def test_groups_mobilenets():
    x = torch.randn(1, 3, 32, 32)
    v2 = find_groups(tv.models.mobilenet_v2(weights=None), x)
    for i in range(2, 18):  # every expand layer: expand -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project
        g = v2[f"features.{i}.conv.0.0"]
        assert g.consumer == f"features.{i}.conv.2"
        assert [m.kind for m in g.members] == ["norm", "depthwise", "norm"]
    # expand_ratio 1 block: hidden channels = the stem's output, which feeds nothing else
    assert v2["features.0.0"].consumer == "features.1.conv.1"
    v3 = find_groups(tv.models.mobilenet_v3_small(weights=None), x)
    g = v3["features.4.block.0.0"]
    assert [m.kind for m in g.members] == ["norm", "depthwise", "norm", "se"]
    assert g.members[-1].name == "features.4.block.2.fc1" and g.members[-1].fc2 == "features.4.block.2.fc2"
    large = find_groups(tv.models.mobilenet_v3_large(weights=None), x)
    assert "features.0.0" in large.rejected  # its stem feeds a residual add


def test_groups_sequential():
    def links(model):
        return [(g.producer, g.consumer) for g in find_groups(model, torch.randn(2, 3, 8, 8)).groups]

    assert links(mlp()) == [("1", "3"), ("3", "6")]
    assert links(cnn()) == [("0", "4"), ("4", "7"), ("7", "11")]


# ---- prune, run, fold, unchanged input ----------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prunes_and_runs_smaller(pruned, arch):
    model, _, x, result = pruned[arch]
    assert result.report and len(result.report) == len(result.groups)
    for r in result.report:
        assert r.channels_after == max(1, int(0.5 * r.channels_before + 0.5))
        assert r.kept.numel() == r.channels_after and r.fold_error == r.fold_error  # not NaN
        producer = result.model.get_submodule(r.producer)
        assert (producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels) == r.channels_after
    assert result.params[1] < result.params[0] and result.flops[1] < result.flops[0]
    assert sum(p.numel() for p in result.model.parameters()) == result.params[1]
    pm = eval_copy(result.model)
    with torch.no_grad():
        y = pm(x)
    assert y.shape == (x.shape[0], 10) and torch.isfinite(y).all()
    assert result.model.training  # flags follow the input model
    assert arch in ("mlp", "cnn") or type(result.model) is type(model)  # still a torchvision model
    assert "parameters" in result.summary()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_folds_exactly(pruned, arch):
    """Before fine-tuning: every pruned consumer's output equals the selected subnetwork's
    sum_j w_j u_j (+ bias), built independently by masking the original network."""
    model, _, x, result = pruned[arch]
    consumers = [r.consumer for r in result.report]
    y_mask, at_mask = outputs_at(masked(model, result), x, consumers)
    y_pruned, at_pruned = outputs_at(eval_copy(result.model), x, consumers)
    # a consumer that is also a producer lost rows, and so did an SE's fc2 (it follows the hidden channels)
    rows = {r.producer: r.kept for r in result.report}
    for g, r in zip(result.groups, result.report, strict=True):
        rows.update({m.fc2: r.kept for m in g.members if m.kind == "se"})
    for c in consumers:
        ref = at_mask[c]
        if c in rows:
            ref = ref.index_select(-1 if isinstance(result.model.get_submodule(c), nn.Linear) else 1, rows[c])
        assert close(at_pruned[c], ref), c
    assert close(y_pruned, y_mask)
    assert max(r.fold_error for r in result.report) < 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_input_model_unchanged(pruned, arch):
    model, (state, flags, ids), _, result = pruned[arch]
    after, after_flags, after_ids = snapshot(model)
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)  # bit-identical, BN statistics included
    assert flags == after_flags and ids == after_ids
    assert all(p is not q for p, q in zip(model.parameters(), result.model.parameters(), strict=True))


def test_local_loss_is_the_selection_loss_and_beats_random_subsets():
    model, x = build("cnn")
    local = prune(model, x, ratio=0.5, progress=False)
    for r in local.report:  # the loss measured on the folded consumer is the selection's loss
        assert abs(r.loss - local.selections[r.name].loss) <= 1e-5 * max(r.loss, 1e-12)
        assert r.gap is not None
    assert local.report[0].dense_loss < 1e-12  # the first group's inputs are the original ones
    # the first group sees the original inputs: the greedy pick beats random subsets of the same
    # size and form (uniform weights, scale N / k); on random-init networks the uniform average
    # need not beat plain dropping (l1 / random), on trained ones it does by far (see the report)
    first = local.report[0]
    net = eval_copy(model)
    with torch.no_grad():
        feats = net[:4](x)
        target = remove_bias(net[4](feats), net[4])
    gen = torch.Generator().manual_seed(0)
    N, k = first.channels_before, first.channels_after
    for _ in range(20):
        s = torch.zeros(N, dtype=torch.float64)
        s[torch.randperm(N, generator=gen)[:k]] = N / k
        with torch.no_grad():
            loss = float(((consumer_output(feats, net[4], s) - target).double() ** 2).mean())
        assert first.loss <= loss + 1e-9


def test_baselines():
    model, x = build("cnn")
    l1 = prune(model, x, keep=5, criterion="l1", progress=False)
    W = model[0].weight.detach()
    top = W.abs().reshape(W.shape[0], -1).sum(1).argsort(descending=True)[:5].sort().values
    assert torch.equal(l1.report[0].kept, top) and torch.all(l1.report[0].scale == 1)
    r1 = prune(model, x, keep=5, criterion="random", seed=3, progress=False)
    r2 = prune(model, x, keep=5, criterion="random", seed=3, progress=False)
    r3 = prune(model, x, keep=5, criterion="random", seed=4, progress=False)
    assert [r.kept.tolist() for r in r1.report] == [r.kept.tolist() for r in r2.report]
    assert [r.kept.tolist() for r in r1.report] != [r.kept.tolist() for r in r3.report]
    assert l1.selections == {} and l1.report[0].gap is None
    assert max(r.fold_error for r in l1.report + r1.report) < 1e-4


def test_replacement_keeps_distinct_channels_and_folds_exactly():
    model, x = build("mlp")
    result = prune(model, x, keep=6, replacement=True, progress=False)
    for r in result.report:
        sel = result.selections[r.name]
        assert r.channels_after == 6 == sel.support.numel()
        assert torch.allclose(r.scale, r.channels_before * sel.weights[r.kept])
    y_mask, _ = outputs_at(masked(model, result), x, [])
    y_pruned, _ = outputs_at(eval_copy(result.model), x, [])
    assert close(y_pruned, y_mask)


def test_calibration_forms_agree():
    model, x = build("mlp")
    y = torch.zeros(len(x), dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    kept = []
    for cal in (x, loader, [x[:5], x[5:10], x[10:]], [(x[:8], y[:8]), (x[8:], y[8:])]):
        kept.append([r.kept.tolist() for r in prune(model, cal, keep=4, progress=False).report])
    assert all(k == kept[0] for k in kept)


def test_layers_selects_groups():
    model, x = build("resnet18")
    result = prune(model, x, ratio=0.25, layers="layer1.*", progress=False)
    assert [r.name for r in result.report] == ["layer1.0.conv1", "layer1.1.conv1"]
    assert "layer2.0.conv1" in result.skipped


def test_group_statistics_is_the_consumer_split_by_channel():
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, padding_mode="reflect")
    lin = nn.Linear(6, 4)
    for layer, X in ((conv, torch.randn(3, 6, 7, 7, generator=gen)), (lin, torch.randn(2, 3, 6, generator=gen))):
        with torch.no_grad():
            dense = consumer_output(X, layer)
            U, y = group_statistics(X, layer, dense)
            assert U.shape == (6, dense.numel()) and torch.allclose(U.mean(0), dense.reshape(-1), atol=1e-5)
            w = torch.rand(6, generator=gen, dtype=torch.float64)
            w /= w.sum()
            sub = consumer_output(X, layer, 6 * w)
            assert torch.allclose((w.float()[:, None] * U).sum(0), sub.reshape(-1), atol=1e-5)
            # too large: a random subset of output positions, all output channels of each, computed
            # directly (no full output); it is the full matrix restricted to those positions
            Cout = layer.weight.shape[0]
            small, ys = group_statistics(
                X, layer, dense, max_elements=6 * Cout * 3, generator=torch.Generator().manual_seed(1)
            )
            assert small.shape == (6, 3 * Cout) and ys.shape == (3 * Cout,)
            pos = torch.randperm(dense.numel() // Cout, generator=torch.Generator().manual_seed(1))[:3].sort().values
            by_position = (
                U.reshape(6, -1, Cout)
                if isinstance(layer, nn.Linear)
                else U.reshape(6, dense.shape[0], Cout, -1).transpose(2, 3).reshape(6, -1, Cout)
            )
            assert torch.allclose(small, by_position[:, pos].reshape(6, -1), atol=1e-5)
            assert torch.allclose(small.mean(0), ys, atol=1e-5)


def _consumers():
    gen = torch.Generator().manual_seed(0)
    X = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return [
        (nn.Linear(6, 4).double(), X(2, 3, 6)),
        (nn.Conv2d(6, 5, 3, stride=2, padding=1).double(), X(3, 6, 7, 7)),
        (nn.Conv2d(6, 5, 3, padding=2, dilation=2, bias=False).double(), X(2, 6, 6, 5)),
        (nn.Conv2d(6, 7, 1).double(), X(2, 6, 4, 4)),
        (
            nn.Conv2d(6, 1, 3, padding=1).double(),
            X(3, 6, 5, 5),
        ),  # few outputs: materialised (gfs.engines.cost.conv2d_method)
    ]


def test_gram_statistics_are_the_materialised_problem_and_select_the_same(monkeypatch):
    """The "local" problem as layer statistics (no N x M tensor) equals the materialised
    candidate matrix's statistics; gfs.select picks the same channels from both."""
    from gfs.engines.cost import conv2d_method
    from gfs.pruning import criteria as crit
    from gfs.stats import layers

    assert conv2d_method(6, 1, 9, 75) == "materialise" and conv2d_method(64, 64, 9, 3136) == "offsets"
    monkeypatch.setattr(layers, "_LAYER_CHUNK_BYTES", 6 * 9 * 8 * 30)  # a few images per offsets pass
    for layer, X in _consumers():
        with torch.no_grad():
            target = consumer_output(X, layer) + 0.3 * torch.randn_like(consumer_output(X, layer))
            U, y = group_statistics(X, layer, target)
            ref = gfs.GramStats.from_features(U, y)
            stats = crit.gram_statistics(X, layer, target)
        assert stats.count == ref.count == target.numel()
        assert torch.allclose(stats.G, ref.G, rtol=1e-10, atol=1e-10 * float(ref.G.abs().max()))
        assert torch.allclose(stats.b, ref.b, rtol=1e-10, atol=1e-10 * float(ref.b.abs().max()))
        assert abs(stats.yy - ref.yy) <= 1e-10 * ref.yy
        for step in ("uniform", "line_search"):
            a = gfs.select(stats, k=4, replacement=False, step=step)
            b = gfs.select(U, y, k=4, replacement=False, step=step)
            assert a.indices.tolist() == b.indices.tolist(), (layer, step)
            assert torch.allclose(a.losses, b.losses, rtol=1e-8)


def test_local_runs_on_the_gram_statistics_exactly(monkeypatch):
    """criterion "local" uses the layer statistics (sampled == 1 even where the materialised
    matrix would be subsampled) and falls back to the materialised matrix for consumers the
    statistics cannot take (padding_mode="reflect")."""
    from gfs.pruning import criteria as crit

    model, x = build("cnn")
    base = prune(model, x, ratio=0.5, progress=False)
    monkeypatch.setattr(crit, "MAX_ELEMENTS", 1000)  # the materialised path would subsample now
    calls = []
    real = crit.group_statistics
    monkeypatch.setattr(crit, "group_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = prune(model, x, ratio=0.5, progress=False)
    assert not calls and all(r.sampled == 1.0 for r in result.report)
    assert [r.kept.tolist() for r in result.report] == [r.kept.tolist() for r in base.report]
    reflect = copy.deepcopy(model)
    reflect[4].padding_mode = "reflect"
    fallback = prune(reflect, x, ratio=0.5, progress=False)
    assert len(calls) == 1 and fallback.report[0].sampled < 1.0  # only that consumer, subsampled
    assert all(r.sampled == 1.0 for r in fallback.report[1:])


def test_exported_from_gfs():
    assert gfs.prune is prune and gfs.PruneResult.__name__ == "PruneResult"


# ---- errors --------------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:  # data-dependent control flow: not traceable
            h = h.relu()
        return self.fc2(h)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc2(self.fc1(self.fc1(x)).relu()))


def test_unsupported_structures_raise_clear_errors():
    x = torch.randn(2, 4)
    with pytest.raises(UnsupportedModelError, match="Branchy"):
        prune(Branchy(), x, ratio=0.5, progress=False)
    with pytest.raises(UnsupportedModelError, match=r"'1'.*LayerNorm|1 \(LayerNorm\)"):
        prune(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)), x, ratio=0.5, progress=False)
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten())
    with pytest.raises(UnsupportedModelError, match=r"grouped convolution \(groups=2"):
        prune(grouped, torch.randn(1, 3, 5, 5), ratio=0.5, layers="0", progress=False)
    with pytest.raises(UnsupportedModelError, match="fc1 is called 2 times"):
        prune(Shared(), x, ratio=0.5, layers="fc1", progress=False)
    net, xr = build("resnet18")
    with pytest.raises(UnsupportedModelError, match=r"'layer1.0.conv2' cannot be pruned.*residual"):
        prune(net, xr, ratio=0.5, layers=["layer1.0.conv2"], progress=False)


def test_argument_errors_name_the_argument():
    model, x = build("mlp")
    cases = [
        (dict(), ValueError, "keep= .*ratio="),
        (dict(keep=2, ratio=0.5), ValueError, "exactly one of keep"),
        (dict(ratio=0), ValueError, "ratio must be in"),
        (dict(ratio=1.5), ValueError, "ratio must be in"),
        (dict(ratio="half"), TypeError, "ratio must be a number"),
        (dict(ratio=True), TypeError, "ratio must be a number"),
        (dict(keep=0), ValueError, "keep must be >= 1"),
        (dict(keep=2.5), TypeError, "keep must be an int"),
        (dict(keep=100), ValueError, "keep=100 is more than the 32 channels of group '1'"),
        (dict(ratio=0.5, criterion="taylor"), ValueError, "unknown criterion 'taylor'"),
        (dict(ratio=0.5, layers=["nope"]), ValueError, "layers: .*'nope'"),
        (dict(ratio=0.5, layers="x*"), ValueError, "layers: pattern 'x\\*'"),
        (dict(ratio=0.5, step="newton"), ValueError, "unknown step"),
        (dict(ratio=0.5, criterion="l1", replacement=True), ValueError, "replacement= and eps= apply to criterion"),
        (dict(keep={}), ValueError, "keep= is an empty mapping"),
        (dict(keep={"1": 0}), ValueError, "keep\\['1'\\] must be >= 1"),
        (dict(keep={"1": 2.0}), TypeError, "keep\\['1'\\] must be an int"),
        (dict(keep={1: 2}), TypeError, "keep= mapping keys must be group names"),
        (dict(keep={"1": 100}), ValueError, "keep\\['1'\\]=100 is more than the 32 channels"),
        (dict(keep={"nope": 2}), ValueError, "keep=: .*no prunable layer named 'nope'"),
        (dict(keep={"1": 2, "nope": 2}, layers="1"), ValueError, "not among them: nope"),
    ]
    for kwargs, err, msg in cases:
        with pytest.raises(err, match=msg):
            prune(model, x, progress=False, **kwargs)
    with pytest.raises(ValueError, match="calibration is empty"):
        prune(model, [], ratio=0.5, progress=False)
    with pytest.raises(TypeError, match="calibration batch 0"):
        prune(model, [{"x": x}], ratio=0.5, progress=False)


def test_keep_per_group_mapping():
    """keep={group: count} prunes the named groups to their own counts and leaves the others
    whole; each group's selection is the one keep=count with layers=group gives (the groups
    before it unchanged); with layers= it must name exactly the groups selected."""
    model, x = build("resnet18")
    counts = {"layer1.0.conv1": 5, "layer2.1.conv1": 100, "layer4.0.conv1": 1}
    res = prune(model, x, keep=counts, progress=False)
    assert {r.name: r.channels_after for r in res.report} == counts
    assert {"layer1.1.conv1", "layer3.0.conv1"} <= set(res.skipped)
    first = prune(model, x, keep=5, layers="layer1.0.conv1", progress=False)
    assert torch.equal(res.report[0].kept, first.report[0].kept)
    assert torch.equal(res.report[0].scale, first.report[0].scale)
    both = prune(model, x, keep=counts, layers=["layer1.0.conv1", "layer2.1.conv1", "layer4.0.*"], progress=False)
    assert [r.channels_after for r in both.report] == [5, 100, 1]
    with pytest.raises(ValueError, match="no count for layer1.1.conv1"):
        prune(model, x, keep={"layer1.0.conv1": 5}, layers="layer1.*", progress=False)


def test_imitate_normalized_weighs_the_error_by_the_batchnorm_after_the_consumer():
    """imitate="normalized": a consumer followed by a BatchNorm imitates that BatchNorm's output;
    the report's loss is then the squared error of the BatchNorm's output in the pruned network
    (the first group's input is the original one); consumers without one imitate their output;
    a BatchNorm with the same gamma / sigma on every channel changes nothing."""
    for name, producer, consumer_bn in (("cnn", "0", "5"), ("mlp", "1", "4")):
        model, x = build(name)  # (the next group slices that BatchNorm: prune only the first)
        res = prune(model, x, ratio=0.5, layers=producer, imitate="normalized", progress=False)
        first = res.report[0]
        _, orig = outputs_at(eval_copy(model), x, [consumer_bn])
        _, new = outputs_at(res.model, x, [consumer_bn])
        want = float(((new[consumer_bn].double() - orig[consumer_bn].double()) ** 2).mean())
        assert abs(first.loss - want) <= 1e-4 * want, (name, first.loss, want)
        plain = prune(model, x, ratio=0.5, layers=producer, progress=False)
        differs = not torch.equal(first.kept, plain.report[0].kept)
        assert differs or not torch.allclose(first.scale, plain.report[0].scale)  # the weighting mattered
        whole = prune(model, x, ratio=0.5, imitate="normalized", progress=False)  # every group
        second = whole.report[-1]  # (its consumer, the classifier, has no BatchNorm after it)
        _, orig = outputs_at(eval_copy(model), x, [second.consumer])
        _, new = outputs_at(whole.model, x, [second.consumer])
        want = float(((new[second.consumer].double() - orig[second.consumer].double()) ** 2).mean())
        assert abs(second.loss - want) <= 1e-4 * want, (name, second.loss, want)
    model, x = build("cnn")  # the second group's consumer (a 1x1 conv -> ReLU) has no BatchNorm after it
    a = prune(model, x, ratio=0.5, layers="4", imitate="normalized", progress=False)
    b = prune(model, x, ratio=0.5, layers="4", progress=False)
    assert torch.equal(a.report[0].kept, b.report[0].kept) and torch.equal(a.report[0].scale, b.report[0].scale)
    with torch.no_grad():  # the same weight on every channel: the same selection
        model[5].weight.fill_(0.7)
        model[5].running_var.fill_(2.0)
    a = prune(model, x, ratio=0.5, layers="0", imitate="normalized", step="refit", progress=False)
    b = prune(model, x, ratio=0.5, layers="0", step="refit", progress=False)
    assert torch.equal(a.report[0].kept, b.report[0].kept)
    assert torch.allclose(a.report[0].scale, b.report[0].scale, rtol=1e-4)
    with pytest.raises(ValueError, match="imitate must be 'output', 'normalized' or 'recalibrated'"):
        prune(model, x, ratio=0.5, imitate="bn", progress=False)
    with pytest.raises(ValueError, match="imitate= applies to criterion 'local'"):
        prune(model, x, ratio=0.5, imitate="normalized", criterion="l1", progress=False)


@pytest.mark.parametrize(
    "geometry",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=1),
        dict(kernel_size=3, padding=2, dilation=2),
        dict(kernel_size=5, stride=3, padding=2),
        dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
        dict(kernel_size=3, stride=2, dilation=2),
    ],
)
def test_output_sums_are_the_sums_of_each_channels_output(geometry):
    from gfs.pruning.criteria import output_sums

    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(6, 5, bias=False, **geometry)
    X = torch.randn(3, 6, 11, 9, generator=gen)
    target = torch.randn_like(conv(X))
    S, t, P = output_sums(X, conv, target)
    with torch.no_grad():
        want = torch.stack(
            [6 * conv(X * (torch.arange(6) == j).view(1, -1, 1, 1)).double().sum((0, 2, 3)) for j in range(6)]
        )
    torch.testing.assert_close(S, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(t, target.double().sum((0, 2, 3)))
    assert P == target.shape[0] * target.shape[2] * target.shape[3]


def test_imitate_recalibrated_leaves_each_output_channel_mean_free(monkeypatch):
    """imitate="recalibrated": the loss is the BatchNorm's output error with each channel's mean
    over the positions removed; the Gram statistics and the materialised candidates agree."""
    from gfs.pruning import criteria

    for name, producer, consumer_bn in (("cnn", "0", "5"), ("mlp", "1", "4")):
        model, x = build(name)
        res = prune(model, x, ratio=0.5, layers=producer, imitate="recalibrated", step="refit", progress=False)
        r = res.report[0]
        _, orig = outputs_at(eval_copy(model), x, [consumer_bn])
        _, new = outputs_at(res.model, x, [consumer_bn])
        err = new[consumer_bn].double() - orig[consumer_bn].double()
        err = err - err.mean((0, 2, 3) if err.dim() == 4 else 0, keepdim=True)
        want = float((err**2).mean())
        assert abs(r.loss - want) <= 1e-4 * want, (name, r.loss, want)
        monkeypatch.setattr(criteria.LocalImitation, "method", "materialise")
        mat = prune(model, x, ratio=0.5, layers=producer, imitate="recalibrated", step="refit", progress=False)
        monkeypatch.undo()
        assert torch.equal(mat.report[0].kept, r.kept), name
        torch.testing.assert_close(mat.report[0].scale, r.scale, rtol=1e-4, atol=1e-6)
        assert mat.report[0].loss == pytest.approx(r.loss, rel=1e-4)
    model, x = build("mlp")  # a constant channel into the Linear consumer: its centred output is 0
    with torch.no_grad():
        model[1].weight[5] = 0.0
        model[1].bias[5] = 1e3
    res = prune(model, x, ratio=0.5, layers="1", imitate="recalibrated", step="refit", progress=False)
    _, orig = outputs_at(eval_copy(model), x, ["4"])
    _, new = outputs_at(res.model, x, ["4"])
    err = new["4"].double() - orig["4"].double()
    want = float(((err - err.mean(0, keepdim=True)) ** 2).mean())
    assert abs(res.report[0].loss - want) <= 1e-4 * want


# ---- save / load -----------------------------------------------------------------------------


def test_save_and_reload_in_a_new_process(pruned, tmp_path):
    cases = []
    for arch, (_, _, x, result) in pruned.items():
        fmt = "torch" if arch == "cnn" else "auto"
        path = tmp_path / f"{arch}.gfs"
        save(result.model, path, format=fmt)
        model = eval_copy(result.model)
        with torch.no_grad():
            torch.save({"x": x, "y": model(x)}, tmp_path / f"{arch}.io")
        cases.append(arch)
    script = textwrap.dedent(f"""
        import sys, torch
        from gfs.pruning import load
        torch.set_num_threads(1)
        for arch in {cases!r}:
            model = load(r"{tmp_path}/" + arch + ".gfs").eval()
            io = torch.load(r"{tmp_path}/" + arch + ".io", weights_only=True)
            with torch.no_grad():
                y = model(io["x"])
            assert torch.equal(y, io["y"]), arch
            print(arch, type(model).__name__, "ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == len(cases)
    assert "ResNet ok" in done.stdout and "MobileNetV3 ok" in done.stdout


def test_load_never_runs_code_from_the_file(tmp_path):
    import json

    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    model = mlp()
    path = tmp_path / "m.safetensors"
    save(model, path)
    assert type(load(path)) is nn.Sequential
    # a file naming a class outside the allow-list: refused, and its module never imported
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    arch = json.loads(meta["gfs_architecture"])
    arch["root"]["children"]["1"]["type"] = "antigravity.Fly"
    save_file(tensors, str(tmp_path / "evil.safetensors"), metadata={**meta, "gfs_architecture": json.dumps(arch)})
    with pytest.raises(UnsafeFileError, match="antigravity.Fly.*not in the allow-list"):
        load(tmp_path / "evil.safetensors")
    assert "antigravity" not in sys.modules
    # a torch.save file with a pickled object that would run code: the restricted unpickler refuses
    marker = tmp_path / "ran"
    torch.save(
        {"format": "gfs-module/1", "gfs_architecture": "{}", "tensors": {}, "x": _Boom(str(marker))},
        tmp_path / "evil.pt",
    )
    with pytest.raises(UnsafeFileError, match="refused to unpickle it.*Unsupported global"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(TypeError, match="not in the allow-list.*Branchy"):
        save(Branchy(), tmp_path / "b.safetensors")


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
