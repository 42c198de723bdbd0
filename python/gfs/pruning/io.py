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

Every refusal of ``load`` is an :class:`UnsafeFileError` saying what is wrong: a name outside the
allow-list, a pickle holding anything but tensors and strings, an architecture nested deeper than
MAX_DEPTH, or attributes that disagree with the tensors (a Conv2d whose ``out_channels`` is not
its weight's first dimension, ...: checked at load for the torch.nn layers, so an edited or
damaged file never gives a model that fails only at its first forward pass).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import torch
import torch.nn as nn

FORMAT = "gfs-module/1"
_KEY = "gfs_architecture"

# Deepest nesting of modules, and of values in an attribute, that save writes and load reads.
# torchvision models nest about 5 modules deep; a forward pass through 128 nested modules already
# needs some 400 Python frames. Deeper files are refused before anything recurses that far.
MAX_DEPTH = 128

_TORCH_CLASSES = [
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Identity,
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Upsample,
    nn.Embedding,
]


def _torchvision_classes():
    try:
        from torchvision.models import mobilenetv2, mobilenetv3, resnet
        from torchvision.ops import misc
    except Exception:  # noqa: BLE001 - torchvision is optional
        return []
    return [
        resnet.ResNet,
        resnet.BasicBlock,
        resnet.Bottleneck,
        mobilenetv2.MobileNetV2,
        mobilenetv2.InvertedResidual,
        mobilenetv3.MobileNetV3,
        mobilenetv3.InvertedResidual,
        misc.Conv2dNormActivation,
        misc.SqueezeExcitation,
    ]


def _clip(where: str, n: int = 80) -> str:
    return where if len(where) <= n else "..." + where[-(n - 3) :]


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
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


# ---- plain values <-> JSON ----------------------------------------------------------------------


def _encode(v, where, classes, depth=0):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if depth >= MAX_DEPTH and isinstance(v, (tuple, list, dict)):
        raise TypeError(f"cannot save {where}: its value is nested more than {MAX_DEPTH} levels deep")
    d = depth + 1
    if isinstance(v, tuple):
        return {"tuple": [_encode(x, where, classes, d) for x in v]}
    if isinstance(v, list):
        return {"list": [_encode(x, where, classes, d) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[_encode(k, where, classes, d), _encode(x, where, classes, d)] for k, x in v.items()]}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, type) and _name(v) in classes:
        return {"class": _name(v)}
    raise TypeError(
        f"cannot save {where}: a {type(v).__name__} is not a plain value (numbers, strings, tuples, "
        f"dtypes, allow-listed classes); gfs.pruning.io saves architectures as plain descriptions"
    )


def _decode(v, where, classes, depth=0):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if depth >= MAX_DEPTH:
        raise UnsafeFileError(
            f"{_clip(where)}: the value is nested too deeply (more than {MAX_DEPTH} levels); "
            f"gfs.pruning.io.save writes no such value"
        )
    d = depth + 1
    if isinstance(v, dict) and len(v) == 1:
        ((tag, x),) = v.items()
        if tag == "tuple" and isinstance(x, list):
            return tuple(_decode(e, where, classes, d) for e in x)
        if tag == "list" and isinstance(x, list):
            return [_decode(e, where, classes, d) for e in x]
        if tag == "dict" and isinstance(x, list) and all(isinstance(p, list) and len(p) == 2 for p in x):
            return {_decode(k, where, classes, d): _decode(e, where, classes, d) for k, e in x}
        if tag == "dtype" and x in _DTYPES:
            return _DTYPES[x]
        if tag == "class" and isinstance(x, str):
            if x not in classes:
                raise UnsafeFileError(f"{where} names class {x!r}, which is not in the allow-list")
            return classes[x]
    raise UnsafeFileError(f"{where}: {json.dumps(v)[:80]} is not a value gfs.pruning.io writes")


# ---- module tree <-> description ----------------------------------------------------------------


def describe(model: nn.Module, allowed=()) -> tuple[dict, dict]:
    """(architecture as a JSON-able dict, {name: tensor}) of ``model``."""
    classes = allowed_classes(allowed)
    tensors, seen = {}, {}

    def walk(m, path, depth=0):
        where = path or "the root module"
        if depth > MAX_DEPTH:
            raise TypeError(
                f"cannot save {where}: it is nested more than {MAX_DEPTH} modules deep (gfs.pruning.io.MAX_DEPTH)"
            )
        tname = _name(type(m))
        if tname not in classes:
            raise TypeError(
                f"cannot save {where}: its type {tname} is not in the allow-list of gfs.pruning.io (torch.nn layers, "
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
        children = {
            k: (None if c is None else walk(c, f"{path}.{k}" if path else k, depth + 1)) for k, c in m._modules.items()
        }
        return {"type": tname, "attrs": attrs, "params": params, "buffers": buffers, "children": children}

    return {"format": FORMAT, "root": walk(model, "")}, tensors


def rebuild(arch: dict, tensors: dict, allowed=()) -> nn.Module:
    """The module described by ``arch`` with ``tensors``; only allow-listed classes are built."""
    classes = allowed_classes(allowed)
    if not isinstance(arch, dict) or arch.get("format") != FORMAT or not isinstance(arch.get("root"), dict):
        raise UnsafeFileError(f"not a {FORMAT} architecture description")
    params_by_name = {}

    def build(d, path, depth):
        where = path or "the root module"
        if depth > MAX_DEPTH:
            raise UnsafeFileError(
                f"the architecture is nested too deeply (module {_clip(where)} is more than {MAX_DEPTH} "
                f"modules deep); gfs.pruning.io.save writes no such model"
            )
        if not isinstance(d, dict) or set(d) != {"type", "attrs", "params", "buffers", "children"}:
            raise UnsafeFileError(f"{where}: malformed module description")
        if not all(isinstance(d[t], dict) for t in ("attrs", "params", "buffers", "children")):
            raise UnsafeFileError(f"{where}: malformed module description")
        cls = classes.get(d["type"]) if isinstance(d["type"], str) else None
        if cls is None:
            raise UnsafeFileError(
                f"{where} has type {d['type']!r}, which is not in the allow-list of gfs.pruning.io; it is not imported "
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
            if spec is not None and not isinstance(spec, dict):
                raise UnsafeFileError(f"{full}: malformed parameter description")
            if spec is None:
                m.register_parameter(k, None)
            elif "tied" in spec:
                if spec["tied"] not in params_by_name:
                    raise UnsafeFileError(f"{full} is tied to unknown parameter {spec['tied']!r}")
                m.register_parameter(k, params_by_name[spec["tied"]])
            else:
                t = _tensor(tensors, full)
                grad = bool(spec.get("requires_grad", True)) and (t.is_floating_point() or t.is_complex())
                p = nn.Parameter(t, requires_grad=grad)
                params_by_name[full] = p
                m.register_parameter(k, p)
        for k, spec in d["buffers"].items():
            full = f"{path}.{k}" if path else k
            if spec is not None and not isinstance(spec, dict):
                raise UnsafeFileError(f"{full}: malformed buffer description")
            m.register_buffer(
                k,
                None if spec is None else _tensor(tensors, full),
                persistent=True if spec is None else bool(spec.get("persistent", True)),
            )
        check_shapes(m, path)
        for k, c in d["children"].items():
            m.add_module(k, None if c is None else build(c, f"{path}.{k}" if path else k, depth + 1))
        return m

    return build(arch["root"], "", 0)


# ---- attributes against tensors -----------------------------------------------------------------


def _shape_error(where, attr, value, tensor, shape, expected, meaning):
    return UnsafeFileError(
        f"{where}.{attr} is {value} but {tensor} has shape {tuple(shape)}, where the {meaning} would have {expected}: "
        f"the file's attributes disagree with its tensors (it was damaged or edited), so the model would fail "
        f"at its first forward pass"
    )


def _attr(m, where, name, kind="int"):
    """Attribute ``name`` of ``m``, checked: a positive int ("int"), a tuple of positive ints
    ("ints"), or a tuple of ints ("shape")."""
    if name not in vars(m):
        raise UnsafeFileError(f"{where}.{name} is missing from the file; a {type(m).__name__} needs it")
    v = vars(m)[name]
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "ints": lambda v: (
            isinstance(v, tuple) and all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in v)
        ),
        "shape": lambda v: (
            isinstance(v, tuple) and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in v)
        ),
    }[kind]
    if not ok(v):
        what = {"int": "a positive int", "ints": "a tuple of positive ints", "shape": "a tuple of ints"}[kind]
        raise UnsafeFileError(f"{where}.{name} is {v!r}; a {type(m).__name__} needs {what}")
    return v


def _expect(m, where, tensor_name, dims, meaning):
    """Tensor ``tensor_name`` of m (if present) must have one size per entry of ``dims``, each
    ``(attribute, its value, expected size)``; the message names the first attribute that
    disagrees."""
    t = getattr(m, tensor_name, None)
    if t is None:
        return
    full = f"{where}.{tensor_name}" if where else tensor_name
    shape = tuple(t.shape)
    expected = tuple(size for _, _, size in dims)
    if shape == expected:
        return
    for i, (attr, value, size) in enumerate(dims):
        if i >= len(shape) or shape[i] != size:
            raise _shape_error(where or "the root module", attr, value, full, shape, f"shape {expected}", meaning)
    attr, value, _ = dims[-1] if dims else ("", None, None)
    raise _shape_error(where or "the root module", attr, value, full, shape, f"shape {expected}", meaning)


def check_shapes(m: nn.Module, path: str = "") -> None:
    """UnsafeFileError when a torch.nn layer's attributes disagree with its tensors (see load)."""
    where = path or "the root module"
    name = type(m).__name__
    if isinstance(m, nn.modules.conv._ConvNd):
        cin, cout, groups = (_attr(m, where, a) for a in ("in_channels", "out_channels", "groups"))
        k = _attr(m, where, "kernel_size", "ints")
        for a in ("stride", "dilation"):
            if len(_attr(m, where, a, "ints")) != len(k):
                raise UnsafeFileError(
                    f"{where}.{a} is {getattr(m, a)!r}; a {name} with kernel_size {k} needs {len(k)} of them"
                )
        for a, c in (("in_channels", cin), ("out_channels", cout)):
            if c % groups:
                raise UnsafeFileError(f"{where}.groups is {groups} but {a} is {c}, not a multiple of it")
        if not isinstance(vars(m).get("transposed"), bool):
            raise UnsafeFileError(f"{where}.transposed is {vars(m).get('transposed')!r}; a {name} needs True or False")
        per_group = lambda a, c: (a, c) if groups == 1 else (f"{a} / groups", f"{c} / {groups}")  # noqa: E731
        if m.transposed:
            dims = [("in_channels", cin, cin), (*per_group("out_channels", cout), cout // groups)]
            meaning = f"{name} weight (in_channels, out_channels / groups, *kernel_size)"
        else:
            dims = [("out_channels", cout, cout), (*per_group("in_channels", cin), cin // groups)]
            meaning = f"{name} weight (out_channels, in_channels / groups, *kernel_size)"
        dims += [("kernel_size", k, size) for size in k]
        _expect(m, path, "weight", dims, meaning)
        _expect(m, path, "bias", [("out_channels", cout, cout)], f"{name} bias (out_channels,)")
    elif isinstance(m, nn.Linear):
        cin, cout = _attr(m, where, "in_features"), _attr(m, where, "out_features")
        _expect(
            m,
            path,
            "weight",
            [("out_features", cout, cout), ("in_features", cin, cin)],
            "Linear weight (out_features, in_features)",
        )
        _expect(m, path, "bias", [("out_features", cout, cout)], "Linear bias (out_features,)")
    elif isinstance(m, nn.Bilinear):
        a, b, c = (_attr(m, where, x) for x in ("in1_features", "in2_features", "out_features"))
        _expect(
            m,
            path,
            "weight",
            [("out_features", c, c), ("in1_features", a, a), ("in2_features", b, b)],
            "Bilinear weight (out_features, in1_features, in2_features)",
        )
        _expect(m, path, "bias", [("out_features", c, c)], "Bilinear bias (out_features,)")
    elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*d, InstanceNorm*d
        n = _attr(m, where, "num_features")
        for t in ("weight", "bias", "running_mean", "running_var"):
            _expect(m, path, t, [("num_features", n, n)], f"{name} {t} (num_features,)")
    elif isinstance(m, nn.LayerNorm):
        shape = _attr(m, where, "normalized_shape", "shape")
        for t in ("weight", "bias"):
            _expect(m, path, t, [("normalized_shape", shape, s) for s in shape], f"LayerNorm {t} (*normalized_shape)")
    elif isinstance(m, nn.GroupNorm):
        groups, n = _attr(m, where, "num_groups"), _attr(m, where, "num_channels")
        if n % groups:
            raise UnsafeFileError(f"{where}.num_groups is {groups} but num_channels is {n}, not a multiple of it")
        for t in ("weight", "bias"):
            _expect(m, path, t, [("num_channels", n, n)], f"GroupNorm {t} (num_channels,)")
    elif isinstance(m, nn.Embedding):
        n, d = _attr(m, where, "num_embeddings"), _attr(m, where, "embedding_dim")
        _expect(
            m,
            path,
            "weight",
            [("num_embeddings", n, n), ("embedding_dim", d, d)],
            "Embedding weight (num_embeddings, embedding_dim)",
        )
    elif isinstance(m, nn.PReLU):
        n = _attr(m, where, "num_parameters")
        _expect(m, path, "weight", [("num_parameters", n, n)], "PReLU weight (num_parameters,)")


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
        try:
            blob = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
            raise UnsafeFileError(
                f"{path}: torch.load(weights_only=True) refused to unpickle it: it holds objects other than tensors "
                f"and strings, which could run code when unpickled{f' ({detail})' if detail else ''}; "
                "gfs.pruning.io.save never writes such a file"
            ) from None
        except Exception as e:  # noqa: BLE001 - a zip file that torch cannot read at all
            first = str(e).splitlines()[0] if str(e) else ""
            raise UnsafeFileError(
                f"{path} is a zip file but not a torch.save file gfs.pruning.io.save wrote "
                f"({type(e).__name__}: {first})"
            ) from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get(_KEY), str):
            raise UnsafeFileError(f"{path} is a torch.save file but not one written by gfs.pruning.io.save")
        text, tensors = blob[_KEY], blob.get("tensors")
    else:
        if not _have_safetensors():
            raise ImportError(
                f"{path} is not a torch.save zip file; reading .safetensors files needs the "
                f"safetensors package (pip install safetensors)"
            )
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
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise UnsafeFileError(f"{path}: its tensors are not a dict of names to tensors")
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnsafeFileError(f"{path}: the architecture is not valid JSON ({e})") from None
    except RecursionError:
        raise UnsafeFileError(
            f"{path}: the architecture JSON is nested too deeply to parse; gfs.pruning.io.save "
            f"writes nothing nested deeper than {MAX_DEPTH} levels"
        ) from None
    try:
        return rebuild(arch, tensors, allowed)
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{path}: {e}") from None
    except RecursionError:  # (MAX_DEPTH is checked first; this guards a lowered recursion limit)
        raise UnsafeFileError(f"{path}: the architecture is nested too deeply to rebuild") from None
