"""gfs.pruning.load on files it did not write, or that were damaged or edited: every refusal is an
UnsafeFileError that says what is wrong (never a raw UnpicklingError, RecursionError, or a model
that fails only at its first forward pass), and nothing from the file runs."""

import json
import sys
import zipfile

import pytest
import torch
import torch.nn as nn

from gfs.pruning import UnsafeFileError, load, save

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


class _Boom:
    """Unpickling this would create ``path`` (code from the file running)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_pickle_is_an_unsafe_file_error(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "gfs-module/1", "gfs_architecture": "{}", "tensors": {}, "x": _Boom(str(marker))}, path)
    with pytest.raises(UnsafeFileError, match=r"evil\.pt.*refused.*unpickl"):
        load(path)
    assert not marker.exists()
    other = tmp_path / "other.zip"  # a zip file that is not a torch.save file at all
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(UnsafeFileError, match=r"other\.zip"):
        load(other)


def _file(tmp_path, name, arch_text, tensors=None):
    path = tmp_path / name
    save_file(tensors or {}, str(path), metadata={"format": "gfs-module/1", "gfs_architecture": arch_text})
    return path


def _module(type_, children=None, attrs=None):
    return {"type": type_, "attrs": attrs or {}, "params": {}, "buffers": {}, "children": children or {}}


SEQ = "torch.nn.modules.container.Sequential"


def _deep_text(kind, depth):
    """Architecture JSON nested ``depth`` levels deep, written as text (json.dumps itself cannot
    encode such depths)."""
    if kind == "json":  # only brackets: deeper than the JSON parser's recursion
        return '{"format": "gfs-module/1", "root": ' + "[" * depth + "]" * depth + "}"
    if kind == "modules":  # a chain of nested Sequential modules
        head = '{"type": "' + SEQ + '", "attrs": {}, "params": {}, "buffers": {}, "children": {'
        return '{"format": "gfs-module/1", "root": ' + (head + '"0": ') * depth + head + "}}" + "}}" * depth + "}"
    # an attribute holding a tuple of a tuple of ... of 1
    value = '{"tuple": [' * depth + "1" + "]}" * depth
    return (
        '{"format": "gfs-module/1", "root": {"type": "torch.nn.modules.activation.ReLU", "attrs": {"inplace": '
        + value
        + '}, "params": {}, "buffers": {}, "children": {}}}'
    )


@pytest.mark.parametrize(
    "kind, depth", [("json", 5000), ("modules", 5000), ("values", 5000), ("modules", 300), ("values", 300)]
)
def test_a_deeply_nested_architecture_is_a_clear_error(tmp_path, kind, depth):
    """5000 deep: the JSON parser's recursion; 300 deep: parsed, but deeper than any model
    (gfs.pruning.io.MAX_DEPTH), refused before rebuilding recurses that far."""
    json.loads(_deep_text(kind, 3))  # the construction is valid JSON
    limit = sys.getrecursionlimit()
    with pytest.raises(UnsafeFileError, match=r"deep\.safetensors.*nested too deeply"):
        load(_file(tmp_path, "deep.safetensors", _deep_text(kind, depth)))
    assert sys.getrecursionlimit() == limit


def test_a_model_nested_a_hundred_modules_deep_loads(tmp_path):
    model = inner = nn.Sequential()
    for _ in range(100):
        child = nn.Sequential()
        inner.append(child)
        inner = child
    inner.append(nn.Linear(3, 2))
    save(model, tmp_path / "m.safetensors")
    again = load(tmp_path / "m.safetensors")
    x = torch.randn(4, 3)
    assert torch.equal(again(x), model(x))


def _edited(tmp_path, model, edit, name="edited.safetensors"):
    """Save model, apply edit(arch_root) to its JSON, write the result to a new file."""
    path = tmp_path / "m.safetensors"
    save(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    arch = json.loads(meta["gfs_architecture"])
    edit(arch["root"])
    return _file(tmp_path, name, json.dumps(arch), tensors)


def _set(module, attr, value):
    module["attrs"][attr] = value


EDITS = {
    # (model, which module, attribute, value in the file, what the message must name)
    "conv out_channels": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3)),
        "0",
        "out_channels",
        8,
        r"0\.out_channels.*8.*0\.weight.*\(16, 3, 3, 3\)",
    ),
    "conv in_channels": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3)),
        "0",
        "in_channels",
        4,
        r"0\.in_channels.*4.*0\.weight",
    ),
    "conv kernel_size": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3)),
        "0",
        "kernel_size",
        {"tuple": [5, 5]},
        r"0\.kernel_size.*\(5, 5\).*0\.weight",
    ),
    "conv groups": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3)), "0", "groups", 2, r"0\.(groups|in_channels)"),
    "nested conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(16, 4, 1))),
        "1",
        None,
        None,
        r"1\.1\.out_channels is 5 .*1\.1\.weight",
    ),
    "linear in_features": (
        lambda: nn.Sequential(nn.Linear(6, 4)),
        "0",
        "in_features",
        7,
        r"0\.in_features.*7.*0\.weight.*\(4, 6\)",
    ),
    "linear out_features": (lambda: nn.Sequential(nn.Linear(6, 4)), "0", "out_features", 3, r"0\.out_features.*3"),
    "batchnorm": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)),
        "1",
        "num_features",
        8,
        r"1\.num_features.*8.*1\.(weight|bias|running_mean|running_var)",
    ),
    "layernorm": (
        lambda: nn.Sequential(nn.LayerNorm(6)),
        "0",
        "normalized_shape",
        {"tuple": [7]},
        r"0\.normalized_shape.*\(7,\)",
    ),
    "groupnorm": (lambda: nn.Sequential(nn.GroupNorm(2, 6)), "0", "num_channels", 8, r"0\.num_channels.*8"),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4)), "0", "embedding_dim", 5, r"0\.embedding_dim.*5"),
    "missing attribute": (
        lambda: nn.Sequential(nn.Linear(6, 4)),
        "0",
        "in_features",
        None,
        r"0\.in_features.*(missing|None)",
    ),
    "not a number": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3)),
        "0",
        "out_channels",
        "sixteen",
        r"0\.out_channels.*'sixteen'",
    ),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_attributes_that_disagree_with_the_tensors_are_refused_at_load(tmp_path, case):
    make, which, attr, value, message = EDITS[case]

    def edit(root):
        module = root["children"][which]
        if attr is None:  # the nested case: the second module of the inner Sequential
            _set(module["children"]["1"], "out_channels", 5)
        elif value is None:
            del module["attrs"][attr]
        else:
            _set(module, attr, value)

    assert isinstance(load(_edited(tmp_path, make(), lambda root: None, "same.safetensors")), nn.Sequential)
    with pytest.raises(UnsafeFileError, match=message):
        load(_edited(tmp_path, make(), edit))


def test_torchvision_models_still_load(tmp_path):
    tv = pytest.importorskip("torchvision")
    for make in (lambda: tv.models.resnet18(num_classes=10), lambda: tv.models.mobilenet_v3_small(num_classes=10)):
        model = make().eval()
        save(model, tmp_path / "m.safetensors")
        again = load(tmp_path / "m.safetensors").eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), again(x))


def test_a_bias_that_disagrees_with_out_channels_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save(nn.Sequential(nn.Conv2d(3, 4, 1)), path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.bias"] = torch.zeros(5)
    with pytest.raises(UnsafeFileError, match=r"0\.out_channels is 4 but 0\.bias has shape \(5,\)"):
        load(_file(tmp_path, "bias.safetensors", meta["gfs_architecture"], tensors))
