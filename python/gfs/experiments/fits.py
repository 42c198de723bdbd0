"""Least-squares fits the studies report (the red line's trend, the Appendix C exponents)."""

from __future__ import annotations

import numpy as np


def least_squares(A, t) -> tuple[np.ndarray, float]:
    """Coefficients c of the least-squares fit t ~ A c, and its R^2 (nan when t is constant)."""
    A, t = np.asarray(A, dtype=np.float64), np.asarray(t, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(A, t, rcond=None)
    resid = t - A @ coef
    ss = float(((t - t.mean()) ** 2).sum())
    return coef, (1 - float((resid**2).sum()) / ss) if ss > 0 else float("nan")


def line_fit(x, t) -> tuple[float, float, float]:
    """(intercept, slope, R^2) of the least-squares line t = intercept + slope x."""
    x = np.asarray(x, dtype=np.float64)
    coef, r2 = least_squares(np.stack([np.ones_like(x), x], 1), t)
    return float(coef[0]), float(coef[1]), r2


def loglog_fit(x, y) -> dict:
    """Least squares log y = c + slope log x; returns slope, c (so y ~ e^c x^slope) and R^2."""
    c, slope, r2 = line_fit(np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64)))
    return {"slope": slope, "intercept": c, "r2": r2}
