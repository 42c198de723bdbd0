"""Resumable pruning: the decisions of the finished groups, written after each group.

``gfs.prune(..., checkpoint=PATH)`` writes PATH after every group it finishes (atomically: a
temporary file in the same folder, then ``os.replace``), and once more at the end. The file holds

- a fingerprint of the run: the model class, a SHA-256 of its state_dict and of the calibration
  data, the groups (names, producer, consumer, channels, budgets) and every setting that can
  change a decision (criterion, keep / ratio, step, replacement, eps, seed, backend, the "loss"
  options);
- per finished group: the kept channels, their scales, the squeeze-excitation means folded into
  a gate's bias, the report row and the Selection;
- the state of the seeded generator after the last finished group.

A run given an existing checkpoint with the same fingerprint replays the finished groups' folds
(no capture, no selection; one forward pass to the last one's consumer for its fold check) and
continues with the next group, so it ends with the same pruned model as an uninterrupted run.
A checkpoint with another fingerprint is refused (ValueError): delete it or pass another path.

Format: ``torch.save`` of a dict of plain strings (JSON) and tensors, read with
``torch.load(weights_only=True)``: nothing in the file is unpickled into objects or run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import zipfile

import torch

from .._files import write_atomically

FORMAT = "gfs-prune-checkpoint/1"


def digest(tensors) -> str:
    """SHA-256 of a sequence of tensors (dtype, shape and bytes of each), or of (name, tensor)
    pairs (names included)."""
    h = hashlib.sha256()
    for item in tensors:
        if item is None:
            h.update(b"none")
            continue
        if isinstance(item, tuple):
            name, t = item
            h.update(name.encode())
        else:
            t = item
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pack(obj, tensors: dict, key: str):
    """A JSON-able copy of obj, its tensors moved into ``tensors`` (referenced by key)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[str(k), _pack(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)  # (nothing of this kind reaches a decision; kept for display)


def _unpack(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unpack(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def write(path, fingerprint: dict, done: list, generator: torch.Generator) -> None:
    """Atomically write the checkpoint: ``done`` is one dict per finished group (tensors and
    plain values; a ``selection`` entry may be a gfs.Selection or None)."""
    tensors: dict = {}
    groups = []
    for i, d in enumerate(done):
        d = dict(d)
        sel = d.get("selection")
        if sel is not None and dataclasses.is_dataclass(sel):
            d["selection"] = {f.name: getattr(sel, f.name) for f in dataclasses.fields(sel)}
        groups.append(_pack(d, tensors, f"g{i}"))
    blob = {
        "format": FORMAT,
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "groups": json.dumps(groups),
        "tensors": tensors,
        "generator": generator.get_state(),
    }
    write_atomically(path, lambda tmp: torch.save(blob, tmp))


def read(path, fingerprint: dict):
    """``(done, generator_state)`` from an existing checkpoint written for ``fingerprint``, or None
    when ``path`` does not exist. ValueError for a damaged file or another run's checkpoint."""
    from ..selection import Selection

    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    what = f"checkpoint {path!r}"
    fix = "delete it or pass another checkpoint= path"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ValueError(
            f"cannot read {what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"it is damaged or not a gfs.prune checkpoint: {fix}"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{what} is not a gfs.prune checkpoint (no format tag {FORMAT!r}): {fix}")
    try:
        stored = json.loads(blob["fingerprint"])
        groups = json.loads(blob["groups"])
        tensors, state = blob["tensors"], blob["generator"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what} is damaged ({type(exc).__name__}: {exc}): {fix}") from exc
    mine = json.loads(json.dumps(fingerprint, sort_keys=True))
    if stored != mine:
        differ = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        raise ValueError(
            f"{what} was written by a run with other settings or another model/calibration "
            f"(different: {', '.join(differ)}); {fix} to start afresh"
        )
    done = []
    for g in groups:
        d = _unpack(g, tensors)
        if d.get("selection") is not None:
            d["selection"] = Selection(**d["selection"])
        done.append(d)
    return done, state
