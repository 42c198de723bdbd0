"""The scripts in examples/ run (in seconds on a CPU) and print what they promise."""

from __future__ import annotations

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _run(name, capsys) -> str:
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_the_examples_are_all_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {
        "torch_pruning_resnet.py",
        "select_features.py",
        "nn_utils_prune.py",
    }


def test_torch_pruning_resnet(capsys):
    pytest.importorskip("torch_pruning")
    out = _run("torch_pruning_resnet.py", capsys)
    assert "channel groups pruned" in out and "relative change of the logits" in out


def test_select_features(capsys):
    out = _run("select_features.py", capsys)
    assert "gfs uniform, 64 units" in out and "gfs line_search, 64 units" in out


def test_nn_utils_prune(capsys):
    out = _run("nn_utils_prune.py", capsys)
    assert "masked to channels" in out and "folded into the consumer" in out
