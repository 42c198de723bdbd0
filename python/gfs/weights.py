"""Weights files of dense models (state dicts): read, load into a model, save with a record.

    load_weights(model, "resnet18-digits.safetensors")   # safetensors, or torch.save (weights_only)
    save_weights(model, path, training={...})             # safetensors; the record in its metadata
    stored_training(path)                                 # that record back, or None

A file is read without unpickling objects: safetensors, or a ``torch.save`` zip file read with
``torch.load(weights_only=True)``. Common checkpoint wrappers (``{"state_dict": ...}``,
``{"model": ...}``) and DataParallel's ``module.`` prefixes are unwrapped. Errors are
:class:`WeightsError`, naming the file and what does not fit.

The record (``training=``) is what the weights' training depended on (`gfs prune` writes
gfs.workflow.PruneJob.training_fingerprint): a later run reuses the file only when it would train
the same weights.
"""

from __future__ import annotations

import json
import os

_TRAINING_KEY = "gfs_training"  # the safetensors metadata entry holding the record


class WeightsError(ValueError):
    """A weights file cannot be read, or does not fit the model; the message names the file."""


def _few(names, n=4):
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def read_state_dict(path: str, what: str = "weights file") -> dict:
    """The state dict (names -> tensors, on the CPU) in ``path``; ``what`` names the file in errors
    (e.g. the CLI flag it came from)."""
    import zipfile

    import torch

    if not os.path.isfile(path):
        raise WeightsError(f"{what} {path}: no such file")
    if zipfile.is_zipfile(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle errors of all kinds
            raise WeightsError(
                f"{what} {path}: torch.load(weights_only=True) cannot read it "
                f"({str(exc).splitlines()[0]}); expected a state dict saved with "
                f"torch.save(model.state_dict(), ...)"
            ) from None
    else:
        try:
            from safetensors.torch import load_file

            blob = load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{what} {path}: neither a torch.save zip file nor a safetensors file ({exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise WeightsError(f"{what} {path}: expected a state dict (names -> tensors), got {type(blob).__name__}")
    if blob and all(k.startswith("module.") for k in blob):  # saved from DataParallel / DDP
        blob = {k[len("module.") :]: v for k, v in blob.items()}
    return blob


def load_weights(model, path: str, *, what: str = "weights file", label: str | None = None):
    """Load the state dict in ``path`` into ``model`` (strictly) and return the model; a
    :class:`WeightsError` naming ``what`` and ``label`` (the model, for the message) says what
    does not fit."""
    sd = read_state_dict(path, what)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shapes = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or extra or shapes:
        parts = []
        if shapes:
            parts.append(
                "shapes differ: " + "; ".join(shapes[:4]) + (f"; ... ({len(shapes)} in all)" if len(shapes) > 4 else "")
            )
        if missing:
            parts.append(f"missing from the file: {_few(missing)}")
        if extra:
            parts.append(f"not in the model: {_few(extra)}")
        hint = ""
        if any(k.split(".")[0] in ("fc", "classifier") for k in (s.split(" ")[0] for s in shapes)):
            hint = (
                " (the classifier's size differs: the weights were trained for another number of classes than "
                "the model has)"
            )
        raise WeightsError(f"{what} {path} does not fit {label or type(model).__name__}{hint}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


def save_weights(model, path: str, *, training: dict | None = None) -> None:
    """The model's state dict as a safetensors file (what :func:`load_weights` reads back).
    ``training``: the record of the training that produced the weights, kept in the file's
    metadata (JSON) and read back by :func:`stored_training`."""
    from safetensors.torch import save_file

    meta = None if training is None else {_TRAINING_KEY: json.dumps(training, sort_keys=True)}
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, path, metadata=meta)


def stored_training(path: str) -> dict | None:
    """The training record kept in a weights file by :func:`save_weights`, or None (no such
    record, or not a safetensors file)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(_TRAINING_KEY)
        return json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - unreadable: no record
        return None
