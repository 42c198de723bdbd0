"""Train -> prune -> fine-tune -> evaluate: the one flow behind `gfs prune`, the CNN part of
`gfs demo` and benchmarks/prune_baselines.py.

    data = load_data("digits", image_size=32)
    flow = Workflow(data, batch_size=64, seed=0)
    dense = flow.train_dense("resnet18", epochs=8)                 # from scratch, TRAIN_RECIPE
    out = flow.prune(dense.model, flow.calibration(256), ratio=0.5, layers=internal_layers("resnet18"))
    out = flow.finetune(out, epochs=2, lr=0.01)
    out.evaluation, out.finetuned, out.channels, out.result.params, out.result.flops
    speed(dense.model, out.model, images)                          # seconds per batch of each

Every training phase gets a fresh loader seeded alike (:meth:`Workflow.train_loader`), so its
batch order does not depend on what ran before: each model trains, and every pruned network
fine-tunes, on the same batches whatever ran before it (a resumed `gfs prune` skips the training
from scratch, yet fine-tunes the same way).

:func:`run_job` is `gfs prune` end to end on a :class:`PruneJob` (the CLI's flags): the dense
weights from --weights, from an earlier run's OUT.dense.safetensors (reused only when this job
would train the same weights, see :meth:`PruneJob.training_fingerprint`) or trained here and
saved there; pruning on a fixed, seeded calibration subset of the training images, checkpointed
after every group to OUT.ckpt (``resume=True`` continues an interrupted run with the same
result); fine-tuning; the model saved with gfs.pruning.io.save (JSON architecture + tensors, no
pickle) and a JSON report beside it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from . import pruning
from ._files import write_atomically
from .data import load_image_data
from .models import MODELS, TORCHVISION_MODELS, build_model, internal_layers
from .pruning.criteria import CRITERIA
from .pruning.finetune import FinetuneResult, evaluate, finetune, time_forward
from .weights import load_weights, save_weights, stored_training

# Training from scratch before pruning (`gfs prune` without --weights, `gfs demo`, the baselines):
# SGD with Nesterov momentum 0.9, weight decay 5e-4, 10% linear warm-up, cosine decay (the batch
# size is the caller's: 64 by default).
TRAIN_RECIPE = {"lr": 0.05, "warmup": 0.1}


def load_data(
    spec: str = "digits",
    *,
    image_size: int | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
):
    """gfs.data.load_image_data(spec) with its fixed split (seed 0), cut to at most
    ``train_samples`` / ``test_samples`` images (a fixed, seeded subset) when given."""
    data = load_image_data(spec, image_size=image_size, seed=0)
    if train_samples or test_samples:
        data = data.subset(train_samples, test_samples, seed=0)
    return data


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class Dense:
    """A dense model trained by :meth:`Workflow.train_dense`: the model, its training (history,
    seconds) and its evaluation on the test images."""

    model: torch.nn.Module
    training: FinetuneResult
    evaluation: dict


@dataclass
class Pruned:
    """A model pruned by :meth:`Workflow.prune` (and fine-tuned by :meth:`Workflow.finetune`).

    Attributes
    ----------
    result : gfs.PruneResult
    seconds : float
        Wall time of the gfs.prune call.
    evaluation : dict
        gfs.pruning.finetune.evaluate of the pruned model on the test images.
    tuned : FinetuneResult or None
        The fine-tuning (None: not fine-tuned, or for 0 epochs).
    finetuned : dict or None
        The evaluation of the fine-tuned model.
    """

    result: object
    seconds: float
    evaluation: dict
    tuned: FinetuneResult | None = None
    finetuned: dict | None = None

    @property
    def model(self):
        """The final model: fine-tuned if it was, else the pruned one."""
        return self.tuned.model if self.tuned is not None else self.result.model

    @property
    def final(self) -> dict:
        """The evaluation of :attr:`model`."""
        return self.finetuned if self.finetuned is not None else self.evaluation

    @property
    def history(self) -> list:
        return self.tuned.history if self.tuned is not None else []

    @property
    def finetune_seconds(self) -> float:
        return self.tuned.seconds if self.tuned is not None else 0.0

    @property
    def channels(self) -> list:
        """[channels before, after], summed over the pruned groups."""
        report = self.result.report
        return [sum(r.channels_before for r in report), sum(r.channels_after for r in report)]


class Workflow:
    """Train, prune, fine-tune and evaluate classifiers on one data set.

    Parameters
    ----------
    data : gfs.data.ImageData
    batch_size : int
        Training and calibration batch size (the test loader's is twice it).
    seed : int
        Seed of the initialisation, the batch order, the calibration subset, the fine-tuning and
        gfs.prune's random criteria.
    workers : int
        DataLoader worker processes.
    progress : bool
        Progress bars of training and fine-tuning, and gfs.prune's (unless ``progress=`` is
        passed to :meth:`prune`).
    console : rich.console.Console, optional
        Where the training bars go (default: rich's).
    """

    def __init__(
        self, data, *, batch_size: int = 64, seed: int = 0, workers: int = 0, progress: bool = True, console=None
    ):
        self.data, self.batch_size, self.seed, self.workers = data, batch_size, seed, workers
        self.progress, self.console = progress, console
        self.test_loader = self._loaders()[1]

    def _loaders(self):
        return self.data.loaders(self.batch_size, seed=self.seed, workers=self.workers)

    def train_loader(self):
        """A new training loader, shuffled by a generator seeded alike on every call."""
        return self._loaders()[0]

    def calibration(self, samples: int, *, progress=None) -> list:
        """A fixed, seeded subset of ``samples`` training images, in (images, labels) batches."""
        return self.data.calibration(samples, self.batch_size, seed=self.seed, progress=progress)

    def build(self, name: str):
        """gfs.models.build_model(name) for this data's classes, initialised from ``seed``."""
        return build_model(name, self.data.classes, seed=self.seed)

    def evaluate(self, model) -> dict:
        """Accuracy and cross-entropy on the test images."""
        return evaluate(model, self.test_loader)

    def train(self, model, epochs: int, *, lr: float = TRAIN_RECIPE["lr"], description: str = "training"):
        """Train ``model`` in place from scratch with TRAIN_RECIPE (peak learning rate ``lr``);
        returns the FinetuneResult (history, seconds)."""
        return finetune(
            model,
            self.train_loader(),
            epochs,
            lr=lr,
            warmup=TRAIN_RECIPE["warmup"],
            seed=self.seed,
            inplace=True,
            progress=self.progress,
            description=description,
            console=self.console,
        )

    def train_dense(
        self, name: str, epochs: int, *, lr: float = TRAIN_RECIPE["lr"], description: str | None = None
    ) -> Dense:
        """Build model ``name``, train it for ``epochs`` and evaluate it."""
        model = self.build(name)
        training = self.train(model, epochs, lr=lr, description=description or f"{name}: training")
        return Dense(model, training, self.evaluate(model))

    def prune(self, model, calibration, *, evaluate: bool = True, **options) -> Pruned:
        """gfs.prune(model, calibration, **options) (seed and progress: the workflow's unless
        given), timed, and the pruned model evaluated (unless ``evaluate=False``)."""
        options = {"progress": self.progress, "seed": self.seed, **options}
        t0 = time.perf_counter()
        result = pruning.prune(model, calibration, **options)
        seconds = time.perf_counter() - t0
        return Pruned(result, seconds, self.evaluate(result.model) if evaluate else {})

    def finetune(self, pruned: Pruned, epochs: int, *, lr: float = 0.01, description: str = "fine-tuning") -> Pruned:
        """Fine-tune the pruned model (a copy) for ``epochs`` (none for 0) and evaluate it;
        returns ``pruned`` with ``tuned`` and ``finetuned`` set."""
        if epochs > 0:
            pruned.tuned = finetune(
                pruned.result.model,
                self.train_loader(),
                epochs,
                lr=lr,
                seed=self.seed,
                progress=self.progress,
                description=description,
                console=self.console,
            )
            pruned.finetuned = self.evaluate(pruned.tuned.model)
        return pruned


def speed(a, b, batch, rounds: int = 5) -> tuple[float, float]:
    """Wall time per batch of models a and b (eval mode): the best over ``rounds`` interleaved
    rounds of 3 runs each, so that a change in the machine's load hits both alike."""
    ta = tb = float("inf")
    for _ in range(max(1, rounds)):
        ta = min(ta, time_forward(a, batch, repeats=3, warmup=1))
        tb = min(tb, time_forward(b, batch, repeats=3, warmup=1))
    return ta, tb


# ---- `gfs prune`: one job end to end ----------------------------------------------------------


class JobError(ValueError):
    """A bad setting or input file of a :class:`PruneJob`; the message names the `gfs prune` flag."""


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
    device: str = "cpu"  # where the model runs: "cpu" or "cuda" (under torchrun: cuda:LOCAL_RANK)
    timeout: float = 300.0  # under torchrun: bound on every collective of gfs.prune, in seconds

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
        """``layers=`` for gfs.prune."""
        if self.layers == "internal":
            return internal_layers(self.model)
        if self.layers == "all":
            return None
        pats = [p.strip() for p in self.layers.split(",") if p.strip()]
        if not pats:
            raise JobError("--layers takes 'internal', 'all' or comma-separated layer names / glob patterns")
        return pats

    def prune_options(self) -> dict:
        """The budget (ratio= or keep=), the criterion and the "loss" options given, for gfs.prune."""
        budget = dict(ratio=self.ratio) if self.ratio is not None else dict(keep=self.keep)
        loss = {
            k: v
            for k, v in (
                ("loss_candidates", self.loss_candidates),
                ("loss_batch", self.loss_batch),
                ("shortlist", self.shortlist),
                ("tolerance", self.tolerance),
            )
            if v is not None
        }
        return dict(criterion=self.criterion, **budget, **loss)

    def training_fingerprint(self, data) -> dict:
        """Everything the dense weights trained by this job (without --weights) depend on: the
        model, the training images (data spec, image size, subset, count, classes), the seed, the
        epochs, the learning rate, the batch size and the recipe. Two jobs with the same
        fingerprint train the same weights."""
        return {
            "model": self.model,
            "data": self.data,
            "image_size": data.image_size,
            "classes": data.classes,
            "train_samples": self.train_samples,
            "train_images": len(data.train),
            "seed": self.seed,
            "train_epochs": self.train_epochs,
            "train_lr": self.train_lr,
            "batch_size": self.batch_size,
            "recipe": dict(TRAIN_RECIPE),
        }

    def check(self) -> None:
        """JobError naming the flag for settings that cannot work (before anything is loaded)."""
        if self.model not in MODELS:
            raise JobError(f"--model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.criterion not in CRITERIA:
            raise JobError(f"--criterion {self.criterion!r}: choose one of {', '.join(CRITERIA)}")
        if (self.ratio is None) == (self.keep is None):
            raise JobError(
                "pass exactly one of --ratio (fraction of channels kept) or --keep (channels kept per group)"
            )
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise JobError(f"--ratio must be in (0, 1] (fraction of each group's channels kept), got {self.ratio}")
        if self.criterion != "loss":
            for flag, value in (
                ("--loss-candidates", self.loss_candidates),
                ("--loss-batch", self.loss_batch),
                ("--shortlist", self.shortlist),
                ("--tolerance", self.tolerance),
            ):
                if value is not None:
                    raise JobError(f"{flag} applies to --criterion loss only (got --criterion {self.criterion})")
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise JobError(f"--tolerance must be in [0, 1) (relative top-1 drop allowed), got {self.tolerance}")
        for flag, value in (("--train-lr", self.train_lr), ("--finetune-lr", self.finetune_lr)):
            if not (math.isfinite(value) and value > 0):
                raise JobError(f"{flag} must be a number > 0, got {value}")
        folder = os.path.dirname(os.path.abspath(self.out))
        if os.path.isdir(self.out):
            raise JobError(
                f"--out {self.out}: is a folder; pass a file name, e.g. {os.path.join(self.out, 'pruned.safetensors')}"
            )
        if not os.path.isdir(folder):
            raise JobError(f"--out {self.out}: the folder {folder} does not exist")
        if self.weights is not None and not os.path.isfile(self.weights):
            raise JobError(f"--weights {self.weights}: no such file")
        if self.device not in ("cpu", "cuda"):
            raise JobError(f"--device {self.device!r}: choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise JobError("--device cuda: torch sees no CUDA device here; use --device cpu")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise JobError(f"--timeout must be a number of seconds > 0, got {self.timeout}")


def _check_groups(model, layers, job: PruneJob, image_size: int) -> None:
    """--layers must name prunable groups and --keep must fit each of them (checked on a trace)."""
    scan = pruning.find_groups(model, torch.zeros(2, 3, image_size, image_size))
    names = scan.names()
    chosen = names
    if layers is not None:
        chosen = []
        for pat in layers:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                why = f" ({scan.rejected[pat]})" if pat in scan.rejected else ""
                raise JobError(
                    f"--layers: {pat!r} names no prunable channel group of {job.model}{why}; groups are "
                    f"named by the layer whose output channels go: {_few(names, 8)}"
                )
            chosen += [h for h in hits if h not in chosen]
    if job.keep is not None:
        small = [(g.name, g.channels) for g in scan.groups if g.name in chosen and g.channels < job.keep]
        if small:
            raise JobError(
                f"--keep {job.keep} is more than the channels of "
                f"{', '.join(f'{n} ({c})' for n, c in small[:3])}{' ...' if len(small) > 3 else ''}; pass a "
                f"smaller --keep, --ratio, or --layers to leave those out"
            )


def run_job(job: PruneJob, *, say=None, console=None, rank: int = 0, world: int = 1) -> dict:
    """Run one `gfs prune` job end to end; returns the report written to OUT.json.

    Parameters
    ----------
    job : PruneJob
    say : callable, optional
        Called with each line worth telling (rich markup), e.g. a rich Console's ``print``.
    console : rich.console.Console, optional
        Where the progress bars go.
    rank, world : int
        Under torchrun (the process group initialised by the caller, e.g. gfs.prune_cli): this
        process's rank and the number of ranks. Every rank loads the data and the dense weights
        (trained, without --weights, by every rank alike from the same seed; gfs.prune checks that
        the ranks' weights are the same) and takes a contiguous block of the calibration batches;
        gfs.prune runs data-parallel (gfs.pruning.parallel) and every rank ends with the same
        pruned model. Then rank 0 alone evaluates, fine-tunes and writes the outputs (each
        atomically: a temporary file renamed over the path) and returns the report; the other
        ranks return an empty dict.

    Raises JobError or gfs.weights.WeightsError (or gfs.data.DataSpecError,
    gfs.pruning.UnsupportedModelError) for bad settings and inputs, KeyboardInterrupt when
    interrupted (the finished groups are then in ``job.checkpoint``).
    """
    job.check()
    say = say or (lambda text: None)
    if job.threads is None:
        return _run_job(job, say, console, rank, world)
    saved = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _run_job(job, say, console, rank, world)
    finally:
        torch.set_num_threads(saved)


def _dense_weights(job: PruneJob, flow: Workflow, model, say, rank: int = 0) -> str:
    """Give ``model`` its dense weights: --weights, the trained weights of an earlier run with the
    same training (--resume), trained here (and saved to OUT.dense.safetensors), or none.
    Returns where they came from."""
    data, checkpoint = flow.data, job.checkpoint
    zoo = "torchvision" if job.model in TORCHVISION_MODELS else "gfs.models"
    label = f"{zoo} {job.model} with {data.classes} classes"
    training = job.training_fingerprint(data)
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
                raise JobError(
                    f"--resume: {job.dense_path} was trained with other settings than this command ({why}), so "
                    f"{checkpoint} belongs to a run of other dense weights; run the interrupted command again with "
                    f"its own flags to continue it, or delete {checkpoint} (and {job.dense_path}) to start afresh"
                )
            say(
                f"--resume: {job.dense_path} was trained with other settings ({why}); not reusing it: "
                + ("training afresh" if job.train_epochs > 0 else "--train-epochs 0")
            )
    if job.weights:
        load_weights(model, job.weights, what="--weights", label=label)
        return f"weights from {job.weights}"
    if reuse:
        load_weights(model, job.dense_path, what="the trained weights", label=label)
        return (
            f"trained weights of the interrupted run, {job.dense_path}"
            if os.path.isfile(checkpoint)
            else f"trained weights of an earlier run with the same training settings, {job.dense_path}"
        )
    if job.train_epochs > 0:
        say(
            f"no --weights: training {job.model} from scratch for {_plural(job.train_epochs, 'epoch')} on {data.name} "
            f"(lr {job.train_lr}, seed {job.seed}) before pruning; pruning an untrained network means nothing"
        )
        trained = flow.train(model, job.train_epochs, lr=job.train_lr)
        if rank == 0:
            save_weights(model, job.dense_path, training=training)
        return (
            f"trained here for {_plural(job.train_epochs, 'epoch')} ({trained.seconds:.0f} s; saved to "
            f"{job.dense_path})"
        )
    say(f"[yellow]warning[/yellow]: no --weights and --train-epochs 0: pruning an untrained {job.model}")
    return "random initialisation (untrained)"


def _calibration(flow: Workflow, samples: int, console) -> list:
    if not flow.progress:
        return flow.calibration(samples)
    from ._progress import progress_bar

    with progress_bar(console=console, transient=True) as bar:
        task = bar.add_task("calibration images", total=samples)
        return flow.calibration(samples, progress=lambda n: bar.update(task, completed=n))


def _prune(job: PruneJob, flow: Workflow, model, calibration, layers, world: int = 1, rank: int = 0) -> Pruned:
    """gfs.prune, checkpointed to OUT.ckpt; its refusals as JobErrors naming the flag.
    (Under torchrun: data-parallel, the pruned model evaluated on rank 0 only.)"""
    more = {} if world == 1 else {"timeout": job.timeout, "evaluate": rank == 0}
    try:
        return flow.prune(model, calibration, layers=layers, checkpoint=job.checkpoint, **job.prune_options(), **more)
    except ValueError as exc:
        if "checkpoint" in str(exc):
            raise JobError(f"--resume: {exc}") from None
        if str(exc).startswith("calibration"):
            raise JobError(f"--data {job.data}: the calibration images: {exc}") from None
        if str(exc).startswith("group "):
            raise JobError(f"pruning failed: {exc}") from None
        raise JobError(f"gfs.prune refused the settings: {exc}") from None


def _run_job(job: PruneJob, say, console, rank: int = 0, world: int = 1) -> dict:
    t_all = time.perf_counter()
    seconds = {}
    layers = job.layer_patterns()
    checkpoint = job.checkpoint
    if os.path.exists(checkpoint) and not job.resume:
        raise JobError(
            f"{checkpoint} exists: an earlier run with --out {job.out} was interrupted; pass --resume to "
            f"continue it, or delete that file to start afresh"
        )

    # 1. data, model, weights ---------------------------------------------------------------
    t0 = time.perf_counter()
    data = load_data(
        job.data, image_size=job.image_size, train_samples=job.train_samples, test_samples=job.test_samples
    )
    flow = Workflow(
        data, batch_size=job.batch_size, seed=job.seed, workers=job.workers, progress=job.progress, console=console
    )
    say(f"[bold]gfs prune[/bold]: {job.model} on {data.describe()}" + (f" ({world} ranks)" if world > 1 else ""))
    model = flow.build(job.model)
    _check_groups(model, layers, job, data.image_size)  # before any training: fail fast
    seconds["data"] = time.perf_counter() - t0
    if job.device == "cuda":  # (under torchrun the caller has set this rank's device: cuda:LOCAL_RANK)
        model.to(f"cuda:{torch.cuda.current_device()}")
    t0 = time.perf_counter()
    dense_source = _dense_weights(job, flow, model, say, rank)
    seconds["dense"] = time.perf_counter() - t0
    model.eval()
    dense_eval = None
    if world == 1:  # (under torchrun rank 0 evaluates after pruning: the other ranks do not wait for it)
        dense_eval = flow.evaluate(model)
        say(f"dense: {dense_source}; test accuracy {dense_eval['accuracy']:.2%}")

    # 2. calibration -----------------------------------------------------------------------
    t0 = time.perf_counter()
    n_cal = job.calib_batches * job.batch_size if job.calib_batches else job.calib_size
    n_cal = min(n_cal, len(data.train))
    calib = _calibration(flow, n_cal, console)
    if world > 1:  # this rank's contiguous block of the batches
        from .distributed import rows_of

        if len(calib) < world:
            raise JobError(
                f"{n_cal} calibration images make {len(calib)} batches of --batch-size {job.batch_size}, fewer "
                f"than the {world} ranks: each rank needs at least one batch; pass a larger --calib-size or a "
                f"smaller --batch-size"
            )
        lo, hi = rows_of(len(calib), rank, world)
        calib = calib[lo:hi]
    seconds["calibration"] = time.perf_counter() - t0

    # 3. prune (checkpointed), fine-tune, save ---------------------------------------------
    if job.resume:
        say(
            f"resuming from {checkpoint}"
            if os.path.isfile(checkpoint)
            else f"--resume: no checkpoint {checkpoint} yet, starting afresh"
        )
    out = _prune(job, flow, model, calib, layers, world, rank)
    seconds["prune"] = out.seconds
    if rank != 0:  # every rank has the same pruned model: rank 0 alone goes on and writes
        return {}
    if dense_eval is None:
        dense_eval = flow.evaluate(model)
        say(f"dense: {dense_source}; test accuracy {dense_eval['accuracy']:.2%}")
    t0 = time.perf_counter()
    flow.finetune(out, job.finetune_epochs, lr=job.finetune_lr)
    seconds["finetune"] = time.perf_counter() - t0
    final = out.model
    final.eval()
    formats = []
    write_atomically(job.out, lambda tmp: formats.append(pruning.save(final, tmp)))
    fmt = formats[0]
    seconds["total"] = time.perf_counter() - t_all

    tuned = out.finetuned
    report = {
        "job": asdict(job),
        "data": data.describe(),
        "dense_source": dense_source,
        "groups": len(out.result.report),
        "channels": out.channels,
        "params": list(out.result.params),
        "flops_per_image": list(out.result.flops),
        "accuracy": {
            "dense": dense_eval["accuracy"],
            "pruned": out.evaluation["accuracy"],
            "finetuned": tuned["accuracy"] if tuned else None,
        },
        "test_loss": {
            "dense": dense_eval["loss"],
            "pruned": out.evaluation["loss"],
            "finetuned": tuned["loss"] if tuned else None,
        },
        "finetune_history": out.history,
        "seconds": seconds,
        "layers": [r.as_dict() for r in out.result.report],
        "skipped": out.result.skipped,
        "out": job.out,
        "format": fmt,
        "calibration_images": n_cal,
        "ranks": world,
    }

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)

    write_atomically(job.report_path, dump)
    if os.path.isfile(checkpoint):
        os.remove(checkpoint)  # the result is saved; the checkpoint has done its job
    return report
