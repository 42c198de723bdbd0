"""gfs.distributed.select_sharded: candidates split across 2 gloo ranks (CPU processes) select
exactly what the float64 reference selects on the concatenated rows, and bad input on one rank
raises on every rank instead of leaving the others waiting."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from reference import brute_force_uniform, check_path, path_gaps

WORLD = 2


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
        # name: (U, y, split, k, replacement, eps)
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


def _worker(rank, path, out):
    import torch.distributed as dist

    from gfs.distributed import select_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    results = {}
    for name, (U, y, split, k, repl, eps) in _problems().items():
        lo = sum(split[:rank])
        sel = select_sharded(U[lo : lo + split[rank]], y, k, replacement=repl, eps=eps, backend="torch")
        results[name] = dict(
            indices=sel.indices.tolist(),
            losses=sel.losses.tolist(),
            gaps=sel.gaps.tolist(),
            weights=sel.weights.tolist(),
            dense=sel.dense_loss,
            offset=sel.notes["offset"],
        )
    errors = {}
    bad = torch.randn(3, 5)
    if rank == 1:
        bad[0, 0] = float("nan")
    for name, call in {
        "nan_on_one_rank": lambda: select_sharded(bad, torch.zeros(5), 2),
        "targets_differ": lambda: select_sharded(torch.randn(3, 5), torch.full((5,), float(rank)), 2),
        "m_differs": lambda: select_sharded(torch.randn(3, 5 + rank), torch.zeros(5 + rank), 2),
        "k_above_total": lambda: select_sharded(torch.randn(3, 5), torch.zeros(5), 7, replacement=False),
    }.items():
        try:
            call()
            errors[name] = None
        except (TypeError, ValueError) as exc:
            errors[name] = str(exc)
    dist.barrier()
    dist.destroy_process_group()
    torch.save({"results": results, "errors": errors}, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    for _ in range(240):  # 2 minutes at most: a deadlock fails the test instead of hanging CI
        if ctx.join(timeout=0.5):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("select_sharded did not finish within 120 s on 2 ranks (a collective is waiting)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(_problems()))
def test_sharded_selection_matches_the_float64_reference(outcome, name):
    U, y, split, k, repl, eps = _problems()[name]
    got = outcome[0]["results"][name]
    assert outcome[1]["results"][name]["indices"] == got["indices"], "ranks disagree"
    assert outcome[1]["results"][name]["losses"] == got["losses"]
    assert [outcome[r]["results"][name]["offset"] for r in range(WORLD)] == [0, split[0]]
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


def test_sharded_ties_go_to_the_lowest_global_index(outcome):
    assert outcome[0]["results"]["exact_ties"]["indices"] == [0, 1, 2, 3]
    assert outcome[0]["results"]["duplicates_across_ranks"]["indices"][0] == 1


@pytest.mark.parametrize(
    "name,pattern",
    [
        ("nan_on_one_rank", ["rank\\(s\\) \\[1\\] is invalid", "shard contains NaN or Inf"]),
        ("targets_differ", ["targets differ between ranks"] * 2),
        ("m_differs", ["same M"] * 2),
        ("k_above_total", ["k=7 is larger than the 6 candidates"] * 2),
    ],
)
def test_bad_input_on_any_rank_raises_on_every_rank(outcome, name, pattern):
    import re

    for r in range(WORLD):
        msg = outcome[r]["errors"][name]
        assert msg is not None, f"rank {r} did not raise for {name}"
        assert re.search(pattern[r], msg), f"rank {r}: {msg!r}"


def test_needs_an_initialised_process_group():
    from gfs.distributed import select_sharded

    with pytest.raises(RuntimeError, match="init_process_group"):
        select_sharded(torch.randn(3, 4), torch.zeros(4), 2)
