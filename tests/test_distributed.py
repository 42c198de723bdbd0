"""gfs.distributed.select_sharded on 2 and 3 gloo ranks (spawned CPU processes):

- every step rule on both engines, with and without replacement, selects exactly what one
  process selects (gfs.select with the same rule and the torch loops: picks, losses, gaps,
  weights, step sizes bit for bit), on N not divisible by the ranks, duplicates across ranks and
  exact ties; the uniform rule also against the float64 reference;
- every option that differs between ranks, and a bad input on any rank, raises on every rank
  naming the rank, well within the timeout; a rank that never calls ends the others at the
  timeout; a rank that dies ends the others with an error at once.

One spawned session per world size runs every case (process start-up dominates the time)."""

from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest
import torch

from ranks import spawn_ranks
from reference import brute_force_uniform, check_path, path_gaps

TIMEOUT = 2.0  # seconds: select_sharded's timeout in the hostile cases
SESSION_LIMIT = 120.0  # seconds: a session that runs longer has a collective waiting: the test fails
FIELDS = ("indices", "losses", "gaps", "weights")


def _problems():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(13, 40, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    dup = torch.randn(6, 9, generator=g, dtype=torch.float64)
    dup[4] = dup[1]  # the same candidate on both ranks (rows 0-2 on rank 0, 3-5 on rank 1)
    dup[3] = dup[1]
    ydup = dup[1] * 1.5
    ties = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    return {
        # name: (U, y, split, k, replacement, eps), uniform rule against the float64 reference
        "random_f64": (U, y, [7, 6], 9, True, None),
        "no_replacement": (U, y, [5, 8], 13, False, None),
        "duplicates_across_ranks": (dup, ydup, [3, 3], 4, True, None),
        "exact_ties": (ties, torch.tensor([0.5, 0.5]), [2, 2], 4, False, None),
        "eps_stop": (U, U.mean(0), [6, 7], 12, True, 1e-3),
        "one_row_each_m1": (torch.tensor([[2.0], [0.5]]), torch.tensor([1.0]), [1, 1], 3, True, None),
        "float32": (U.float(), y.float(), [7, 6], 6, True, None),
        # a column of a matrix: non-contiguous targets (issue 11)
        "strided_targets": (U, torch.stack([y, -y], 1)[:, 0], [7, 6], 5, True, None),
        # squares overflow float32 unless the ranks agree on one exact power-of-two rescale
        "float32_near_overflow": (U.float() * 2.0**66, y.float() * 2.0**66, [7, 6], 6, True, None),
    }


def _rule_problems():
    """(U, y, k, eps) for the rules x engines x replacement matrix; N = 13 or 11 (not divisible by
    2 or 3), a candidate duplicated across ranks, and exact ties."""
    g = torch.Generator().manual_seed(1)
    U = torch.randn(13, 24, generator=g, dtype=torch.float64)
    U[9] = U[2]  # on another rank than row 2 for 2 and 3 ranks
    y = torch.randn(24, generator=g, dtype=torch.float64)
    ties = torch.eye(4, dtype=torch.float64).repeat(3, 1)[:11]  # 11 rows, each direction 2-3 times
    V = torch.randn(11, 30, generator=g)
    return {
        "random_dup": (U, y, 9, None),
        "ties": (ties, torch.full((4,), 0.25, dtype=torch.float64), 8, None),
        "float32_eps": (V, V.mean(0) + 0.01 * torch.randn(30, generator=g), 10, 0.05),
    }


RULES = [
    (step, engine, repl)
    for step in ("uniform", "line_search", "refit")
    for engine in ("stream", "gram")
    for repl in (True, False)
]


def _record(sel) -> dict:
    out = {f: getattr(sel, f).tolist() for f in FIELDS}
    out.update(gammas=sel.notes["gammas"].tolist(), dense=sel.dense_loss, engine=sel.engine, comm=sel.notes.get("comm"))
    return out


def _rule_matrix(rank, world) -> dict:
    """Sharded and single-process results of every rule, engine and replacement on each problem."""
    import gfs
    from gfs.distributed import GramShard, rows_of, select_sharded

    out = {}
    for name, (U, y, k, eps) in _rule_problems().items():
        lo, hi = rows_of(U.shape[0], rank, world)
        stats = gfs.GramStats.from_features(U, y)
        for step, engine, repl in RULES:
            kw = dict(k=k, step=step, replacement=repl, eps=eps)
            if engine == "stream":
                sharded = select_sharded(U[lo:hi], y, backend="torch", timeout=30, **kw)
                single = gfs.select(U, y, engine="stream", backend="torch", **kw)
            else:
                sharded = select_sharded(GramShard.from_stats(stats, rank, world), timeout=30, **kw)
                single = gfs.select(stats, backend="torch", **kw)
            out[(name, step, engine, repl)] = (_record(sharded), _record(single))
    # the C++ backend's passes over each rank's rows (its single-process loop is native)
    U, y, k, _ = _rule_problems()["random_dup"]
    lo, hi = rows_of(U.shape[0], rank, world)
    if gfs.backends()["cpu"] is None:
        sharded = select_sharded(U[lo:hi], y, k, backend="cpu", timeout=30)
        out["cpu_backend"] = (_record(sharded), _record(gfs.select(U, y, k, engine="stream", backend="cpu")))
    return out


def _hostile(rank) -> dict:
    """Each audited mismatch and bad input (2 ranks): (exception type, message, seconds) per case."""
    import gfs
    from gfs.distributed import GramShard, select_sharded

    g = torch.Generator().manual_seed(2)
    U = torch.randn(10, 8, generator=g, dtype=torch.float64)
    y = torch.randn(8, generator=g, dtype=torch.float64)
    mine = U[:5] if rank == 0 else U[5:]
    nan = mine.clone()
    if rank == 1:
        nan[0, 0] = float("nan")
    stats = gfs.GramStats.from_features(U, y)
    gs = GramShard.from_stats(stats, rank, 2)
    if rank == 1:
        gs_bad = GramShard(gs.G, gs.b, gs.yy, gs.count, offset=4)
    else:
        gs_bad = gs
    cases = {
        "k0_on_rank1": lambda: select_sharded(mine, y, 0 if rank else 3, timeout=TIMEOUT),
        "k_3_vs_5": lambda: select_sharded(mine, y, 3 + 2 * rank, timeout=TIMEOUT),
        "eps_none_vs_10": lambda: select_sharded(mine, y, 4, eps=10.0 if rank else None, timeout=TIMEOUT),
        "replacement_differs": lambda: select_sharded(mine, y, 4, replacement=not rank, timeout=TIMEOUT),
        "step_differs": lambda: select_sharded(mine, y, 4, step="refit" if rank else "uniform", timeout=TIMEOUT),
        "dtype_differs": lambda: select_sharded(mine.float() if rank else mine, y, 4, timeout=TIMEOUT),
        "m_differs": lambda: select_sharded(torch.randn(5, 8 + rank), torch.zeros(8 + rank), 2, timeout=TIMEOUT),
        "targets_differ": lambda: select_sharded(mine, y + rank, 4, timeout=TIMEOUT),
        "nan_on_rank1": lambda: select_sharded(nan, y, 4, timeout=TIMEOUT),
        "backend_differs": lambda: select_sharded(mine, y, 4, backend="cpu" if rank else "torch", timeout=TIMEOUT),
        "engine_differs": lambda: select_sharded(gs if rank else mine, None if rank else y, 4, timeout=TIMEOUT),
        "gram_offset_wrong": lambda: select_sharded(gs_bad, k=4, timeout=TIMEOUT),
        "k_above_total": lambda: select_sharded(mine, y, 11, replacement=False, timeout=TIMEOUT),
        "bad_timeout_on_rank1": lambda: select_sharded(mine, y, 4, timeout=-1 if rank else TIMEOUT),
    }
    out = {}
    for name, call in cases.items():
        t0 = time.perf_counter()
        try:
            call()
            out[name] = (None, "", time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - the test records whatever was raised
            out[name] = (type(exc).__name__, str(exc), time.perf_counter() - t0)
    return out


def _absent(rank, world, victim) -> tuple:
    """Rank `victim` raises before the call (never calls): the others end at the timeout. On a
    group of its own, whose connections the timeout closes."""
    import torch.distributed as dist

    from gfs.distributed import select_sharded

    group = dist.new_group(list(range(world)))
    result = None
    if rank != victim:
        t0 = time.perf_counter()
        try:
            select_sharded(torch.randn(3, 4), torch.zeros(4), 2, group=group, timeout=TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            result = (type(exc).__name__, str(exc), time.perf_counter() - t0)
    dist.barrier()
    return result


def _dies(rank, world, victim) -> tuple:
    """Rank `victim` dies (SIGKILL) inside its third pass over its rows: the others end at once."""
    import signal

    import gfs_kernels
    from gfs.distributed import select_sharded
    from gfs_kernels.torch_ref import TorchBackend

    class Dies(TorchBackend):
        name = "dies_in_the_third_pass"
        calls = 0

        def dots(self, U, r):
            self.calls += 1
            if rank == victim and self.calls == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().dots(U, r)

    gfs_kernels.register(Dies())
    t0 = time.perf_counter()
    try:
        select_sharded(torch.randn(4, 6), torch.zeros(6), 8, backend=Dies.name, timeout=30)
        return (None, "", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc), time.perf_counter() - t0)


def _cli(rank, world, out) -> dict:
    """`gfs select --stats` on this session's ranks (the torchrun environment variables, the
    process group already there): one run that works, then one that fails on every rank."""
    import contextlib
    import io

    import torch.distributed as dist

    import gfs
    from gfs.cli import main
    from gfs.select_cli import read_selection

    U, y, _, _ = _rule_problems()["random_dup"]
    stats, prefix = os.path.join(out, "stats.pt"), os.path.join(out, "cli")
    if rank == 0:
        gfs.GramStats.from_features(U, y).save(stats)
    dist.barrier()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    result = {}
    runs = {"works": ["-k", "7", "--step", "line_search"], "fails": ["-k", "14", "--no-replacement"]}
    for name, extra in runs.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["select", "--stats", stats, "--out", prefix, "--timeout", "30", *extra])
        result[name] = (rc, err.getvalue(), os.path.exists(prefix + ".json"))
        if name == "works" and rank == 0:
            result["record"] = read_selection(prefix)
        dist.barrier()
    return result


def _worker(rank, world, path, out):
    import torch.distributed as dist

    from gfs.distributed import select_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    result: dict = {"rules": _rule_matrix(rank, world)}
    if world == 2:
        result["reference"] = {}
        for name, (U, y, split, k, repl, eps) in _problems().items():
            lo = sum(split[:rank])
            sel = select_sharded(U[lo : lo + split[rank]], y, k, replacement=repl, eps=eps, backend="torch")
            result["reference"][name] = dict(_record(sel), offset=sel.notes["offset"])
        result["hostile"] = _hostile(rank)
        result["cli"] = _cli(rank, world, out)
        result["absent"] = _absent(rank, world, victim=1)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if world == 3:  # last: the group is gone after it
        torch.save({"dies": _dies(rank, world, victim=2)}, os.path.join(out, f"dies{rank}.pt"))
        # a gloo group with a dead peer can abort in its destructors at interpreter exit
        # ("terminate called without an active exception"): the results are saved, leave now
        os._exit(0)
    else:
        dist.destroy_process_group()


def _session(world, tmp):
    """Run _worker on `world` spawned ranks; the exit codes (None: killed at the limit)."""
    return spawn_ranks(_worker, world, tmp, SESSION_LIMIT)


def _run(world, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    t0 = time.monotonic()
    codes = _session(world, tmp)
    seconds = time.monotonic() - t0
    if any(c is None for c in codes):
        pytest.fail(f"select_sharded did not finish within {SESSION_LIMIT:.0f} s on {world} ranks: exit codes {codes}")
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    dies = [torch.load(p, weights_only=False) if (p := tmp / f"dies{r}.pt").exists() else None for r in range(world)]
    return dict(world=world, codes=codes, results=results, dies=dies, seconds=seconds)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _run(2, tmp_path_factory)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _run(3, tmp_path_factory)


@pytest.fixture(params=["two_ranks", "three_ranks"])
def session(request):
    return request.getfixturevalue(request.param)


def test_every_rule_and_engine_equals_one_process(session):
    world, results = session["world"], session["results"]
    assert session["codes"][: 2 if world == 3 else world] == [0] * (2 if world == 3 else world)
    rules = results[0]["rules"]
    assert len(rules) >= 3 * len(RULES)
    for key, (sharded, single) in rules.items():
        if key == "cpu_backend":  # one process runs the C++ loop (its own rounding of z): the same picks
            assert sharded["indices"] == single["indices"]
            np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-12)
            continue
        for r in range(1, world):
            assert results[r]["rules"][key][0] == {**sharded, "comm": results[r]["rules"][key][0]["comm"]}, (key, r)
        for f in (*FIELDS, "gammas"):
            assert sharded[f] == single[f], (key, f, sharded[f], single[f])
        assert sharded["engine"] == single["engine"]
        # the dense loss sums the candidates in another order (float32 sums for float32 features)
        rel = 1e-5 if key[0].startswith("float32") else 1e-12
        assert sharded["dense"] == pytest.approx(single["dense"], rel=rel, abs=1e-14)


def test_ties_go_to_the_lowest_global_index(session):
    rules = session["results"][0]["rules"]
    assert rules[("ties", "uniform", "stream", False)][0]["indices"][:4] == [0, 1, 2, 3]
    assert rules[("ties", "uniform", "gram", True)][0]["indices"][:4] == [0, 1, 2, 3]
    assert rules[("random_dup", "line_search", "stream", False)][0]["indices"].count(9) <= 1


def test_bytes_per_step_do_not_grow_with_n(session):
    """Gram engine: a few scalars per rank a step (no row of G crosses); streaming: one row of U."""
    world, rules = session["world"], session["results"][0]["rules"]
    M = 24
    for step in ("uniform", "line_search"):
        gram_step = rules[("random_dup", step, "gram", True)][0]["comm"]["per_step"]
        assert gram_step["bytes"] <= 8 * (8 * world + 1) and gram_step["collectives"] <= 2
        stream_step = rules[("random_dup", step, "stream", True)][0]["comm"]["per_step"]
        assert 8 * M <= stream_step["bytes"] <= 8 * (M + 8 * world + 2) and stream_step["collectives"] <= 2.2


@pytest.mark.parametrize("name", list(_problems()))
def test_sharded_uniform_matches_the_float64_reference(two_ranks, name):
    results = two_ranks["results"]
    U, y, split, k, repl, eps = _problems()[name]
    got = results[0]["reference"][name]
    assert results[1]["reference"][name]["indices"] == got["indices"], "ranks disagree"
    assert results[1]["reference"][name]["losses"] == got["losses"]
    assert [results[r]["reference"][name]["offset"] for r in range(2)] == [0, split[0]]
    Un, yn = U.double().numpy(), y.double().numpy()
    dense = float(((yn - Un.mean(0)) ** 2).mean())
    assert got["dense"] == pytest.approx(dense, rel=1e-6, abs=1e-12)
    stop = -1.0 if eps is None else dense + eps
    picks, losses, _, _ = brute_force_uniform(Un, yn, k, replacement=repl, stop_loss=stop)
    tol = dict(rtol=1e-5, atol=1e-7) if U.dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    check_path(Un, yn, got["indices"], got["losses"], replacement=repl, **tol)
    if U.dtype == torch.float64:
        assert got["indices"] == picks
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["gaps"], path_gaps(Un, yn, got["indices"]), rtol=1e-5, atol=1e-6)
    w = np.array(got["weights"])
    assert w.shape == (U.shape[0],) and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w, np.bincount(got["indices"], minlength=U.shape[0]) / len(got["indices"]))


HOSTILE = {
    # name: (exception type on both ranks, a pattern each rank's message must match)
    "k0_on_rank1": ("ValueError", r"rank 1 of 2: k must be >= 1"),
    "k_3_vs_5": ("ValueError", r"disagree on k: k=3 on rank 0, k=5 on rank 1"),
    "eps_none_vs_10": ("ValueError", r"disagree on eps: eps=None on rank 0, eps=10.0 on rank 1"),
    "replacement_differs": ("ValueError", r"disagree on replacement: replacement=True on rank 0, replacement=False"),
    "step_differs": ("ValueError", r"disagree on step: step='uniform' on rank 0, step='refit' on rank 1"),
    "dtype_differs": ("ValueError", r"disagree on dtype: dtype='float64' on rank 0, dtype='float32' on rank 1"),
    "m_differs": ("ValueError", r"disagree on M: M=8 on rank 0, M=9 on rank 1"),
    "targets_differ": ("ValueError", r"disagree on targets"),
    "nan_on_rank1": ("ValueError", r"rank 1 of 2: shard contains NaN or Inf"),
    "backend_differs": ("ValueError", r"disagree on backend: backend='torch' on rank 0, backend='cpu' on rank 1"),
    "engine_differs": ("ValueError", r"disagree on engine: engine='stream' on rank 0, engine='gram' on rank 1"),
    "gram_offset_wrong": ("ValueError", r"rank 1's GramShard starts at row 4 but ranks 0..0 hold 5 rows"),
    "k_above_total": ("ValueError", r"k=11 is larger than the 10 candidates"),
    "bad_timeout_on_rank1": ("ValueError", r"rank 1 of 2: timeout must be a positive"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_mismatch_or_bad_input_raises_on_every_rank_naming_the_rank(two_ranks, name):
    results = two_ranks["results"]
    kind, pattern = HOSTILE[name]
    if name == "backend_differs" and not results[0]["rules"].get("cpu_backend"):
        pytest.skip("the cpu backend is not built here")
    for r in range(2):
        got_kind, message, seconds = results[r]["hostile"][name]
        assert got_kind == kind, f"rank {r}: {got_kind}: {message}"
        assert re.search(pattern, message), f"rank {r}: {message!r}"
        assert seconds < TIMEOUT, f"rank {r} took {seconds:.2f} s"


def test_gfs_select_stats_on_two_ranks(two_ranks):
    import gfs

    results = two_ranks["results"]
    rc, err, wrote = results[0]["cli"]["works"]
    assert rc == 0 and wrote, err
    assert results[1]["cli"]["works"][0] == 0
    record = results[0]["cli"]["record"]
    U, y, _, _ = _rule_problems()["random_dup"]
    single = gfs.select(gfs.GramStats.from_features(U, y), k=7, step="line_search", backend="torch")
    assert record["indices"] == single.indices.tolist() and record["engine"] == "gram" and record["ranks"] == 2
    assert torch.equal(record["tensors"]["losses"], single.losses)
    assert torch.equal(record["tensors"]["weights"], single.weights)
    for r in range(2):  # k above N without replacement: status 2 on every rank, and no record left
        rc, err, wrote = results[r]["cli"]["fails"]
        assert rc == 2 and "k=14 is larger than the 13 candidates" in err and not wrote, (r, rc, err)


def test_a_rank_that_never_calls_ends_the_others_at_the_timeout(two_ranks):
    results = two_ranks["results"]
    kind, message, seconds = results[0]["absent"]
    assert kind == "CollectiveError" and "rank 0 of 2" in message and "timeout=2 s" in message, message
    assert TIMEOUT * 0.9 <= seconds < TIMEOUT + 5, seconds


def test_a_rank_that_dies_ends_the_others_with_an_error(three_ranks):
    assert three_ranks["codes"][2] == -9  # the victim was killed
    for r in (0, 1):
        kind, message, seconds = three_ranks["dies"][r]["dies"]
        assert kind == "CollectiveError" and f"rank {r} of 3" in message, message
        assert seconds < 20, seconds  # at once (a dead peer closes its connections), not at the 30 s timeout


def test_rows_of_splits_evenly_in_rank_order():
    from gfs.distributed import rows_of

    for n, world in [(13, 2), (13, 3), (10, 3), (2, 2), (64, 64)]:
        blocks = [rows_of(n, r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        sizes = [hi - lo for lo, hi in blocks]
        assert max(sizes) - min(sizes) <= 1


def test_needs_an_initialised_process_group():
    from gfs.distributed import select_sharded

    with pytest.raises(RuntimeError, match="init_process_group"):
        select_sharded(torch.randn(3, 4), torch.zeros(4), 2)
