"""Save and load (pruned) models without running code from the file.

A file holds two things:

- the architecture, as plain JSON: the module tree, each module's type *named* (it must be in an
  allow-list of classes fixed in this file, e.g. ``torch.nn.modules.conv.Conv2d``,
  ``torchvision.models.resnet.Bottleneck``), its plain attributes (numbers, strings, tuples,
  dtypes, allow-listed classes: the hyper-parameters and shapes), and the names of its parameters
  and buffers;
- the tensors, by their state_dict names.

With safetensors installed (the default) the file is a ``.safetensors`` file, the JSON in its
metadata: nothing in it is ever unpickled. Without, it is a ``torch.save`` file read back with
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors, dicts, strings).

Loading builds every module with ``cls.__new__`` + ``nn.Module.__init__`` for a class looked up
in the allow-list (never imported by the name in the file), sets the plain attributes, registers
the tensors, and so gets back the same class, hyper-parameters and forward code as the saved
model, e.g. a torchvision ResNet with narrower convolutions. Hooks are not saved. Extra trusted
classes can be allowed with ``allowed=`` on both save and load.
"""
from __future__ import annotations

import json
import os
import zipfile

import torch
import torch.nn as nn

FORMAT = "gfs-module/1"
_KEY = "gfs_architecture"

_TORCH_CLASSES = [
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d,
    nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Softmax, nn.LogSoftmax, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.Upsample, nn.Embedding,
]


def _torchvision_classes():
    try:
        from torchvision.models import mobilenetv2, mobilenetv3, resnet
        from torchvision.ops import misc
    except Exception:  # noqa: BLE001 - torchvision is optional
        return []
    return [resnet.ResNet, resnet.BasicBlock, resnet.Bottleneck, mobilenetv2.MobileNetV2, mobilenetv2.InvertedResidual,
            mobilenetv3.MobileNetV3, mobilenetv3.InvertedResidual, misc.Conv2dNormActivation, misc.SqueezeExcitation]


def _name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def allowed_classes(extra=()) -> dict:
    """{qualified name: class} of every module class a file may name (plus ``extra``)."""
    classes = list(_TORCH_CLASSES) + _torchvision_classes() + list(extra)
    for c in extra:
        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise TypeError(f"allowed must hold nn.Module subclasses, got {c!r}")
    return {_name(c): c for c in classes}


class UnsafeFileError(ValueError):
    """The file names something outside the allow-list, or is not a gfs model file."""


_INTERNALS = set(vars(nn.Module()).keys()) - {"training"}  # hooks and bookkeeping, never saved or set
_TABLES = ("_parameters", "_buffers", "_modules")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32,
    torch.int64, torch.bool, torch.complex64, torch.complex128)}


# ---- plain values <-> JSON ----------------------------------------------------------------------

def _encode(v, where, classes):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"tuple": [_encode(x, where, classes) for x in v]}
    if isinstance(v, list):
        return {"list": [_encode(x, where, classes) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[_encode(k, where, classes), _encode(x, where, classes)] for k, x in v.items()]}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, type) and _name(v) in classes:
        return {"class": _name(v)}
    raise TypeError(f"cannot save {where}: a {type(v).__name__} is not a plain value (numbers, strings, tuples, "
                    f"dtypes, allow-listed classes); gfs.prune.io saves architectures as plain descriptions")


def _decode(v, where, classes):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "tuple" and isinstance(x, list):
            return tuple(_decode(e, where, classes) for e in x)
        if tag == "list" and isinstance(x, list):
            return [_decode(e, where, classes) for e in x]
        if tag == "dict" and isinstance(x, list) and all(isinstance(p, list) and len(p) == 2 for p in x):
            return {_decode(k, where, classes): _decode(e, where, classes) for k, e in x}
        if tag == "dtype" and x in _DTYPES:
            return _DTYPES[x]
        if tag == "class" and isinstance(x, str):
            if x not in classes:
                raise UnsafeFileError(f"{where} names class {x!r}, which is not in the allow-list")
            return classes[x]
    raise UnsafeFileError(f"{where}: {json.dumps(v)[:80]} is not a value gfs.prune.io writes")


# ---- module tree <-> description ----------------------------------------------------------------

def describe(model: nn.Module, allowed=()) -> tuple[dict, dict]:
    """(architecture as a JSON-able dict, {name: tensor}) of ``model``."""
    classes = allowed_classes(allowed)
    tensors, seen = {}, {}

    def walk(m, path):
        where = path or "the root module"
        tname = _name(type(m))
        if tname not in classes:
            raise TypeError(
                f"cannot save {where}: its type {tname} is not in the allow-list of gfs.prune.io (torch.nn layers, "
                f"torchvision ResNet / MobileNetV2 / MobileNetV3 blocks); pass allowed=[{type(m).__name__}] to "
                f"save and load if you trust that class"
            )
        attrs = {}
        for k, v in vars(m).items():
            if k in _INTERNALS or k in _TABLES:
                continue
            attrs[k] = _encode(v, f"{where}.{k}", classes)
        params, buffers = {}, {}
        for k, p in m._parameters.items():
            full = f"{path}.{k}" if path else k
            if p is None:
                params[k] = None
            elif id(p) in seen:
                params[k] = {"tied": seen[id(p)]}
            else:
                seen[id(p)] = full
                tensors[full] = p.detach()
                params[k] = {"requires_grad": bool(p.requires_grad)}
        for k, b in m._buffers.items():
            full = f"{path}.{k}" if path else k
            if b is None:
                buffers[k] = None
            else:
                tensors[full] = b.detach()
                buffers[k] = {"persistent": k not in m._non_persistent_buffers_set}
        children = {k: (None if c is None else walk(c, f"{path}.{k}" if path else k)) for k, c in m._modules.items()}
        return {"type": tname, "attrs": attrs, "params": params, "buffers": buffers, "children": children}

    return {"format": FORMAT, "root": walk(model, "")}, tensors


def rebuild(arch: dict, tensors: dict, allowed=()) -> nn.Module:
    """The module described by ``arch`` with ``tensors``; only allow-listed classes are built."""
    classes = allowed_classes(allowed)
    if not isinstance(arch, dict) or arch.get("format") != FORMAT or not isinstance(arch.get("root"), dict):
        raise UnsafeFileError(f"not a {FORMAT} architecture description")
    params_by_name = {}

    def build(d, path):
        where = path or "the root module"
        if not isinstance(d, dict) or set(d) != {"type", "attrs", "params", "buffers", "children"}:
            raise UnsafeFileError(f"{where}: malformed module description")
        cls = classes.get(d["type"]) if isinstance(d["type"], str) else None
        if cls is None:
            raise UnsafeFileError(
                f"{where} has type {d['type']!r}, which is not in the allow-list of gfs.prune.io; it is not imported "
                f"or built (pass allowed=[...] to load if you trust that class)"
            )
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for k, v in d["attrs"].items():
            if not isinstance(k, str) or k.startswith("__") or k in _INTERNALS or k in _TABLES:
                raise UnsafeFileError(f"{where}: attribute name {k!r} is not allowed")
            object.__setattr__(m, k, _decode(v, f"{where}.{k}", classes))
        for k, spec in d["params"].items():
            full = f"{path}.{k}" if path else k
            if spec is None:
                m.register_parameter(k, None)
            elif isinstance(spec, dict) and "tied" in spec:
                if spec["tied"] not in params_by_name:
                    raise UnsafeFileError(f"{full} is tied to unknown parameter {spec['tied']!r}")
                m.register_parameter(k, params_by_name[spec["tied"]])
            else:
                p = nn.Parameter(_tensor(tensors, full), requires_grad=bool(spec.get("requires_grad", True)))
                params_by_name[full] = p
                m.register_parameter(k, p)
        for k, spec in d["buffers"].items():
            full = f"{path}.{k}" if path else k
            m.register_buffer(k, None if spec is None else _tensor(tensors, full),
                              persistent=True if spec is None else bool(spec.get("persistent", True)))
        for k, c in d["children"].items():
            m.add_module(k, None if c is None else build(c, f"{path}.{k}" if path else k))
        return m

    return build(arch["root"], "")


def _tensor(tensors, name):
    if name not in tensors:
        raise UnsafeFileError(f"the file has no tensor {name!r} that its architecture names")
    return tensors[name]


# ---- files --------------------------------------------------------------------------------------

def _have_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def save(model: nn.Module, path, *, format="auto", allowed=()) -> str:
    """Write ``model`` to ``path``: JSON architecture + tensors, nothing executable.

    format: "safetensors", "torch" (torch.save of tensors and strings only, read back with
    weights_only=True), or "auto" (safetensors when installed). Returns the format written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if format == "auto":
        format = "safetensors" if _have_safetensors() else "torch"
    if format not in ("safetensors", "torch"):
        raise ValueError(f"format must be 'auto', 'safetensors' or 'torch', got {format!r}")
    arch, tensors = describe(model, allowed)
    text = json.dumps(arch, separators=(",", ":"))
    flat = {k: v.cpu().contiguous().clone() for k, v in tensors.items()}
    if format == "safetensors":
        if not _have_safetensors():
            raise ImportError("format='safetensors' needs the safetensors package (pip install safetensors)")
        from safetensors.torch import save_file

        save_file(flat, os.fspath(path), metadata={_KEY: text, "format": FORMAT})
    else:
        torch.save({"format": FORMAT, _KEY: text, "tensors": flat}, path)
    return format


def load(path, *, map_location="cpu", allowed=()) -> nn.Module:
    """Read a model written by :func:`save`. No code from the file runs: the JSON names classes,
    which must be in the allow-list (plus ``allowed``), and tensors are read by safetensors or
    by ``torch.load(weights_only=True)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if zipfile.is_zipfile(path):  # torch.save
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get(_KEY), str):
            raise UnsafeFileError(f"{path} is a torch.save file but not one written by gfs.prune.io.save")
        text, tensors = blob[_KEY], blob["tensors"]
    else:
        if not _have_safetensors():
            raise ImportError(f"{path} is not a torch.save zip file; reading .safetensors files needs the "
                              f"safetensors package (pip install safetensors)")
        from safetensors import safe_open

        device = str(map_location) if map_location is not None else "cpu"
        try:
            with safe_open(path, framework="pt", device=device) as f:
                meta = f.metadata() or {}
                # clone: fresh, aligned storage (views into the file's buffer can take other SIMD paths)
                tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise UnsafeFileError(f"{path} is neither a gfs .safetensors nor a torch.save file ({e})") from None
        if meta.get("format") != FORMAT or _KEY not in meta:
            raise UnsafeFileError(f"{path} is a safetensors file without a gfs architecture description")
        text = meta[_KEY]
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnsafeFileError(f"{path}: the architecture is not valid JSON ({e})") from None
    return rebuild(arch, tensors, allowed)
