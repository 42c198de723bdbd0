"""`gfs prune`, `gfs bench prune` and `gfs bench quality`: argument parsing and printing. The work is
gfs.workflow.run_job (train -> prune -> fine-tune -> evaluate -> save, see gfs.workflow).

    gfs prune --model resnet50 --data cifar10:~/data --ratio 0.5 --out pruned.safetensors \\
              --weights resnet50-cifar10.safetensors --finetune-epochs 2

Steps: load the data (``--data``, see gfs.data.load_image_data); build the model (torchvision's
with ``weights=None``, or the CIFAR-style resnet56 / vgg16_bn of gfs.models) with as many classes
as the data have; load ``--weights`` (a
state dict, safetensors or ``torch.save``, read with ``weights_only=True``; gfs.weights), or,
without a weights file, train it from scratch for ``--train-epochs`` (pruning an untrained
network means nothing; the trained weights are written to OUT.dense.safetensors so the next run
can pass them as ``--weights``, with a record of what their training depended on: model, data,
seed, epochs, learning rate, batch size, see gfs.workflow.PruneJob.training_fingerprint); prune
with :func:`gfs.prune` on a fixed, seeded calibration subset of the training images
(checkpointed after every group to OUT.ckpt, so ``--resume`` continues an interrupted run with
the same result); fine-tune for ``--finetune-epochs``; save the model with gfs.pruning.io.save
(JSON architecture + tensors, no pickle) and a JSON report beside it; print a summary table.

``--resume`` reuses OUT.dense.safetensors only when its record matches this command's training
(the same weights would be trained again); otherwise it trains afresh and says why, or, when
OUT.ckpt exists (an interrupted run of those other weights), refuses with what differs.
"""

from __future__ import annotations

import argparse
import os
import sys

from .argtypes import nonnegative_int, number, positive_int
from .models import MODELS
from .pruning.criteria import CRITERIA


def _consoles():
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out = Console(width=120)
    return out, Console(stderr=True)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _print_report(report: dict, console) -> None:
    """The summary table of a `gfs prune` report (gfs.workflow.run_job's), and where it was written."""
    from rich.table import Table

    job, acc, loss, sec = report["job"], report["accuracy"], report["test_loss"], report["seconds"]
    (ch_before, ch_after), (pb, pa), (fb, fa) = report["channels"], report["params"], report["flops_per_image"]
    rows = [
        ("dense", f"{ch_before:,}", f"{pb:,}", _human(fb), acc["dense"], loss["dense"], sec["dense"]),
        (
            f"pruned ({job['criterion']})",
            f"{ch_after:,}",
            f"{pa:,} ({pa / pb:.0%})",
            f"{_human(fa)} ({fa / fb:.0%})",
            acc["pruned"],
            loss["pruned"],
            sec["prune"],
        ),
    ]
    if acc["finetuned"] is not None:
        rows.append(
            (
                f"fine-tuned ({job['finetune_epochs']} ep)",
                f"{ch_after:,}",
                f"{pa:,}",
                _human(fa),
                acc["finetuned"],
                loss["finetuned"],
                sec["finetune"],
            )
        )
    kept = f"ratio {job['ratio']}" if job["ratio"] is not None else f"keep {job['keep']}"
    table = Table(
        title=f"{job['model']}, {report['groups']} channel groups pruned ({kept}, "
        f"{report['calibration_images']} calibration images, seed {job['seed']}); FLOPs per image",
        title_justify="left",
    )
    for col, justify in (
        ("model", "left"),
        ("internal channels", "right"),
        ("params", "right"),
        ("FLOPs", "right"),
        ("test accuracy", "right"),
        ("test loss", "right"),
        ("seconds", "right"),
    ):
        table.add_column(col, justify=justify)
    for name, channels, params, flops, accuracy, test_loss, seconds in rows:
        table.add_row(name, channels, params, flops, f"{accuracy:.2%}", f"{test_loss:.3f}", f"{seconds:.1f}")
    console.print(table)
    console.print(
        f"wrote {report['out']} ({report['format']}; load with `from gfs.pruning import load`) and "
        f"{report['out']}.json; total {sec['total']:.1f} s"
    )


# ---- argparse ---------------------------------------------------------------------------------

_ratio = number(lambda v: 0 < v <= 1, "a fraction in (0, 1] of each group's channels kept")
_fraction = number(lambda v: 0 <= v < 1, "a number in [0, 1)")
_positive_float = number(lambda v: v > 0, "a number > 0")


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Register `gfs prune` under ``subparsers``."""

    p = subparsers.add_parser(
        "prune",
        help="prune a ResNet / MobileNet / VGG on image data (train, prune, fine-tune, save)",
        description=(
            "Prune the internal channels of a classifier by greedy forward selection (or a baseline "
            "criterion) and save the smaller model. Without --weights the model is first trained from scratch on "
            "--data for --train-epochs (pruning an untrained network means nothing). Pruning is checkpointed after "
            "every channel group to OUT.ckpt; --resume continues an interrupted run and ends with the same result. "
            "The output is written with gfs.pruning.io.save (JSON architecture + tensors, no pickle; load it with "
            "`from gfs.pruning import load`), with a JSON report at OUT.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        choices=MODELS,
        help="architecture: torchvision's (built with weights=None), or resnet56 / vgg16_bn, the CIFAR-style "
        "ResNet-56 (option-B shortcuts) and VGG-16-BN for 32x32 images (gfs.models)",
    )
    p.add_argument(
        "--data",
        default="digits",
        metavar="DATA",
        help="digits (scikit-learn's digits, upsampled; no download), cifar10:DIR (DIR/cifar-10-batches-py), "
        "imagefolder:DIR (class folders; DIR/train and DIR/val if present), fashion-mnist[:DIR] (the four IDX "
        "files, plain or .gz; default DIR /usr/share/datasets/fashion-mnist, from the Debian package "
        "dataset-fashion-mnist) or mnist:DIR (MNIST's four IDX files); (Fashion-)MNIST's 28x28 grey images are "
        "zero-padded to 32x32 and repeated to 3 channels",
    )
    p.add_argument("--out", required=True, metavar="PATH", help="output model file (e.g. pruned.safetensors)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--ratio", type=_ratio, metavar="R", help="fraction of each group's channels kept (default 0.5)"
    )
    budget.add_argument("--keep", type=positive_int, metavar="N", help="channels kept per group")
    p.add_argument(
        "--criterion",
        choices=tuple(CRITERIA),
        default="local",
        help="local: greedy forward selection imitating each layer (gfs); loss: greedy on the whole "
        "network's loss (slow); l1: largest-L1 filters; random",
    )
    p.add_argument(
        "--layers",
        default="internal",
        metavar="WHICH",
        help="internal (the hidden channels of each block), all (every group gfs finds), or "
        "comma-separated layer names / glob patterns like 'layer*.conv1'",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="state dict of the dense model (safetensors, or torch.save read "
        "with weights_only=True); its classifier must match the number of classes of --data",
    )
    p.add_argument(
        "--train-epochs",
        type=nonnegative_int,
        default=8,
        metavar="E",
        help="without --weights: epochs of training from scratch before pruning",
    )
    p.add_argument(
        "--train-lr", type=_positive_float, default=0.05, metavar="LR", help="peak learning rate of that training"
    )
    p.add_argument(
        "--finetune-epochs", type=nonnegative_int, default=2, metavar="E", help="fine-tuning epochs after pruning"
    )
    p.add_argument(
        "--finetune-lr", type=_positive_float, default=0.01, metavar="LR", help="peak learning rate of fine-tuning"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=64, metavar="B", help="training and calibration batch size"
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        metavar="S",
        help="image side (default 32 for digits / CIFAR-10 / (Fashion-)MNIST, 224 for image folders)",
    )
    calib = p.add_mutually_exclusive_group()
    calib.add_argument(
        "--calib-size",
        type=positive_int,
        default=256,
        metavar="N",
        help="calibration images (a fixed, seeded subset of the training images)",
    )
    calib.add_argument(
        "--calib-batches",
        type=positive_int,
        metavar="N",
        help="calibration batches of --batch-size images (instead of --calib-size)",
    )
    p.add_argument(
        "--loss-candidates",
        type=positive_int,
        metavar="N",
        help="--criterion loss: score a random subset of N candidate channels per step",
    )
    p.add_argument("--loss-batch", type=positive_int, metavar="N", help="--criterion loss: candidates per forward pass")
    p.add_argument(
        "--shortlist",
        type=positive_int,
        metavar="N",
        help="--criterion loss: evaluate only the N best by a first-order (Taylor) estimate each step",
    )
    p.add_argument(
        "--tolerance",
        type=_fraction,
        metavar="T",
        help="--criterion loss: stop a group once top-1 is within T (relative) of the dense network's",
    )
    p.add_argument("--train-samples", type=positive_int, metavar="N", help="use at most N training images (quick runs)")
    p.add_argument("--test-samples", type=positive_int, metavar="N", help="use at most N test images (quick runs)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run whose checkpoint is OUT.ckpt "
        "(the dense weights OUT.dense.safetensors are reused when they were trained with the same settings)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initialisation, batch order, calibration subset and the random criteria",
    )
    p.add_argument("--threads", type=positive_int, metavar="T", help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model runs (cuda under torchrun: one GPU a rank, cuda:LOCAL_RANK, NCCL)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: bound on every collective of the data-parallel pruning (a rank that died or "
        "stopped answering ends the others with an error after at most this long)",
    )
    p.add_argument("--workers", type=nonnegative_int, default=0, metavar="W", help="DataLoader worker processes")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_cmd_prune)
    return p


def _job_from_args(args):
    from .workflow import PruneJob

    fields = {f for f in PruneJob.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("ratio") is None and values.get("keep") is None:
        values["ratio"] = 0.5
    return PruneJob(**values)


def _cmd_prune(args) -> int:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        return _cmd_prune_ranks(args, rank, world)
    return _cmd_prune_one(args)


def _cmd_prune_ranks(args, rank: int, world: int) -> int:
    """`gfs prune` under torchrun: the process group (gloo, or NCCL with --device cuda: one GPU a
    rank, LOCAL_RANK's), data-parallel pruning (gfs.workflow.run_job with rank and world), rank 0
    prints and writes. An error on any rank ends every rank with a non-zero status."""
    import datetime

    import torch
    import torch.distributed as dist

    from .distributed import CollectiveError

    where = f"gfs prune (rank {rank} of {world})"
    cuda = args.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            print(f"{where}: --device cuda: torch sees no CUDA device here; use --device cpu", file=sys.stderr)
            return 2
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    own = not dist.is_initialized()  # (called from a job that has its process group: use it)
    if own:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        if rank != 0:
            args.progress = False
        code = _cmd_prune_one(args, rank=rank, world=world, where=where)
    except (CollectiveError, RuntimeError, ValueError, TypeError) as exc:
        print(f"{where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    if own:
        if code == 0:
            dist.destroy_process_group()
        else:  # a gloo group whose peer died can abort in its destructors: leave now, with the status
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _cmd_prune_one(args, *, rank: int = 0, world: int = 1, where: str = "gfs prune") -> int:
    from .data import DataSpecError
    from .pruning import UnsupportedModelError
    from .weights import WeightsError
    from .workflow import JobError, run_job

    job = _job_from_args(args)
    out, err = _consoles()
    say = out.print if rank == 0 else (lambda text: None)
    try:
        report = run_job(job, say=say, console=err, rank=rank, world=world)
    except (JobError, WeightsError, DataSpecError, UnsupportedModelError) as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            f"the finished channel groups are in {job.checkpoint}; run the same command with --resume to continue"
            if os.path.isfile(job.checkpoint)
            else "no channel group had finished"
        )
        print(f"\n{where}: interrupted; {hint}", file=sys.stderr)
        return 130
    if rank == 0:
        _print_report(report, out)
    return 0


# ---- gfs bench prune / gfs bench quality -------------------------------------------------------

# `gfs bench NAME ARGS...` runs benchmarks/SCRIPT's main(ARGS) from the source checkout.
BENCHES = {
    "prune": "prune_baselines.py",
    "quality": "quality.py",
}


def _bench_script(name: str = "prune") -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "benchmarks", BENCHES[name]))


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `gfs bench prune` and `gfs bench quality` (they run benchmarks/prune_baselines.py
    and benchmarks/quality.py of the source checkout; every argument after the name is theirs)."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: `gfs bench prune` (pruning baselines on the embedded data), `gfs bench quality` "
        "(gfs vs Torch-Pruning's criteria at equal FLOPs on Fashion-MNIST)",
        description="Benchmarks run from a source checkout of gfs.",
    )
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    helps = {
        "prune": "L1 / random / gfs local / gfs loss at 50%% kept on ResNet-18 and MobileNetV2, plus the "
        "selection time of local vs loss (benchmarks/prune_baselines.py; --help for its flags)",
        "quality": "ResNet-56 and MobileNetV2 on Fashion-MNIST pruned to 2x and 4x fewer FLOPs by gfs and by "
        "Torch-Pruning's criteria: accuracy before / after BN recalibration / after fine-tuning, resumable "
        "(benchmarks/quality.py; --help for its flags, --quick for a few minutes' run)",
    }
    for name in BENCHES:
        # every further argument, --help included, belongs to the script: no option of its own
        bp = bsub.add_parser(name, add_help=False, prefix_chars="\x00", help=helps[name])
        bp.add_argument("script_args", nargs=argparse.REMAINDER)
        bp.set_defaults(func=lambda args, name=name: run_bench(name, args.script_args))
    return bench


def run_bench(name: str, argv) -> int:
    """`gfs bench NAME ARGS...`: run benchmarks/SCRIPT's main(ARGS) (SCRIPT from BENCHES)."""
    import importlib.util

    path = _bench_script(name)
    if not os.path.isfile(path):
        print(
            f"gfs bench {name}: {path} not found; it runs from a source checkout of gfs (benchmarks/ is not installed "
            f"with the package): run python benchmarks/{BENCHES[name]} there",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location(f"gfs_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return int(module.main(list(argv)) or 0)


def run_bench_prune(argv) -> int:
    """`gfs bench prune ARGS...`: run benchmarks/prune_baselines.py's main(ARGS)."""
    return run_bench("prune", argv)
