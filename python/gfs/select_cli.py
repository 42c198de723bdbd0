"""`gfs select`: greedy forward selection from files, in one process or on several.

    gfs select --features U.npy --targets y.pt -k 64 --out runs/sel [--step line_search] ...
    gfs select --stats stats.pt -k 64 --out runs/sel
    torchrun --nproc-per-node R -m gfs select ...      (gloo on CPU; --device cuda: NCCL, one GPU a rank)

Features (N, M) or (N, *S) and targets are .npy (numpy.load, allow_pickle=False) or .pt (one
tensor, torch.load with weights_only=True); statistics are a gfs.GramStats file. Alone, the
command runs gfs.select (any engine). Under torchrun each rank reads only its block of rows
(gfs.distributed.rows_of: memory-mapped, then copied) or its rows of the statistics, every rank
checks that every other rank read its input, and gfs.distributed.select_sharded runs (features:
the streaming engine; statistics: the Gram engine). Rank 0 alone writes.

Output, PREFIX from --out: PREFIX.safetensors (indices, support, weights, losses, gaps, gammas)
and PREFIX.json (the record: options, inputs, results, and the sha256 of the tensors file). The
old record is removed when the run starts; the tensors, then the record, are each written to a
temporary file and renamed into place, so PREFIX.json exists only for a run that finished, and
names the tensors that run wrote (`read_selection` checks). Exit status: 0 done; 2 bad input or
options (the message names the rank); 1 a rank failed or did not answer within --timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import sys

from ._files import write_atomically
from .argtypes import number, positive_int

FORMAT = "gfs.Selection"
VERSION = 1


def add_select_parser(sub) -> None:
    p = sub.add_parser(
        "select",
        help="greedy forward selection from features/targets or a GramStats file (one process or under torchrun)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", metavar="FILE", help="candidates' outputs U, (N, M) or (N, *S): .npy or .pt")
    src.add_argument("--stats", metavar="FILE", help="a gfs.GramStats file (GramStats.save): the Gram engine")
    p.add_argument("--targets", metavar="FILE", help="the target y, (M,) or (*S): .npy or .pt (with --features)")
    p.add_argument("-k", "--k", type=positive_int, required=True, help="selection steps")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.json and PREFIX.safetensors")
    p.add_argument("--step", choices=("uniform", "line_search", "refit"), default="uniform", help="step rule")
    p.add_argument("--no-replacement", dest="replacement", action="store_false", help="never pick a candidate twice")
    p.add_argument("--eps", type=number(lambda v: v >= 0, "a number >= 0"), help="stop at dense loss + EPS")
    p.add_argument("--backend", default="auto", metavar="NAME", help="auto (default), cpu, torch, triton, cuda, ...")
    p.add_argument(
        "--engine", choices=("auto", "stream", "gram"), default="auto", help="one process only (default auto)"
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the data go (cuda under torchrun: NCCL)"
    )
    p.add_argument(
        "--timeout",
        type=number(lambda v: v > 0, "a number of seconds > 0"),
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: bound on every collective (default 300)",
    )
    p.set_defaults(func=run_select)


def run_select(args: argparse.Namespace) -> int:
    """The command; returns the exit status."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    where = f"gfs select (rank {rank} of {world})" if world > 1 else "gfs select"
    if (args.features is None) != (args.targets is None):
        print(f"{where}: --targets goes with --features (and not with --stats)", file=sys.stderr)
        return 2
    if rank == 0:
        for path in _outputs(args.out):  # a record exists only for a run that finished
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    try:
        if world > 1:
            sel = _sharded(args, rank, world)
        else:
            sel = _single(args)
        if rank == 0:
            write_selection(sel, args.out, _record(args, world))
    except (ValueError, TypeError) as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(f"{where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"{where}: {sel!r}\nwrote {args.out}.json and {args.out}.safetensors")
    return 0


def _single(args):
    import gfs

    from . import _validation as check

    opts = dict(k=args.k, step=args.step, replacement=args.replacement, eps=args.eps, backend=args.backend)
    if args.stats is not None:
        return gfs.select(gfs.GramStats.load(args.stats, device=args.device), engine=args.engine, **opts)
    U = check.as_tensor(_read(args.features, "features"), "features").to(args.device)
    y = check.as_tensor(_read(args.targets, "targets"), "targets").to(args.device)
    return gfs.select(U, y, engine=args.engine, **opts)


def _sharded(args, rank: int, world: int):
    import torch
    import torch.distributed as dist

    import gfs
    from gfs.distributed import GramShard, check_every_rank, rows_of, select_sharded

    from . import _validation as check

    if args.engine != "auto" and args.engine != ("gram" if args.stats else "stream"):
        raise ValueError(
            f"--engine {args.engine}: under torchrun features run the streaming engine and statistics the Gram engine"
        )
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=args.timeout)
    own = not dist.is_initialized()  # (called from a job that has its process group: use it)
    if own:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    try:
        error: BaseException | None = None
        shard: GramShard | torch.Tensor | None = None
        targets = None
        try:  # every rank reads its part; a failure anywhere is reported by every rank
            if args.stats is not None:
                shard = GramShard.from_stats(gfs.GramStats.load(args.stats, device=args.device), rank, world)
            else:
                rows = _read(args.features, "features", lambda n: rows_of(n, rank, world))
                shard = check.as_tensor(rows, "features").to(args.device)
                targets = check.as_tensor(_read(args.targets, "targets"), "targets").to(args.device)
        except (ValueError, TypeError, OSError) as exc:
            error = exc
        check_every_rank(error, what="gfs select (reading the inputs)", timeout=timeout)
        opts = dict(step=args.step, replacement=args.replacement, eps=args.eps, backend=args.backend)
        return select_sharded(shard, targets, args.k, timeout=timeout, **opts)
    finally:
        if own:
            dist.destroy_process_group()


def _read(path: str, name: str, block=None):
    """The array in a .npy or .pt file (rows block(n) = (lo, hi) of it only, when given), read
    without running code; ValueError naming the file for anything else."""
    import pickle

    import numpy as np
    import torch

    try:
        if path.endswith(".npy"):
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.endswith((".pt", ".pth")):
            a = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(a, torch.Tensor):
                raise ValueError(f"holds a {type(a).__name__}, not one tensor (save it with torch.save(tensor, path))")
            held = a.untyped_storage().nbytes() - a.storage_offset() * a.element_size()
            if not a.is_contiguous() or held < a.numel() * a.element_size():
                raise ValueError(f"claims shape {tuple(a.shape)} but holds {max(held, 0):,} bytes (damaged or forged)")
        else:
            raise ValueError("is neither .npy nor .pt")
        if block is not None:
            if a.ndim < 1:
                raise ValueError("holds a scalar, not one row per candidate")
            lo, hi = block(a.shape[0])
            a = a[lo:hi]
        return np.array(a) if isinstance(a, np.ndarray) else a.clone()
    except FileNotFoundError as exc:
        raise ValueError(f"{name} file {path!r} does not exist") from exc
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"cannot read the {name} file {path!r}: {exc}") from exc


def _outputs(prefix: str) -> tuple[str, str]:
    """(the record, the tensors): the record first (it is removed first and written last)."""
    return prefix + ".json", prefix + ".safetensors"


def _record(args, world: int) -> dict:
    inputs = {n: getattr(args, n) for n in ("features", "targets", "stats") if getattr(args, n) is not None}
    options = {n: getattr(args, n) for n in ("k", "step", "replacement", "eps", "backend", "engine", "device")}
    return {"inputs": inputs, "options": options, "ranks": world}


def write_selection(sel, prefix: str, extra: dict | None = None) -> None:
    """PREFIX.safetensors, then PREFIX.json (the record, naming the tensors and their sha256),
    each written to a temporary file and renamed into place."""
    from safetensors.torch import save

    record_path, tensors_path = _outputs(prefix)
    tensors = {
        "indices": sel.indices,
        "support": sel.support,
        "weights": sel.weights,
        "losses": sel.losses,
        "gaps": sel.gaps,
        "gammas": sel.notes["gammas"],
    }
    blob = save({key: t.detach().cpu().contiguous() for key, t in tensors.items()}, metadata={"format": FORMAT})
    _replace(tensors_path, blob)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "tensors_file": os.path.basename(tensors_path),
        "sha256": hashlib.sha256(blob).hexdigest(),
        **(extra or {}),
        "k": sel.k,
        "indices": sel.indices.tolist(),
        "support": sel.support.tolist(),
        "losses": sel.losses.tolist(),
        "gaps": sel.gaps.tolist(),
        "loss": sel.loss,
        "dense_loss": sel.dense_loss,
        "backend": sel.backend,
        "engine": sel.engine,
        "step": sel.step,
        "replacement": sel.replacement,
        "reason": sel.reason,
        "seconds": sel.seconds,
        "timings": sel.timings,
    }
    _replace(record_path, json.dumps(record, indent=1).encode())


def read_selection(prefix: str) -> dict:
    """The record of a finished `gfs select` run, with its tensors (checked against the sha256 the
    record names); ValueError when there is no record or the tensors are not the ones it names."""
    from safetensors.torch import load

    record_path, tensors_path = _outputs(prefix)
    try:
        with open(record_path, "rb") as f:
            record = json.loads(f.read())
        with open(tensors_path, "rb") as f:
            blob = f.read()
    except FileNotFoundError as exc:
        raise ValueError(f"no finished selection at {prefix!r}: {exc.filename} does not exist") from exc
    if record.get("format") != FORMAT or hashlib.sha256(blob).hexdigest() != record.get("sha256"):
        raise ValueError(f"{tensors_path!r} is not the tensors file that {record_path!r} records")
    record["tensors"] = load(blob)
    return record


def _replace(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file beside it, renamed over it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomically(path, write)
