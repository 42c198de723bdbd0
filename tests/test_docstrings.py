"""The examples in the docstrings run: every module of gfs and gfs_kernels whose source holds an
example (`>>>`) is run through doctest, one test per module. Examples marked `# doctest: +SKIP`
(long studies, printouts that vary) are shown, not run; a new module with examples is picked
up without a change here."""

from __future__ import annotations

import doctest
import importlib
import pathlib

import pytest

import gfs
import gfs_kernels

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples() -> list[str]:
    names = []
    for package in (gfs, gfs_kernels):
        root = pathlib.Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            if path.name == "__main__.py" or ">>>" not in path.read_text(encoding="utf-8"):
                continue
            parts = [package.__name__, *path.relative_to(root).with_suffix("").parts]
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    assert {"gfs.select", "gfs.stats.gram", "gfs.theory", "gfs.pruning.api"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS, report=True)
    assert result.attempted > 0, f"{name} has '>>>' but doctest found no example to run"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
