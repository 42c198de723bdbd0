"""Input checks at the API edge. Every error names the argument and says what to do.

Nothing here modifies what the caller passed: arrays are wrapped (torch.from_numpy shares memory,
read only), reshaped views or contiguous copies are made only when needed.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
STEPS = ("uniform", "line_search", "refit")
_CHECK_CHUNK = 1 << 24  # elements per finiteness check, bounds the temporary


def as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} has dtype {x.dtype}; pass floating-point data (e.g. {name}.astype('float32'))")
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def check_dtype(x: torch.Tensor, name: str) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; gfs takes float32, float64, float16 or bfloat16 (convert with {name}.float())"
        )


def check_finite(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        return
    # fast path: NaN and Inf propagate through a sum (one reduction, ~25x cheaper than isfinite);
    # a non-finite sum (or a float32 overflow of a finite one) falls through to the exact scan
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(total)):
        return
    flat = x.reshape(-1)
    for i in range(0, flat.numel(), _CHECK_CHUNK):
        if not bool(torch.isfinite(flat[i : i + _CHECK_CHUNK]).all()):
            bad = i + int((~torch.isfinite(flat[i : i + _CHECK_CHUNK])).nonzero()[0])
            where = np.unravel_index(bad, tuple(x.shape)) if x.dim() else ()
            raise ValueError(
                f"{name} contains NaN or Inf (first at index {tuple(int(w) for w in where)}); "
                f"remove or impute non-finite values before selecting"
            )


def features_and_targets(features, targets, name: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (U, y): U a contiguous (N, M) view or copy of features, y of targets (M,); errors
    call the features argument `name`."""
    U = as_tensor(features, name)
    if targets is None:
        raise ValueError("targets is missing: pass the target output y (shape (M,) or features.shape[1:])")
    y = as_tensor(targets, "targets")
    check_dtype(U, name)
    check_dtype(y, "targets")
    if U.dim() < 2:
        raise ValueError(
            f"{name} must have shape (N, M) or (N, *S) with one row per candidate; got shape {tuple(U.shape)}"
            " (for a single candidate use features[None])"
        )
    N, M = U.shape[0], int(np.prod(U.shape[1:]))
    if N == 0 or M == 0:
        raise ValueError(f"{name} is empty (shape {tuple(U.shape)}); it needs at least one candidate and one entry")
    if tuple(y.shape) != tuple(U.shape[1:]) and tuple(y.shape) != (M,):
        raise ValueError(
            f"targets has shape {tuple(y.shape)} but {name} has shape {tuple(U.shape)}; "
            f"targets must have shape {tuple(U.shape[1:])} or ({M},)"
        )
    if U.device != y.device:
        raise ValueError(
            f"{name} is on {U.device} but targets is on {y.device}; move both to one device (e.g. targets.to({name}.device))"
        )
    U = U.reshape(N, M).contiguous()
    y = y.reshape(M)
    check_finite(U, name)
    check_finite(y, "targets")
    return U, y


def check_k(k, n: int, replacement: bool) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int (the number of selection steps), got {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be >= 1 (the number of selection steps), got {k}")
    if not replacement and k > n:
        raise ValueError(
            f"k={k} is larger than the {n} candidates, and replacement=False forbids picking one twice; "
            f"use k <= {n} or replacement=True"
        )
    return k


def check_options(step, eps, replacement) -> float | None:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose one of {list(STEPS)}")
    if not isinstance(replacement, (bool, np.bool_)):
        raise TypeError(f"replacement must be True or False, got {replacement!r}")
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be None or a finite number >= 0 (stop once loss <= dense loss + eps), got {eps!r}")
    return float(eps)
