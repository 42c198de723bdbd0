"""Spawned torch.distributed ranks for the multi-process tests (tests/test_distributed*.py)."""

from __future__ import annotations

import multiprocessing
import time


def spawn_ranks(worker, world: int, tmp, limit: float) -> list:
    """Run ``worker(rank, world, rendezvous_path, out_dir)`` on `world` spawned processes; return
    their exit codes (None: still running at `limit` seconds, then killed)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, str(tmp / "rendezvous"), str(tmp))) for r in range(world)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    for p in procs:
        p.join(max(0.1, limit - (time.monotonic() - t0)))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes
