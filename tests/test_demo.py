"""`gfs demo` end to end (quick sizes: the two-layer part and the CNN part), and the MNIST IDX reader on small
files made here."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from gfs.data import IdxError, load_digits_split, load_mnist_idx, read_idx, write_idx

# -- IDX ----------------------------------------------------------------------------------------


def _write_mnist(folder, n_train=7, n_test=5, rows=4, cols=3, gz=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(os.path.join(folder, name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = _write_mnist(str(tmp_path), gz=gz)
    for name, array in arrays.items():
        back = read_idx(str(tmp_path / (name + (".gz" if gz else ""))))
        assert back.dtype == np.uint8 and back.shape == array.shape
        np.testing.assert_array_equal(back, array)

    ds = load_mnist_idx(str(tmp_path), standardise=False)
    assert ds.x_train.shape == (7, 12) and ds.x_test.shape == (5, 12)
    np.testing.assert_allclose(ds.x_train.numpy(), arrays["train-images-idx3-ubyte"].reshape(7, 12) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.classes == 10


def test_idx_other_dtypes_round_trip(tmp_path):
    for array in (np.arange(6, dtype=np.int32).reshape(2, 3) - 3, np.linspace(-1, 1, 8).astype(np.float32)):
        path = str(tmp_path / "a.idx")
        write_idx(path, array)
        np.testing.assert_array_equal(read_idx(path), array)


def test_idx_rejects_bad_magic_naming_the_file(tmp_path):
    _write_mnist(str(tmp_path))
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0:4] = b"\x12\x34\x08\x01"
    path.write_bytes(bytes(raw))
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte: bad magic number 0x12340801"):
        load_mnist_idx(str(tmp_path))


def test_idx_rejects_images_where_labels_belong(tmp_path):
    arrays = _write_mnist(str(tmp_path))
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), arrays["t10k-images-idx3-ubyte"])
    with pytest.raises(IdxError, match=r"t10k-labels-idx1-ubyte: bad magic number 0x00000803, expected 0x00000801"):
        load_mnist_idx(str(tmp_path))


def test_idx_rejects_truncated_and_mismatched_files(tmp_path):
    arrays = _write_mnist(str(tmp_path))
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1])
    with pytest.raises(IdxError, match=r"train-images-idx3-ubyte: \d+ bytes, but the header's shape \(7, 4, 3\)"):
        load_mnist_idx(str(tmp_path))

    write_idx(str(images), arrays["train-images-idx3-ubyte"][:6])  # 6 images, 7 labels
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte: 7 labels, but .*train-images-idx3-ubyte has 6"):
        load_mnist_idx(str(tmp_path))

    os.remove(images)
    with pytest.raises(IdxError, match=r"train-images-idx3-ubyte: not found"):
        load_mnist_idx(str(tmp_path))


def test_idx_gzipped_without_suffix_says_so(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(IdxError, match="gzipped"):
        read_idx(str(path))


# -- digits ---------------------------------------------------------------------------------------


def test_digits_split_is_fixed_and_standardised():
    a, b = load_digits_split(seed=0), load_digits_split(seed=0)
    assert len(a.x_train) + len(a.x_test) == 1797 and a.dim == 64 and a.classes == 10
    assert (a.x_train == b.x_train).all() and (a.y_test == b.y_test).all()
    assert abs(float(a.x_train.mean())) < 1e-5
    assert a.y_test.bincount().min() >= 30  # stratified: every class in the test split


# -- the demo -------------------------------------------------------------------------------------


def test_quick_demo_end_to_end(tmp_path, capsys):
    from gfs.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Pruning a 64-neuron two-layer net" in printed and "random" in printed and "naive" in printed

    for name in ("results.json", "accuracy_vs_k.png", "summary.txt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())

    assert res["dense"]["loss"] == pytest.approx(0.0, abs=1e-6)  # the target is the dense net itself
    rows = res["rows"]
    assert [r["k"] for r in rows] == [4, 8, 16, 32]
    for r in rows:
        gfs, rnd = r["gfs"], r["random"]
        assert gfs["steps"] == r["k"] and gfs["distinct"] <= r["k"]
        assert r["gfs_no_replacement"]["distinct"] == r["k"]
        # GFS minimises the imitation loss: far below random subsets of the same size.
        assert gfs["loss"] < 0.7 * rnd["loss"]
        assert r["gfs_no_replacement"]["loss"] < 0.7 * rnd["loss"]
    # ... and the pruned networks are more accurate, once they have a few neurons.
    assert sum(r["gfs"]["test_acc"] for r in rows[1:]) > sum(r["random"]["test_acc"] for r in rows[1:])
    assert rows[-1]["gfs"]["train_acc"] > rows[-1]["random"]["train_acc"]
    assert res["timing"]["same_picks"]
    assert res["timing"]["naive_steps_timed"] <= res["timing"]["k"]

    # the CNN part: ResNet-18 and MobileNetV2 trained, half their internal channels pruned, fine-tuned
    assert "Pruning torchvision CNNs with gfs 'local'" in printed and "speed-up" in printed
    cnn = {r["model"]: r for r in res["cnn"]}
    assert set(cnn) == {"resnet18", "mobilenet_v2"}
    assert cnn["resnet18"]["channels"] == [1920, 960] and cnn["mobilenet_v2"]["channels"] == [7136, 3568]
    for r in cnn.values():
        assert r["params"][1] < 0.7 * r["params"][0] and r["flops_per_image"][1] < 0.7 * r["flops_per_image"][0]
        assert set(r["accuracy"]) == {"dense", "pruned", "finetuned"}
        assert r["seconds_per_batch"]["pruned"] > 0 and r["speedup"] > 0
        assert len(r["train_history"]) == 1 and len(r["finetune_history"]) == 1


def test_demo_parts_can_be_skipped(tmp_path, capsys):
    from gfs.cli import main

    out = tmp_path / "cnn-only"
    assert (
        main(
            [
                "demo",
                "--quick",
                "--no-two-layer",
                "--cnn-models",
                "resnet18",
                "--cnn-epochs",
                "0",
                "--cnn-finetune-epochs",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert "rows" not in res and [r["model"] for r in res["cnn"]] == ["resnet18"]
    assert not (out / "accuracy_vs_k.png").exists() and (out / "summary.txt").stat().st_size > 0
    capsys.readouterr()
    assert main(["demo", "--no-two-layer", "--no-cnn"]) == 2
    assert "nothing to run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--cnn-models", "vgg16"])


def test_cli_rejects_unknown_backend(capsys):
    from gfs.cli import main

    assert main(["demo", "--quick", "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
