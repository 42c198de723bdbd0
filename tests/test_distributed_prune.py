"""gfs.prune with data-parallel calibration (gfs.pruning.parallel) on 2 gloo ranks (spawned CPU
processes), against the single-process run on all the batches:

- the uniform step: the same pruned model bit for bit, the same kept channels, losses and fold
  errors to rounding (the fold check on sampled positions, drawn for all ranks' images);
  line_search with replacement: the same kept channels, weights to rounding; criterion "l1":
  the same model, losses to rounding; the ranks' models identical;
- a checkpoint written by rank 0 is read by both ranks: resuming from it gives the same model;
- settings that differ between ranks, criterion "loss", an error on one rank in the middle of
  calibration: raised on every rank, naming the rank; a rank killed in the middle of
  calibration ends the other with an error at once;
- `torchrun --nproc-per-node 2 -m gfs prune --model resnet18 --data digits` writes the model the
  single-process command writes.

One spawned session runs every in-process case (process start-up dominates the time)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from ranks import spawn_ranks

SESSION_LIMIT = 120.0  # seconds: a session that runs longer has a collective waiting: the test fails
TIMEOUT = 20.0  # seconds: gfs.prune's timeout= in the session
SAMPLED_CHECK_MACS = 1 << 12  # the fold check samples positions (spread over both ranks' images)

CASES = {
    "uniform": dict(ratio=0.5),
    "line_search": dict(ratio=0.5, step="line_search", replacement=True),
    "l1": dict(ratio=0.5, criterion="l1"),
    "normalized": dict(ratio=0.5, imitate="normalized"),  # each rank's statistics weighted, then summed
}


def _model():
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():  # BatchNorm statistics away from the identity
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    return m.eval()


def _batches():
    """3 batches of 3 images: rank 0 takes the first two, rank 1 the last (an uneven split)."""
    g = torch.Generator().manual_seed(2)
    return [torch.randn(3, 3, 16, 16, generator=g) for _ in range(3)]


def _layers():
    from gfs.models import internal_layers

    return internal_layers("resnet18")


def _record(result) -> dict:
    return {
        "state": {k: v.clone() for k, v in result.model.state_dict().items()},
        "rows": [r.as_dict() for r in result.report],
        "exchange": result.timings.get("exchange", 0.0),
    }


def _attempt(call) -> tuple:
    t0 = time.perf_counter()
    try:
        call()
        return (None, "", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - the test records whatever was raised
        return (type(exc).__name__, str(exc), time.perf_counter() - t0)


def _worker(rank, world, path, out):
    import signal

    import torch.distributed as dist

    import gfs
    from gfs.distributed import rows_of
    from gfs.pruning import run

    torch.set_num_threads(1)
    run.FULL_CHECK_MACS = SAMPLED_CHECK_MACS
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    batches = _batches()
    lo, hi = rows_of(len(batches), rank, world)
    mine = batches[lo:hi]
    common = dict(layers=_layers(), progress=False, timeout=TIMEOUT)
    result: dict = {}
    for name, kw in CASES.items():
        result[name] = _record(gfs.prune(_model(), mine, **common, **kw))
    ckpt = os.path.join(out, "prune.ckpt")
    first = gfs.prune(_model(), mine, checkpoint=ckpt, **common, ratio=0.5)
    dist.barrier()
    result["checkpoint_written"] = os.path.isfile(ckpt)
    again = gfs.prune(_model(), mine, checkpoint=ckpt, **common, ratio=0.5)  # every group from the file
    result["checkpoint"] = (_record(first), _record(again))
    result["mismatch"] = _attempt(lambda: gfs.prune(_model(), mine, ratio=0.5 if rank == 0 else 0.25, **common))
    result["loss"] = _attempt(lambda: gfs.prune(_model(), mine, ratio=0.5, criterion="loss", **common))
    result["recalibrated"] = _attempt(lambda: gfs.prune(_model(), mine, ratio=0.5, imitate="recalibrated", **common))

    capture = run.PruneRun.capture

    def fails(self, i):
        if rank == 1 and i == 2:
            raise ValueError("injected: rank 1 cannot read its third group's activations")
        return capture(self, i)

    run.PruneRun.capture = fails
    result["fails"] = _attempt(lambda: gfs.prune(_model(), mine, ratio=0.5, **common))
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))

    def dies(self, i):
        if rank == 1 and i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return capture(self, i)

    run.PruneRun.capture = dies
    dist.barrier()
    died = _attempt(lambda: gfs.prune(_model(), mine, ratio=0.5, **common))
    torch.save(died, os.path.join(out, f"dies{rank}.pt"))
    # a gloo group with a dead peer can abort in its destructors at interpreter exit: the results
    # are saved, leave now
    os._exit(0)


def _session(world, tmp):
    """Run _worker on `world` spawned ranks; the exit codes (None: killed at the limit)."""
    return spawn_ranks(_worker, world, tmp, SESSION_LIMIT)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dprune")
    codes = _session(2, tmp)
    if any(c is None for c in codes):
        pytest.fail(f"the data-parallel gfs.prune session did not finish within {SESSION_LIMIT:.0f} s: codes {codes}")
    missing = [r for r in range(2) if not (tmp / f"rank{r}.pt").exists()]
    if missing:
        pytest.fail(f"the data-parallel gfs.prune session raised on ranks {missing} (exit codes {codes}): see the log")
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    dies = [torch.load(p, weights_only=False) if (p := tmp / f"dies{r}.pt").exists() else None for r in range(2)]
    return dict(codes=codes, results=results, dies=dies)


@pytest.fixture(scope="module")
def single():
    """The single-process runs on all three batches (one thread, like the ranks)."""
    import gfs
    from gfs.pruning import run

    saved_threads, saved_macs = torch.get_num_threads(), run.FULL_CHECK_MACS
    torch.set_num_threads(1)
    run.FULL_CHECK_MACS = SAMPLED_CHECK_MACS
    try:
        return {
            name: _record(gfs.prune(_model(), _batches(), layers=_layers(), progress=False, **kw))
            for name, kw in CASES.items()
        }
    finally:
        torch.set_num_threads(saved_threads)
        run.FULL_CHECK_MACS = saved_macs


def _rows(record: dict) -> list:
    """The report rows without their seconds (each rank's own)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in record["rows"]]


def _same_state(a: dict, b: dict) -> list:
    """Names of the tensors that differ (bit for bit)."""
    assert a.keys() == b.keys()
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("name", list(CASES))
def test_both_ranks_end_with_the_same_model(two_ranks, name):
    assert two_ranks["codes"][0] == 0
    r0, r1 = (two_ranks["results"][r][name] for r in range(2))
    assert _same_state(r0["state"], r1["state"]) == []
    assert _rows(r0) == _rows(r1)
    assert r0["exchange"] > 0  # the collectives ran (and were timed)


@pytest.mark.parametrize("name", list(CASES))
def test_the_single_process_run_on_all_batches(two_ranks, single, name):
    got, want = two_ranks["results"][0][name], single[name]
    assert len(got["rows"]) == len(want["rows"]) == 8
    for a, b in zip(got["rows"], want["rows"], strict=True):
        assert a["kept"] == b["kept"], a["name"]
        # from the statistics, whose float32 products are chunked per rank (and losses at 0 by rounding)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["name"]
        assert a["dense_loss"] == pytest.approx(b["dense_loss"], rel=1e-5, abs=1e-7), a["name"]
        assert a["fold_error"] == pytest.approx(b["fold_error"], rel=0.5, abs=2e-6), a["name"]
        assert a["fold_error"] < 1e-5
    if name == "line_search":  # the step sizes come from the statistics: the scales to rounding
        for a, b in zip(got["rows"], want["rows"], strict=True):
            torch.testing.assert_close(torch.tensor(a["scale"]), torch.tensor(b["scale"]), rtol=1e-4, atol=1e-5)
        for k, v in want["state"].items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    else:  # scales N / kept (uniform) or 1 (l1): the same model bit for bit
        assert _same_state(got["state"], want["state"]) == []
        for a, b in zip(got["rows"], want["rows"], strict=True):
            assert a["scale"] == b["scale"]
    if name == "uniform":  # the same sampled positions: the same fold errors, bit for bit here
        assert [r["fold_error"] for r in got["rows"]] == [r["fold_error"] for r in want["rows"]]


def test_a_checkpoint_written_by_rank_0_is_resumed_by_every_rank(two_ranks):
    results = two_ranks["results"]
    assert results[0]["checkpoint_written"] and results[1]["checkpoint_written"]
    uniform = results[0]["uniform"]
    for r in range(2):
        first, again = results[r]["checkpoint"]
        assert _same_state(first["state"], uniform["state"]) == []
        assert _same_state(again["state"], uniform["state"]) == []
        assert [x["kept"] for x in again["rows"]] == [x["kept"] for x in uniform["rows"]]
        assert again["exchange"] > 0


ERRORS = {
    # case: (exception type on both ranks, a pattern each rank's message must match)
    "mismatch": ("ValueError", r"disagree on ratio: ratio=0.5 on rank 0, ratio=0.25 on rank 1"),
    "loss": ("ValueError", r"rank 0 of 2: criterion 'loss' is not data-parallel"),
    "recalibrated": ("ValueError", r"rank 0 of 2: imitate='recalibrated' is not data-parallel"),
    "fails": ("ValueError", r"rank 1 of 2: injected: rank 1 cannot read its third group's activations"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_an_error_on_one_rank_is_raised_on_every_rank_naming_it(two_ranks, case):
    kind, pattern = ERRORS[case]
    for r in range(2):
        got, message, seconds = two_ranks["results"][r][case]
        assert got == kind, f"rank {r}: {got}: {message}"
        assert re.search(pattern, message), f"rank {r}: {message!r}"
        assert seconds < TIMEOUT, f"rank {r} took {seconds:.1f} s"
    if case == "fails":  # in the middle of calibration: the third group's exchange
        assert "group 'layer2.0.conv1'" in two_ranks["results"][0][case][1]


def test_a_rank_killed_mid_calibration_ends_the_other_with_an_error(two_ranks):
    assert two_ranks["codes"][1] == -9  # the victim was killed
    kind, message, seconds = two_ranks["dies"][0]
    assert kind == "CollectiveError" and "gfs.prune on rank 0 of 2" in message, message
    assert seconds < TIMEOUT, seconds  # at once (the dead peer's connections close), not at the timeout


# ---- the command under torchrun ------------------------------------------------------------------

CLI = [
    "prune",
    "--model",
    "resnet18",
    "--data",
    "digits",
    "--train-epochs",
    "0",
    "--finetune-epochs",
    "0",
    "--train-samples",
    "200",
    "--test-samples",
    "32",
    "--image-size",
    "16",
    "--calib-size",
    "24",
    "--batch-size",
    "8",
    "--threads",
    "1",
    "--no-progress",
    "--timeout",
    "60",
]


def test_torchrun_gfs_prune_writes_the_single_process_model(tmp_path):
    from gfs.pruning import load

    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    runs = {
        "ranks": [*torchrun, "-m", "gfs", *CLI, "--out", str(tmp_path / "ranks.safetensors")],
        "one": [sys.executable, "-m", "gfs", *CLI, "--out", str(tmp_path / "one.safetensors")],
    }
    for name, cmd in runs.items():
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"{name}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if name == "ranks":  # rank 0 alone prints the report
            assert done.stdout.count("wrote ") == 1, done.stdout
    a, b = (load(tmp_path / f"{n}.safetensors") for n in ("ranks", "one"))
    assert _same_state(a.state_dict(), b.state_dict()) == []
    ra, rb = (json.loads((tmp_path / f"{n}.safetensors.json").read_text()) for n in ("ranks", "one"))
    assert ra["ranks"] == 2 and rb["ranks"] == 1
    assert [r["kept"] for r in ra["layers"]] == [r["kept"] for r in rb["layers"]]
    assert ra["params"] == rb["params"] and ra["accuracy"]["pruned"] == rb["accuracy"]["pruned"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.ckpt"))  # nothing left half-written
