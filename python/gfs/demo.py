"""`gfs demo`: prune a trained two-layer network by greedy forward selection, end to end.

The network is the papers' mean-field two-layer ReLU net: the output is the uniform average of
N hidden neurons' contributions,

    f(x) = (1/N) sum_j a_j relu(w_j . x + c_j),    a_j in R^C (one logit per class).

After training it with Adam, neuron j's contribution over the training set is a candidate
u_j = a_j relu(X w_j + c_j) (flattened to n_train * C numbers) and the target is the dense
network's own logits y = f(X) (local imitation). `gfs.select` picks k neurons with weights w,
and the pruned network is x -> sum_j w_j a_j relu(w_j . x + c_j): no retraining.

The demo reports, for several k, the imitation loss and the accuracy of the pruned network,
against the dense network and against random subsets of the same size; times the selection on
the chosen backend against the "naive" backend; and saves a figure and a JSON of the numbers.

Then the CNN part (:func:`run_cnn_part`): torchvision ResNet-18 and MobileNetV2 (weights=None)
are trained from scratch on the same digits as 32x32 RGB images, half of their internal channels
(the hidden channels of every residual block) are pruned by ``gfs.prune(criterion="local")``,
and the pruned networks are fine-tuned briefly; it reports accuracy dense / pruned / fine-tuned,
parameters, FLOPs and the measured wall time per batch of the pruned against the dense model.
Either part can be switched off (``two_layer=False`` / ``cnn=False``; the CLI's --no-two-layer
and --no-cnn).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from .select import select

__all__ = ["DemoConfig", "run_demo", "run_cnn_part", "TwoLayerNet"]


@dataclass
class DemoConfig:
    """Settings of one demo run (the CLI's flags map onto these)."""

    hidden: int = 512  # N, hidden neurons of the dense network
    ks: tuple[int, ...] = (8, 16, 32, 64, 128)  # subnetwork sizes (selection steps)
    seed: int = 0  # initialisation, mini-batch order and random baselines
    steps: int | None = None  # optimizer steps (None: 300 full-batch on digits, 800 mini-batch on MNIST)
    lr: float = 1e-2
    batch_size: int | None = None  # None: full batch up to 4096 training points, else 256
    calib: int = 5_000  # at most this many training points form the candidates (MNIST)
    random_seeds: int = 5  # random subsets averaged for the baseline
    naive_steps: int = 16  # the naive backend is timed on at most this many steps, then scaled
    naive_budget: float = 4.0  # ... and on fewer when its runs would take longer than this (seconds)
    timing_repeats: int = 3  # each timing is the best of this many runs
    backend: str = "auto"
    # torch CPU threads for the run (None: torch's default). One by default: at the demo's sizes
    # threads gain little, and on a busy machine OpenMP's spin-waiting made the two-thread run
    # several times slower (100 s against 18 s on 2 shared cores). Timings say which was used.
    threads: int | None = 1
    mnist: str | None = None  # folder of MNIST IDX files; None: scikit-learn's digits
    out: str = "runs/demo"
    quick: bool = False
    two_layer: bool = True  # the two-layer part (above)
    # the CNN part: torchvision models on the digits images (upsampled to RGB), gfs "local"
    cnn: bool = True
    cnn_models: tuple[str, ...] = ("resnet18", "mobilenet_v2")
    cnn_image_size: int = 32
    cnn_train_epochs: int = 8  # from scratch, gfs.workflow.TRAIN_RECIPE
    cnn_finetune_epochs: int = 2
    cnn_finetune_lr: float = 0.01
    cnn_ratio: float = 0.5  # fraction of the internal channels kept
    cnn_calib: int = 256  # calibration images
    cnn_batch: int = 64
    cnn_train_samples: int | None = None  # None: all 1438 training images
    cnn_test_samples: int | None = None
    cnn_timing_batch: int = 64
    cnn_timing_rounds: int = 5

    @classmethod
    def quick_config(cls, **overrides) -> DemoConfig:
        """Tiny sizes for tests and a first look (well under 30 s on 2 cores)."""
        base = dict(
            hidden=64,
            ks=(4, 8, 16, 32),
            steps=120,
            random_seeds=5,
            naive_steps=8,
            calib=2000,
            quick=True,
            cnn_image_size=16,
            cnn_train_epochs=1,
            cnn_finetune_epochs=1,
            cnn_calib=32,
            cnn_batch=32,
            cnn_train_samples=160,
            cnn_test_samples=64,
            cnn_timing_batch=16,
            cnn_timing_rounds=1,
        )
        base.update(overrides)
        return cls(**base)


# -- the network ------------------------------------------------------------------------------


class TwoLayerNet(torch.nn.Module):
    """f(x) = (1/N) sum_j a_j relu(w_j . x + c_j): the uniform average of N neurons' outputs."""

    def __init__(self, dim: int, hidden: int, classes: int, generator: torch.Generator):
        super().__init__()
        # Mean-field scale: w_j ~ N(0, I/d) and a_j ~ N(0, I), so each neuron's contribution is
        # O(1) and the 1/N average, not the size of a_j, makes the output small at init.
        self.w = torch.nn.Parameter(torch.randn(hidden, dim, generator=generator) / math.sqrt(dim))
        self.c = torch.nn.Parameter(torch.zeros(hidden))
        self.a = torch.nn.Parameter(torch.randn(hidden, classes, generator=generator))

    @property
    def hidden(self) -> int:
        return self.w.shape[0]

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """relu(x w_j + c_j) for every neuron: (n, N)."""
        return torch.relu(x @ self.w.T + self.c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activations(x) @ self.a / self.hidden

    def weighted_logits(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights_j a_j relu(x w_j + c_j): the subnetwork with these neuron weights.

        Uniform weights 1/N give the dense network back.
        """
        return self.activations(x) @ (weights[:, None].to(self.a.dtype) * self.a)

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """Candidates u_j: neuron j's contribution a_j relu(x w_j + c_j), flattened: (N, n * C)."""
        h = self.activations(x)  # (n, N)
        return (h.T[:, :, None] * self.a[:, None, :]).reshape(self.hidden, -1).contiguous()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def train_dense(
    net: TwoLayerNet,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: DemoConfig,
    steps: int,
    generator: torch.Generator,
    progress=None,
) -> list[float]:
    """Adam on the cross-entropy, full batch or mini-batch; returns the loss of every step."""
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=cfg.lr * 0.05)
    n = len(x)
    batch = cfg.batch_size or (n if n <= 4096 else 256)
    task = progress.add_task(f"training {net.hidden} neurons", total=steps, loss=float("nan")) if progress else None
    losses = []
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if batch >= n:
            xb, yb = x, y
        else:
            if pos + batch > n:
                perm, pos = torch.randperm(n, generator=generator), 0
            idx = perm[pos : pos + batch]
            pos += batch
            xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress.update(task, advance=1, loss=losses[-1])
    return losses


# -- the demo ---------------------------------------------------------------------------------


def _load_data(cfg: DemoConfig):
    from . import data

    if cfg.mnist:
        return data.load_mnist_idx(cfg.mnist)
    return data.load_digits_split(seed=0)  # the split is fixed; --seed varies the network


def _make_console():
    from rich.console import Console

    console = Console(record=True)
    if not console.is_terminal:  # pipes and test captures: wide enough for the table
        console = Console(record=True, width=120)
    return console


def run_demo(cfg: DemoConfig | None = None, console=None, **overrides) -> dict:
    """Train, prune by GFS for every k in cfg.ks, compare with random subsets, time the backends,
    and write `summary.txt`, `results.json` and `accuracy_vs_k.png` under cfg.out.

    Returns the dictionary written to results.json.
    """
    cfg = cfg or DemoConfig()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if cfg.threads is None:
        return _run(cfg, console)
    saved = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, console)
    finally:
        torch.set_num_threads(saved)


def _run(cfg: DemoConfig, console) -> dict:
    console = console or _make_console()
    t_start = time.perf_counter()
    phases = {}  # seconds spent in each part of the demo
    result = {
        "config": {**asdict(cfg), "ks": list(cfg.ks), "cnn_models": list(cfg.cnn_models)},
        "torch_threads": torch.get_num_threads(),
    }
    if not (cfg.two_layer or cfg.cnn):
        raise ValueError("nothing to run: both the two-layer part and the CNN part are switched off")
    if cfg.two_layer:
        result.update(_run_two_layer(cfg, console, phases))
        result["config"]["steps"] = result.pop("steps")
    if cfg.cnn:
        t0 = time.perf_counter()
        result["cnn"] = run_cnn_part(cfg, console)
        phases["cnn"] = time.perf_counter() - t0

    # files ---------------------------------------------------------------------------------------
    os.makedirs(cfg.out, exist_ok=True)
    result["files"] = {"json": os.path.join(cfg.out, "results.json"), "summary": os.path.join(cfg.out, "summary.txt")}
    if cfg.two_layer:
        png = result["files"]["png"] = os.path.join(cfg.out, "accuracy_vs_k.png")
        t0 = time.perf_counter()
        _plot(result, png)
        phases["plot"] = time.perf_counter() - t0
    result["seconds_total"] = time.perf_counter() - t_start
    result["seconds_by_phase"] = phases
    with open(result["files"]["json"], "w") as f:
        json.dump(result, f, indent=1)
    console.print(
        f"wrote {', '.join(result['files'].values())}  (total {result['seconds_total']:.1f} s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
        + ")"
    )
    console.save_text(result["files"]["summary"])
    return result


def _run_two_layer(cfg: DemoConfig, console, phases: dict) -> dict:
    """The two-layer part: train, prune for every k, random subsets, timing. Returns its results."""
    from rich.table import Table

    from ._progress import progress_bar

    t_start = time.perf_counter()

    # 1. data ----------------------------------------------------------------------------------
    ds = _load_data(cfg)
    phases["data"] = time.perf_counter() - t_start
    console.print(f"[bold]gfs demo[/bold]: {ds.describe()}")
    gen = torch.Generator().manual_seed(cfg.seed)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    # The candidates are built on (at most cfg.calib of) the training points.
    if len(x_tr) > cfg.calib:
        calib_idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.calib]
        x_cal, y_cal = x_tr[calib_idx], y_tr[calib_idx]
        cal_name = f"{cfg.calib} of the {len(x_tr)} training points"
    else:
        x_cal, y_cal = x_tr, y_tr
        cal_name = f"all {len(x_tr)} training points"

    # 2. train the dense network ----------------------------------------------------------------
    steps = cfg.steps or (300 if len(x_tr) <= 4096 else 800)
    net = TwoLayerNet(ds.dim, cfg.hidden, ds.classes, gen)
    t0 = time.perf_counter()
    with progress_bar("{task.description}", "loss {task.fields[loss]:.4f}", console=console) as progress:
        train_losses = train_dense(net, x_tr, y_tr, cfg, steps, gen, progress)
    train_seconds = phases["train"] = time.perf_counter() - t0
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)

    N = cfg.hidden
    dense_w = torch.full((N,), 1.0 / N)
    dense = {
        "neurons": N,
        "train_acc": _accuracy(net(x_cal), y_cal),
        "test_acc": _accuracy(net(x_te), y_te),
        "train_seconds": train_seconds,
        "train_steps": steps,
        "final_train_ce": train_losses[-1],
    }

    # 3. candidates and target (local imitation of the dense logits) ----------------------------
    U = net.contributions(x_cal)  # (N, n_cal * C)
    y = net(x_cal).reshape(-1)  # the dense network's own logits
    console.print(
        f"candidates: {N} neurons x {U.shape[1]} numbers (their logit contributions on {cal_name}); "
        f"target: the dense logits"
    )

    h_cal, h_te = net.activations(x_cal), net.activations(x_te)  # computed once for every subnetwork

    def evaluate(weights: torch.Tensor) -> dict:
        """Loss and accuracy of the subnetwork sum_j weights_j a_j relu(w_j . x + c_j)."""
        head = weights.float()[:, None] * net.a  # (N, C): the weighted output layer
        return {
            "loss": float(((weights.float() @ U - y) ** 2).mean()),
            "train_acc": _accuracy(h_cal @ head, y_cal),
            "test_acc": _accuracy(h_te @ head, y_te),
        }

    t0 = time.perf_counter()
    ks = [k for k in cfg.ks if k >= 1]
    if not ks:
        raise ValueError(f"no subnetwork size to try: ks={cfg.ks!r} (give sizes >= 1)")
    rows = []
    backend_used = None
    timed = None  # the with-replacement selection at the largest k, and its wall time
    for k in ks:
        row = {"k": k}
        for label, replacement in (("gfs", True), ("gfs_no_replacement", False)):
            if not replacement and k > N:
                row[label] = None  # cannot pick k distinct neurons out of fewer than k
                continue
            t_sel = time.perf_counter()
            sel = select(U, y, k, replacement=replacement, backend=cfg.backend)
            t_sel = time.perf_counter() - t_sel
            if replacement and k == max(ks):
                timed = (sel, t_sel)
            if backend_used is None:
                console.print(f"selection backend: {sel.backend}, engine {sel.engine} ({sel.reason})")
            backend_used = sel.backend
            row[label] = {
                "distinct": int(len(sel.support)),
                "steps": int(sel.k),
                "gfs_loss": float(sel.losses[-1]),
                "gap": float(sel.gaps[-1]),
                "seconds": float(sel.seconds),
                "indices": [int(i) for i in sel.indices],
                **evaluate(sel.weights),
            }
            if dense.get("loss") is None:
                dense["loss"] = float(sel.dense_loss)
        rand = []
        for s in range(cfg.random_seeds):
            g = torch.Generator().manual_seed(10_000 * (cfg.seed + 1) + 97 * k + s)
            idx = torch.randperm(N, generator=g)[: min(k, N)]
            w = torch.zeros(N)
            w[idx] = 1.0 / len(idx)
            rand.append(evaluate(w))
        row["random"] = {
            "distinct": min(k, N),
            "seeds": cfg.random_seeds,
            **{m: sum(r[m] for r in rand) / len(rand) for m in ("loss", "train_acc", "test_acc")},
            "test_acc_min": min(r["test_acc"] for r in rand),
            "test_acc_max": max(r["test_acc"] for r in rand),
        }
        rows.append(row)
    dense.setdefault("loss", evaluate(dense_w)["loss"])
    phases["select_and_evaluate"] = time.perf_counter() - t0

    # 4. the table ------------------------------------------------------------------------------
    table = Table(
        title=f"Pruning a {N}-neuron two-layer net by greedy forward selection (no retraining)",
        caption=(
            "loss: mean squared distance to the dense logits on the training points (what GFS minimises); "
            f"random: {cfg.random_seeds} random subsets of k distinct neurons, uniform weights, averaged"
        ),
    )
    for col, justify in (
        ("k", "right"),
        ("subnetwork", "left"),
        ("neurons", "right"),
        ("loss", "right"),
        ("train acc", "right"),
        ("test acc", "right"),
        ("test vs dense", "right"),
    ):
        table.add_column(col, justify=justify)
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    table.add_row(
        "-",
        "[bold]dense[/bold]",
        str(N),
        f"{dense['loss']:.4f}",
        pct(dense["train_acc"]),
        pct(dense["test_acc"]),
        "",
        end_section=True,
    )
    for row in rows:
        k = row["k"]
        for i, (label, name) in enumerate(
            (("gfs", "GFS"), ("gfs_no_replacement", "GFS, no replacement"), ("random", "random"))
        ):
            r = row[label]
            if r is None:
                continue
            style = "dim" if label == "random" else None
            table.add_row(
                str(k) if i == 0 else "",
                name,
                str(r["distinct"]),
                f"{r['loss']:.4f}",
                pct(r["train_acc"]),
                pct(r["test_acc"]),
                f"{100 * (r['test_acc'] - dense['test_acc']):+.1f}",
                style=style,
                end_section=(label == "random"),
            )
    console.print(table)

    # 5. timing: the chosen backend vs the naive loop, on the same selection --------------------
    t0 = time.perf_counter()
    timing = _time_backends(U, y, *timed, cfg, console)
    phases["timing"] = time.perf_counter() - t0

    return {
        "steps": steps,
        "dataset": {
            "name": ds.name,
            "n_train": len(x_tr),
            "n_test": len(x_te),
            "n_candidates_points": len(x_cal),
            "dim": ds.dim,
            "classes": ds.classes,
        },
        "dense": dense,
        "rows": rows,
        "backend": backend_used,
        "timing": timing,
        "seconds_two_layer": time.perf_counter() - t_start,
    }


# -- the CNN part: torchvision ResNet-18 / MobileNetV2 on the embedded image data ---------------


def run_cnn_part(cfg: DemoConfig, console) -> list:
    """Train each of cfg.cnn_models on the embedded digits images (upsampled to RGB), prune
    cfg.cnn_ratio of its internal channels with gfs "local", fine-tune briefly, and measure
    accuracy dense / pruned / fine-tuned, parameters, FLOPs and the wall time per batch of the
    pruned against the dense model (gfs.workflow). Returns one dict per model."""
    from rich.table import Table

    from .models import internal_layers
    from .workflow import TRAIN_RECIPE, Workflow, load_data, speed

    t0 = time.perf_counter()
    data = load_data(
        "digits", image_size=cfg.cnn_image_size, train_samples=cfg.cnn_train_samples, test_samples=cfg.cnn_test_samples
    )  # the split is fixed
    flow = Workflow(data, batch_size=cfg.cnn_batch, seed=cfg.seed, progress=True, console=console)
    calib = flow.calibration(cfg.cnn_calib)
    timing_batch = torch.cat([x for x, _ in data.loaders(cfg.cnn_timing_batch, seed=cfg.seed)[1]])[
        : cfg.cnn_timing_batch
    ]
    console.print(
        f"\n[bold]CNNs[/bold]: {data.describe()}; train {_plural(cfg.cnn_train_epochs, 'epoch')} from scratch (SGD, lr "
        f"{TRAIN_RECIPE['lr']}, cosine, seed {cfg.seed}), prune {1 - cfg.cnn_ratio:.0%} of the internal channels with "
        f"gfs 'local' on {sum(len(x) for x, _ in calib)} calibration images, fine-tune "
        f"{_plural(cfg.cnn_finetune_epochs, 'epoch')} (lr {cfg.cnn_finetune_lr}); "
        f"{_plural(torch.get_num_threads(), 'torch thread')}"
    )
    out = []
    for name in cfg.cnn_models:
        t_model = time.perf_counter()
        dense = flow.train_dense(name, cfg.cnn_train_epochs)
        pruned = flow.prune(
            dense.model, calib, ratio=cfg.cnn_ratio, criterion="local", layers=internal_layers(name), progress=False
        )
        flow.finetune(pruned, cfg.cnn_finetune_epochs, lr=cfg.cnn_finetune_lr, description=f"{name}: fine-tuning")
        t_dense, t_pruned = speed(dense.model, pruned.model, timing_batch, cfg.cnn_timing_rounds)
        out.append(
            {
                "model": name,
                "groups": len(pruned.result.report),
                "channels": pruned.channels,
                "params": list(pruned.result.params),
                "flops_per_image": list(pruned.result.flops),
                "accuracy": {
                    "dense": dense.evaluation["accuracy"],
                    "pruned": pruned.evaluation["accuracy"],
                    "finetuned": pruned.final["accuracy"],
                },
                "seconds_per_batch": {"dense": t_dense, "pruned": t_pruned, "batch": len(timing_batch)},
                "speedup": t_dense / t_pruned,
                "train_history": dense.training.history,
                "finetune_history": pruned.history,
                "seconds": {
                    "train": dense.training.seconds,
                    "prune": pruned.seconds,
                    "finetune": pruned.finetune_seconds,
                    "total": time.perf_counter() - t_model,
                },
            }
        )
        r, a = out[-1], out[-1]["accuracy"]
        console.print(
            f"{name}: dense {a['dense']:.1%} -> pruned {a['pruned']:.1%} -> fine-tuned {a['finetuned']:.1%}; "
            f"{r['channels'][0]} -> {r['channels'][1]} internal channels; "
            f"{t_dense * 1e3:.1f} -> {t_pruned * 1e3:.1f} ms per batch of {len(timing_batch)} (x{r['speedup']:.2f})"
        )

    table = Table(
        title=f"Pruning torchvision CNNs with gfs 'local' ({1 - cfg.cnn_ratio:.0%} of the internal "
        f"channels removed), {data.name}",
        caption=f"FLOPs per image; ms: wall time per batch of {len(timing_batch)} in eval mode (best of "
        f"{cfg.cnn_timing_rounds} interleaved rounds), {_plural(torch.get_num_threads(), 'thread')}",
    )
    for col in (
        "model",
        "internal channels",
        "params",
        "FLOPs",
        "acc dense",
        "pruned",
        "fine-tuned",
        "ms / batch",
        "speed-up",
    ):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col in ("model", "speed-up"))
    for r in out:
        (pb, pa), (fb, fa), a, t = r["params"], r["flops_per_image"], r["accuracy"], r["seconds_per_batch"]
        table.add_row(
            r["model"],
            f"{r['channels'][0]} → {r['channels'][1]}",
            f"{pb / 1e6:.1f}M → {pa / 1e6:.1f}M",
            f"{fb / 1e6:.1f}M → {fa / 1e6:.1f}M",
            f"{a['dense']:.1%}",
            f"{a['pruned']:.1%}",
            f"{a['finetuned']:.1%}",
            f"{t['dense'] * 1e3:.1f} → {t['pruned'] * 1e3:.1f}",
            f"x{r['speedup']:.2f}",
        )
    console.print(table)
    console.print(f"CNN part: {time.perf_counter() - t0:.1f} s")
    return out


def _time_backends(U, y, fast, fast_wall: float, cfg: DemoConfig, console) -> dict:
    """Compare the selection `fast` (k steps, taking `fast_wall` seconds on the chosen backend) with
    the "naive" backend on the same problem; each time is the best of cfg.timing_repeats runs
    (the first being the one already made), which is what a busy machine disturbs least.

    The naive loop is timed on at most cfg.naive_steps steps, fewer when its runs would take
    over cfg.naive_budget seconds, and its time is scaled to k steps: every uniform step costs
    the same, one loss evaluation per candidate.
    """
    k, reps = fast.k, max(1, cfg.timing_repeats)
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        select(U, y, k, replacement=True, backend=fast.backend)
        fast_wall = min(fast_wall, time.perf_counter() - t0)
    t0 = time.perf_counter()
    probe = select(U, y, 1, replacement=True, backend="naive")
    per_step = time.perf_counter() - t0
    n_naive = max(1, min(k, cfg.naive_steps, int(cfg.naive_budget / reps / max(per_step, 1e-9))))
    slow, naive_wall = probe, per_step
    if n_naive > 1 or reps > 1:
        naive_wall = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            slow = select(U, y, n_naive, replacement=True, backend="naive")
            naive_wall = min(naive_wall, time.perf_counter() - t0)
    naive_scaled = naive_wall * k / n_naive
    agree = [int(i) for i in slow.indices] == [int(i) for i in fast.indices[:n_naive]]
    timing = {
        "k": k,
        "repeats": reps,
        "backend": fast.backend,
        "backend_seconds": fast_wall,
        "naive_steps_timed": n_naive,
        "naive_seconds_timed": naive_wall,
        "naive_seconds_for_k": naive_scaled,
        "naive_scaled": n_naive < k,
        "speedup": naive_scaled / fast_wall if fast_wall > 0 else float("inf"),
        "same_picks": agree,
    }
    note = (
        f"first {n_naive} of {k} steps timed, {naive_wall:.2f} s, scaled x{k / n_naive:.3g}"
        if n_naive < k
        else "all steps timed"
    )
    best = f"best of {reps}, " if reps > 1 else ""
    console.print(
        f"[bold]timing[/bold] of one selection ({U.shape[0]} x {U.shape[1]} candidates, k = {k}, "
        f"with replacement, {best}{_plural(torch.get_num_threads(), 'torch thread')}):\n"
        f"  {fast.backend} {fast_wall * 1e3:.1f} ms | naive {naive_scaled:.2f} s ({note}) | "
        f"speed-up x{timing['speedup']:.0f} | "
        + ("same picks" if agree else "[red]picks differ from naive's[/red] (float ties?)")
    )
    return timing


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dense = result["dense"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)

    def series(label, metric):
        pts = [(r["k"], r[label][metric]) for r in rows if r[label] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    for label, name, style in (
        ("gfs", "GFS (with replacement)", dict(color="C0", marker="o")),
        ("gfs_no_replacement", "GFS (without replacement)", dict(color="C2", marker="s", ls="--")),
        ("random", f"random subsets (mean of {rows[0]['random']['seeds']})", dict(color="C3", marker="^", ls=":")),
    ):
        ks, acc = series(label, "test_acc")
        ax1.plot(ks, [100 * a for a in acc], label=name, **style)
        ks, loss = series(label, "loss")
        ax2.plot(ks, loss, label=name, **style)
    ks = [r["k"] for r in rows]
    ax1.fill_between(
        ks,
        [100 * r["random"]["test_acc_min"] for r in rows],
        [100 * r["random"]["test_acc_max"] for r in rows],
        color="C3",
        alpha=0.12,
        label="random: min to max",
    )
    ax1.axhline(
        100 * dense["test_acc"],
        color="k",
        lw=1,
        label=f"dense, {dense['neurons']} neurons ({100 * dense['test_acc']:.1f}%)",
    )
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(ks, [str(k) for k in ks])
    ax1.set_xlabel("neurons kept (k, selection steps)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Test accuracy of the pruned network")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xticks(ks, [str(k) for k in ks])
    ax2.set_xlabel("neurons kept (k, selection steps)")
    ax2.set_ylabel("mean squared distance to dense logits")
    ax2.set_title("Imitation loss on the training points")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"gfs demo: {result['dataset']['name']}, two-layer ReLU net, no retraining", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
