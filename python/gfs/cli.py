"""The `gfs` command: `gfs demo`, `gfs select`, `gfs prune`, `gfs bench prune`, `gfs study pretraining`,
`gfs study singular-values`.

Heavy modules (torch, scikit-learn, matplotlib, rich) are imported by the subcommand that needs
them, so `gfs --help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from .argtypes import int_list, names_from, nonnegative_int, positive_int


def _model_names() -> tuple[str, ...]:
    from .models import MODELS

    return tuple(MODELS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gfs", description="Greedy forward selection for pruning neural networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train a two-layer net and two CNNs, prune them by GFS, compare with baselines, time them",
        description=(
            "Train a mean-field two-layer ReLU network (the output is the average of N neurons), prune it "
            "to k neurons by greedy forward selection imitating its own logits, and report loss and "
            "accuracy against the dense net and random subsets; time the backend against the naive loop. "
            "Then train torchvision ResNet-18 and MobileNetV2 on the digits as 32x32 RGB images, prune half of their "
            "internal channels with gfs.prune (criterion 'local'), fine-tune briefly, and report accuracy dense / "
            "pruned / fine-tuned, parameters, FLOPs and the measured speed-up per batch (about 4 minutes on 2 CPU "
            "cores). Writes summary.txt, results.json and accuracy_vs_k.png to --out. The two-layer part uses "
            "scikit-learn's built-in 8x8 digits unless --mnist names a folder of MNIST IDX files."
        ),
    )
    demo.add_argument(
        "--mnist",
        metavar="DIR",
        help="folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be .gz)",
    )
    demo.add_argument(
        "--hidden",
        type=positive_int,
        metavar="N",
        help="hidden neurons of the dense net (default 512; 64 with --quick)",
    )
    demo.add_argument(
        "--ks", type=int_list("8,16,32"), metavar="K,K,...", help="subnetwork sizes (default 8,16,32,64,128)"
    )
    demo.add_argument("--steps", type=positive_int, help="training steps (default 300 on digits, 800 on MNIST)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation and the random baselines (default 0)"
    )
    demo.add_argument("--out", metavar="DIR", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument(
        "--backend", default="auto", metavar="NAME", help="selection backend: auto (default), torch, cpu, naive, ..."
    )
    demo.add_argument(
        "--threads",
        type=nonnegative_int,
        metavar="T",
        help="torch CPU threads for the run (default 1; 0: torch's own choice)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (64 neurons, k up to 32; CNNs on 160 images of 16x16 for 1 epoch): seconds",
    )
    demo.add_argument("--no-two-layer", dest="two_layer", action="store_false", help="skip the two-layer part")
    demo.add_argument(
        "--no-cnn",
        dest="cnn",
        action="store_false",
        help="skip the CNN part (ResNet-18 and MobileNetV2 trained, pruned by gfs 'local', fine-tuned)",
    )
    demo.add_argument(
        "--cnn-models",
        type=names_from(_model_names()),
        metavar="M,M",
        help="CNNs of the CNN part (default "
        "resnet18,mobilenet_v2; any of resnet18/34/50/101, mobilenet_v2, mobilenet_v3_small/large)",
    )
    demo.add_argument(
        "--cnn-epochs",
        dest="cnn_train_epochs",
        type=nonnegative_int,
        metavar="E",
        help="CNN training epochs from scratch (default 8)",
    )
    demo.add_argument(
        "--cnn-finetune-epochs",
        dest="cnn_finetune_epochs",
        type=nonnegative_int,
        metavar="E",
        help="fine-tuning epochs after pruning (default 2)",
    )
    demo.add_argument(
        "--cnn-image-size",
        dest="cnn_image_size",
        type=positive_int,
        metavar="S",
        help="side of the digits images for the CNNs (default 32)",
    )
    demo.add_argument(
        "--cnn-samples",
        dest="cnn_train_samples",
        type=positive_int,
        metavar="N",
        help="train the CNNs on at most N of the 1438 training images (default: all)",
    )
    demo.set_defaults(func=_cmd_demo)

    from .experiments.cli import add_study_parser
    from .prune_cli import add_bench_parser, add_prune_parser
    from .select_cli import add_select_parser

    add_select_parser(sub)
    add_prune_parser(sub)
    add_study_parser(sub)
    add_bench_parser(sub)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.backend != "auto":
        import torch

        from .engines.plan import backend_for

        try:  # the demo selects on float32 features in CPU memory
            backend_for("stream", torch.device("cpu"), torch.float32, backend=args.backend)
        except ValueError as exc:
            print(f"gfs demo: {exc}", file=sys.stderr)
            return 2
    from .data import IdxError
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig.quick_config() if args.quick else DemoConfig()
    cfg.seed, cfg.out, cfg.backend, cfg.mnist = args.seed, args.out, args.backend, args.mnist
    cfg.two_layer, cfg.cnn = args.two_layer, args.cnn
    if not (cfg.two_layer or cfg.cnn):
        print("gfs demo: --no-two-layer and --no-cnn leave nothing to run", file=sys.stderr)
        return 2
    for name in (
        "hidden",
        "ks",
        "steps",
        "threads",
        "cnn_models",
        "cnn_train_epochs",
        "cnn_finetune_epochs",
        "cnn_image_size",
        "cnn_train_samples",
    ):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.threads == 0:
        cfg.threads = None
    try:
        run_demo(cfg)
    except IdxError as exc:
        print(f"gfs demo: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "prune"]:  # every further argument (--help included) belongs to the script
        from .prune_cli import run_bench_prune

        return run_bench_prune(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
