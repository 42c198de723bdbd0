"""gfs.prune keeps the live activations between groups, reports "local"'s losses from its
statistics and checks folds on a sample of positions (issue 16), and gives what the recomputing
path gave before (tests/prune_reference.py, today's code as it was): the same pruned model, kept
channels, scales and selections bit for bit, the same fold errors, and the same losses (bit for
bit where they are still measured on the consumer's output, to the rounding of the statistics
where they come from them)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gfs.pruning import fold, prune
from gfs.pruning import run as run_module
from prune_reference import reference_prune
from test_prune import build

pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")


def two_batches(x):
    """The calibration data in two batches (the runs go batch by batch)."""
    h = max(1, x.shape[0] // 2)
    return [x[:h], x[h:]] if x.shape[0] > 1 else [x]


def same_model(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.params == b.params and a.flops == b.flops


def same_result(new, old, *, stats_losses):
    """new (this code) against old (the recomputing path): bit for bit but the losses "local"
    now takes from its statistics (those to their rounding)."""
    same_model(new, old)
    assert len(new.report) == len(old.report)
    for rn, ro in zip(new.report, old.report, strict=True):
        assert torch.equal(rn.kept, ro.kept) and torch.equal(rn.scale, ro.scale), rn.name
        for f in ("name", "channels_after", "sampled", "gap", "network_loss", "network_dense_loss", "top1"):
            assert getattr(rn, f) == getattr(ro, f), (rn.name, f)
        assert rn.fold_error == ro.fold_error or rn.fold_error <= 1e-6 >= ro.fold_error, rn.name
        if stats_losses:
            scale = max(ro.loss, ro.dense_loss)
            assert abs(rn.loss - ro.loss) <= 1e-4 * scale + 1e-12, (rn.name, rn.loss, ro.loss)
            assert abs(rn.dense_loss - ro.dense_loss) <= 1e-4 * scale + 1e-12, (rn.name, rn.dense_loss, ro.dense_loss)
        else:
            assert (rn.loss, rn.dense_loss) == (ro.loss, ro.dense_loss), rn.name
    assert new.selections.keys() == old.selections.keys()
    for k in new.selections:
        a, b = new.selections[k], old.selections[k]
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights), k
        assert torch.equal(a.losses, b.losses), k


CASES = [
    ("resnet18", dict(ratio=0.5)),
    ("resnet50", dict(ratio=0.5)),
    ("mobilenet_v2", dict(ratio=0.5)),
    ("mobilenet_v3_small", dict(ratio=0.5)),  # squeeze-excitation; groups nested in groups
    ("cnn", dict(ratio=0.5)),
    ("mlp", dict(keep=5)),
    ("resnet18", dict(ratio=0.5, step="line_search", replacement=True)),
    ("mobilenet_v2", dict(ratio=0.5, criterion="l1")),
    ("resnet18", dict(ratio=0.5, criterion="random", seed=3)),
    ("cnn", dict(keep=3, criterion="loss", loss_candidates=5, shortlist=3)),
]


@pytest.mark.parametrize("arch, kwargs", CASES, ids=[f"{a}-{'-'.join(map(str, k.values()))}" for a, k in CASES])
def test_the_same_result_as_the_recomputing_path(arch, kwargs):
    model, x = build(arch)
    batches = two_batches(x)
    new = prune(model, batches, progress=False, **kwargs)
    old = reference_prune(model, batches, progress=False, **kwargs)
    same_result(new, old, stats_losses=kwargs.get("criterion", "local") == "local")


def test_local_losses_are_the_selections_own():
    """The report's losses of "local" are those of the selection's last step and its dense loss
    (both from the same statistics), and every phase of the run is timed."""
    model, x = build("resnet18")
    res = prune(model, two_batches(x), ratio=0.5, progress=False)
    for r in res.report:
        sel = res.selections[r.name]
        assert r.loss == pytest.approx(float(sel.losses[-1]), rel=1e-9, abs=1e-12)
        assert r.dense_loss == pytest.approx(max(0.0, sel.dense_loss), rel=1e-9, abs=1e-12)
        assert {"pruned", "original", "statistics", "select", "losses", "fold", "fold check"} <= set(r.phases)
        assert sum(r.phases.values()) <= r.seconds * 1.01 + 1e-3
    assert {"setup", "pruned", "original", "statistics", "select", "fold", "finish"} <= set(res.timings)
    assert sum(res.timings.values()) <= res.seconds * 1.01 + 1e-3
    assert "seconds by phase: " in res.summary()
    assert res.memory["checkpoint_bytes"] > 0 and res.memory["checkpoints_skipped"] == 0


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_recomputing_above_the_budget_gives_the_same_bits(monkeypatch, arch):
    """With no memory for checkpoints (ACTIVATION_BUDGET=0) every pass starts from the input:
    the same values, so the same result, bit for bit."""
    model, x = build(arch)
    kept = prune(model, two_batches(x), ratio=0.5, progress=False)
    monkeypatch.setattr(run_module, "ACTIVATION_BUDGET", 0)
    again = prune(model, two_batches(x), ratio=0.5, progress=False)
    assert again.memory["checkpoints_skipped"] > 0 and again.memory["checkpoint_bytes"] == 0
    same_model(again, kept)
    for a, b in zip(again.report, kept.report, strict=True):
        da, db = a.as_dict(), b.as_dict()
        da.pop("seconds"), db.pop("seconds")
        assert da == db


class ChangesAValueInPlace(nn.Module):
    """A live value (``a``, needed after the group) is changed in place between the group's
    producer and its consumer: a checkpoint holding it by reference is spoiled."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 12, 3, padding=1)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 10, 1)
        self.c4 = nn.Conv2d(10, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        a = self.c0(x)
        h = F.relu(self.b1(self.c1(a)))
        a.mul_(0.5)  # a is live at c1 (the producer) and used after c2
        h = self.c2(h) + a
        h = self.c4(F.relu(self.c3(h)))
        return self.head(h.mean((2, 3)))


def test_a_value_changed_in_place_spoils_its_checkpoint_and_is_recomputed():
    torch.manual_seed(0)
    model = ChangesAValueInPlace().eval()
    x = torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    new = prune(model, two_batches(x), keep=4, progress=False)
    assert [g.name for g in new.groups] == ["c1", "c3"]
    assert new.memory["checkpoints_spoiled"] >= 1
    same_result(new, reference_prune(model, two_batches(x), keep=4, progress=False), stats_losses=True)


def strided():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1),
        nn.BatchNorm2d(10),
        nn.ReLU(),
        nn.Conv2d(10, 7, (3, 5), stride=(2, 3), dilation=(2, 1), padding=(3, 1)),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(7, 4),
    ).eval()
    return model, torch.randn(6, 3, 13, 11, generator=torch.Generator().manual_seed(2))


def test_the_sampled_fold_check_is_the_full_one_and_catches_a_wrong_fold(monkeypatch):
    """Forced onto the sample (FULL_CHECK_MACS=0, 16 positions), the fold check of a correct fold
    is at the rounding level, as the full check's; a fold that scales one kept column wrongly, or
    that keeps the wrong channel, is caught (on a sample of 16 of the 2 x 8 x 8 positions)."""
    model, x = build("cnn")
    full = prune(model, two_batches(x), keep=5, progress=False)
    monkeypatch.setattr(run_module, "FULL_CHECK_MACS", 0)
    monkeypatch.setattr(run_module, "CHECK_POSITIONS", 16)
    sampled = prune(model, two_batches(x), keep=5, progress=False)
    same_model(sampled, full)
    for a, b in zip(sampled.report, full.report, strict=True):
        assert a.fold_error <= 1e-6 and b.fold_error <= 1e-6
    assert sampled.report[0].fold_error != full.report[0].fold_error  # not the same computation

    real = fold.apply

    def wrong_scale(model, group, keep, scale, se_means=None):
        scale = scale.clone()
        scale[-1] *= 1.01
        real(model, group, keep, scale, se_means)

    def wrong_channel(model, group, keep, scale, se_means=None):
        missing = sorted(set(range(group.channels)) - set(keep.tolist()))
        keep = keep.clone()
        keep[0] = missing[0]
        real(model, group, keep.sort().values, scale, se_means)

    monkeypatch.setattr(run_module, "CHECK_POSITIONS", 4)
    for arch in ("mlp", "strided"):  # Linear consumers; a strided, dilated, padded conv consumer
        m, xs = build(arch) if arch == "mlp" else strided()
        monkeypatch.setattr(run_module, "FULL_CHECK_MACS", 0)
        res = prune(m, two_batches(xs), keep=3, progress=False)
        monkeypatch.setattr(run_module, "FULL_CHECK_MACS", 1 << 40)
        ref = prune(m, two_batches(xs), keep=3, progress=False)
        same_model(res, ref)
        assert all(r.fold_error <= 1e-6 for r in res.report + ref.report), arch
        assert all(a.fold_error != b.fold_error for a, b in zip(res.report, ref.report, strict=True)), arch
    monkeypatch.setattr(run_module, "FULL_CHECK_MACS", 0)
    monkeypatch.setattr(run_module, "CHECK_POSITIONS", 16)

    for bad in (wrong_scale, wrong_channel):
        monkeypatch.setattr(run_module, "fold_into", bad)
        res = prune(model, two_batches(x), keep=5, progress=False)
        assert all(r.fold_error > 1e-4 for r in res.report), (bad.__name__, [r.fold_error for r in res.report])


def test_a_resumed_run_replays_without_running_the_groups_before(monkeypatch, tmp_path):
    """Resuming after every group but the last: the groups before are folded, not captured
    (one pass of the pruned network to the last finished group's consumer for its fold check)."""
    model, x = build("resnet18")
    path = tmp_path / "r.ckpt"
    whole = prune(model, two_batches(x), ratio=0.5, progress=False, checkpoint=path)
    again = prune(model, two_batches(x), ratio=0.5, progress=False, checkpoint=path)
    same_model(again, whole)
    assert [r.fold_error for r in again.report] == [r.fold_error for r in whole.report]
    assert not math.isnan(again.report[-1].fold_error)
    assert "statistics" not in again.timings and "original" not in again.timings


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])  # (MobileNetV2 has no 3x3 consumer with groups=1)
def test_shifted_statistics_prune_what_the_offsets_identity_prunes(monkeypatch, arch):
    """The stride-1 3x3 consumers' statistics by shifted products (issue 16) give the prune the
    offsets identity gave: the same kept channels, scales and losses to the rounding of the
    float32 products."""
    from gfs.stats import layers

    model, x = build(arch)
    batches = two_batches(x)
    ran = []
    real = layers._shift_stats
    monkeypatch.setattr(layers, "_shift_stats", lambda *a, **k: ran.append(1) or real(*a, **k))
    new = prune(model, batches, ratio=0.5, progress=False)
    assert ran  # the shifted products ran
    rule = layers.conv2d_method
    monkeypatch.setattr(layers, "conv2d_method", lambda *a, shift_rows=None, **k: rule(*a, **k))
    ran.clear()
    old = prune(model, batches, ratio=0.5, progress=False)
    assert not ran
    for rn, ro in zip(new.report, old.report, strict=True):
        assert torch.equal(rn.kept, ro.kept), rn.name
        torch.testing.assert_close(rn.scale, ro.scale, rtol=1e-4, atol=1e-6)
        scale = max(ro.loss, ro.dense_loss)
        assert abs(rn.loss - ro.loss) <= 1e-4 * scale + 1e-12, (rn.name, rn.loss, ro.loss)
