"""GramStats: building, combining, storing, and every bad input named clearly."""

import math

import pytest
import torch

import gfs
from gfs import GramStats
from gfs.engines.gram import Accumulator


def _data(N=12, M=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, M, generator=g, dtype=dtype), torch.randn(M, generator=g, dtype=dtype)


def test_batches_sum_to_the_statistics_of_the_whole():
    U, y = _data(N=2100, M=70)  # N > 2048 exercises the block-triangular product
    stats = GramStats(2100)
    for c0 in range(0, 70, 16):
        stats.update(U[:, c0 : c0 + 16], y[c0 : c0 + 16])
    assert stats.count == 70
    assert torch.equal(stats.G, stats.G.T)
    torch.testing.assert_close(stats.G, U @ U.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.b, U @ y, rtol=1e-12, atol=1e-12)
    assert stats.yy == pytest.approx(float(y @ y), rel=1e-14)
    torch.testing.assert_close(stats.u_sum, U.sum(1))
    assert stats.y_sum == pytest.approx(float(y.sum()), rel=1e-12, abs=1e-12)


def test_batch_shapes_numpy_and_inputs_unchanged():
    U, y = _data(N=5, M=24)
    ref = GramStats.from_features(U, y)
    U3, y3 = U.reshape(5, 4, 6), y.reshape(4, 6)
    U0 = U3.clone()
    for stats in (GramStats(5).update(U3, y3), GramStats(5).update(U3, y), GramStats(5).update(U.numpy(), y.numpy())):
        torch.testing.assert_close(stats.G, ref.G)
        torch.testing.assert_close(stats.b, ref.b)
    assert torch.equal(U3, U0)


def test_dense_loss_from_statistics_alone():
    U, y = _data(N=9, M=40)
    stats = GramStats.from_features(U, y)
    direct = float(((y - U.mean(0)) ** 2).mean())
    assert stats.dense_loss == pytest.approx(direct, rel=1e-12)
    # ||y - mean u||^2 = ||y||^2 - 2 mean(b) + mean(G)
    assert stats.dense_loss * stats.count == pytest.approx(stats.yy - 2 * float(stats.b.mean()) + float(stats.G.mean()))


def test_float32_precision_statement():
    """float32 batches: float32 products of at most `chunk` entries, summed in float64; the
    rounding per entry stays near 1e-6 of sqrt(G_ii G_jj) however many batches are added."""
    g = torch.Generator().manual_seed(1)
    U = torch.randn(40, 20000, generator=g)
    y = torch.randn(20000, generator=g)
    stats = GramStats(40, chunk=4096)
    for c0 in range(0, 20000, 1000):
        stats.update(U[:, c0 : c0 + 1000], y[c0 : c0 + 1000])
    assert stats.precision == torch.float32
    exact = U.double() @ U.double().T
    d = torch.sqrt(torch.diagonal(exact))
    assert float(((stats.G - exact).abs() / torch.outer(d, d)).max()) < 2e-6
    forced = GramStats(40, compute_dtype=torch.float64).update(U, y)
    assert forced.precision == torch.float64
    torch.testing.assert_close(forced.G, exact, rtol=1e-12, atol=1e-9)


def test_merge_equals_one_pass():
    U, y = _data(N=7, M=60)
    a = GramStats.from_features(U[:, :25], y[:25])
    b = GramStats.from_features(U[:, 25:], y[25:])
    assert a.merge(b) is a
    whole = GramStats.from_features(U, y)
    torch.testing.assert_close(a.G, whole.G)
    torch.testing.assert_close(a.b, whole.b)
    assert a.count == 60 and a.yy == pytest.approx(whole.yy)
    with pytest.raises(ValueError, match="cannot merge GramStats of n=3 candidates into n=7"):
        a.merge(GramStats(3))
    with pytest.raises(TypeError, match="other must be a GramStats"):
        a.merge(U)


def test_centred_is_the_problem_with_block_means_removed():
    gen = torch.Generator().manual_seed(3)
    N, K, P = 7, 3, 40  # entries: K blocks of P (block-major)
    U = torch.randn(N, K * P, dtype=torch.float64, generator=gen) + 2.0
    y = torch.randn(K * P, dtype=torch.float64, generator=gen) - 1.0
    stats = GramStats.from_features(U, y)
    S, t = U.view(N, K, P).sum(2), y.view(K, P).sum(1)
    got = stats.centred(S, t, P)
    Uc = (U.view(N, K, P) - U.view(N, K, P).mean(2, keepdim=True)).reshape(N, -1)
    yc = (y.view(K, P) - y.view(K, P).mean(1, keepdim=True)).reshape(-1)
    want = GramStats.from_features(Uc, yc)
    torch.testing.assert_close(got.G, want.G, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(got.b, want.b, rtol=1e-12, atol=1e-9)
    assert got.yy == pytest.approx(want.yy, rel=1e-12) and got.count == want.count
    assert torch.equal(got.G, got.G.T)
    assert stats.G.equal(GramStats.from_features(U, y).G)  # unchanged
    a, b = gfs.select(got, k=4), gfs.select(Uc, yc, k=4)
    assert torch.equal(a.support, b.support) and a.loss == pytest.approx(b.loss, rel=1e-9)
    with pytest.raises(ValueError, match="u_sums must be"):
        stats.centred(S[:, :2], t, P)
    with pytest.raises(ValueError, match="per_block must be"):
        stats.centred(S, t, 0)


def test_save_and_load_round_trip(tmp_path):
    U, y = _data(N=6, M=30, dtype=torch.float32)
    stats = GramStats.from_features(U, y)
    path = tmp_path / "stats.pt"
    stats.save(path)
    back = GramStats.load(path)
    assert torch.equal(back.G, stats.G) and torch.equal(back.b, stats.b) and torch.equal(back.u_sum, stats.u_sum)
    assert (back.yy, back.y_sum, back.count, back.precision) == (stats.yy, stats.y_sum, stats.count, stats.precision)
    assert gfs.select(back, k=5).indices.tolist() == gfs.select(stats, k=5).indices.tolist()


def test_damaged_files_are_named(tmp_path):
    U, y = _data(N=6, M=30)
    path = tmp_path / "stats.pt"
    GramStats.from_features(U, y).save(path)
    raw = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cannot read GramStats file .*cut.pt.*truncated"):
        GramStats.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a GramStats file"):
        GramStats.load(tmp_path / "other.pt")
    data = torch.load(path, weights_only=True)
    torch.save({**data, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 99, this gfs reads version 1"):
        GramStats.load(tmp_path / "future.pt")
    torch.save({**data, "b": torch.zeros(5, dtype=torch.float64)}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"b should have shape \(6,\) for n=6, got \(5,\)"):
        GramStats.load(tmp_path / "shape.pt")
    with pytest.raises(FileNotFoundError):
        GramStats.load(tmp_path / "missing.pt")


BAD_UPDATE = {
    "other width": (
        lambda U, y: (U[:4], y),
        ValueError,
        "features_batch has shape (4, 20) but these GramStats were built for n=6",
    ),
    "1-d batch": (lambda U, y: (U[0], y), ValueError, "but these GramStats were built for n=6"),
    "missing targets": (lambda U, y: (U, None), ValueError, "targets_batch is missing"),
    "target shape": (lambda U, y: (U, y[:7]), ValueError, "targets_batch has shape (7,)"),
    "nan batch": (
        lambda U, y: (U.index_fill(1, torch.tensor([3]), float("nan")), y),
        ValueError,
        "features_batch contains NaN or Inf",
    ),
    "inf target": (
        lambda U, y: (U, y.index_fill(0, torch.tensor([0]), float("inf"))),
        ValueError,
        "targets_batch contains NaN or Inf",
    ),
    "int batch": (lambda U, y: (U.to(torch.int64), y), TypeError, "features_batch has dtype torch.int64"),
    "no data": (lambda U, y: (U.to("meta"), y.to("meta")), ValueError, "features_batch is on the meta device"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATE))
def test_bad_batches_are_named_and_change_nothing(case):
    U, y = _data(N=6, M=20)
    stats = GramStats(6).update(U, y)
    G0, count = stats.G.clone(), stats.count
    make, error, message = BAD_UPDATE[case]
    with pytest.raises(error) as info:
        stats.update(*make(U, y))
    assert message in str(info.value)
    assert torch.equal(stats.G, G0) and stats.count == count


def test_constructor_arguments():
    with pytest.raises(ValueError, match="n must be a positive int"):
        GramStats(0)
    with pytest.raises(ValueError, match="compute_dtype must be None"):
        GramStats(3, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        GramStats(3, chunk=0)


def test_corrupted_statistics_are_refused_by_select():
    U, y = _data(N=5, M=20)
    empty = GramStats(5)
    with pytest.raises(ValueError, match="stats is empty"):
        gfs.select(empty, k=2)
    s = GramStats.from_features(U, y)
    s.G[1, 2] = float("nan")
    with pytest.raises(ValueError, match="stats.G contains NaN or Inf"):
        gfs.select(s, k=2)
    s = GramStats.from_features(U, y)
    s.G[3, 3] = -1.0
    with pytest.raises(ValueError, match=r"stats.G is not positive semi-definite: G\[3,3\]"):
        gfs.select(s, k=2)
    s = GramStats.from_features(U, y)
    s.G[0, 4] = s.G[4, 0] = 10 * math.sqrt(float(s.G[0, 0] * s.G[4, 4]))
    with pytest.raises(ValueError, match=r"stats.G is not positive semi-definite: \|G\[0,4\]\|"):
        gfs.select(s, k=2)
    s = GramStats.from_features(U, y)
    s.b[2] = 1e3 * math.sqrt(float(s.G[2, 2]) * s.yy)
    with pytest.raises(ValueError, match=r"stats.b is inconsistent"):
        gfs.select(s, k=2)
    s = GramStats.from_features(U, y)
    s.yy = float("inf")
    with pytest.raises(ValueError, match="stats.yy"):
        gfs.select(s, k=2)


def test_indefinite_statistics_found_by_the_loop_and_by_the_full_check():
    # passes the O(N^2) checks (|G_ij| <= sqrt(G_ii G_jj)) yet has a negative eigenvalue
    G = torch.tensor([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]], dtype=torch.float64)
    s = GramStats(3)
    s.G.copy_(G)
    s.b.copy_(torch.tensor([0.9, 0.9, 0.9], dtype=torch.float64))
    s.yy, s.count = 1.0, 1
    s.validate()
    with pytest.raises(ValueError, match="stats is not positive semi-definite"):
        s.validate("stats", full=True)
    for step in ("uniform", "line_search", "refit"):
        with pytest.raises(ValueError, match="not positive semi-definite"):
            gfs.select(s, k=3, step=step)


def _reduce_worker(rank, world, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        U, y = _data(N=8, M=40, seed=3)
        part = GramStats.from_features(U[:, rank::world], y[rank::world])
        part.all_reduce()
        whole = GramStats.from_features(U, y)
        torch.testing.assert_close(part.G, whole.G)
        torch.testing.assert_close(part.b, whole.b)
        assert part.count == 40 and abs(part.yy - whole.yy) < 1e-10
        if rank == 0:
            part.save(out)
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "reduced.pt")
    mp.spawn(_reduce_worker, args=(2, init, out), nprocs=2, join=True)
    U, y = _data(N=8, M=40, seed=3)
    torch.testing.assert_close(GramStats.load(out).G, GramStats.from_features(U, y).G)


def test_all_reduce_without_a_process_group():
    with pytest.raises(RuntimeError, match="all_reduce needs an initialised torch.distributed process group"):
        GramStats(2).all_reduce()


@pytest.mark.parametrize("n", [37, 1100])
def test_the_block_triangle_product_and_both_flushes(n):
    """The Gram build's product (gfs.engines.gram.Accumulator) fills the lower block triangle of a buffer;
    the CPU flush (numpy) and the device flush (torch) must both add exactly A A^T, symmetric."""
    A = torch.randn(n, 50, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    exact = A @ A.T
    for flush in ("_flush_numpy", "_flush_torch"):
        acc = Accumulator(n, torch.device("cpu"))
        acc.add(A[:, :20])
        acc.add(A[:, 20:])
        G = torch.zeros(n, n, dtype=torch.float64)
        getattr(acc, flush)(acc.buf, G)
        torch.testing.assert_close(G, exact, rtol=1e-12, atol=1e-12)
        assert torch.equal(G, G.T)
        assert not acc.buf.any()
