"""The collectives of one sharded call: each bounded by a timeout, counted, and turned into one
error that says which rank saw what when another rank does not answer.

The bound is the process group's own timeout (`torch.distributed.set_timeout`), set for the
call and restored after it. Gloo applies it to every send and receive of a collective (work-level
timeouts): a collective that another rank never joins fails after `timeout` with "Timed out
waiting ... for send/recv operation to complete", and a rank whose process died makes its peers'
collective fail at once ("Connection reset by peer" / "closed"). After either, the group's
connections are closed: the run is over on every rank. Under NCCL the same timeout is the
watchdog's: a collective that does not finish in time is aborted and the process exits.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import numbers

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


class CollectiveError(RuntimeError):
    """A collective of a sharded call failed: another rank raised, died, or did not join it within
    the timeout. The group's connections are closed after it; create a new process group to go on."""


def as_timeout(timeout) -> datetime.timedelta:
    """timeout (seconds, or a timedelta) as a positive timedelta, else TypeError / ValueError."""
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be a number of seconds or a datetime.timedelta, got {type(timeout).__name__}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=seconds)


class Comm:
    """The collectives of one call on one group: float64 and byte tensors on the group's device
    (the current GPU under NCCL, else the CPU); gathered tables come back on the CPU. `calls` and `bytes`
    count the collectives and the bytes of their results that reached this rank."""

    def __init__(self, group, timeout: datetime.timedelta, name: str = "select_sharded"):
        self.group = group
        self.name = name  # the call, as the errors name it
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        cuda = self.backend == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.timeout = timeout
        self.stage = "the agreement"
        self.calls = self.bytes = 0

    @contextlib.contextmanager
    def bounded(self):
        """Every collective on the group inside the block fails after `timeout`; the group's own
        timeout is restored afterwards."""
        group = self.group if self.group is not None else dist.distributed_c10d._get_default_group()
        try:
            before = group._get_backend(self.device).options._timeout
        except (AttributeError, RuntimeError):  # not readable here: restore torch's default
            before = (default_pg_nccl_timeout if self.backend == "nccl" else None) or default_pg_timeout
        dist.set_timeout(self.timeout, self.group)
        try:
            yield self
        finally:
            dist.set_timeout(before, self.group)

    def counters(self) -> dict:
        return {"collectives": self.calls, "bytes": self.bytes}

    def _run(self, what: str, fn, received: int):
        self.calls += 1
        try:
            fn()
        except RuntimeError as exc:  # torch.distributed's errors (DistError) are RuntimeErrors
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            raise CollectiveError(
                f"{self.name} on rank {self.rank} of {self.world}: {what} ({self.stage}) failed: another rank "
                f"raised, died, or did not join within timeout={self.timeout.total_seconds():g} s (every rank must "
                f"call with its part of the same problem; see the other ranks' errors). {self.backend} said: {first}"
            ) from exc
        self.bytes += received

    def call(self, what: str, fn, received: int = 0) -> None:
        """Run ``fn`` (collectives on the group, e.g. gfs.GramStats.all_reduce) as one counted
        collective: its failure is a CollectiveError saying ``what`` failed."""
        self._run(what, fn, received)

    def all_gather(self, row: torch.Tensor, what: str) -> torch.Tensor:
        """(world, len): every rank's 1-D `row` (all of the same length and dtype)."""
        row = row.to(self.device).contiguous()
        parts = [torch.empty_like(row) for _ in range(self.world)]
        self._run(what, lambda: dist.all_gather(parts, row, group=self.group), row.nbytes * self.world)
        return torch.stack(parts).cpu()

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """Group rank `src`'s `t` on every rank (on the group's device)."""
        t = t.to(self.device).contiguous()
        self._run(what, lambda: dist.broadcast(t, group_src=src, group=self.group), t.nbytes)
        return t

    def all_reduce(self, t: torch.Tensor, op, what: str) -> torch.Tensor:
        t = t.to(self.device).contiguous()
        self._run(what, lambda: dist.all_reduce(t, op=op, group=self.group), t.nbytes)
        return t
