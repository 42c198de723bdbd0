"""`study` subcommands for the `gfs` command (and `python -m gfs.experiments`).

Wire into gfs.cli with:

    from .experiments.cli import add_study_parser
    add_study_parser(sub)          # sub = parser.add_subparsers(...)

Each subcommand sets `func` (args -> exit code), like `gfs demo`. Heavy modules are imported by
the handler, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import sys

from ..argtypes import int_list, positive_int


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Register `study pretraining` and `study singular-values` under `subparsers`."""
    study = subparsers.add_parser(
        "study",
        help="the papers' studies: pre-training sufficiency (Figure 1), singular values (Appendix C)",
        description="Reproduce the studies of 'How Much Pre-training Is Enough to Discover a Good Subnetwork?'.",
    )
    ssub = study.add_subparsers(dest="study", metavar="STUDY")
    ssub.required = True

    pre = ssub.add_parser(
        "pretraining",
        help="pruned accuracy vs data-set size and pre-training iterations, with the red line",
        description=(
            "Pre-train mean-field two-layer ReLU networks (sigmoid output, BCE, labels digit<5 vs >=5) on "
            "class-balanced sub-data-sets of growing size; every P iterations prune the hidden layer by greedy "
            "forward selection (no fine-tuning) and record the pruned accuracy on the training sub-set. Writes "
            "cells.jsonl (resumable), results.csv, summary.csv, summary.json and figure.png to --out, and prints the "
            "finding: does the pre-training threshold (red line) not decrease as the data set grows? Default: "
            "scikit-learn's digits (a few minutes on 2 CPU cores); --data mnist:DIR or --data fashion-mnist runs the "
            "paper's scale (sizes 1K, 5K..50K, 8000 iterations, prune every 1000 to 200, widths 500/1000/2000, "
            "3 seeds) on MNIST or Fashion-MNIST."
        ),
    )
    pre.add_argument(
        "--data",
        metavar="DATA",
        default=None,
        help="digits (the default: scikit-learn's 8x8 digits, embedded; the small default grid), mnist:DIR "
        "(train-images-idx3-ubyte and train-labels-idx1-ubyte in DIR, each may be .gz) or fashion-mnist[:DIR] "
        "(the same files of Fashion-MNIST; DIR defaults to /usr/share/datasets/fashion-mnist, the Debian package "
        "dataset-fashion-mnist): the paper's scale (sizes 1K,5K..50K, 8000 iterations, prune every 1000 to 200, "
        "widths 500,1000,2000, 3 seeds); labels: class < 5 vs >= 5",
    )
    pre.add_argument("--mnist", metavar="DIR", help="deprecated: the same as --data mnist:DIR")
    pre.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder (default runs/study-pretraining, runs/study-pretraining-quick with --quick, "
        "runs/study-pretraining-mnist / -fashion-mnist with --data mnist:DIR / fashion-mnist, -quick added with "
        "--quick)",
    )
    pre.add_argument("--quick", action="store_true", help="a seconds-long smoke run (2 widths, 3 sizes, 1 seed)")
    pre.add_argument("--resume", action="store_true", help="keep the cells already in --out and compute the rest")
    pre.add_argument("--overwrite", action="store_true", help="discard cells already in --out")
    pre.add_argument("--widths", type=int_list("64,256"), metavar="W,W,...", help="hidden widths")
    pre.add_argument(
        "--sizes", type=int_list("64,256"), metavar="S,S,...", help="sub-data-set sizes (the largest is the 'full' set)"
    )
    pre.add_argument("--seeds", type=positive_int, metavar="N", help="number of seeds (0..N-1)")
    pre.add_argument("--iterations", type=positive_int, help="pre-training iterations")
    pre.add_argument("--prune-every", type=positive_int, metavar="P", help="prune every P iterations")
    pre.add_argument("--k", type=positive_int, help="GFS steps: neurons kept, at most")
    pre.add_argument("--backend", default="auto", metavar="NAME", help="selection backend (default auto)")
    pre.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="torch threads while it runs (default 1 on digits: small "
        "matrices; 0 = torch's own setting, the default with --data mnist:DIR / fashion-mnist)",
    )
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=_cmd_pretraining)

    sv = ssub.add_parser(
        "singular-values",
        help="smallest singular value of the random hidden output vs width, size, dimension",
        description=(
            "Appendix C: sigma_min of H = act(X W^T) for random Gaussian data (on the unit sphere) and weights, over "
            "widths N, data-set sizes M and input dimensions d, with log-log least-squares fits. Writes "
            "singular_values.csv/.json/.png to --out."
        ),
    )
    sv.add_argument("--out", metavar="DIR", default="runs/study-singular-values", help="output folder")
    sv.add_argument("--quick", action="store_true", help="a small grid, 3 repeats: seconds")
    sv.add_argument("--repeats", type=positive_int, help="draws per grid point (default 10)")
    sv.add_argument("--activation", choices=("relu", "tanh", "sigmoid"), default="relu")
    sv.set_defaults(func=_cmd_singular_values)
    return study


def study_data(data: str | None, mnist: str | None = None) -> tuple[str, str | None]:
    """(dataset, folder) of `gfs study pretraining --data DATA` (and of the deprecated --mnist
    DIR, the same as --data mnist:DIR, with a note on stderr): "digits", "mnist:DIR",
    "fashion-mnist" or "fashion-mnist:DIR". ValueError naming the flag otherwise."""
    if mnist is not None:
        if data is not None:
            raise ValueError("--mnist DIR is the old spelling of --data mnist:DIR; pass only --data")
        print("gfs study pretraining: --mnist DIR is deprecated; use --data mnist:DIR", file=sys.stderr)
        data = f"mnist:{mnist}"
    spec = (data or "digits").strip()
    if spec == "digits":
        return "digits", None
    if spec == "fashion-mnist":
        return "fashion-mnist", None
    kind, _, folder = spec.partition(":")
    if kind in ("mnist", "fashion-mnist") and folder:
        return kind, folder
    if kind == "mnist":
        raise ValueError("--data mnist needs the folder of the MNIST IDX files: --data mnist:DIR")
    raise ValueError(f"--data {spec!r}: expected digits, mnist:DIR, fashion-mnist or fashion-mnist:DIR")


def _cmd_pretraining(args: argparse.Namespace) -> int:
    from ..data import IdxError
    from .pretraining import PretrainingConfig, pretraining_study

    try:
        dataset, folder = study_data(args.data, args.mnist)
    except ValueError as exc:
        print(f"gfs study pretraining: {exc}", file=sys.stderr)
        return 2
    if dataset != "digits" and args.quick:
        cfg = PretrainingConfig.paper(
            folder,
            dataset=dataset,
            widths=(64, 256),
            sizes=(1000, 5000),
            iterations=200,
            prune_every=100,
            k=32,
            seeds=(0,),
        )
        out = args.out or f"runs/study-pretraining-{dataset}-quick"
    elif dataset != "digits":
        cfg = PretrainingConfig.paper(folder, dataset=dataset)
        out = args.out or f"runs/study-pretraining-{dataset}"
    elif args.quick:
        cfg = PretrainingConfig.quick()
        out = args.out or "runs/study-pretraining-quick"
    else:
        cfg = PretrainingConfig.default()
        out = args.out or "runs/study-pretraining"
    for name, field in (
        ("widths", "widths"),
        ("sizes", "sizes"),
        ("iterations", "iterations"),
        ("prune_every", "prune_every"),
        ("k", "k"),
    ):
        if getattr(args, name) is not None:
            setattr(cfg, field, getattr(args, name))
    if args.seeds is not None:
        cfg.seeds = tuple(range(args.seeds))
    cfg.backend = args.backend
    if args.threads is not None:
        cfg.threads = args.threads
    try:
        res = pretraining_study(
            cfg, out=out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (IdxError, FileExistsError, ValueError) as exc:
        print(f"gfs study pretraining: {exc}", file=sys.stderr)
        return 2
    print(res.finding)
    print(
        f"{res.computed_cells} cell(s) computed, {res.skipped_cells} resumed, {res.seconds:.1f} s; wrote "
        + ", ".join(res.files.values())
    )
    return 0


def _cmd_singular_values(args: argparse.Namespace) -> int:
    from .singular_values import singular_value_study

    kw = {}
    if args.quick:
        kw = dict(widths=(128, 256, 512, 1024), sizes=(16, 32), dims=(8, 32), repeats=3)
    if args.repeats is not None:
        kw["repeats"] = args.repeats
    res = singular_value_study(**kw, activation=args.activation, out=args.out, progress=True)
    print(res.finding)
    print(f"{len(res.rows)} grid points, {res.seconds:.1f} s; wrote " + ", ".join(res.files.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gfs.experiments study ...` until the `gfs` command carries these subcommands."""
    parser = argparse.ArgumentParser(prog="python -m gfs.experiments", description="gfs studies")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_study_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
