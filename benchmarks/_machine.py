"""What every benchmark script records about the machine it ran on."""

from __future__ import annotations

import os
import platform


def load1() -> float:
    """The 1-minute load average (nan where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what lscpu prints as "Model name")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def slug() -> str:
    """<cpu-model>-<cores>c, lower case, for results file names (e.g. amd-epyc-2c)."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") + f"-{os.cpu_count()}c"
