"""gfs.prune(..., checkpoint=PATH): interrupted runs resume to exactly the uninterrupted result."""

import math
import os

import pytest
import torch

from gfs.pruning import criteria, prune, resume
from test_prune import build

pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")


ORIGINAL = dict(criteria.CRITERIA)


class Interrupted(RuntimeError):
    pass


def counting(monkeypatch, name, stop_after=None):
    """Replace criterion ``name`` by one that counts its decisions and raises after ``stop_after``."""
    base = ORIGINAL[name]
    calls = []

    class Counting(base):
        def decide(self, ctx):
            if stop_after is not None and len(calls) >= stop_after:
                raise Interrupted("stopped")
            calls.append(ctx.group.name)
            return super().decide(ctx)

    monkeypatch.setitem(criteria.CRITERIA, name, Counting)
    return calls


def identical(a, b, where="") -> None:
    """a and b are the same nested values (dicts, lists, numbers, strings, None), every float bit
    for bit except that NaN equals NaN (pytest.approx takes no nested dicts since pytest 9.2)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_identical_compares_nested_values_exactly():
    identical({"a": [1.0, float("nan")], "b": None}, {"a": [1.0, float("nan")], "b": None})
    for other in (
        {"a": [1.0, 0.0], "b": None},
        {"a": [1.0 + 2**-52, float("nan")], "b": None},
        {"a": [1.0, float("nan")]},
        {"a": [1, float("nan")], "b": None},
    ):
        with pytest.raises(AssertionError):
            identical({"a": [1.0, float("nan")], "b": None}, other)


def same_result(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # bit for bit
    for ra, rb in zip(a.report, b.report, strict=True):
        da, db = ra.as_dict(), rb.as_dict()
        da.pop("seconds"), db.pop("seconds")
        identical(da, db, ra.name)  # the same computation on the same values: bit for bit
        assert math.isfinite(da["fold_error"]), f"{ra.name}: the fold of every group was checked"
    assert a.selections.keys() == b.selections.keys()
    for k in a.selections:
        assert torch.equal(a.selections[k].indices, b.selections[k].indices)
        assert torch.equal(a.selections[k].weights, b.selections[k].weights)
    assert a.params == b.params and a.flops == b.flops


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("resnet18", dict(ratio=0.5, criterion="random", seed=7)),  # the generator state is restored
        ("mobilenet_v3_small", dict(ratio=0.5)),  # squeeze-excitation: the folded gate means are replayed
        ("cnn", dict(keep=3, criterion="loss", loss_candidates=5, shortlist=3)),
    ],
)
def test_interrupted_run_resumes_to_the_same_model(monkeypatch, tmp_path, arch, kwargs):
    model, x = build(arch)
    path = tmp_path / "run.ckpt"
    whole = prune(model, x, progress=False, **kwargs)
    calls = counting(monkeypatch, kwargs.get("criterion", "local"), stop_after=2)
    with pytest.raises(Interrupted):
        prune(model, x, progress=False, checkpoint=path, **kwargs)
    assert len(calls) == 2 and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary file left behind
    stored = torch.load(path, weights_only=True)  # plain tensors and strings: no unpickling
    assert stored["format"] == resume.FORMAT
    calls = counting(monkeypatch, kwargs.get("criterion", "local"))
    resumed = prune(model, x, progress=False, checkpoint=path, **kwargs)
    assert calls == [g.name for g in whole.groups][2:]  # only the unfinished groups were selected
    same_result(whole, resumed)
    calls.clear()
    again = prune(model, x, progress=False, checkpoint=path, **kwargs)  # finished: everything replayed
    assert calls == []
    same_result(whole, again)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    model, x = build("cnn")
    path = tmp_path / "c.ckpt"
    prune(model, x, keep=3, progress=False, checkpoint=path)
    with pytest.raises(ValueError, match=r"other settings.*\(different: groups, keep\).*delete it or pass another"):
        prune(model, x, keep=4, progress=False, checkpoint=path)
    with pytest.raises(ValueError, match=r"different: calibration"):
        prune(model, x + 1, keep=3, progress=False, checkpoint=path)
    other, _ = build("cnn")
    with torch.no_grad():
        other[0].weight.mul_(2)
    with pytest.raises(ValueError, match=r"different: weights"):
        prune(other, x, keep=3, progress=False, checkpoint=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint.*delete it or pass another"):
        prune(model, x, keep=3, progress=False, checkpoint=path)
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="not a gfs.prune checkpoint"):
        prune(model, x, keep=3, progress=False, checkpoint=path)
    with pytest.raises(ValueError, match="checkpoint: the folder"):
        prune(model, x, keep=3, progress=False, checkpoint=tmp_path / "nope" / "c.ckpt")
    with pytest.raises(ValueError, match="is a folder"):
        prune(model, x, keep=3, progress=False, checkpoint=tmp_path)
    with pytest.raises(TypeError, match="checkpoint must be a file path"):
        prune(model, x, keep=3, progress=False, checkpoint=3)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert os.path.exists(path)
