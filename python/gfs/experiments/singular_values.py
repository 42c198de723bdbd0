"""The paper's Appendix C: the smallest singular value of the hidden output of a two-layer network
at random initialisation, against the width N, the data-set size M and the input dimension d.

`singular_value_study` runs the grid (`hidden_output`, `torch.linalg.svdvals`), fits the exponents
in log-log (`gfs.experiments.fits.loglog_fit`), writes a table, the fits and a figure
(`plot_singular_values`), and states the finding. Command line: `gfs study singular-values`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .fits import least_squares, loglog_fit

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


def activation_std(activation: str = "relu") -> float:
    """Standard deviation of act(g), g ~ N(0, 1) (trapezoid rule on [-12, 12]): the entry scale
    of the independent-entries random-matrix prediction sigma_min ~ std * |sqrt(N) - sqrt(M)|."""
    act = _activation(activation)
    x = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    pdf = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    v = act(x)
    m = float(torch.trapezoid(pdf * v, x))
    return math.sqrt(max(float(torch.trapezoid(pdf * v * v, x)) - m * m, 0.0))


def hidden_output(
    M: int, N: int, d: int, *, activation: str = "relu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """H = act(X W^T), (M x N): M inputs x_i ~ N(0, I_d) scaled to unit norm, N first-layer
    weights w_j ~ N(0, I_d), so every pre-activation w_j . x_i is N(0, 1) (float64)."""
    act = _activation(activation)
    X = torch.randn(M, d, generator=generator, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    W = torch.randn(N, d, generator=generator, dtype=torch.float64)
    return act(X @ W.T)


@dataclass
class SingularValueResult:
    """Table rows (width N, size M, dim d, mean / std of sigma_min and of the condition number over
    repeats, the random-matrix prediction), the log-log fits, and the files written."""

    rows: list
    fits: dict
    finding: str
    seconds: float
    files: dict = field(default_factory=dict)


def singular_value_study(
    widths=(256, 512, 1024, 2048, 4096),
    sizes=(32, 64, 128),
    dims=(8, 32, 128),
    *,
    repeats: int = 10,
    activation: str = "relu",
    seed: int = 0,
    out: str | None = None,
    progress: bool = False,
    threads: int | None = 1,
) -> SingularValueResult:
    """The paper's Appendix C: sigma_min(H) of the hidden output H = act(X W^T) (M x N) at random
    Gaussian initialisation (`hidden_output`), for every width N, data-set size M and input
    dimension d, `repeats` draws each (mean and standard deviation), with the condition number
    sigma_max / sigma_min.

    Fits (least squares in log-log): for every (M, d) the exponent of N (the paper: sigma_min
    grows like sqrt(N), exponent 1/2, when N >> M), for every (N, d) the exponent of M, for every
    (N, M) the exponent of d, and one joint fit log sigma_min = c + a log N + b log M + g log d.
    The independent-entries prediction std(act) * (sqrt(N) - sqrt(M)) is tabulated beside it
    (the data points share the weights, so the entries are not independent: a guide, not a law).

    Writes singular_values.csv, singular_values.json and singular_values.png to `out` if given.
    """
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    std = activation_std(activation)
    grid = [(N, M, d) for d in dims for M in sizes for N in widths]
    rows = []
    try:
        bar = None
        if progress:
            from rich.progress import Progress

            bar = Progress()
            bar.start()
            task = bar.add_task("singular values", total=len(grid))
        for N, M, d in grid:
            smin, cond = [], []
            for _ in range(repeats):
                sv = torch.linalg.svdvals(hidden_output(M, N, d, activation=activation, generator=g))
                smin.append(float(sv[-1]))
                cond.append(float(sv[0] / sv[-1]) if sv[-1] > 0 else math.inf)
            rows.append(
                {
                    "width": N,
                    "size": M,
                    "dim": d,
                    "sigma_min_mean": float(np.mean(smin)),
                    "sigma_min_std": float(np.std(smin, ddof=1)) if repeats > 1 else 0.0,
                    "condition_mean": float(np.mean(cond)),
                    "condition_std": float(np.std(cond, ddof=1)) if repeats > 1 else 0.0,
                    "rmt_prediction": std * abs(math.sqrt(N) - math.sqrt(M)),
                    "repeats": repeats,
                }
            )
            if bar is not None:
                bar.update(task, advance=1)
        if bar is not None:
            bar.stop()
    finally:
        torch.set_num_threads(old_threads)
    fits = _singular_value_fits(rows, widths, sizes, dims)
    finding = _singular_value_finding(fits, activation)
    res = SingularValueResult(rows=rows, fits=fits, finding=finding, seconds=time.perf_counter() - t0)
    if out is not None:
        res.files = _write_singular_values(res, out, activation, std)
    return res


def _singular_value_fits(rows, widths, sizes, dims) -> dict:
    table = {(r["width"], r["size"], r["dim"]): r["sigma_min_mean"] for r in rows}
    fits = {"vs_width": [], "vs_size": [], "vs_dim": []}
    if len(widths) > 1:
        for M in sizes:
            for d in dims:
                sig = np.array([table[(N, M, d)] for N in widths])
                f = loglog_fit(widths, sig)
                # the paper's comparison: sigma_min against c (sqrt(N) - sqrt(M)), c by least squares
                x = np.abs(np.sqrt(np.array(widths, dtype=np.float64)) - math.sqrt(M))
                c = float(x @ sig / (x @ x)) if float(x @ x) > 0 else float("nan")
                rel = float(np.max(np.abs(c * x - sig) / sig))
                fits["vs_width"].append({"size": M, "dim": d, **f, "sqrt_scale": c, "sqrt_max_rel_err": rel})
    if len(sizes) > 1:
        for N in widths:
            for d in dims:
                f = loglog_fit(sizes, [table[(N, M, d)] for M in sizes])
                fits["vs_size"].append({"width": N, "dim": d, **f})
    if len(dims) > 1:
        for N in widths:
            for M in sizes:
                f = loglog_fit(dims, [table[(N, M, d)] for d in dims])
                fits["vs_dim"].append({"width": N, "size": M, **f})
    keys = list(table)
    A = np.array([[1.0, math.log(N), math.log(M), math.log(d)] for (N, M, d) in keys])
    ly = np.log(np.array([table[k] for k in keys]))
    free = [0] + [i + 1 for i, v in enumerate((widths, sizes, dims)) if len(v) > 1]
    coef = np.zeros(4)
    coef[free], r2 = least_squares(A[:, free], ly)
    fits["joint"] = {
        "intercept": float(coef[0]),
        "width_exponent": float(coef[1]),
        "size_exponent": float(coef[2]),
        "dim_exponent": float(coef[3]),
        "r2": r2,
    }
    return fits


def _range(values) -> str:
    return f"{min(values):.2f} to {max(values):.2f}" if values else "n/a"


def _singular_value_finding(fits, activation) -> str:
    j = fits["joint"]
    lines = [f"sigma_min of act(X W^T) ({activation}), log-log least squares:"]
    if fits["vs_width"]:
        lines.append(
            f"  exponent of width N (per size and dim): {_range([f['slope'] for f in fits['vs_width']])} "
            f"(paper: sigma_min ~ sqrt(N), exponent 0.5, for N >> M)"
        )
        lines.append(
            f"  sigma_min = c (sqrt(N) - sqrt(M)) over the widths, c by least squares per size and dim: "
            f"c {_range([f['sqrt_scale'] for f in fits['vs_width']])}, largest relative error "
            f"{max(f['sqrt_max_rel_err'] for f in fits['vs_width']):.1%}"
        )
    if fits["vs_size"]:
        lines.append(
            f"  exponent of data-set size M (per width and dim): {_range([f['slope'] for f in fits['vs_size']])}"
        )
    if fits["vs_dim"]:
        lines.append(
            f"  exponent of input dimension d (per width and size): {_range([f['slope'] for f in fits['vs_dim']])}"
        )
    lines.append(
        f"  joint fit: sigma_min ~ {math.exp(j['intercept']):.3g} N^{j['width_exponent']:.2f} "
        f"M^{j['size_exponent']:.2f} d^{j['dim_exponent']:.2f} (R^2 {j['r2']:.3f})"
    )
    return "\n".join(lines)


def _write_singular_values(res: SingularValueResult, out: str, activation: str, std: float) -> dict:
    import csv
    import json
    import os

    os.makedirs(out, exist_ok=True)
    files = {
        "csv": os.path.join(out, "singular_values.csv"),
        "json": os.path.join(out, "singular_values.json"),
        "figure": os.path.join(out, "singular_values.png"),
    }
    with open(files["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(res.rows[0]))
        w.writeheader()
        w.writerows(res.rows)
    with open(files["json"], "w") as fh:
        json.dump(
            {
                "activation": activation,
                "activation_std": std,
                "rows": res.rows,
                "fits": res.fits,
                "finding": res.finding,
                "seconds": res.seconds,
            },
            fh,
            indent=1,
        )
    plot_singular_values(res.rows, res.fits, files["figure"], activation)
    return files


def plot_singular_values(rows, fits, path: str, activation: str = "relu") -> str:
    """Three panels: sigma_min vs width for each size (middle dim) with the independent-entries
    prediction dashed; sigma_min vs width for each dim (middle size); condition number vs width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows})
    sizes = sorted({r["size"] for r in rows})
    dims = sorted({r["dim"] for r in rows})
    d_mid, m_mid = dims[len(dims) // 2], sizes[len(sizes) // 2]
    t = {(r["width"], r["size"], r["dim"]): r for r in rows}
    slope = {(f["size"], f["dim"]): f["slope"] for f in fits.get("vs_width", [])}
    scale = {(f["size"], f["dim"]): f["sqrt_scale"] for f in fits.get("vs_width", [])}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)
    for M in sizes:
        rs = [t[(N, M, d_mid)] for N in widths]
        lab = f"M={M}" + (f" (slope {slope[(M, d_mid)]:.2f})" if (M, d_mid) in slope else "")
        line = axes[0].errorbar(
            widths,
            [r["sigma_min_mean"] for r in rs],
            yerr=[r["sigma_min_std"] for r in rs],
            marker="o",
            ms=4,
            capsize=2,
            label=lab,
        )
        if (M, d_mid) in scale:
            axes[0].plot(
                widths,
                [scale[(M, d_mid)] * abs(math.sqrt(N) - math.sqrt(M)) for N in widths],
                ls="--",
                color=line[0].get_color(),
                lw=1,
            )
    axes[0].set_title(f"sigma_min vs width, d={d_mid} (dashed: fitted c (sqrt N - sqrt M))", fontsize=9)
    for d in dims:
        rs = [t[(N, m_mid, d)] for N in widths]
        lab = f"d={d}" + (f" (slope {slope[(m_mid, d)]:.2f})" if (m_mid, d) in slope else "")
        axes[1].errorbar(
            widths,
            [r["sigma_min_mean"] for r in rs],
            yerr=[r["sigma_min_std"] for r in rs],
            marker="o",
            ms=4,
            capsize=2,
            label=lab,
        )
    axes[1].set_title(f"sigma_min vs width, M={m_mid}", fontsize=9)
    for M in sizes:
        rs = [t[(N, M, d_mid)] for N in widths]
        axes[2].plot(widths, [r["condition_mean"] for r in rs], marker="o", ms=4, label=f"M={M}")
    axes[2].set_title(f"condition number sigma_max/sigma_min, d={d_mid}", fontsize=9)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(widths, [str(N) for N in widths])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("width N")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("smallest singular value of H")
    fig.suptitle(
        f"Hidden output H = {activation}(X W^T) at random Gaussian initialisation (x on the unit sphere)", fontsize=10
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "singular_value_study",
    "SingularValueResult",
    "hidden_output",
    "activation_std",
    "loglog_fit",
    "plot_singular_values",
]
