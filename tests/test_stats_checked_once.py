"""GramStats are checked once (issue 16, item 4): statistics that GramStats built itself, or that
passed validate(), are not validated again by gfs.select until they change; a loaded file, an
edit through torch (in place or by reassignment) are validated; the dense
loss is the same number as before, (yy - 2 mean(b) + mean(G)) / count."""

from __future__ import annotations

import pytest
import torch

import gfs
from gfs import GramStats


def _data(N=12, M=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(N, M, generator=g, dtype=torch.float64).to(dtype)
    return U, U.double().mean(0) + 0.3 * torch.randn(M, generator=g, dtype=torch.float64)


@pytest.fixture
def validations(monkeypatch):
    """Counts the O(N^2) validations."""
    calls = []
    real = GramStats.validate

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GramStats, "validate", counting)
    return calls


def test_statistics_built_by_gramstats_are_not_validated_again(validations):
    U, y = _data()
    for stats in (
        GramStats.from_features(U, y),
        GramStats(12).update(U[:, :20], y[:20]).update(U[:, 20:], y[20:]),  # products pending
        GramStats.from_features(U[:, :20], y[:20]).merge(GramStats.from_features(U[:, 20:], y[20:])),
        GramStats.from_features(U, y).to("cpu"),
    ):
        a = gfs.select(stats, k=5)
        b = gfs.select(stats, k=5, step="line_search")
        assert a.engine == b.engine == "gram"
    assert validations == []
    assert gfs.select(U, y, 5, engine="gram").engine == "gram" and validations == []


def test_loaded_statistics_are_validated_once(tmp_path, validations):
    U, y = _data()
    GramStats.from_features(U, y).save(tmp_path / "s.pt")
    stats = GramStats.load(tmp_path / "s.pt")
    first = gfs.select(stats, k=6)
    assert len(validations) == 1
    again = gfs.select(stats, k=6)
    assert len(validations) == 1
    assert torch.equal(first.indices, again.indices) and torch.equal(first.losses, again.losses)


def test_explicit_validate_always_checks_and_is_remembered(validations):
    stats = GramStats.from_features(*_data())
    stats.validate()
    stats.validate()
    assert len(validations) == 2
    gfs.select(stats, k=3)
    assert len(validations) == 2


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.G.__setitem__((1, 2), s.G[1, 2] * 1.5),  # in place
        lambda s: s.G.mul_(1.0),  # a write that changes no value still counts
        lambda s: s.b.add_(0.0),
        lambda s: setattr(s, "b", s.b.clone()),  # reassigned
        lambda s: setattr(s, "yy", s.yy * 2),
        lambda s: setattr(s, "count", s.count + 1),
    ],
    ids=["G in place", "G rewritten", "b in place", "b reassigned", "yy", "count"],
)
def test_any_change_through_torch_is_validated(edit, validations):
    stats = GramStats.from_features(*_data())
    gfs.select(stats, k=3)
    assert validations == []
    edit(stats)
    gfs.select(stats, k=3)
    assert len(validations) == 1
    gfs.select(stats, k=3)  # and remembered once it passed
    assert len(validations) == 1


def test_a_corrupted_edit_is_refused_after_a_clean_selection():
    stats = GramStats.from_features(*_data())
    gfs.select(stats, k=3)
    stats.G[0, 5] = stats.G[5, 0] = 10 * float(torch.sqrt(stats.G[0, 0] * stats.G[5, 5]))
    with pytest.raises(ValueError, match=r"stats.G is not positive semi-definite: \|G\[0,5\]\|"):
        gfs.select(stats, k=3)
    stats = GramStats.from_features(*_data())
    gfs.select(stats, k=3)
    stats.G[2, 2] = float("nan")
    with pytest.raises(ValueError, match="stats.G contains NaN or Inf"):
        gfs.select(stats, k=3)
    stats = GramStats.from_features(*_data())
    gfs.select(stats, k=3)
    stats.yy = float("inf")
    with pytest.raises(ValueError, match="stats.yy"):
        gfs.select(stats, k=3)


def test_merging_unchecked_statistics_makes_them_unchecked(tmp_path, validations):
    U, y = _data()
    GramStats.from_features(U[:, 20:], y[20:]).save(tmp_path / "half.pt")
    stats = GramStats.from_features(U[:, :20], y[:20]).merge(GramStats.load(tmp_path / "half.pt"))
    gfs.select(stats, k=3)
    assert len(validations) == 1


def test_a_rescaled_batch_stays_known_valid(validations):
    U, y = _data()
    stats = GramStats(12).update(U * 2.0**60, y * 2.0**60)  # float32 products rescaled exactly
    assert gfs.select(stats, k=4).indices.tolist() == gfs.select(GramStats.from_features(U, y), k=4).indices.tolist()
    assert validations == []


def test_inference_tensors_are_validated_every_time(validations):
    U, y = _data()
    with torch.inference_mode():
        stats = GramStats.from_features(U, y)
    gfs.select(stats, k=3)
    gfs.select(stats, k=3)
    assert len(validations) == 2


def test_dense_loss_is_the_same_number_and_follows_changes():
    U, y = _data()
    for stats in (GramStats.from_features(U, y), GramStats(12).update(U, y)):
        want = (stats.yy - 2.0 * float(stats.b.mean()) + float(stats.G.mean())) / stats.count
        assert stats.dense_loss == want
        assert gfs.select(stats, k=3).dense_loss == want
        stats.G.mul_(2.0)
        stats.b.mul_(2.0)
        want = (stats.yy - 2.0 * float(stats.b.mean()) + float(stats.G.mean())) / stats.count
        assert stats.dense_loss == want
