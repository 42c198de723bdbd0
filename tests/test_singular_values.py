"""gfs.experiments.singular_values: the paper's Appendix C (smallest singular value of the random
hidden output) and its log-log fits."""

import math
import os

import numpy as np
import pytest
import torch

from gfs.experiments import singular_values as sv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loglog_fit_recovers_a_power_law():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    f = sv.loglog_fit(x, 3.0 * x**0.5)
    assert abs(f["slope"] - 0.5) < 1e-12 and abs(math.exp(f["intercept"]) - 3.0) < 1e-12 and f["r2"] > 0.999999


def test_singular_value_study_quick(tmp_path):
    res = sv.singular_value_study(widths=(64, 128, 256), sizes=(8, 16), dims=(4, 16), repeats=2, out=str(tmp_path))
    assert len(res.rows) == 12
    for name in ("csv", "json", "figure"):
        assert os.path.getsize(res.files[name]) > 0
    # sigma_min grows with the width, falls with the data-set size, at every grid point
    t = {(r["width"], r["size"], r["dim"]): r["sigma_min_mean"] for r in res.rows}
    assert all(t[(128, m, d)] > t[(64, m, d)] for m in (8, 16) for d in (4, 16))
    assert all(t[(n, 16, d)] < t[(n, 8, d)] for n in (64, 128, 256) for d in (4, 16))
    assert all(f["slope"] > 0.3 for f in res.fits["vs_width"]) and "joint fit" in res.finding
    H = sv.hidden_output(5, 7, 3, generator=torch.Generator().manual_seed(0))
    assert H.shape == (5, 7) and bool((H >= 0).all())
    assert abs(sv.activation_std("relu") - math.sqrt(0.5 - 1 / (2 * math.pi))) < 1e-6
