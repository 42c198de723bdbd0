"""`gfs prune` end to end on tiny settings, resume after an interrupt, errors naming the flag;
and the image data behind --data (digits, cifar10:DIR, imagefolder:DIR) on small files made here."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from gfs.cli import main
from gfs.data import DataSpecError, load_image_data

tv = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")

# resnet18 on 16x16 digits, a few hundred images: each run takes a second or two
TINY = [
    "--model",
    "resnet18",
    "--image-size",
    "16",
    "--train-samples",
    "192",
    "--test-samples",
    "96",
    "--calib-size",
    "48",
    "--batch-size",
    "32",
    "--no-progress",
]


def _flat(text):
    """Text without whitespace: rich wraps long lines (paths) at the console width."""
    return "".join(text.split())


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A state dict of resnet18 with 10 classes (random init): --weights without training."""
    from gfs.models import build_model
    from gfs.weights import save_weights

    path = tmp_path_factory.mktemp("w") / "resnet18-10.safetensors"
    save_weights(build_model("resnet18", 10, seed=3), str(path))
    return path


def test_prune_cli_trains_prunes_finetunes_and_saves(tmp_path, capsys):
    from gfs.pruning import load

    out = tmp_path / "pruned.safetensors"
    assert main(["prune", *TINY, "--out", str(out), "--train-epochs", "1", "--finetune-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "training resnet18 from scratch for 1 epoch" in printed
    assert "dense" in printed and "pruned (local)" in printed and "fine-tuned (1 ep)" in printed
    assert "internal channels" in printed and "FLOPs" in printed

    model = load(str(out))  # no pickle: gfs.pruning.io
    assert isinstance(model, tv.models.ResNet)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert model.layer1[0].conv1.out_channels == 32 and model.layer4[1].conv1.out_channels == 256
    assert os.path.isfile(str(out) + ".dense.safetensors")  # the trained dense weights, reusable as --weights
    assert not os.path.exists(str(out) + ".ckpt")  # removed once the result is saved

    rep = json.loads((tmp_path / "pruned.safetensors.json").read_text())
    assert rep["channels"] == [1920, 960] and rep["groups"] == 8
    assert rep["params"][1] < 0.6 * rep["params"][0] and rep["flops_per_image"][1] < rep["flops_per_image"][0]
    for key in ("dense", "pruned", "finetuned"):
        assert 0.0 <= rep["accuracy"][key] <= 1.0
    assert len(rep["finetune_history"]) == 1 and rep["job"]["criterion"] == "local"


def test_prune_cli_resume_after_interrupt_gives_the_same_model(tmp_path, monkeypatch, capsys):
    """Train from scratch, prune, interrupt after two groups; --resume reuses the trained weights
    (saved beside --out), replays the two groups, and ends with the uninterrupted run's model."""
    from gfs.pruning.criteria import CRITERIA

    common = ["prune", *TINY, "--train-epochs", "1", "--finetune-epochs", "1", "--criterion", "local"]
    whole = tmp_path / "whole.safetensors"
    assert main([*common, "--out", str(whole)]) == 0

    cut = tmp_path / "cut.safetensors"
    cls = CRITERIA["local"]
    original = cls.decide
    calls = []

    def decide_then_interrupt(self, ctx):
        calls.append(ctx.group.name)
        if len(calls) == 3:  # two groups finished and checkpointed
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(cls, "decide", decide_then_interrupt)
    assert main([*common, "--out", str(cut)]) == 130
    assert "--resume" in capsys.readouterr().err
    assert os.path.isfile(str(cut) + ".ckpt") and not cut.exists()
    # without --resume, an existing checkpoint is not silently thrown away
    monkeypatch.setattr(cls, "decide", original)
    assert main([*common, "--out", str(cut)]) == 2
    assert "pass --resume" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(cls, "decide", lambda self, ctx: (calls.append(ctx.group.name), original(self, ctx))[1])
    assert main([*common, "--out", str(cut), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "trained weights of the interrupted run" in printed
    assert len(calls) == 6  # only the 6 groups not checkpointed were selected again

    a, b = _tensors(whole), _tensors(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((tmp_path / "whole.safetensors.json").read_text())
    rb = json.loads((tmp_path / "cut.safetensors.json").read_text())
    assert [r["kept"] for r in ra["layers"]] == [r["kept"] for r in rb["layers"]]
    assert ra["accuracy"] == rb["accuracy"]


def test_prune_cli_resume_reuses_dense_weights_only_of_the_same_training(tmp_path, capsys):
    """OUT.dense.safetensors records what its training depended on; --resume reuses it only when
    this command would train the same weights, else trains afresh (saying why), or refuses when an
    interrupted run's checkpoint belongs to the other weights."""
    from safetensors.torch import save_file

    common = ["prune", *TINY, "--train-epochs", "1", "--finetune-epochs", "0"]
    out = tmp_path / "p.safetensors"
    dense = str(out) + ".dense.safetensors"
    assert main([*common, "--out", str(out)]) == 0  # a completed run: no checkpoint left, its dense weights kept
    capsys.readouterr()
    first = _tensors(dense)

    assert main([*common, "--out", str(out), "--resume", "--seed", "1"]) == 0  # another seed: not those weights
    printed = _flat(capsys.readouterr().out)
    assert (
        _flat(f"{dense} was trained with other settings (different: seed)") in printed
        and _flat("training afresh") in printed
    )
    assert _flat("training resnet18 from scratch") in printed and _flat("of the interrupted run") not in printed
    fresh = tmp_path / "fresh.safetensors"
    assert main([*common, "--out", str(fresh), "--seed", "1"]) == 0
    capsys.readouterr()
    reseeded, expected = _tensors(dense), _tensors(str(fresh) + ".dense.safetensors")
    assert any(not torch.equal(first[k], reseeded[k]) for k in first)
    assert all(torch.equal(reseeded[k], expected[k]) for k in expected)  # what --seed 1 trains

    assert main([*common, "--out", str(out), "--resume", "--seed", "1"]) == 0  # the same training: reused
    printed = _flat(capsys.readouterr().out)
    assert _flat("training resnet18 from scratch") not in printed
    assert _flat(f"trained weights of an earlier run with the same training settings, {dense}") in printed

    for flags, differ in (
        (["--train-epochs", "2"], "train_epochs"),
        (["--train-lr", "0.01"], "train_lr"),
        (["--batch-size", "16"], "batch_size"),
        (["--image-size", "12"], "image_size"),
        (["--train-samples", "160"], "train_images, train_samples"),
    ):
        (tmp_path / "p.safetensors.ckpt").write_bytes(b"an interrupted run")  # its checkpoint: refused up front
        assert main([*common, "--out", str(out), "--resume", "--seed", "1", *flags]) == 2  # (the last flag wins)
        err = _flat(capsys.readouterr().err)
        assert (
            _flat(f"--resume: {dense} was trained with other settings than this command (different: {differ})") in err
        )
        assert "delete" in err and "p.safetensors.ckpt" in err
    os.remove(tmp_path / "p.safetensors.ckpt")

    save_file(_tensors(dense), dense)  # a file without the record (an older gfs): not reused
    assert main([*common, "--out", str(out), "--resume", "--seed", "1"]) == 0
    printed = _flat(capsys.readouterr().out)
    assert _flat("carries no record of its training") in printed and _flat("training resnet18 from scratch") in printed


def test_prune_cli_nan_in_the_calibration_images_names_data(tmp_path, random_weights, monkeypatch, capsys):
    from gfs.data import ImageData

    real = ImageData.calibration

    def with_nan(self, *args, **kwargs):
        batches = real(self, *args, **kwargs)
        batches[0][0][0, 0, 0, 0] = float("nan")
        return batches

    monkeypatch.setattr(ImageData, "calibration", with_nan)
    assert (
        main(
            [
                "prune",
                *TINY,
                "--weights",
                str(random_weights),
                "--finetune-epochs",
                "0",
                "--out",
                str(tmp_path / "n.safetensors"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--data digits: the calibration images: calibration batch 0" in err and "NaN" in err


def test_prune_cli_baseline_criteria_and_keep(tmp_path, random_weights):
    from gfs.pruning import load

    for criterion in ("l1", "random"):
        out = tmp_path / f"{criterion}.safetensors"
        assert (
            main(
                [
                    "prune",
                    *TINY,
                    "--weights",
                    str(random_weights),
                    "--finetune-epochs",
                    "0",
                    "--keep",
                    "8",
                    "--criterion",
                    criterion,
                    "--layers",
                    "layer1.*",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        model = load(str(out))
        assert model.layer1[0].conv1.out_channels == 8 and model.layer2[0].conv1.out_channels == 128
        rep = json.loads((tmp_path / f"{criterion}.safetensors.json").read_text())
        assert rep["accuracy"]["finetuned"] is None and rep["channels"] == [128, 16]


def test_prune_cli_loss_criterion(tmp_path, random_weights):
    from gfs.pruning.criteria import CRITERIA

    if "loss" not in CRITERIA:
        pytest.skip("criterion 'loss' is not in this gfs.prune")
    out = tmp_path / "loss.safetensors"
    assert (
        main(
            [
                "prune",
                *TINY,
                "--weights",
                str(random_weights),
                "--finetune-epochs",
                "0",
                "--keep",
                "3",
                "--criterion",
                "loss",
                "--loss-candidates",
                "5",
                "--layers",
                "layer1.0.conv1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads((tmp_path / "loss.safetensors.json").read_text())
    assert rep["channels"] == [64, 3]


def test_prune_cli_errors_name_the_flag(tmp_path, random_weights, capsys):
    out = str(tmp_path / "x.safetensors")
    base = ["prune", *TINY, "--out", out, "--train-epochs", "0"]

    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "--data 'svhn:/x' is not a data spec" in err([*base, "--data", "svhn:/x"])
    msg = err([*base, "--data", f"cifar10:{tmp_path / 'none'}"])
    assert "--data cifar10:" in msg and "cifar-10-batches-py" in msg
    assert "--data imagefolder:" in err([*base, "--data", f"imagefolder:{tmp_path / 'none'}"])
    assert "--weights" in err([*base, "--weights", str(tmp_path / "missing.pt")])

    wrong = tmp_path / "r18-1000.pt"
    torch.save(tv.models.resnet18(weights=None).state_dict(), wrong)  # ImageNet's 1000 classes
    msg = err([*base, "--weights", str(wrong)])
    assert "--weights" in msg and "fc.weight (file (1000, 512), model (10, 512))" in msg and "classes" in msg
    mbv2 = tmp_path / "mbv2.pt"
    torch.save(tv.models.mobilenet_v2(weights=None, num_classes=10).state_dict(), mbv2)
    assert "does not fit torchvision resnet18" in err([*base, "--weights", str(mbv2)])
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a weights file")
    assert "--weights" in err([*base, "--weights", str(bogus)])

    assert "--loss-candidates applies to --criterion loss" in err([*base, "--loss-candidates", "4"])
    assert "--out" in err(["prune", *TINY, "--out", str(tmp_path / "no" / "such" / "dir.safetensors")])
    assert "--layers: 'nope.conv' names no prunable" in err(
        [*base, "--weights", str(random_weights), "--layers", "nope.conv"]
    )
    assert "--keep 100 is more than the channels of layer1.0.conv1 (64)" in err(
        [*base, "--weights", str(random_weights), "--keep", "100"]
    )

    for bad in (["--ratio", "1.5"], ["--ratio", "0.5", "--keep", "3"], ["--model", "vgg16"]):
        with pytest.raises(SystemExit) as exc:
            main([*base, *bad])
        assert exc.value.code == 2
        capsys.readouterr()


def test_prune_cli_loads_torch_save_weights(tmp_path):
    """A torch.save state dict (read with weights_only=True), wrapped as {"state_dict": ...} and
    saved from DataParallel ("module." prefixes), loads as well."""
    from gfs.models import build_model
    from gfs.weights import load_weights

    src = build_model("resnet18", 10, seed=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = load_weights(build_model("resnet18", 10, seed=2), str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_bench_prune_is_reachable_from_the_cli():
    from gfs.prune_cli import _bench_script

    assert os.path.isfile(_bench_script())
    with pytest.raises(SystemExit) as exc:
        main(["bench", "prune", "--help"])
    assert exc.value.code == 0


# -- --data ---------------------------------------------------------------------------------------


def test_digits_images_are_fixed_standardised_and_stratified():
    a, b = load_image_data("digits", image_size=16), load_image_data(None, image_size=16)
    assert len(a.train) + len(a.test) == 1797 and a.classes == 10 and a.image_size == 16
    xa, ya = a.train.tensors
    assert xa.shape[1:] == (3, 16, 16) and torch.equal(xa, b.train.tensors[0])
    assert abs(float(xa.mean())) < 1e-4 and abs(float(xa.std()) - 1) < 1e-3
    assert torch.equal(xa[:, 0], xa[:, 2])  # grey, repeated to 3 channels
    assert a.test.tensors[1].bincount().min() >= 30
    cal = a.calibration(70, 32, seed=5)
    assert [tuple(x.shape) for x, _ in cal] == [(32, 3, 16, 16), (32, 3, 16, 16), (6, 3, 16, 16)]
    again = a.calibration(70, 32, seed=5)
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(cal, again, strict=True))
    small = a.subset(50, 20)
    assert len(small.train) == 50 and len(small.test) == 20


def _fake_cifar(root, n=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), "labels": list(range(n))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_from_local_files(tmp_path, monkeypatch):
    _fake_cifar(tmp_path)
    # the files made here are not the real ones, so their checksums differ: skip that check
    monkeypatch.setattr(tv.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv.datasets.cifar, "check_integrity", lambda *a, **k: True)
    d = load_image_data(f"cifar10:{tmp_path}")
    assert len(d.train) == 30 and len(d.test) == 6 and d.classes == 10
    x, y = d.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert load_image_data(f"cifar10:{tmp_path}", image_size=16).train[0][0].shape == (3, 16, 16)


def test_cifar10_bad_files_say_what_is_expected(tmp_path):
    _fake_cifar(tmp_path)  # real checksum check: these files are not CIFAR-10
    with pytest.raises(DataSpecError, match=r"--data cifar10:.*torchvision cannot read"):
        load_image_data(f"cifar10:{tmp_path}")
    with pytest.raises(DataSpecError, match=r"no folder .*cifar-10-batches-py"):
        load_image_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}")
    with pytest.raises(DataSpecError, match=r"folder is missing after 'cifar10:'"):
        load_image_data("cifar10:")


def _images(folder, classes=("cat", "dog"), per_class=5, size=(20, 14)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_imagefolder_train_val_and_seeded_split(tmp_path):
    _images(tmp_path / "tv" / "train")
    _images(tmp_path / "tv" / "val", per_class=2)
    d = load_image_data(f"imagefolder:{tmp_path / 'tv'}", image_size=12)
    assert (len(d.train), len(d.test), d.classes) == (10, 4, 2)
    assert d.train[0][0].shape == (3, 12, 12)

    _images(tmp_path / "flat", per_class=10)
    a = load_image_data(f"imagefolder:{tmp_path / 'flat'}", image_size=8, seed=1)
    b = load_image_data(f"imagefolder:{tmp_path / 'flat'}", image_size=8, seed=1)
    assert (len(a.train), len(a.test)) == (16, 4) and a.train.indices == b.train.indices
    assert sorted(a.train.indices + a.test.indices) == list(range(20))

    _images(tmp_path / "odd" / "train")
    _images(tmp_path / "odd" / "val", classes=("cat", "cow"))
    with pytest.raises(DataSpecError, match="class folders differ"):
        load_image_data(f"imagefolder:{tmp_path / 'odd'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSpecError, match=r"--data imagefolder:.*one sub-folder of images per class"):
        load_image_data(f"imagefolder:{tmp_path / 'empty'}")
