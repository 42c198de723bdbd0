"""benchmarks/quality.py (`gfs bench quality`) in pieces, on random models and generated IDX files:
methods by name, FLOPs as a function of the channels kept (exact against the pruned models), the
FLOPs-matched budgets (uniform ratio, greedy per FLOP, equal relative loss), per-group keep counts,
BatchNorm recalibration, the weight-norm rescale, and a tiny end-to-end run that resumes without
recomputing a cell and writes its report."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

import gfs
from gfs.models import build_model, internal_layers
from gfs.prune_cli import _bench_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def Q():
    path = _bench_script("quality")
    spec = importlib.util.spec_from_file_location("gfs_bench_quality_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _trained_like(name, size=16, seed=0):
    model = build_model(name, 10, seed=seed)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, size, size, generator=g))
    return model.eval()


def _calib(size=16, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


def test_methods_by_name(Q):
    assert Q.parse_method("gfs") == {"name": "gfs", "kind": "gfs", **Q.GFS_DEFAULTS}
    assert Q.parse_method("gfs-refit")["step"] == "refit"
    m = Q.parse_method("gfs[step=line_search,budget=eps,rounds=2,rescale=1]")
    assert (m["step"], m["budget"], m["rounds"], m["rescale"]) == ("line_search", "eps", 2, 1)
    assert Q.parse_method("tp-lamp-global") == {
        "name": "tp-lamp-global",
        "kind": "tp",
        "importance": "lamp",
        "global": True,
    }
    assert Q.parse_method("tp-taylor")["global"] is False
    for bad in ("gfs[step=newton]", "gfs[foo=1]", "tp-magic", "l1"):
        with pytest.raises(ValueError):
            Q.parse_method(bad)
    assert Q._split_methods("gfs,gfs[step=refit,rounds=2],tp-l1") == ["gfs", "gfs[step=refit,rounds=2]", "tp-l1"]
    assert len(set(Q.ALL_METHODS)) == len(Q.ALL_METHODS) == len(Q.METHODS) + 12
    assert set(Q.DEFAULT_METHODS) <= set(Q.ALL_METHODS) and set(Q.QUICK_METHODS) <= set(Q.ALL_METHODS)
    assert Q.parse_method("gfs-nofold")["fold"] == 0 and Q.parse_method("gfs[fold=0]")["fold"] == 0
    assert Q.parse_method("gfs-count")["budget"] == "count" == Q.parse_method("gfs[budget=count]")["budget"]
    assert Q.parse_method("gfs")["imitate"] == "output"
    assert Q.parse_method("gfs[step=refit,imitate=normalized]")["imitate"] == "normalized"
    with pytest.raises(ValueError, match="imitate must be"):
        Q.parse_method("gfs[imitate=bn]")
    m = Q.parse_method("gfs[criterion=loss,shortlist=8]")
    assert (m["criterion"], m["shortlist"]) == ("loss", 8)
    for bad in ("gfs[criterion=taylor]", "gfs[criterion=loss,step=refit]", "gfs[shortlist=4]"):
        with pytest.raises(ValueError, match="criterion|shortlist"):
            Q.parse_method(bad)


@pytest.mark.parametrize("name", ["resnet56", "mobilenet_v2"])
def test_flop_model_is_exact_and_the_budgets_meet_the_target(Q, name):
    model, calib = _trained_like(name), _calib()
    layers = internal_layers(name)
    groups = Q.chosen_groups(model, layers, calib[0][0])
    fm = Q.FlopModel(model, groups, calib[0][0])
    assert fm.flops(dict(fm.channels)) == fm.dense and fm.fixed == 0
    for factor in (2, 4):
        target = fm.dense / factor
        ratio = fm.uniform_ratio(target)
        result = gfs.prune(model, calib, ratio=ratio, layers=layers, progress=False)
        assert result.flops[1] == pytest.approx(fm.flops(fm.keeps_for_ratio(ratio)), rel=1e-9)
        assert result.flops[1] <= target
        assert [r.channels_after for r in result.report] == [fm.keeps_for_ratio(ratio)[g.name] for g in groups]
        # one more channel anywhere (a larger ratio) would break the target
        assert fm.flops(fm.keeps_for_ratio(min(1.0, ratio + 1.0 / max(fm.channels.values())))) > target
        # budget=count: one count K for every group (smaller groups whole), the largest within the target
        same = fm.equal_count(target)
        K = max(same.values())
        assert fm.flops(same) <= target and same == {g: min(K, c) for g, c in fm.channels.items()}
        assert fm.flops({g: min(K + 1, c) for g, c in fm.channels.items()}) > target
    # per-group keep counts (gfs.prune's keep= mapping)
    keeps = {g.name: 1 + (i % g.channels) for i, g in enumerate(groups)}
    result = Q.prune_keeps(model, calib, keeps, layers=layers, progress=False)
    assert [r.channels_after for r in result.report] == [keeps[g.name] for g in groups]
    assert result.flops[1] == pytest.approx(fm.flops(keeps), rel=1e-9)


def test_lamp_budget_is_torch_prunings_allocation(Q):
    """budget=lamp: every group keeps the channels LAMP global leaves it, gfs choosing which: the
    architecture (FLOPs, parameters, channels per group) of tp-lamp-global at the same target."""
    pytest.importorskip("torch_pruning")
    from gfs.pruning.fold import count_flops, count_parameters

    model, calib = _trained_like("mobilenet_v2"), _calib()
    layers = internal_layers("mobilenet_v2")
    target = count_flops(model, calib[0][0][:1]) / 2
    tp, _ = Q.tp_method(model, calib, layers, target, Q.parse_method("tp-lamp-global"), 0)
    ours, info = Q.gfs_method(model, calib, layers, target, Q.parse_method("gfs-lamp-budget"), None, 0)
    groups = Q.chosen_groups(model, layers, calib[0][0])
    keeps = info["rounds"][0]["keeps"]
    assert keeps == {g.name: tp.get_submodule(g.producer).weight.shape[0] for g in groups}
    assert len(set(keeps.values())) > 1  # not one ratio for every group
    example = calib[0][0][:1]
    assert count_flops(ours, example) == count_flops(tp, example) <= target
    assert count_parameters(ours) == count_parameters(tp)


def test_allocations_from_loss_curves(Q):
    model, calib = _trained_like("resnet56"), _calib()
    groups = Q.chosen_groups(model, None, calib[0][0])
    fm = Q.FlopModel(model, groups, calib[0][0])
    profile = gfs.prune(model, calib, ratio=1.0, progress=False)
    curves = Q.relative_curves(model, calib, profile, groups)
    for g in groups:
        c = curves[g.name]
        assert len(c) == g.channels + 1 and c[0] == 1.0 and np.all(np.diff(c) <= 0) and c[-1] < 1e-6
    target = fm.dense / 3
    greedy = fm.allocate(curves, target)
    assert fm.flops(greedy) <= target and all(1 <= greedy[g] <= c for g, c in fm.channels.items())
    assert fm.flops(greedy) > target - max(fm.flops({**greedy, g: greedy[g] + 1}) - fm.flops(greedy) for g in greedy)
    equal, eps = fm.equal_loss(curves, target)
    assert fm.flops(equal) <= target and 0 < eps
    assert all(curves[g][equal[g]] <= eps for g in equal)  # every group within the same relative loss


def test_recalibration_and_rescale(Q):
    model, calib = _trained_like("resnet56", seed=3), _calib(n=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recal = Q.recalibrate_bn(model, calib)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched
    bn = recal.bn1
    with torch.no_grad():
        h = model.conv1(torch.cat([b[0] for b in calib]))
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == model.bn1.momentum and not recal.training

    groups = Q.chosen_groups(model, None, calib[0][0])
    pruned = gfs.prune(model, calib, ratio=0.25, progress=False).model
    x = calib[0][0]
    with torch.no_grad():
        out = pruned(x)
        done = Q.rescale_into_bn(pruned, model, groups)
        assert len(done) == 27 and torch.allclose(pruned(x), out, rtol=1e-4, atol=1e-3)
    w, ref = pruned.layer2[3].conv2.weight, model.layer2[3].conv2.weight
    assert torch.allclose(w.flatten(1).norm(dim=1), ref.flatten(1).norm(dim=1), rtol=1e-5)


def test_tiny_run_resumes_and_reports(Q, tmp_path, monkeypatch, capsys):
    from test_data_images import write_fashion

    write_fashion(str(tmp_path / "fm"), n_train=64, n_test=32)
    argv = [
        "--data",
        f"fashion-mnist:{tmp_path / 'fm'}",
        "--models",
        "resnet56",
        "--methods",
        "gfs,tp-l1",
        "--factors",
        "2",
        "--seeds",
        "1",
        "--train-samples",
        "64",
        "--image-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--calib",
        "32",
        "--recal",
        "32",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out" / "quality"),
    ]
    assert Q.main(argv) == 0
    cells = os.listdir(tmp_path / "work" / "cells")
    tp_present = importlib.util.find_spec("torch_pruning") is not None
    assert sorted(cells) == sorted(
        ["resnet56-seed0-x2-gfs.json"] + (["resnet56-seed0-x2-tp-l1.json"] if tp_present else [])
    )
    res = json.loads((tmp_path / "out" / "quality.json").read_text())
    row = next(r for r in res["rows"] if r["method"] == "gfs")
    assert row["flops"] <= row["dense_flops"] / 2 and row["seeds"] == [0]
    assert all(0 <= row[s][0] <= 1 for s in ("pruned", "recalibrated", "finetuned"))
    if tp_present:
        tp = next(r for r in res["rows"] if r["method"] == "tp-l1")
        assert tp["flops"] == row["flops"] and tp["params"] == row["params"]  # the same architecture
    else:
        assert "torch-pruning" in res["skipped"]
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "| gfs |" in md and "2x fewer FLOPs" in md
    assert os.path.isfile(tmp_path / "out" / "quality.png") or res["figure"] is None

    # a rerun computes nothing (the dense weights and the cells are reused) and writes the same rows
    monkeypatch.setattr(Q, "run_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert Q.main(argv) == 0
    again = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert again["rows"] == res["rows"]
    # other settings in the same work folder are refused
    with pytest.raises(SystemExit, match="other settings"):
        Q.main([*argv, "--epochs", "2"])
    capsys.readouterr()
