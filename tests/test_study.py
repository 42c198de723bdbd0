"""gfs.experiments.pretraining_study: the protocol's pieces, the red line, the IDX reader, and a
tiny study that writes its table and figure and resumes without recomputing."""

import gzip
import json
import os

import numpy as np
import pytest
import torch

from gfs.data import Dataset, IdxError, balanced_quotas, balanced_subsets, load_mnist_idx, read_idx
from gfs.experiments import PretrainingConfig, pretraining_study, red_line
from gfs.experiments import cli as study_cli
from gfs.experiments import pretraining as P

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dataset(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % 10
    centres = rng.normal(size=(10, d))
    X = torch.from_numpy((centres[classes] + 0.7 * rng.normal(size=(n, d))).astype(np.float32))
    y = torch.from_numpy(classes.astype(np.int64))
    return Dataset("tiny", X, y, X[:0], y[:0], 10)


TINY = dict(
    widths=(8, 24),
    sizes=(40, 100, 200),
    iterations=40,
    prune_every=20,
    k=6,
    seeds=(0, 1),
    batch_size=16,
    backend="torch",
)


def test_balanced_nested_subsets():
    classes = np.repeat(np.arange(10), [30, 30, 30, 30, 30, 30, 30, 30, 30, 5])
    subs = balanced_subsets(classes, [20, 55, 120, 275], seed=3)
    for s, idx in subs.items():
        assert len(idx) == len(set(idx.tolist())) == s
    counts = np.bincount(classes[subs[55]], minlength=10)
    assert counts.max() - counts.min() <= 1
    # a short class gives what it has, the others make up the rest
    assert np.bincount(classes[subs[275]], minlength=10)[9] == 5
    for a, b in [(20, 55), (55, 120), (120, 275)]:
        assert set(subs[a].tolist()) <= set(subs[b].tolist())
    assert np.array_equal(subs[55], balanced_subsets(classes, [55], seed=3)[55])
    assert balanced_quotas(7, np.array([10, 10, 10])).tolist() == [3, 2, 2]
    with pytest.raises(ValueError, match="larger than the data set"):
        balanced_quotas(31, np.array([10, 10, 10]))


def test_gradients_match_autograd():
    net = P.TwoLayer.init(12, 5, seed=1)
    X, y = torch.randn(9, 5), (torch.rand(9) > 0.5).float()
    params = [p.clone().requires_grad_(True) for p in net.parameters()]
    ref = P.TwoLayer(*params)
    torch.nn.functional.binary_cross_entropy_with_logits(ref.forward(X), y).backward()
    for got, p in zip(P.gradients(net, X, y), params, strict=True):
        assert torch.allclose(got, p.grad, atol=1e-6)


def test_candidates_average_to_the_dense_output():
    net = P.TwoLayer.init(16, 4, seed=0)
    X = torch.randn(30, 4)
    U = net.candidates(X)
    assert U.shape == (16, 30)
    assert torch.allclose(U.mean(0), net.forward(X), atol=1e-6)


def _summary(acc):
    """acc[(size, iteration)] -> summary rows of one width."""
    return [{"width": 5, "size": s, "iteration": t, "pruned_acc_mean": a} for (s, t), a in acc.items()]


def test_red_line_definition():
    its = [0, 10, 20, 30]
    table = {
        100: [0.5, 0.9, 0.95, 0.95],
        200: [0.5, 0.8, 0.93, 0.95],  # reaches A* = 0.95 at 30
        300: [0.5, 0.7, 0.9, 0.94],  # never
        400: [0.5, 0.6, 0.95, 0.94],  # the full set: A* = 0.95, first at 20
    }
    acc = {(s, t): v for s, row in table.items() for t, v in zip(its, row, strict=True)}
    line = red_line(_summary(acc))[5]
    assert line["target"] == 0.95 and line["target_iteration"] == 20
    assert line["sizes"] == [100, 200, 300, 400]
    assert line["thresholds"] == [20, 30, None, 20]
    assert red_line(_summary(acc), tol=0.011)[5]["thresholds"] == [20, 30, 30, 20]
    verdict = P.assess({5: line}, never_as=40)["per_width"][5]
    assert not verdict["non_decreasing"] and verdict["decreases"][0]["from"] is None


def test_assess_monotone_and_flat():
    line = {
        1: {"sizes": [1, 2, 3], "thresholds": [10, 10, 30], "target": 0.9, "target_iteration": 30},
        2: {"sizes": [1, 2, 3], "thresholds": [10, 10, 10], "target": 0.9, "target_iteration": 10},
    }
    a = P.assess(line, never_as=50)
    assert a["per_width"][1]["verdict"].startswith("grows, never decreases")
    assert a["per_width"][2]["verdict"].startswith("flat")
    assert a["widths_strict"] == 1 and a["widths_non_decreasing"] == 2
    text = P.finding_text(line, a, prune_every=10)
    assert "Mixed" in text and "1:10, 2:10, 3:30" in text


def _write_idx(path, arr, code):
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, dtype=">i4").tobytes()
    data = header + arr.astype({0x08: ">u1", 0x0D: ">f4"}[code]).tobytes()
    if path.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)


def test_idx_reader(tmp_path):
    images = np.arange(4 * 3 * 2, dtype=np.uint8).reshape(4, 3, 2)
    labels = np.array([0, 5, 9, 4], dtype=np.uint8)
    _write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images, 0x08)
    _write_idx(str(tmp_path / "train-labels.idx1-ubyte"), labels, 0x08)
    assert np.array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), images)
    data = load_mnist_idx(str(tmp_path), standardise=False, test=False)
    assert data.x_train.shape == (4, 6) and data.x_train.dtype == torch.float32
    assert abs(float(data.x_train.max()) - 23 / 255) < 1e-7 and len(data.x_test) == 0
    assert P.binary_labels(data.y_train).tolist() == [0, 1, 1, 0]
    floats = np.array([[1.5, -2.0]], dtype=np.float32)
    _write_idx(str(tmp_path / "f.idx"), floats, 0x0D)
    assert np.array_equal(read_idx(str(tmp_path / "f.idx")), floats)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(IdxError, match="bad magic number"):
        read_idx(str(tmp_path / "bad"))
    with pytest.raises(IdxError, match="train-labels-idx1-ubyte: not found"):
        load_mnist_idx(str(_only_images(tmp_path)), test=False)


def _only_images(tmp_path):
    d = tmp_path / "only"
    d.mkdir()
    _write_idx(str(d / "train-images-idx3-ubyte"), np.zeros((1, 2, 2), np.uint8), 0x08)
    return d


def test_mnist_path_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(str(tmp_path / "train-images-idx3-ubyte"), rng.integers(0, 256, (120, 28, 28)).astype(np.uint8), 0x08)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), (np.arange(120) % 10).astype(np.uint8), 0x08)
    cfg = PretrainingConfig.paper(
        str(tmp_path),
        widths=(8,),
        sizes=(50, 120),
        iterations=10,
        prune_every=5,
        k=4,
        seeds=(0,),
        backend="torch",
        threads=1,
    )
    res = pretraining_study(cfg, out=str(tmp_path / "out"), progress=False, plot=False)
    assert res.computed_cells == 2 and {r["size"] for r in res.rows} == {50, 120}
    assert json.load(open(res.files["summary_json"]))["dataset"] == {"name": "mnist", "examples": 120, "dim": 784}


def test_tiny_study_writes_table_and_figure_and_resumes(tmp_path, monkeypatch):
    out = str(tmp_path / "study")
    data = tiny_dataset()
    first = pretraining_study(PretrainingConfig(**TINY), out=out, progress=False, dataset=data)
    assert first.computed_cells == 12 and first.skipped_cells == 0
    for name in ("cells.jsonl", "results.csv", "summary.csv", "summary.json", "figure.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert len(first.rows) == 12 * 3  # checkpoints 0, 20, 40
    assert {r["iteration"] for r in first.rows} == {0, 20, 40}
    assert all(r["distinct"] <= 6 for r in first.rows)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["red_line"]) == {"8", "24"} and summary["finding"] == first.finding
    assert summary["summary"][0]["seeds"] == 2

    # a second run with the same out folder recomputes nothing
    monkeypatch.setattr(P, "run_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed a cell")))
    again = pretraining_study(PretrainingConfig(**TINY), out=out, progress=False, dataset=data)
    assert again.computed_cells == 0 and again.skipped_cells == 12
    assert again.summary == first.summary and again.red_line == first.red_line

    # without resume, existing cells are not silently discarded
    with pytest.raises(FileExistsError, match="--resume"):
        pretraining_study(PretrainingConfig(**TINY), out=out, progress=False, dataset=data, resume=False)
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="different settings"):
        pretraining_study(PretrainingConfig(**{**TINY, "k": 5}), out=out, progress=False, dataset=data)


def test_interrupted_study_resumes_to_the_same_result(tmp_path, monkeypatch):
    data = tiny_dataset(seed=1)
    cfg = dict(TINY, widths=(8,), seeds=(0,))
    whole = pretraining_study(
        PretrainingConfig(**cfg), out=str(tmp_path / "a"), progress=False, dataset=data, plot=False
    )

    real, calls = P.run_cell, []

    def dies_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(P, "run_cell", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        pretraining_study(PretrainingConfig(**cfg), out=str(tmp_path / "b"), progress=False, dataset=data, plot=False)
    with open(tmp_path / "b" / "cells.jsonl", "a") as fh:
        fh.write('{"width": 8, "size": 2')  # a torn line, as if killed mid-write
    monkeypatch.setattr(P, "run_cell", real)
    resumed = pretraining_study(
        PretrainingConfig(**cfg), out=str(tmp_path / "b"), progress=False, dataset=data, plot=False
    )
    assert resumed.skipped_cells == 2 and resumed.computed_cells == 1
    assert resumed.summary == whole.summary


def test_cli_quick(tmp_path, capsys):
    out = str(tmp_path / "q")
    argv = [
        "study",
        "pretraining",
        "--quick",
        "--out",
        out,
        "--backend",
        "torch",
        "--no-progress",
        "--seeds",
        "1",
        "--iterations",
        "40",
    ]
    assert study_cli.main(argv) == 0
    assert "cell(s) computed" in capsys.readouterr().out
    assert study_cli.main(argv) == 2  # cells exist, no --resume
    assert "--resume" in capsys.readouterr().err
    assert study_cli.main(argv + ["--resume"]) == 0
    assert "0 cell(s) computed, 6 resumed" in capsys.readouterr().out
    assert (
        study_cli.main(["study", "pretraining", "--mnist", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
        == 2
    )
    assert "not a folder" in capsys.readouterr().err


def test_study_data_specs():
    assert study_cli.study_data(None) == ("digits", None)
    assert study_cli.study_data("digits") == ("digits", None)
    assert study_cli.study_data("fashion-mnist") == ("fashion-mnist", None)
    assert study_cli.study_data("fashion-mnist:/d") == ("fashion-mnist", "/d")
    assert study_cli.study_data("mnist:/d") == ("mnist", "/d")
    assert study_cli.study_data(None, "/old") == ("mnist", "/old")  # --mnist DIR, deprecated
    for bad, why in (("mnist", "mnist:DIR"), ("cifar10:/x", "expected digits"), ("fashion", "expected digits")):
        with pytest.raises(ValueError, match=why):
            study_cli.study_data(bad)
    with pytest.raises(ValueError, match="only --data"):
        study_cli.study_data("digits", "/old")


def test_cli_data_fashion_mnist_and_the_old_mnist_flag(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "fm"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(str(folder / "train-images-idx3-ubyte.gz"), rng.integers(0, 256, (120, 28, 28)).astype(np.uint8), 0x08)
    _write_idx(str(folder / "train-labels-idx1-ubyte.gz"), (np.arange(120) % 10).astype(np.uint8), 0x08)
    grid = ["--widths", "8", "--sizes", "50,120", "--iterations", "10", "--prune-every", "5", "--k", "4"]
    grid += ["--seeds", "1", "--backend", "torch", "--threads", "1", "--no-progress"]
    out = tmp_path / "f"
    assert study_cli.main(["study", "pretraining", "--data", f"fashion-mnist:{folder}", "--out", str(out), *grid]) == 0
    assert "2 cell(s) computed" in capsys.readouterr().out
    summary = json.load(open(out / "summary.json"))
    assert summary["dataset"] == {"name": "fashion-mnist", "examples": 120, "dim": 784}

    # --mnist DIR still works, says it is deprecated
    assert study_cli.main(["study", "pretraining", "--mnist", str(folder), "--out", str(tmp_path / "m"), *grid]) == 0
    assert "deprecated" in capsys.readouterr().err
    assert json.load(open(tmp_path / "m" / "summary.json"))["dataset"]["name"] == "mnist"

    # fashion-mnist without a folder reads the Debian package's; absent, the error says how to get it
    monkeypatch.setattr("gfs.data.images.FASHION_MNIST_DIR", str(tmp_path / "absent"))
    assert study_cli.main(["study", "pretraining", "--data", "fashion-mnist", "--out", str(tmp_path / "a"), *grid]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert study_cli.main(["study", "pretraining", "--data", "svhn:/x", "--out", str(tmp_path / "b"), *grid]) == 2
    assert "--data 'svhn:/x'" in capsys.readouterr().err
