"""How much pre-training is enough? The MNIST two-layer study of the paper (Section 5, Figure 1)
as library code: `gfs.experiments.pretraining_study`.

Protocol (one *cell* = one hidden width W, one sub-data-set size S, one seed):

1. Labels are binarised: digit < 5 -> 0, digit >= 5 -> 1 (Fashion-MNIST: classes 0-4, T-shirt,
   trouser, pullover, dress, coat -> 0; classes 5-9, sandal, shirt, sneaker, bag, ankle boot -> 1).
2. A class-balanced sub-data-set of S examples is drawn (the same number from each of the ten
   digit classes; the subsets of one seed are nested).
3. A two-layer network in the mean-field parameterisation,
       f(x) = (1/W) sum_j a_j relu(w_j . x + c_j),   p(y=1|x) = sigmoid(f(x)),
   is pre-trained on the sub-data-set with binary cross-entropy by (minibatch) gradient descent
   for `iterations` steps (`batch_size` examples drawn uniformly per step; None: full-batch
   GD, as in the paper's theory). The per-neuron learning rate is `lr * W`, the mean-field
   scaling that makes training speed independent of the width. Inputs are centred and scaled to
   mean squared norm 1 (over the whole data set); w_j ~ N(0, I), c_j ~ N(0, 1), a_j ~ N(0, 1).
   The initialisation depends on (W, seed) only, so every size of one seed starts from the same
   network. (The paper does not state its optimiser, batch size or widths; these are ours.)
4. At iteration 0 and every `prune_every` iterations, the hidden layer is pruned by greedy forward
   selection: candidate j's features are u_j = (a_j relu(w_j . x_i + c_j))_i over the S
   training examples, the target is the dense pre-sigmoid output y = mean_j u_j, and
   `gfs.select(U, y, k)` keeps at most k neurons (k steps; with replacement a neuron's
   weight is its count / k). No fine-tuning: the pruned network sum_j weight_j u_j is evaluated
   at once, and its accuracy on the whole training sub-data-set is recorded.

The *red line* (`red_line`): for each width, with A* the best mean pruned accuracy reached on the
largest sub-data-set (the "full data set") at any pruning checkpoint, the threshold of size S is
the first checkpoint t whose mean pruned accuracy (over seeds) on S is >= A* - tol; "never" (None)
when no checkpoint reaches it. The paper's finding is that this threshold does not decrease (it
grows, roughly logarithmically) as the data set grows.

Results are written as they come: `cells.jsonl` (one line per finished cell) makes a run
resumable; `results.csv` (every seed and checkpoint), `summary.csv` (mean and spread over
seeds), `summary.json` (config, table, red line, finding, runtime) and `figure.png` at the end.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from .._files import write_atomically
from ..data import Dataset, balanced_subsets, idx_folder, load_digits, load_mnist_idx
from .fits import line_fit

DIGITS_SIZES = (100, 300, 500, 700, 900, 1100, 1300, 1500, 1797)
MNIST_SIZES = (1000,) + tuple(range(5000, 50001, 5000))
DATASETS = ("digits", "mnist", "fashion-mnist")  # fashion-mnist: MNIST's layout, Zalando's clothes

_ACCURACY_SLACK = 1e-9  # float noise allowed when comparing mean accuracies


@dataclass
class PretrainingConfig:
    """Every setting of the study. `default()` is the embedded digits run, `paper()` the paper's
    MNIST scale (on MNIST or Fashion-MNIST), `quick()` a seconds-long smoke run.

    ``dataset``: "digits" (scikit-learn's, embedded), "mnist" (IDX files in ``data_dir``) or
    "fashion-mnist" (IDX files in ``data_dir``, default /usr/share/datasets/fashion-mnist, the
    Debian package dataset-fashion-mnist)."""

    dataset: str = "digits"
    data_dir: str | None = None
    widths: tuple = (64, 256, 1024)
    sizes: tuple = DIGITS_SIZES
    iterations: int = 4000
    prune_every: int = 200
    k: int = 32
    seeds: tuple = (0, 1, 2, 3, 4)
    lr: float = 0.5
    batch_size: int | None = 32
    replacement: bool = True
    tol: float = 0.0
    backend: str = "auto"
    threads: int = 1  # torch intra-op threads while the study runs; 0 leaves torch's setting

    @classmethod
    def default(cls, **overrides) -> PretrainingConfig:
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides) -> PretrainingConfig:
        base = dict(
            widths=(16, 48), sizes=(60, 150, 300), iterations=60, prune_every=20, k=8, seeds=(0,), batch_size=32
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def paper(cls, data_dir: str | None = None, *, dataset: str = "mnist", **overrides) -> PretrainingConfig:
        """Sizes 1K, 5K, ..., 50K, 8000 iterations, pruning every 1000 to 200 neurons, 3 seeds, on
        ``dataset`` ("mnist": the paper's; "fashion-mnist": the same protocol on Fashion-MNIST)
        read from ``data_dir``. The paper's widths were lost in extraction: (500, 1000, 2000)
        stand in."""
        base = dict(
            dataset=dataset,
            data_dir=data_dir,
            widths=(500, 1000, 2000),
            sizes=MNIST_SIZES,
            iterations=8000,
            prune_every=1000,
            k=200,
            seeds=(0, 1, 2),
            batch_size=128,
            threads=0,
        )
        base.update(overrides)
        return cls(**base)

    def checkpoints(self) -> list[int]:
        return list(range(0, self.iterations + 1, self.prune_every))

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}, got {self.dataset!r}")
        if self.dataset == "mnist" and not self.data_dir:
            raise ValueError("dataset='mnist' needs data_dir, the folder with the MNIST IDX files")
        for name in ("widths", "sizes", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty; give at least one")
        if any(int(w) < 1 for w in self.widths) or any(int(s) < 2 for s in self.sizes):
            raise ValueError("widths must be >= 1 and sizes >= 2")
        if self.iterations < 0 or self.prune_every < 1:
            raise ValueError("iterations must be >= 0 and prune_every >= 1")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's own setting), got {self.threads}")
        if self.k < 1 or (not self.replacement and self.k > min(self.widths)):
            raise ValueError(f"k={self.k} must be >= 1 (and <= every width when replacement=False)")

    def identity(self) -> dict:
        """The settings that change a cell's numbers: not where they go, nor the backend, nor
        which widths, sizes and seeds are in the grid (a cell depends on its own width, size and
        seed only, so a study can be extended by more of them and resumed)."""
        d = asdict(self)
        for name in ("backend", "data_dir", "widths", "sizes", "seeds", "tol", "threads"):
            d.pop(name)
        return d


# --------------------------------------------------------------------------------------------
# The two-layer network and one cell
# --------------------------------------------------------------------------------------------


@dataclass
class TwoLayer:
    """f(x) = (1/W) sum_j a_j relu(w_j . x + c_j), parameters as plain tensors."""

    w: torch.Tensor  # (W, d)
    c: torch.Tensor  # (W,)
    a: torch.Tensor  # (W,)

    @classmethod
    def init(cls, width: int, dim: int, seed: int) -> TwoLayer:
        g = torch.Generator().manual_seed(1_000_003 * int(seed) + int(width))
        return cls(
            torch.randn(width, dim, generator=g), torch.randn(width, generator=g), torch.randn(width, generator=g)
        )

    def parameters(self):
        return [self.w, self.c, self.a]

    def hidden(self, X: torch.Tensor) -> torch.Tensor:
        return torch.relu(X @ self.w.T + self.c)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.hidden(X) @ self.a / self.a.numel()

    def candidates(self, X: torch.Tensor) -> torch.Tensor:
        """U (W, S): row j is neuron j's contribution a_j relu(w_j . x_i + c_j) over the data,
        so the dense pre-sigmoid output is U.mean(0)."""
        with torch.no_grad():
            return (self.hidden(X) * self.a).T.contiguous()


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((logits > 0).to(labels.dtype) == labels).double().mean())


def prune_and_score(
    net: TwoLayer, X: torch.Tensor, labels: torch.Tensor, k: int, *, replacement: bool = True, backend: str = "auto"
) -> dict:
    """Prune the hidden layer by GFS on (X, labels) and score pruned and dense networks on it."""
    import gfs

    U = net.candidates(X)
    y = U.mean(0)
    kk = k if replacement else min(k, U.shape[0])
    sel = gfs.select(U, y, kk, replacement=replacement, backend=backend)
    z = sel.output(U).float()
    return {
        "pruned_acc": _accuracy(z, labels),
        "dense_acc": _accuracy(y, labels),
        "pruned_bce": _bce(z, labels),
        "dense_bce": _bce(y, labels),
        "imitation_loss": sel.loss,
        "distinct": int(sel.support.numel()),
        "select_seconds": sel.seconds,
    }


def gradients(net: TwoLayer, X: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of the mean binary cross-entropy of sigmoid(f(X)) w.r.t. (w, c, a), in closed
    form (cheaper than autograd on these small problems; tests check it against autograd)."""
    W = net.a.numel()
    pre = X @ net.w.T + net.c  # (B, W)
    h = torch.relu(pre)
    f = h @ net.a / W
    g = (torch.sigmoid(f) - labels) / X.shape[0]  # dL/df, (B,)
    da = h.T @ g / W
    dpre = torch.outer(g, net.a / W) * (pre > 0)
    return dpre.T @ X, dpre.sum(0), da


def run_cell(data_X: torch.Tensor, labels: torch.Tensor, width: int, seed: int, cfg: PretrainingConfig) -> list[dict]:
    """Pre-train one network on (data_X, labels) by (minibatch) gradient descent with the
    mean-field learning rate lr * width, and prune it at every checkpoint."""
    net = TwoLayer.init(width, data_X.shape[1], seed)
    step = cfg.lr * width
    g = torch.Generator().manual_seed(7_919 * int(seed) + 31 * int(width) + data_X.shape[0])
    n = data_X.shape[0]
    full_batch = cfg.batch_size is None or cfg.batch_size >= n
    checkpoints = set(cfg.checkpoints())
    rows = []
    for it in range(cfg.iterations + 1):
        if it in checkpoints:
            row = prune_and_score(net, data_X, labels, cfg.k, replacement=cfg.replacement, backend=cfg.backend)
            row["iteration"] = it
            rows.append(row)
        if it == cfg.iterations:
            break
        if full_batch:
            xb, yb = data_X, labels
        else:
            idx = torch.randint(n, (cfg.batch_size,), generator=g)
            xb, yb = data_X[idx], labels[idx]
        for p, dp in zip(net.parameters(), gradients(net, xb, yb), strict=True):
            p.sub_(dp, alpha=step)
    return rows


# --------------------------------------------------------------------------------------------
# Red line and finding
# --------------------------------------------------------------------------------------------


def summarise(
    rows: list[dict], metrics=("pruned_acc", "dense_acc", "pruned_bce", "dense_bce", "imitation_loss", "distinct")
) -> list[dict]:
    """Mean and spread (sample standard deviation; 0 for one seed) over seeds per
    (width, size, iteration)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["width"], r["size"], r["iteration"]), []).append(r)
    out = []
    for w, s, it in sorted(groups):
        g = groups[(w, s, it)]
        rec = {"width": w, "size": s, "iteration": it, "seeds": len(g)}
        for m in metrics:
            v = np.array([r[m] for r in g], dtype=np.float64)
            rec[f"{m}_mean"] = float(v.mean())
            rec[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(rec)
    return out


def red_line(summary: list[dict], tol: float = 0.0, metric: str = "pruned_acc_mean") -> dict[int, dict]:
    """The red line of Figure 1, per width.

    For width W, let S_max be the largest sub-data-set size and A* = max over checkpoints t of the
    mean (over seeds) pruned accuracy on S_max at t: the best pruned accuracy reached on the full
    data set. For every size S, threshold(S) = the smallest checkpoint t with
    mean pruned accuracy(W, S, t) >= A* - tol, or None ("never") if no checkpoint reaches it.
    threshold(S_max) always exists (it is at most the arg-max of A*).

    Returns {width: {"target": A*, "target_iteration": first t reaching A* on S_max,
    "sizes": [...], "thresholds": [t or None, ...]}}.
    """
    table: dict[tuple, float] = {(r["width"], r["size"], r["iteration"]): r[metric] for r in summary}
    out = {}
    for w in sorted({r["width"] for r in summary}):
        sizes = sorted({s for (ww, s, _) in table if ww == w})
        its = sorted({t for (ww, _, t) in table if ww == w})
        smax = sizes[-1]
        target = max(table[(w, smax, t)] for t in its if (w, smax, t) in table)
        thresholds = []
        for s in sizes:
            hit = [t for t in its if (w, s, t) in table and table[(w, s, t)] >= target - tol - _ACCURACY_SLACK]
            thresholds.append(hit[0] if hit else None)
        out[int(w)] = {
            "target": float(target),
            "sizes": [int(s) for s in sizes],
            "thresholds": thresholds,
            "target_iteration": thresholds[-1],
        }
    return out


def _spearman(x, y) -> float:
    """Spearman rank correlation with average ranks for ties; nan if either side is constant."""

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for val in np.unique(v):
            m = v == val
            r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _fit(x, t) -> dict:
    """Least squares t = alpha + beta x, with R^2."""
    alpha, beta, r2 = line_fit(x, t)
    return {"alpha": alpha, "beta": beta, "r2": r2}


def assess(line: dict[int, dict], never_as: float, trend_rho: float = 0.5) -> dict:
    """Does the threshold not decrease as the data set grows?

    Per width: the thresholds ("never" counts as `never_as`, beyond the last checkpoint); the
    neighbouring sizes where it decreases and by how much; Spearman's rank correlation of
    threshold with size; least-squares fits of threshold against size and against log(size)
    (when every size has a threshold); and a verdict:

    - "grows, never decreases": no decrease between neighbouring sizes, later on the largest
      size than on the smallest (the paper's claim, strictly);
    - "flat": no decrease, but no growth either;
    - "grows as a trend": rank correlation >= trend_rho and later on the largest size, with
      local decreases;
    - "does not grow": anything else.
    """
    per_width = {}
    for w, rec in line.items():
        sizes = rec["sizes"]
        t = [never_as if v is None else float(v) for v in rec["thresholds"]]
        drops = [
            {
                "from_size": sizes[i],
                "to_size": sizes[i + 1],
                "from": rec["thresholds"][i],
                "to": rec["thresholds"][i + 1],
                "by": t[i] - t[i + 1],
            }
            for i in range(len(t) - 1)
            if t[i + 1] < t[i]
        ]
        rho = _spearman(sizes, t)
        grows = t[-1] > t[0]
        if not drops and grows:
            verdict = "grows, never decreases"
        elif not drops:
            verdict = "flat (never decreases, does not grow)"
        elif grows and rho >= trend_rho:
            verdict = (
                f"grows as a trend, with {len(drops)} local decrease(s) of at most "
                f"{max(d['by'] for d in drops):g} iterations"
            )
        else:
            verdict = "does not grow"
        fits = {}
        if None not in rec["thresholds"] and len(sizes) > 2:
            fits = {"linear_in_size": _fit(sizes, t), "linear_in_log_size": _fit(np.log(sizes), t)}
        per_width[w] = {
            "non_decreasing": not drops,
            "grows": grows,
            "decreases": drops,
            "spearman": rho,
            "smallest_size_threshold": rec["thresholds"][0],
            "largest_size_threshold": rec["thresholds"][-1],
            "fits": fits,
            "verdict": verdict,
        }
    vals = per_width.values()
    return {
        "per_width": per_width,
        "widths": len(per_width),
        "widths_non_decreasing": sum(v["non_decreasing"] for v in vals),
        "widths_strict": sum(v["verdict"].startswith("grows, never") for v in vals),
        "widths_trend": sum(v["verdict"].startswith("grows") for v in vals),
        "trend_rho": trend_rho,
    }


def _fmt_t(t) -> str:
    return "never" if t is None else str(t)


def finding_text(
    line: dict[int, dict], verdict: dict, per_seed: dict | None = None, prune_every: int | None = None
) -> str:
    """The finding in words, with the numbers behind it."""
    n = verdict["widths"]
    strict, trend = verdict["widths_strict"], verdict["widths_trend"]
    drops = [d for v in verdict["per_width"].values() for d in v["decreases"]]
    rhos = [v["spearman"] for v in verdict["per_width"].values() if not math.isnan(v["spearman"])]
    rho_txt = (
        f"rank correlation of threshold with size {min(rhos):.2f} to {max(rhos):.2f}" if rhos else "no rank correlation"
    )
    if strict == n:
        head = (
            f"Reproduced: for all {n} widths the pre-training threshold (red line) never decreases as the "
            f"sub-data-set grows and is later on the largest set than on the smallest ({rho_txt})."
        )
    elif trend == n:
        biggest = max(d["by"] for d in drops)
        steps = f" = {biggest / prune_every:g} checkpoint interval(s)" if prune_every else ""
        head = (
            f"Reproduced as a trend, not strictly: for all {n} widths the threshold grows with the data-set size "
            f"({rho_txt}), but it is not monotone: {len(drops)} decrease(s) between neighbouring sizes in all, "
            f"the largest {biggest:g} iterations{steps}."
        )
    elif trend:
        head = f"Mixed: the threshold grows with size for {trend} of {n} widths ({rho_txt}); not for the others."
    else:
        head = f"Not reproduced: the threshold does not grow with the data-set size for any width ({rho_txt})."
    lines = [head]
    for w, rec in line.items():
        v = verdict["per_width"][w]
        pairs = ", ".join(f"{s}:{_fmt_t(t)}" for s, t in zip(rec["sizes"], rec["thresholds"], strict=True))
        rho = "n/a" if math.isnan(v["spearman"]) else f"{v['spearman']:.2f}"
        fit = ""
        if v["fits"]:
            lin, log = v["fits"]["linear_in_size"], v["fits"]["linear_in_log_size"]
            fit = (
                f"; fit t = {log['alpha']:.0f} + {log['beta']:.0f} ln(size) R^2 {log['r2']:.2f} "
                f"(linear in size: R^2 {lin['r2']:.2f})"
            )
        lines.append(
            f"  width {w}: A* = {100 * rec['target']:.2f}% (best mean pruned accuracy on the full set, first at "
            f"iteration {rec['target_iteration']}); threshold by size {pairs}; rank corr {rho}{fit}; {v['verdict']}"
        )
    if per_seed:
        for w, ps in per_seed.items():
            lines.append(
                f"  width {w}, seed by seed (each seed's own A*): {ps['non_decreasing']} of {ps['seeds']} "
                f"never decrease, {ps['growing']} of {ps['seeds']} later on the largest set than the smallest; "
                f"mean rank corr {ps['mean_spearman']}"
            )
    return "\n".join(lines)


def per_seed_lines(rows: list[dict], tol: float, never_as: float) -> dict:
    """The red line computed seed by seed (each seed's own A*), as a robustness check."""
    out = {}
    for w in sorted({r["width"] for r in rows}):
        seeds = sorted({r["seed"] for r in rows if r["width"] == w})
        nd, grow, rhos, thresholds = 0, 0, [], {}
        for sd in seeds:
            sub = [dict(r, pruned_acc_mean=r["pruned_acc"]) for r in rows if r["width"] == w and r["seed"] == sd]
            line = red_line(sub, tol)[w]
            a = assess({w: line}, never_as)["per_width"][w]
            nd += a["non_decreasing"]
            grow += a["grows"]
            if not math.isnan(a["spearman"]):
                rhos.append(a["spearman"])
            thresholds[int(sd)] = line["thresholds"]
        out[int(w)] = {
            "seeds": len(seeds),
            "non_decreasing": nd,
            "growing": grow,
            "thresholds": thresholds,
            "mean_spearman": (f"{np.mean(rhos):.2f}" if rhos else "n/a"),
        }
    return out


# --------------------------------------------------------------------------------------------
# Output: cells file, tables, figure
# --------------------------------------------------------------------------------------------

CELLS_FILE = "cells.jsonl"


def _config_hash(cfg: PretrainingConfig, dataset: Dataset) -> str:
    ident = dict(cfg.identity(), n_examples=len(dataset.x_train), dim=int(dataset.dim))
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _read_cells(path: str) -> list[dict]:
    """Completed cells; a torn last line (interrupted write) is ignored."""
    cells = []
    if not os.path.exists(path):
        return cells
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                cells.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return cells


def _append_cell(path: str, cell: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(cell) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def _write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, default=_json_default)

    write_atomically(path, write)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def plot_study(summary: list[dict], line: dict[int, dict], cfg: PretrainingConfig, path: str) -> str:
    """Figure 1: mean pruned accuracy over (sub-data-set size, pre-training iterations), one panel
    per width, with the red line (threshold per size; "never" drawn above the top row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted(line)
    sizes = sorted({r["size"] for r in summary})
    its = sorted({r["iteration"] for r in summary})
    acc = {(r["width"], r["size"], r["iteration"]): r["pruned_acc_mean"] for r in summary}
    vals = np.array(list(acc.values()))
    trained = np.array([v for (_, _, t), v in acc.items() if t > 0]) if len(its) > 1 else vals
    # the colour scale follows the trained checkpoints: iteration 0 (chance level) would flatten it
    vmin, vmax = float(np.percentile(trained, 2)), float(vals.max())
    fig, axes = plt.subplots(
        1, len(widths), figsize=(4.6 * len(widths) + 1.2, 4.8), squeeze=False, constrained_layout=True
    )
    annotate = len(sizes) * len(its) <= 160
    for ax, w in zip(axes[0], widths, strict=True):
        grid = np.full((len(its), len(sizes)), np.nan)
        for i, t in enumerate(its):
            for j, s in enumerate(sizes):
                grid[i, j] = acc.get((w, s, t), np.nan)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        if annotate:
            for i in range(len(its)):
                for j in range(len(sizes)):
                    if not np.isnan(grid[i, j]):
                        v = grid[i, j]
                        ax.text(
                            j,
                            i,
                            f"{100 * v:.0f}" if vmax - vmin > 0.05 else f"{100 * v:.1f}",
                            ha="center",
                            va="center",
                            fontsize=6,
                            color="white" if v < (vmin + vmax) / 2 else "black",
                        )
        rec = line[w]
        xs, ys, never = [], [], []
        for s, t in zip(rec["sizes"], rec["thresholds"], strict=True):
            xs.append(sizes.index(s))
            if t is None:
                ys.append(len(its) - 0.5)
                never.append(sizes.index(s))
            else:
                ys.append(its.index(t))
        ax.plot(xs, ys, color="red", lw=2.2, marker="o", ms=4, label=f"red line: first >= {100 * rec['target']:.1f}%")
        if never:
            ax.plot(never, [len(its) - 0.5] * len(never), "rx", ms=9, mew=2, label="never")
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes], rotation=60, fontsize=7)
        ax.set_yticks(range(len(its)), [str(t) for t in its], fontsize=7)
        ax.set_xlabel("sub-data-set size")
        ax.set_ylabel("pre-training iterations")
        ax.set_title(f"width {w} -> GFS k={cfg.k}", fontsize=10)
        ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    fig.colorbar(
        im, ax=axes[0].tolist(), extend="min", label="pruned accuracy on its training sub-set (mean over seeds)"
    )
    title = (
        f"{cfg.dataset}: pruned (no fine-tuning) accuracy vs data-set size and pre-training; {len(cfg.seeds)} seed(s)"
    )
    # wrapped to the figure's width (about 12 characters an inch at this size): one width is narrow
    fig.suptitle("\n".join(textwrap.wrap(title, int(12 * fig.get_figwidth()))), fontsize=10)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """What `pretraining_study` returns (and writes to `out`)."""

    config: PretrainingConfig
    rows: list = field(repr=False)
    summary: list = field(repr=False)
    red_line: dict = field(default_factory=dict)
    assessment: dict = field(default_factory=dict)
    finding: str = ""
    computed_cells: int = 0
    skipped_cells: int = 0
    seconds: float = 0.0
    files: dict = field(default_factory=dict)


def _load_dataset(cfg: PretrainingConfig, dataset: Dataset | None) -> Dataset:
    """`dataset`, or the one `cfg` names: MNIST's or Fashion-MNIST's training split (only its two
    files are read) or all of scikit-learn's digits, pixels in [0, 1], named as the config names
    them. A missing folder is a ValueError (for Fashion-MNIST naming the Debian package)."""
    if dataset is not None:
        return dataset
    if cfg.dataset in ("mnist", "fashion-mnist"):
        folder = idx_folder(cfg.dataset, cfg.data_dir, what="dataset")
        name = "Fashion-MNIST" if cfg.dataset == "fashion-mnist" else "MNIST"
        data = load_mnist_idx(folder, standardise=False, test=False, name=name)
    else:
        data = load_digits()
    return replace(data, name=cfg.dataset)


def normalise(X: np.ndarray) -> np.ndarray:
    """Centre every input coordinate and scale so that the mean squared norm of an input is 1
    (Assumption 2 of the paper bounds ||x||; this keeps w.x of order 1 for w ~ N(0, I))."""
    Xc = X - X.mean(0, keepdims=True)
    scale = float(np.sqrt((Xc.astype(np.float64) ** 2).sum(1).mean()))
    return (Xc / max(scale, 1e-12)).astype(np.float32)


def binary_labels(classes: torch.Tensor) -> torch.Tensor:
    """Step 1 of the protocol: class < 5 -> 0, class >= 5 -> 1 (float32)."""
    return (classes >= 5).to(torch.float32)


def _run_with_progress(work, todo, skipped, progress):
    if not (todo and progress):
        work(lambda *a: None)
        return
    from .._progress import progress_bar

    with progress_bar("[bold]study[/] {task.description}", remaining=True) as bar:
        task = bar.add_task(f"{len(todo)} cells ({skipped} resumed)", total=len(todo))
        work(lambda w, s, sd: bar.update(task, advance=1, description=f"width {w} size {s} seed {sd}"))


def pretraining_study(
    config: PretrainingConfig | None = None,
    *,
    out: str = "runs/study-pretraining",
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    dataset: Dataset | None = None,
    plot: bool = True,
    **overrides,
) -> StudyResult:
    """Run (or resume) the pre-training study and write its table and figure to `out`.

    Parameters
    ----------
    config : PretrainingConfig, optional
        The settings (default `PretrainingConfig.default()`, digits); keyword `overrides` replace
        single fields, e.g. ``pretraining_study(widths=(32, 128), seeds=(0,))``.
    out : str
        Output folder: cells.jsonl, results.csv, summary.csv, summary.json, figure.png.
    resume : bool
        Keep the cells already in `out/cells.jsonl` (same settings) and compute only the rest.
        With resume=False and cells present, `overwrite=True` is needed to start afresh.
    progress : bool
        A rich progress bar over the cells.
    dataset : gfs.data.Dataset, optional
        Use this data instead of loading `config.dataset` (tests, custom data): the study draws
        from its training split, ``y_train`` holding digit classes (binarised digit >= 5).

    Returns
    -------
    StudyResult
        rows (every seed and checkpoint), summary (mean and std over seeds), red_line,
        assessment and finding (does the threshold not decrease as the data set grows?),
        computed / skipped cell counts, seconds, files.

    Examples
    --------
    >>> from gfs.experiments import pretraining_study, PretrainingConfig
    >>> res = pretraining_study(PretrainingConfig.quick(), out="runs/quick", progress=False)  # doctest: +SKIP
    >>> print(res.finding)  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    cfg = config if config is not None else PretrainingConfig.default()
    if overrides:
        known = {f.name for f in fields(PretrainingConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown setting(s) {bad}; known: {sorted(known)}")
        cfg = PretrainingConfig(**{**asdict(cfg), **overrides})
    cfg.sizes = tuple(sorted(int(s) for s in cfg.sizes))
    cfg.widths = tuple(int(w) for w in cfg.widths)
    cfg.seeds = tuple(int(s) for s in cfg.seeds)
    cfg.validate()
    data = _load_dataset(cfg, dataset)
    examples = len(data.x_train)
    if cfg.sizes[-1] > examples:
        raise ValueError(f"size {cfg.sizes[-1]} is larger than the {data.name} data set ({examples} examples)")

    os.makedirs(out, exist_ok=True)
    cells_path = os.path.join(out, CELLS_FILE)
    chash = _config_hash(cfg, data)
    existing = _read_cells(cells_path)
    if existing and not resume:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds {len(existing)} completed cell(s); resume them (resume=True, "
                f"--resume), start afresh (overwrite=True, --overwrite) or choose another out folder"
            )
        os.remove(cells_path)
        existing = []
    other = {c.get("config_hash") for c in existing} - {chash}
    if other:
        raise ValueError(
            f"{out} holds cells of different settings (config hash {sorted(other)} vs {chash}); "
            f"use another out folder, or overwrite=True to discard them"
        )
    done = {(c["width"], c["size"], c["seed"]): c for c in existing}

    X_all = torch.from_numpy(normalise(data.x_train.numpy()))
    y_all = binary_labels(data.y_train)
    subsets = {sd: balanced_subsets(data.y_train.numpy(), cfg.sizes, sd) for sd in cfg.seeds}
    todo = [(w, s, sd) for w in cfg.widths for s in cfg.sizes for sd in cfg.seeds if (w, s, sd) not in done]
    skipped = len(done)

    def work(advance):
        for w, s, sd in todo:
            t0 = time.perf_counter()
            idx = torch.from_numpy(subsets[sd][s])
            rows = run_cell(X_all[idx], y_all[idx], w, sd, cfg)
            cell = {
                "width": w,
                "size": s,
                "seed": sd,
                "config_hash": chash,
                "seconds": time.perf_counter() - t0,
                "rows": rows,
            }
            _append_cell(cells_path, cell)
            done[(w, s, sd)] = cell
            advance(w, s, sd)

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads_used = torch.get_num_threads()
    try:
        _run_with_progress(work, todo, skipped, progress)
    finally:
        torch.set_num_threads(threads)

    rows = []
    for w, s, sd in sorted(done):
        if w in cfg.widths and s in cfg.sizes and sd in cfg.seeds:
            for r in done[(w, s, sd)]["rows"]:
                rows.append({"width": w, "size": s, "seed": sd, **r})
    summary = summarise(rows)
    line = red_line(summary, cfg.tol)
    never_as = float(cfg.iterations + cfg.prune_every)
    verdict = assess(line, never_as)
    per_seed = per_seed_lines(rows, cfg.tol, never_as) if len(cfg.seeds) > 1 else None
    finding = finding_text(line, verdict, per_seed, cfg.prune_every)
    seconds = time.perf_counter() - t_start
    cell_seconds = sum(done[key]["seconds"] for key in done)

    files = {
        "cells": cells_path,
        "results": os.path.join(out, "results.csv"),
        "summary_csv": os.path.join(out, "summary.csv"),
        "summary_json": os.path.join(out, "summary.json"),
    }
    _write_csv(files["results"], rows)
    _write_csv(files["summary_csv"], summary)
    if plot:
        files["figure"] = plot_study(summary, line, cfg, os.path.join(out, "figure.png"))
    _write_json(
        files["summary_json"],
        {
            "config": asdict(cfg),
            "config_hash": chash,
            "dataset": {"name": data.name, "examples": examples, "dim": int(data.dim)},
            "red_line": {str(w): v for w, v in line.items()},
            "red_line_definition": red_line.__doc__.split("Returns")[0].strip(),
            "assessment": {**verdict, "per_width": {str(w): v for w, v in verdict["per_width"].items()}},
            "per_seed": {str(w): v for w, v in (per_seed or {}).items()},
            "finding": finding,
            "runtime": {
                "this_call_seconds": seconds,
                "sum_of_cell_seconds": cell_seconds,
                "computed_cells": len(todo),
                "resumed_cells": skipped,
                "torch_threads": threads_used,
            },
            "summary": summary,
        },
    )
    return StudyResult(
        config=cfg,
        rows=rows,
        summary=summary,
        red_line=line,
        assessment=verdict,
        finding=finding,
        computed_cells=len(todo),
        skipped_cells=skipped,
        seconds=seconds,
        files=files,
    )
