"""Exact power-of-two rescaling: finite input never gives a silently wrong selection.

Multiplying U and y by the same power of two changes no argmin (every rule's scores scale by one
positive factor) and is exact in binary floating point unless a value leaves the dtype's range.
Data whose products would overflow or underflow the accumulation dtype are brought near 1
first, and losses are reported back in the caller's units (docs/design.md section 3).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def rescale_exponent(amax: float, dtype: torch.dtype, m: int, step: str = "uniform") -> int:
    """0 when entries of magnitude <= amax can be selected on as they are: their products summed
    over m terms in `dtype`'s accumulation dtype (float64 for float64, else float32), and the
    float64 products of those sums that line_search and refit form (fourth powers of the data),
    neither overflow nor underflow. Otherwise the exponent e of amax (amax = f 2^e, 0.5 <= f < 1):
    multiplying by 2^-e brings the data to [0.5, 1) (losses scale by 4^-e)."""
    if amax == 0.0:
        return 0
    e = math.frexp(amax)[1]
    bits = int(m).bit_length()
    acc = np.finfo(np.float64 if dtype == torch.float64 else np.float32)
    for fi, power in ((acc, 2), (np.finfo(np.float64), 2 if step == "uniform" else 4)):
        # headroom for the sums of m terms and the step factor t of the GPU loops' q = (t+1) y - t z;
        # below, the powers keep a full mantissa above the smallest normal number
        hi = (fi.maxexp - 40 - power // 2 * bits) // power
        lo = (fi.minexp + 2 * (fi.nmant + 1)) // power
        if e > hi or e < lo:
            return e
    return 0


def ldexp(x: torch.Tensor, e: int) -> torch.Tensor:
    """x * 2^e, a new tensor of x's dtype, in factors the dtype can hold (two at least): exact
    while the values stay in range (an overflow gives inf, not NaN from inf * 0)."""
    if e == 0:
        return x
    lim = math.frexp(torch.finfo(x.dtype).max)[1] - 1
    n = max(2, -(-abs(e) // lim))
    steps = [(e * (i + 1)) // n - (e * i) // n for i in range(n)]
    out = x * 2.0 ** steps[0]
    for s in steps[1:]:
        out.mul_(2.0**s)
    return out


def ldexp_float(v: float, e: int) -> float:
    """v * 2^e as a Python float (inf where it overflows)."""
    try:
        return math.ldexp(v, e)
    except OverflowError:
        return math.copysign(math.inf, v)


def check_representable(e: int, name: str) -> None:
    """Products of entries near 2^e must be finite, non-zero float64 numbers (in G = U U^T)."""
    f64 = np.finfo(np.float64)
    if not (f64.minexp + 2 * (f64.nmant + 1) < 2 * e < f64.maxexp - 64):
        raise ValueError(
            f"{name} has entries of magnitude 2^{e}, whose products {'overflow' if e > 0 else 'underflow'} the "
            f"float64 statistics; multiply features and targets by one common power of two (the selection does "
            f"not change) or use the streaming engine (engine='stream')"
        )
