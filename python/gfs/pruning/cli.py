"""`gfs prune` (and `gfs bench prune`): prune a torchvision classifier on image data, end to end.

    gfs prune --model resnet50 --data cifar10:~/data --ratio 0.5 --out pruned.safetensors \\
              --weights resnet50-cifar10.safetensors --finetune-epochs 2

Steps: load the data (``--data``, see gfs.data.load_image_data); build the torchvision model
with ``weights=None`` and as many classes as the data have; load ``--weights`` (a state dict,
safetensors or ``torch.save``, read with ``weights_only=True``), or, without a weights file,
train it from scratch for ``--train-epochs`` (pruning an untrained network means nothing; the
trained weights are written to OUT.dense.safetensors so the next run can pass them as
``--weights``, with a record of what their training depended on: model, data, seed, epochs,
learning rate, batch size, see :func:`training_fingerprint`); prune with :func:`gfs.prune` on a
fixed, seeded calibration subset of the training images (checkpointed after every group to
OUT.ckpt, so ``--resume`` continues an interrupted run with the same result); fine-tune for
``--finetune-epochs``; save the model with gfs.pruning.io.save (JSON architecture + tensors, no
pickle) and a JSON report beside it; print a summary table.

``--resume`` reuses OUT.dense.safetensors only when its record matches this command's training
(the same weights would be trained again); otherwise it trains afresh and says why, or, when
OUT.ckpt exists (an interrupted run of those other weights), refuses with what differs.

The building blocks (:func:`build_model`, :func:`internal_layers`, :func:`load_weights`,
:func:`run`) are used by `gfs demo` and benchmarks/prune_baselines.py too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from ..argtypes import nonnegative_int, number, positive_int

# Training from scratch before pruning (CLI without --weights, `gfs demo`, the baselines):
# SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 64, 10% linear warm-up, cosine decay.
TRAIN_RECIPE = {"lr": 0.05, "warmup": 0.1}

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
CRITERIA = ("local", "loss", "l1", "random")

# Which channel groups are "internal" (the hidden channels of each residual block), per model.
# ResNets: every group gfs.prune finds is inside a block (conv1 of BasicBlock, conv1 / conv2 of
# Bottleneck). MobileNets: the expanded hidden channels of the inverted residuals (and the
# stem's, which are the hidden channels of the first block when it has no expand layer); not the
# squeeze-excitation bottlenecks, the projections between blocks nor the classifier head.
_INTERNAL = {
    "mobilenet_v2": ["features.0.0", "features.*.conv.0.0"],
    "mobilenet_v3_small": ["features.0.0", "features.*.block.0.0"],
    "mobilenet_v3_large": ["features.*.block.0.0"],
}


class CliError(ValueError):
    """A bad argument or input file; the message names the flag."""


def internal_layers(name: str):
    """``layers=`` for :func:`gfs.prune` selecting the internal channels of model ``name``
    (None: every group found, which for ResNets is exactly the block-internal ones)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return list(_INTERNAL[name]) if name in _INTERNAL else None


def build_model(name: str, classes: int, *, seed: int = 0):
    """torchvision model ``name`` with ``weights=None`` and ``classes`` outputs, initialised
    from torch's generator seeded by ``seed`` (the caller's random state is left alone)."""
    import torch
    import torchvision

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return getattr(torchvision.models, name)(weights=None, num_classes=int(classes))


def _read_state_dict(path: str, what: str) -> dict:
    import zipfile

    import torch

    if not os.path.isfile(path):
        raise CliError(f"{what} {path}: no such file")
    if zipfile.is_zipfile(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle errors of all kinds
            raise CliError(f"{what} {path}: torch.load(weights_only=True) cannot read it ({str(exc).splitlines()[0]}); "
                           f"expected a state dict saved with torch.save(model.state_dict(), ...)") from None
    else:
        try:
            from safetensors.torch import load_file

            blob = load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise CliError(f"{what} {path}: neither a torch.save zip file nor a safetensors file ({exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CliError(f"{what} {path}: expected a state dict (names -> tensors), got {type(blob).__name__}")
    if blob and all(k.startswith("module.") for k in blob):  # saved from DataParallel / DDP
        blob = {k[len("module."):]: v for k, v in blob.items()}
    return blob


def load_weights(model, path: str, *, what: str = "--weights", label: str | None = None):
    """Load a state dict from ``path`` (safetensors, or torch.save read with weights_only=True)
    into ``model`` (strictly); a :class:`CliError` naming ``what`` says what does not fit."""
    sd = _read_state_dict(path, what)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shapes = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = []
        if shapes:
            parts.append("shapes differ: " + "; ".join(shapes[:4]) + (f"; ... ({len(shapes)} in all)" if len(shapes) > 4 else ""))
        if missing:
            parts.append(f"missing from the file: {_few(missing)}")
        if extra:
            parts.append(f"not in the model: {_few(extra)}")
        hint = ""
        if any(k.split(".")[0] in ("fc", "classifier") for k in (s.split(" ")[0] for s in shapes)):
            hint = " (the classifier's size differs: the weights were trained for another number of classes than --data has)"
        raise CliError(f"{what} {path} does not fit {label or type(model).__name__}{hint}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


_TRAINING_KEY = "gfs_training"  # safetensors metadata of OUT.dense.safetensors: what its training depended on


def save_weights(model, path: str, *, training: dict | None = None) -> None:
    """The model's state dict as a safetensors file (what --weights reads back). ``training``:
    the fingerprint of the training that produced the weights (see :func:`training_fingerprint`),
    kept in the file's metadata so that ``--resume`` reuses the file only for the same training."""
    from safetensors.torch import save_file

    meta = None if training is None else {_TRAINING_KEY: json.dumps(training, sort_keys=True)}
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, path, metadata=meta)


def training_fingerprint(job: "PruneJob", data) -> dict:
    """Everything the dense weights trained by `gfs prune` (without --weights) depend on: the
    model, the training images (data spec, image size, subset, count, classes), the seed, the
    epochs, the learning rate, the batch size and the recipe. Two runs with the same fingerprint
    train the same weights."""
    return {"model": job.model, "data": job.data, "image_size": data.image_size, "classes": data.classes,
            "train_samples": job.train_samples, "train_images": len(data.train), "seed": job.seed,
            "train_epochs": job.train_epochs, "train_lr": job.train_lr, "batch_size": job.batch_size,
            "recipe": dict(TRAIN_RECIPE)}


def stored_training(path: str) -> dict | None:
    """The training fingerprint kept in a dense weights file by :func:`save_weights`, or None
    (no such record, or not a safetensors file)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(_TRAINING_KEY)
        return json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - unreadable: no record
        return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _few(names, n=4):
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


@dataclass
class PruneJob:
    """Settings of one `gfs prune` run (the CLI's flags map onto these)."""

    model: str = "resnet18"
    data: str = "digits"
    out: str = "pruned.safetensors"
    ratio: float | None = 0.5
    keep: int | None = None
    criterion: str = "local"
    layers: str = "internal"  # "internal", "all", or comma-separated names / glob patterns
    weights: str | None = None
    train_epochs: int = 8
    train_lr: float = 0.05
    finetune_epochs: int = 2
    finetune_lr: float = 0.01
    batch_size: int = 64
    image_size: int | None = None
    calib_size: int = 256
    calib_batches: int | None = None  # overrides calib_size: this many batches of batch_size
    loss_candidates: int | None = None
    loss_batch: int | None = None
    shortlist: int | None = None
    tolerance: float | None = None
    train_samples: int | None = None
    test_samples: int | None = None
    resume: bool = False
    seed: int = 0
    threads: int | None = None
    workers: int = 0
    progress: bool = True

    @property
    def checkpoint(self) -> str:
        return self.out + ".ckpt"

    @property
    def dense_path(self) -> str:
        return self.out + ".dense.safetensors"

    @property
    def report_path(self) -> str:
        return self.out + ".json"

    def layer_patterns(self):
        if self.layers == "internal":
            return internal_layers(self.model)
        if self.layers == "all":
            return None
        pats = [p.strip() for p in self.layers.split(",") if p.strip()]
        if not pats:
            raise CliError("--layers takes 'internal', 'all' or comma-separated layer names / glob patterns")
        return pats


def _check_job(job: PruneJob) -> None:
    if job.model not in MODELS:
        raise CliError(f"--model {job.model!r}: choose one of {', '.join(MODELS)}")
    if job.criterion not in CRITERIA:
        raise CliError(f"--criterion {job.criterion!r}: choose one of {', '.join(CRITERIA)}")
    if (job.ratio is None) == (job.keep is None):
        raise CliError("pass exactly one of --ratio (fraction of channels kept) or --keep (channels kept per group)")
    if job.ratio is not None and not (isinstance(job.ratio, (int, float)) and 0 < job.ratio <= 1):
        raise CliError(f"--ratio must be in (0, 1] (fraction of each group's channels kept), got {job.ratio}")
    if job.criterion != "loss":
        for flag, value in (("--loss-candidates", job.loss_candidates), ("--loss-batch", job.loss_batch),
                            ("--shortlist", job.shortlist), ("--tolerance", job.tolerance)):
            if value is not None:
                raise CliError(f"{flag} applies to --criterion loss only (got --criterion {job.criterion})")
    if job.tolerance is not None and not 0 <= job.tolerance < 1:
        raise CliError(f"--tolerance must be in [0, 1) (relative top-1 drop allowed), got {job.tolerance}")
    for flag, value in (("--train-lr", job.train_lr), ("--finetune-lr", job.finetune_lr)):
        if not (math.isfinite(value) and value > 0):
            raise CliError(f"{flag} must be a number > 0, got {value}")
    folder = os.path.dirname(os.path.abspath(job.out))
    if os.path.isdir(job.out):
        raise CliError(f"--out {job.out}: is a folder; pass a file name, e.g. {os.path.join(job.out, 'pruned.safetensors')}")
    if not os.path.isdir(folder):
        raise CliError(f"--out {job.out}: the folder {folder} does not exist")
    if job.weights is not None and not os.path.isfile(job.weights):
        raise CliError(f"--weights {job.weights}: no such file")


def _check_groups(model, layers, job: PruneJob, image_size: int) -> None:
    """--layers must name prunable groups and --keep must fit each of them (checked on a trace)."""
    import fnmatch

    import torch

    from .groups import find_groups

    scan = find_groups(model, torch.zeros(2, 3, image_size, image_size))
    names = scan.names()
    chosen = names
    if layers is not None:
        chosen = []
        for pat in layers:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                why = f" ({scan.rejected[pat]})" if pat in scan.rejected else ""
                raise CliError(f"--layers: {pat!r} names no prunable channel group of {job.model}{why}; groups are named "
                               f"by the layer whose output channels go: {_few(names, 8)}")
            chosen += [h for h in hits if h not in chosen]
    if job.keep is not None:
        small = [(g.name, g.channels) for g in scan.groups if g.name in chosen and g.channels < job.keep]
        if small:
            raise CliError(f"--keep {job.keep} is more than the channels of {', '.join(f'{n} ({c})' for n, c in small[:3])}"
                           f"{' ...' if len(small) > 3 else ''}; pass a smaller --keep, --ratio, or --layers to leave "
                           f"those out")


def _consoles():
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out = Console(width=120)
    return out, Console(stderr=True)


def _table(rows, title):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (("model", "left"), ("internal channels", "right"), ("params", "right"), ("FLOPs", "right"),
                         ("test accuracy", "right"), ("test loss", "right"), ("seconds", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r["model"], r["channels"], r["params"], r["flops"], r["accuracy"], r["loss"], r["seconds"])
    return table


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def run(job: PruneJob, console=None, err_console=None) -> dict:
    """Run one `gfs prune` job end to end; returns the report written to OUT.json.

    Raises :class:`CliError` (or gfs.data.DataSpecError) for bad flags and inputs,
    KeyboardInterrupt when interrupted (the finished groups are then in ``job.checkpoint``).
    """
    import torch

    _check_job(job)
    if job.threads is None:
        return _run(job, console, err_console)
    saved = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _run(job, console, err_console)
    finally:
        torch.set_num_threads(saved)


def _run(job: PruneJob, console, err_console) -> dict:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .. import data as gdata
    from .api import prune
    from .criteria import CRITERIA as AVAILABLE
    from .finetune import evaluate, finetune
    from .io import save

    out_c, err_c = _consoles()
    console = console or out_c
    err_console = err_console or err_c
    if job.criterion not in AVAILABLE:
        raise CliError(f"--criterion {job.criterion}: this version of gfs.prune has {', '.join(AVAILABLE)}")
    t_all = time.perf_counter()
    seconds = {}
    layers = job.layer_patterns()
    checkpoint = job.checkpoint
    if os.path.exists(checkpoint) and not job.resume:
        raise CliError(f"{checkpoint} exists: an earlier run with --out {job.out} was interrupted; pass --resume to "
                       f"continue it, or delete that file to start afresh")

    # 1. data, model, weights ---------------------------------------------------------------
    t0 = time.perf_counter()
    data = gdata.load_image_data(job.data, image_size=job.image_size, seed=0)  # the split is fixed
    if job.train_samples or job.test_samples:
        data = data.subset(job.train_samples, job.test_samples, seed=0)
    # every training phase gets a fresh loader seeded alike, so its batch order does not depend on
    # what ran before (a resumed run skips the training from scratch, yet fine-tunes the same way)
    loaders = lambda: data.loaders(job.batch_size, seed=job.seed, workers=job.workers)  # noqa: E731
    train_loader, test_loader = loaders()
    console.print(f"[bold]gfs prune[/bold]: {job.model} on {data.describe()}")
    model = build_model(job.model, data.classes, seed=job.seed)
    label = f"torchvision {job.model} with {data.classes} classes"
    _check_groups(model, layers, job, data.image_size)  # before any training: fail fast
    seconds["data"] = time.perf_counter() - t0
    dense_source = None
    t0 = time.perf_counter()
    training = training_fingerprint(job, data)
    reuse = False
    if not job.weights and job.resume and os.path.isfile(job.dense_path):
        # reuse the dense weights of an earlier run only if this command would train the same ones
        stored = stored_training(job.dense_path)
        reuse = stored == json.loads(json.dumps(training, sort_keys=True))
        if not reuse:
            if stored is None:
                why = "it carries no record of its training (written by another tool or an older gfs)"
            else:
                differ = sorted(k for k in set(stored) | set(training) if stored.get(k) != training.get(k))
                why = f"different: {', '.join(differ)}"
            if os.path.isfile(checkpoint):
                raise CliError(
                    f"--resume: {job.dense_path} was trained with other settings than this command ({why}), so "
                    f"{checkpoint} belongs to a run of other dense weights; run the interrupted command again with "
                    f"its own flags to continue it, or delete {checkpoint} (and {job.dense_path}) to start afresh")
            console.print(f"--resume: {job.dense_path} was trained with other settings ({why}); not reusing it: "
                          + ("training afresh" if job.train_epochs > 0 else "--train-epochs 0"))
    if job.weights:
        load_weights(model, job.weights, label=label)
        dense_source = f"weights from {job.weights}"
    elif reuse:
        load_weights(model, job.dense_path, what="the trained weights", label=label)
        dense_source = (f"trained weights of the interrupted run, {job.dense_path}" if os.path.isfile(checkpoint)
                        else f"trained weights of an earlier run with the same training settings, {job.dense_path}")
    elif job.train_epochs > 0:
        console.print(f"no --weights: training {job.model} from scratch for {_plural(job.train_epochs, 'epoch')} on {data.name} "
                      f"(lr {job.train_lr}, seed {job.seed}) before pruning; pruning an untrained network means "
                      f"nothing")
        trained = finetune(model, train_loader, job.train_epochs, lr=job.train_lr, warmup=TRAIN_RECIPE["warmup"],
                           seed=job.seed,
                           inplace=True, progress=job.progress, description="training", console=err_console)
        save_weights(model, job.dense_path, training=training)
        dense_source = (f"trained here for {_plural(job.train_epochs, 'epoch')} ({trained.seconds:.0f} s; saved to "
                        f"{job.dense_path})")
    else:
        console.print(f"[yellow]warning[/yellow]: no --weights and --train-epochs 0: pruning an untrained {job.model}")
        dense_source = "random initialisation (untrained)"
    seconds["dense"] = time.perf_counter() - t0
    model.eval()
    dense_eval = evaluate(model, test_loader)
    console.print(f"dense: {dense_source}; test accuracy {dense_eval['accuracy']:.2%}")

    # 2. calibration -----------------------------------------------------------------------
    t0 = time.perf_counter()
    n_cal = job.calib_batches * job.batch_size if job.calib_batches else job.calib_size
    n_cal = min(n_cal, len(data.train))
    if job.progress:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True) as bar:
            task = bar.add_task("calibration images", total=n_cal)
            calib = data.calibration(n_cal, job.batch_size, seed=job.seed,
                                     progress=lambda n: bar.update(task, completed=n))
    else:
        calib = data.calibration(n_cal, job.batch_size, seed=job.seed)
    seconds["calibration"] = time.perf_counter() - t0

    # 3. prune (checkpointed) --------------------------------------------------------------
    if job.resume:
        console.print(f"resuming from {checkpoint}" if os.path.isfile(checkpoint)
                      else f"--resume: no checkpoint {checkpoint} yet, starting afresh")
    budget = dict(ratio=job.ratio) if job.ratio is not None else dict(keep=job.keep)
    loss_opts = {k: v for k, v in (("loss_candidates", job.loss_candidates), ("loss_batch", job.loss_batch),
                                   ("shortlist", job.shortlist), ("tolerance", job.tolerance)) if v is not None}
    t0 = time.perf_counter()
    try:
        result = prune(model, calib, criterion=job.criterion, layers=layers, progress=job.progress, seed=job.seed,
                       checkpoint=checkpoint, **budget, **loss_opts)
    except ValueError as exc:
        if "checkpoint" in str(exc):
            raise CliError(f"--resume: {exc}") from None
        if str(exc).startswith("calibration"):
            raise CliError(f"--data {job.data}: the calibration images: {exc}") from None
        if str(exc).startswith("group "):
            raise CliError(f"pruning failed: {exc}") from None
        raise CliError(f"gfs.prune refused the settings: {exc}") from None
    seconds["prune"] = time.perf_counter() - t0
    pruned_eval = evaluate(result.model, test_loader)

    # 4. fine-tune, save -------------------------------------------------------------------
    t0 = time.perf_counter()
    final, tuned_eval, history = result.model, None, []
    if job.finetune_epochs > 0:
        tuned = finetune(result.model, loaders()[0], job.finetune_epochs, lr=job.finetune_lr, seed=job.seed,
                         progress=job.progress, description="fine-tuning", console=err_console)
        final, history = tuned.model, tuned.history
        tuned_eval = evaluate(final, test_loader)
    seconds["finetune"] = time.perf_counter() - t0
    final.eval()
    fmt = save(final, job.out)
    seconds["total"] = time.perf_counter() - t_all

    ch_before = sum(r.channels_before for r in result.report)
    ch_after = sum(r.channels_after for r in result.report)
    (pb, pa), (fb, fa) = result.params, result.flops
    report = {
        "job": asdict(job),
        "data": data.describe(),
        "dense_source": dense_source,
        "groups": len(result.report),
        "channels": [ch_before, ch_after],
        "params": [pb, pa],
        "flops_per_image": [fb, fa],
        "accuracy": {"dense": dense_eval["accuracy"], "pruned": pruned_eval["accuracy"],
                     "finetuned": tuned_eval["accuracy"] if tuned_eval else None},
        "test_loss": {"dense": dense_eval["loss"], "pruned": pruned_eval["loss"],
                      "finetuned": tuned_eval["loss"] if tuned_eval else None},
        "finetune_history": history,
        "seconds": seconds,
        "layers": [r.as_dict() for r in result.report],
        "skipped": result.skipped,
        "out": job.out,
        "format": fmt,
    }
    with open(job.report_path, "w") as f:
        json.dump(report, f, indent=1)
    if os.path.isfile(checkpoint):
        os.remove(checkpoint)  # the result is saved; the checkpoint has done its job

    rows = [
        dict(model="dense", channels=f"{ch_before:,}", params=f"{pb:,}", flops=_human(fb),
             accuracy=f"{dense_eval['accuracy']:.2%}", loss=f"{dense_eval['loss']:.3f}",
             seconds=f"{seconds['dense']:.1f}"),
        dict(model=f"pruned ({job.criterion})", channels=f"{ch_after:,}", params=f"{pa:,} ({pa / pb:.0%})",
             flops=f"{_human(fa)} ({fa / fb:.0%})", accuracy=f"{pruned_eval['accuracy']:.2%}",
             loss=f"{pruned_eval['loss']:.3f}", seconds=f"{seconds['prune']:.1f}"),
    ]
    if tuned_eval:
        rows.append(dict(model=f"fine-tuned ({job.finetune_epochs} ep)", channels=f"{ch_after:,}",
                         params=f"{pa:,}", flops=_human(fa), accuracy=f"{tuned_eval['accuracy']:.2%}",
                         loss=f"{tuned_eval['loss']:.3f}", seconds=f"{seconds['finetune']:.1f}"))
    kept = f"ratio {job.ratio}" if job.ratio is not None else f"keep {job.keep}"
    console.print(_table(rows, f"{job.model}, {len(result.report)} channel groups pruned ({kept}, "
                               f"{n_cal} calibration images, seed {job.seed}); FLOPs per image"))
    console.print(f"wrote {job.out} ({fmt}; load with `from gfs.pruning import load`) and {job.report_path}; "
                  f"total {seconds['total']:.1f} s")
    return report


# ---- argparse ---------------------------------------------------------------------------------

_ratio = number(lambda v: 0 < v <= 1, "a fraction in (0, 1] of each group's channels kept")
_fraction = number(lambda v: 0 <= v < 1, "a number in [0, 1)")
_positive_float = number(lambda v: v > 0, "a number > 0")


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Register `gfs prune` under ``subparsers``."""

    p = subparsers.add_parser(
        "prune", help="prune a torchvision ResNet / MobileNet on image data (train, prune, fine-tune, save)",
        description=(
            "Prune the internal channels of a torchvision classifier by greedy forward selection (or a baseline "
            "criterion) and save the smaller model. Without --weights the model is first trained from scratch on "
            "--data for --train-epochs (pruning an untrained network means nothing). Pruning is checkpointed after "
            "every channel group to OUT.ckpt; --resume continues an interrupted run and ends with the same result. "
            "The output is written with gfs.pruning.io.save (JSON architecture + tensors, no pickle; load it with "
            "`from gfs.pruning import load`), with a JSON report at OUT.json."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, choices=MODELS, help="torchvision architecture (built with weights=None)")
    p.add_argument("--data", default="digits", metavar="DATA",
                   help="digits (scikit-learn's digits, upsampled; no download), cifar10:DIR (DIR/cifar-10-batches-py) "
                        "or imagefolder:DIR (class folders; DIR/train and DIR/val if present)")
    p.add_argument("--out", required=True, metavar="PATH", help="output model file (e.g. pruned.safetensors)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=_ratio, metavar="R", help="fraction of each group's channels kept (default 0.5)")
    budget.add_argument("--keep", type=positive_int, metavar="N", help="channels kept per group")
    p.add_argument("--criterion", choices=CRITERIA, default="local",
                   help="local: greedy forward selection imitating each layer (gfs); loss: greedy on the whole "
                        "network's loss (slow); l1: largest-L1 filters; random")
    p.add_argument("--layers", default="internal", metavar="WHICH",
                   help="internal (the hidden channels of each block), all (every group gfs finds), or "
                        "comma-separated layer names / glob patterns like 'layer*.conv1'")
    p.add_argument("--weights", metavar="FILE", help="state dict of the dense model (safetensors, or torch.save read "
                   "with weights_only=True); its classifier must match the number of classes of --data")
    p.add_argument("--train-epochs", type=nonnegative_int, default=8, metavar="E",
                   help="without --weights: epochs of training from scratch before pruning")
    p.add_argument("--train-lr", type=_positive_float, default=0.05, metavar="LR", help="peak learning rate of that training")
    p.add_argument("--finetune-epochs", type=nonnegative_int, default=2, metavar="E", help="fine-tuning epochs after pruning")
    p.add_argument("--finetune-lr", type=_positive_float, default=0.01, metavar="LR", help="peak learning rate of fine-tuning")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="B", help="training and calibration batch size")
    p.add_argument("--image-size", type=positive_int, metavar="S", help="image side (default 32 for digits / CIFAR-10, "
                   "224 for image folders)")
    calib = p.add_mutually_exclusive_group()
    calib.add_argument("--calib-size", type=positive_int, default=256, metavar="N",
                       help="calibration images (a fixed, seeded subset of the training images)")
    calib.add_argument("--calib-batches", type=positive_int, metavar="N", help="calibration batches of --batch-size "
                       "images (instead of --calib-size)")
    p.add_argument("--loss-candidates", type=positive_int, metavar="N",
                   help="--criterion loss: score a random subset of N candidate channels per step")
    p.add_argument("--loss-batch", type=positive_int, metavar="N", help="--criterion loss: candidates per forward pass")
    p.add_argument("--shortlist", type=positive_int, metavar="N",
                   help="--criterion loss: evaluate only the N best by a first-order (Taylor) estimate each step")
    p.add_argument("--tolerance", type=_fraction, metavar="T",
                   help="--criterion loss: stop a group once top-1 is within T (relative) of the dense network's")
    p.add_argument("--train-samples", type=positive_int, metavar="N", help="use at most N training images (quick runs)")
    p.add_argument("--test-samples", type=positive_int, metavar="N", help="use at most N test images (quick runs)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run whose checkpoint is OUT.ckpt "
                   "(the dense weights OUT.dense.safetensors are reused when they were trained with the same settings)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batch order, calibration subset "
                   "and the random criteria")
    p.add_argument("--threads", type=positive_int, metavar="T", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=nonnegative_int, default=0, metavar="W", help="DataLoader worker processes")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_cmd_prune)
    return p


def _job_from_args(args) -> PruneJob:
    fields = {f for f in PruneJob.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("ratio") is None and values.get("keep") is None:
        values["ratio"] = 0.5
    return PruneJob(**values)


def _cmd_prune(args) -> int:
    from ..data import DataSpecError
    from .groups import UnsupportedModelError

    job = _job_from_args(args)
    try:
        run(job)
    except (CliError, DataSpecError, UnsupportedModelError) as exc:
        print(f"gfs prune: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (f"the finished channel groups are in {job.checkpoint}; run the same command with --resume to "
                 f"continue" if os.path.isfile(job.checkpoint) else "no channel group had finished")
        print(f"\ngfs prune: interrupted; {where}", file=sys.stderr)
        return 130
    return 0


# ---- gfs bench prune ------------------------------------------------------------------------------

def _bench_script() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "benchmarks", "prune_baselines.py"))


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `gfs bench prune` (runs benchmarks/prune_baselines.py of the source checkout)."""
    bench = subparsers.add_parser("bench", help="benchmarks: `gfs bench prune` (pruning baselines on the embedded data)",
                                  description="Benchmarks run from a source checkout of gfs.")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    bp = bsub.add_parser("prune", add_help=False,
                         help="L1 / random / gfs local / gfs loss at 50%% kept on ResNet-18 and MobileNetV2, plus the "
                              "selection time of local vs loss (benchmarks/prune_baselines.py; --help for its flags)")
    bp.set_defaults(func=lambda args: run_bench_prune([]))
    return bench


def run_bench_prune(argv) -> int:
    """`gfs bench prune ARGS...`: run benchmarks/prune_baselines.py's main(ARGS)."""
    import importlib.util

    path = _bench_script()
    if not os.path.isfile(path):
        print(f"gfs bench prune: {path} not found; it runs from a source checkout of gfs (benchmarks/ is not installed "
              f"with the package): run python benchmarks/prune_baselines.py there", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("gfs_prune_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(list(argv)) or 0)
