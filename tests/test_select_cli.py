"""`gfs select` in one process and under torchrun (2 gloo ranks): the written selection is the
one gfs.select makes; bad input exits with status 2 and leaves no record; the record names the
tensors it was written with. (The statistics path on 2 ranks, and a run that fails there, are
tested inside tests/test_distributed.py's 2-rank session: one process start-up less.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gfs
from gfs.cli import main
from gfs.select_cli import read_selection

TORCHRUN_LIMIT = 150  # seconds


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("select_cli")
    g = torch.Generator().manual_seed(0)
    U = torch.randn(11, 30, generator=g, dtype=torch.float64)
    U[7] = U[1]  # a duplicate on the other rank
    y = torch.randn(30, generator=g, dtype=torch.float64)
    np.save(tmp / "U.npy", U.numpy())
    torch.save(y, tmp / "y.pt")
    torch.save(U.float(), tmp / "U32.pt")
    stats = gfs.GramStats.from_features(U, y)
    stats.save(tmp / "stats.pt")
    return dict(tmp=tmp, U=U, y=y, stats=stats)


def _same(record, sel, exact=True):
    t = record["tensors"]
    assert record["k"] == sel.k and record["indices"] == sel.indices.tolist()
    assert torch.equal(t["indices"], sel.indices) and torch.equal(t["support"], sel.support)
    for name in ("losses", "gaps", "weights"):
        if exact:
            assert torch.equal(t[name], getattr(sel, name)), name
        else:
            torch.testing.assert_close(t[name], getattr(sel, name), rtol=1e-12, atol=1e-14)


def test_one_process_features(files):
    out = str(files["tmp"] / "one")
    rc = main(["select", "--features", str(files["tmp"] / "U.npy"), "--targets", str(files["tmp"] / "y.pt"),
               "-k", "6", "--step", "line_search", "--backend", "torch", "--out", out])  # fmt: skip
    assert rc == 0
    record = read_selection(out)
    _same(record, gfs.select(files["U"], files["y"], 6, step="line_search", backend="torch"))
    assert record["ranks"] == 1 and record["options"]["step"] == "line_search"


def test_one_process_stats_and_pt_features(files):
    out = str(files["tmp"] / "stats_one")
    assert main(["select", "--stats", str(files["tmp"] / "stats.pt"), "-k", "5", "--step", "refit", "--out", out]) == 0
    _same(read_selection(out), gfs.select(files["stats"], k=5, step="refit"))
    out = str(files["tmp"] / "pt_one")
    argv = ["select", "--features", str(files["tmp"] / "U32.pt"), "--targets", str(files["tmp"] / "y.pt")]
    assert main([*argv, "-k", "4", "--no-replacement", "--out", out]) == 0
    _same(read_selection(out), gfs.select(files["U"].float(), files["y"], 4, replacement=False))


def test_bad_input_exits_2_and_leaves_no_record(files, capsys):
    out = files["tmp"] / "bad"
    (out.parent / "bad.json").write_text("{}")  # a record of an earlier run: removed when this one starts
    rc = main(["select", "--features", str(files["tmp"] / "y.pt"), "--targets", str(files["tmp"] / "y.pt"),
               "-k", "3", "--out", str(out)])  # fmt: skip
    assert rc == 2
    assert "features must have shape (N, M)" in capsys.readouterr().err
    assert not (out.parent / "bad.json").exists() and not (out.parent / "bad.safetensors").exists()
    assert main(["select", "--stats", str(files["tmp"] / "stats.pt"), "--targets", "y.pt", "-k", "3",
                 "--out", str(out)]) == 2  # fmt: skip
    rc = main(["select", "--features", str(files["tmp"] / "missing.npy"), "--targets", str(files["tmp"] / "y.pt"),
               "-k", "3", "--out", str(out)])  # fmt: skip
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_the_record_names_its_tensors(files):
    out = str(files["tmp"] / "one")
    if not os.path.exists(out + ".json"):
        test_one_process_features(files)
    with open(out + ".safetensors", "r+b") as f:  # tensors of another run behind the record
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="is not the tensors file"):
        read_selection(out)


def _torchrun(args, tmp):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gfs", "select", *args, "--timeout", "30"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=TORCHRUN_LIMIT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish within {TORCHRUN_LIMIT} s: {exc.stdout}\n{exc.stderr}")


def test_torchrun_two_ranks_features(files):
    tmp = files["tmp"]
    out = str(tmp / "two")
    run = _torchrun(["--features", str(tmp / "U.npy"), "--targets", str(tmp / "y.pt"), "-k", "8",
                     "--step", "refit", "--backend", "torch", "--out", out], tmp)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    record = read_selection(out)
    _same(record, gfs.select(files["U"], files["y"], 8, step="refit", backend="torch", engine="stream"))
    assert record["ranks"] == 2 and "sharded over 2 ranks" in record["reason"]
    assert run.stdout.count("wrote") == 1  # rank 0 alone writes
