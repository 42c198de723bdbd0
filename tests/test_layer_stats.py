"""Layer statistics without forming N x M (gfs.stats.linear_stats / conv2d_stats / layer_stats),
each equal to the statistics of the materialised contributions, U U^T."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import gfs
from gfs import stats as S
from gfs.stats import layers as L


def _close(a: gfs.GramStats, b: gfs.GramStats, rtol=1e-10, ysum_rtol=1e-8):
    scale = float(torch.diagonal(b.G).max())
    torch.testing.assert_close(a.G, b.G, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(a.b, b.b, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(a.u_sum, b.u_sum, rtol=rtol, atol=rtol * scale)
    assert a.yy == pytest.approx(b.yy, rel=rtol) and a.count == b.count
    assert a.y_sum == pytest.approx(b.y_sum, rel=ysum_rtol, abs=ysum_rtol * (1 + abs(b.y_sum)))


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("with_target", [False, True])
def test_linear_equals_materialised(with_target):
    g = _g(0)
    x = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)  # (batch, tokens, C_in)
    W = torch.randn(3, 7, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    target = torch.randn(4, 5, 3, generator=g, dtype=torch.float64) if with_target else None
    got = S.linear_stats(x, W, target, bias)
    U = S.linear_contributions(x, W)
    assert U.shape == (7, 4, 5, 3)
    dense = F.linear(x, W)
    torch.testing.assert_close(U.mean(0), dense)  # the dense layer is the uniform average
    y = (target - bias) if with_target else dense
    _close(got, gfs.GramStats.from_features(U.reshape(7, -1), y.reshape(-1)))


CONVS = [
    dict(k=1, stride=1, padding=0, dilation=1),
    dict(k=1, stride=2, padding=1, dilation=1),
    dict(k=3, stride=1, padding=1, dilation=1),
    dict(k=3, stride=2, padding=2, dilation=2),
    dict(k=(2, 3), stride=(1, 2), padding=(0, 1), dilation=1),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "k{k}-s{stride}-p{padding}-d{dilation}".format(**c))
@pytest.mark.parametrize("method", ["offsets", "materialise"])
@pytest.mark.parametrize("with_target", [False, True])
def test_conv2d_equals_materialised(conv, method, with_target):
    g = _g(1)
    k = conv["k"] if isinstance(conv["k"], tuple) else (conv["k"], conv["k"])
    x = torch.randn(3, 5, 9, 8, generator=g, dtype=torch.float64)
    W = torch.randn(4, 5, *k, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    kw = dict(stride=conv["stride"], padding=conv["padding"], dilation=conv["dilation"])
    dense = F.conv2d(x, W, **kw)
    noise = 0.5 * torch.randn(dense.shape, generator=g, dtype=torch.float64)
    target = dense + bias[:, None, None] + noise if with_target else None
    got = S.conv2d_stats(x, W, target, bias, method=method, **kw)
    U = S.conv2d_contributions(x, W, **kw)
    torch.testing.assert_close(U.mean(0), dense)
    y = (target - bias[:, None, None]) if with_target else dense
    _close(got, gfs.GramStats.from_features(U.reshape(5, -1), y.reshape(-1)))


def test_accumulating_batches_and_modules():
    g = _g(2)
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1).double()
    xs = [torch.randn(2, 6, 10, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    stats = gfs.GramStats(6)
    for x in xs:
        with torch.no_grad():
            assert S.layer_stats(conv, x, conv(x), out=stats) is stats
    x = torch.cat(xs)
    U = S.conv2d_contributions(x, conv.weight.detach(), stride=2, padding=1)
    y = (conv(x) - conv.bias[:, None, None]).detach()
    _close(stats, gfs.GramStats.from_features(U.reshape(6, -1), y.reshape(-1)))
    lin = torch.nn.Linear(6, 3).double()
    xl = torch.randn(20, 6, generator=g, dtype=torch.float64)
    _close(S.layer_stats(lin, xl), S.linear_stats(xl, lin.weight.detach()))


def test_selection_on_layer_stats_folds_into_a_pruned_layer():
    """Weights w from the statistics give the pruned layer W'[:, j] = N w_j W[:, j] (bias kept),
    whose loss against the target is the selection's loss."""
    g = _g(3)
    conv = torch.nn.Conv2d(10, 6, 3, padding=1).double()
    x = torch.randn(4, 10, 7, 7, generator=g, dtype=torch.float64)
    with torch.no_grad():
        target = conv(x)
        stats = S.layer_stats(conv, x, target)
        for step in ("uniform", "line_search", "refit"):
            sel = gfs.select(stats, k=5, step=step)
            pruned = conv.weight * (10 * sel.weights)[None, :, None, None]
            out = F.conv2d(x, pruned, conv.bias, padding=1)
            assert float(((out - target) ** 2).mean()) == pytest.approx(sel.loss, rel=1e-9, abs=1e-12)
        dense = float(((F.conv2d(x, conv.weight, padding=1) + conv.bias[:, None, None] - target) ** 2).mean())
        assert stats.dense_loss == pytest.approx(dense, abs=1e-12)


def _picks(monkeypatch):
    """Record which method conv2d_stats ran: "materialise" builds the contributions, "offsets"
    goes through the patch statistics, "shifts" through the shifted products."""
    ran = []
    contributions, patch_stats, shift_stats = L.conv2d_contributions, L._patch_stats, L._shift_stats
    monkeypatch.setattr(L, "conv2d_contributions", lambda *a, **k: ran.append("materialise") or contributions(*a, **k))
    monkeypatch.setattr(L, "_patch_stats", lambda *a, **k: ran.append("offsets") or patch_stats(*a, **k))
    monkeypatch.setattr(L, "_shift_stats", lambda *a, **k: ran.append("shifts") or shift_stats(*a, **k))
    return ran


@pytest.mark.parametrize("with_target", [False, True])
def test_auto_method_follows_the_cost_model(monkeypatch, with_target):
    """method="auto" runs what conv2d_method decides for the layer's (C, C_out, K, positions,
    shifted rows): few outputs (C_out = 1 < K = 9) at stride 2 materialise, many (C_out = 64)
    take the shifted products, a 1x1 conv at stride 2 the offsets identity; and it follows the
    rule when the rule says otherwise. Either way the statistics are exact."""
    g = _g(4)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    ran = _picks(monkeypatch)
    rule_of_stats = L.conv2d_method  # the cost model's rule (gfs.engines.cost), as the layer statistics call it
    cases = ((1, 3, 2, 1, "materialise"), (64, 3, 1, 1, "shifts"), (64, 3, 2, 1, "shifts"), (64, 1, 2, 0, "offsets"))
    for C_out, k, stride, padding, expected in cases:
        H = (6 + 2 * padding - k) // stride + 1
        plan = L._shift_plan(6, 6, k, k, (stride,) * 2, (padding,) * 2, (1, 1), H, H)
        shift_rows = plan.rows(2) if k > 1 else None
        W = torch.randn(C_out, 4, k, k, generator=g, dtype=torch.float64)
        target = torch.randn(2, C_out, H, H, generator=g, dtype=torch.float64) if with_target else None
        conv = dict(padding=padding, stride=stride)
        assert rule_of_stats(4, C_out, k * k, 2 * H * H, with_target, shift_rows=shift_rows) == expected
        ran.clear()
        auto = S.conv2d_stats(x, W, target, **conv)
        assert set(ran) == {expected}, (C_out, ran)
        for method in ("offsets", "materialise", "shifts"):
            _close(auto, S.conv2d_stats(x, W, target, method=method, **conv))
        for forced in ("offsets", "materialise", "shifts"):  # the rule decides, whatever it says
            seen = []

            def rule(*a, forced=forced, seen=seen, **kw):
                seen.append(dict(inspect.signature(rule_of_stats).bind(*a, **kw).arguments))
                return forced

            monkeypatch.setattr(L, "conv2d_method", rule)
            ran.clear()
            S.conv2d_stats(x, W, target, **conv)
            assert set(ran) == {forced}, (forced, ran)
            asked = dict(C=4, C_out=C_out, K=k * k, positions=2 * H * H, has_target=with_target, shift_rows=shift_rows)
            assert seen == [asked], seen
            S.conv2d_stats(x, W, target, method="offsets" if forced != "offsets" else "materialise", **conv)
            assert len(seen) == 1  # an explicit method does not ask the rule
        monkeypatch.setattr(L, "conv2d_method", rule_of_stats)


SHIFTED = [  # convs for the shifted products: (kernel, stride, padding, dilation, H, W)
    ((3, 3), (1, 1), (1, 1), (1, 1), 9, 8),  # "same": one border row / column per offset
    ((3, 3), (1, 1), (0, 0), (1, 1), 6, 7),  # "valid": every offset reads less than the image
    ((3, 3), (1, 1), (2, 2), (2, 2), 9, 8),
    ((2, 3), (1, 1), (0, 1), (1, 1), 5, 5),
    ((5, 5), (1, 1), (2, 2), (1, 1), 7, 6),
    ((3, 3), (1, 1), (3, 1), (1, 2), 4, 9),  # padding beyond the kernel: outputs that read only zeros
    ((3, 3), (1, 1), (1, 1), (1, 1), 1, 1),  # one pixel: most offsets read nothing
    ((1, 3), (1, 1), (0, 1), (1, 1), 3, 3),
    ((3, 3), (1, 1), (1, 1), (1, 1), 20, 18),  # large enough for the flat zero-padded layout
    ((3, 3), (1, 1), (2, 2), (2, 2), 36, 36),
    ((3, 3), (2, 2), (1, 1), (1, 1), 9, 8),  # stride 2: four phases of different sizes
    ((3, 3), (2, 2), (0, 0), (1, 1), 8, 9),
    ((3, 3), (2, 3), (2, 1), (2, 1), 11, 10),
    ((5, 5), (3, 3), (2, 2), (1, 1), 10, 11),
    ((1, 1), (2, 2), (0, 0), (1, 1), 7, 7),  # 1x1 at stride 2: one phase read
    ((3, 3), (2, 2), (1, 1), (1, 1), 40, 38),  # stride 2 in the flat layout
]


@pytest.mark.parametrize("geometry", SHIFTED, ids=lambda g: "k{}-s{}-p{}-d{}-{}x{}".format(*g))
@pytest.mark.parametrize("with_target", [False, True])
def test_shifts_equal_materialised(geometry, with_target):
    """method="shifts" (one product per phase pair and shift, borders corrected) equals the
    statistics of the materialised contributions on "same", "valid", dilated, rectangular,
    over-padded and strided convs, with the whole-image products over exact rectangles (small
    images) and over the flat zero-padded layout (large ones), summed over several chunks."""
    k, stride, padding, dilation, H, W = geometry
    g = _g(5)
    x = torch.randn(3, 5, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 5, *k, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    dense = F.conv2d(x, weight, **conv)
    target = dense + bias[:, None, None] + torch.randn(dense.shape, generator=g, dtype=torch.float64)
    got = S.conv2d_stats(x, weight, target if with_target else None, bias, method="shifts", **conv)
    chunked = S.conv2d_stats(
        x, weight, target if with_target else None, bias, method="shifts", out=gfs.GramStats(5, chunk=7), **conv
    )
    U = S.conv2d_contributions(x, weight, **conv)
    y = (target - bias[:, None, None]) if with_target else dense
    want = gfs.GramStats.from_features(U.reshape(5, -1), y.reshape(-1))
    _close(got, want)
    _close(chunked, want)
    plan = L._shift_plan(H, W, *k, stride, padding, dilation, *dense.shape[2:])
    assert (plan.padded is not None) == (H >= 18)


def test_shifts_in_float32_and_rescaled():
    """Float32 inputs: products in float32 over at most `chunk` positions, summed in float64
    (the statistics say so); data whose products would overflow float32 go through the offsets
    path's exact rescaling and give the same statistics scaled."""
    g = _g(6)
    x = torch.randn(4, 8, 20, 20, generator=g)
    weight = torch.randn(8, 8, 3, 3, generator=g)
    target = F.conv2d(x, weight, padding=1) + 0.1 * torch.randn(4, 8, 20, 20, generator=g)
    got = S.conv2d_stats(x, weight, target, padding=1, method="shifts")
    assert got.precision == torch.float32
    exact = S.conv2d_stats(x.double(), weight.double(), target.double(), padding=1, method="shifts")
    _close(got, exact, rtol=1e-5)
    big = S.conv2d_stats(x * 2.0**100, weight, target * 2.0**100, padding=1, method="shifts")
    assert torch.isfinite(big.G).all()
    torch.testing.assert_close(big.G * 2.0**-200, exact.G, rtol=1e-5, atol=1e-5 * float(exact.G.abs().max()))


@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pointwise_from_image_blocks(with_target, dtype):
    """A 1x1 conv over images of >= 128 positions takes X^T X and Y^T X from each image's
    (C, H W) block in place, a few images a product: the statistics of the materialised
    contributions (float32: to its rounding; any chunk)."""
    g = _g(7)
    x, weight, bias, noise = (
        torch.randn(*shape, generator=g).to(dtype).double()  # representable in dtype
        for shape in ((5, 6, 12, 11), (9, 6, 1, 1), (9,), (5, 9, 12, 11))
    )
    target = (F.conv2d(x, weight, bias) + noise).to(dtype).double()
    U = S.conv2d_contributions(x, weight)
    y = (target - bias[:, None, None]) if with_target else F.conv2d(x, weight)
    want = gfs.GramStats.from_features(U.reshape(6, -1), y.reshape(-1))
    args = (x.to(dtype), weight.to(dtype), target.to(dtype) if with_target else None, bias.to(dtype))
    assert 12 * 11 >= L._POINTWISE_MIN_POSITIONS
    for out in (None, gfs.GramStats(6, chunk=100)):
        got = S.conv2d_stats(*args, out=out)
        tol = 1e-10 if dtype == torch.float64 else 1e-5  # (float32: the target minus bias is rounded too)
        _close(got, want, rtol=tol, ysum_rtol=max(tol, 1e-8))
        assert got.precision == dtype


BAD = {
    "linear width": (lambda: S.linear_stats(torch.zeros(5, 4), torch.zeros(3, 6)), ValueError, "x must be (..., 6)"),
    "linear weight dims": (
        lambda: S.linear_stats(torch.zeros(5, 4), torch.zeros(3, 4, 1)),
        ValueError,
        "weight must have shape (C_out, C_in)",
    ),
    "conv channels": (
        lambda: S.conv2d_stats(torch.zeros(1, 3, 5, 5), torch.zeros(2, 4, 3, 3)),
        ValueError,
        "x must be (B, 4, H, W)",
    ),
    "target shape": (
        lambda: S.linear_stats(torch.zeros(5, 4), torch.zeros(3, 4), torch.zeros(5, 2)),
        ValueError,
        "target has shape (5, 2)",
    ),
    "nan input": (
        lambda: S.linear_stats(torch.full((5, 4), float("nan")), torch.zeros(3, 4)),
        ValueError,
        "x contains NaN or Inf",
    ),
    "wrong out": (
        lambda: S.linear_stats(torch.zeros(5, 4), torch.zeros(3, 4), out=gfs.GramStats(3)),
        ValueError,
        "out must be GramStats of n=4",
    ),
    "method": (
        lambda: S.conv2d_stats(torch.zeros(1, 4, 5, 5), torch.zeros(2, 4, 3, 3), method="fft"),
        ValueError,
        "unknown method 'fft'",
    ),
    "groups": (
        lambda: S.layer_stats(torch.nn.Conv2d(4, 4, 3, groups=2), torch.zeros(1, 4, 5, 5)),
        ValueError,
        "groups=1",
    ),
    "module": (lambda: S.layer_stats(torch.nn.ReLU(), torch.zeros(1, 4)), TypeError, "nn.Linear or nn.Conv2d"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_layer_inputs(case):
    fn, error, message = BAD[case]
    with pytest.raises(error) as info:
        fn()
    assert message in str(info.value)
