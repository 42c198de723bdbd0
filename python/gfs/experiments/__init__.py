"""The papers' studies as library code.

- `pretraining_study`: "How much pre-training is enough to discover a good subnetwork?",
  Section 5 / Figure 1 (two-layer network, data-set size x pre-training iterations, red line).
- `singular_value_study` (from gfs.theory): Appendix C, the smallest singular value of the
  hidden output matrix at random initialisation vs width, data-set size and input dimension.

Command line: `python -m gfs.experiments study pretraining|singular-values ...`
(`gfs study ...` once wired into gfs.cli through `gfs.experiments.cli.add_study_parser`).
"""
from ._data import Dataset, IdxFormatError, balanced_subsets, load_digits, load_mnist_train, read_idx
from .pretraining import PretrainingConfig, StudyResult, plot_study, pretraining_study, red_line, summarise


def __getattr__(name):
    # gfs.theory imports matplotlib lazily; keep `import gfs.experiments` light
    if name in ("singular_value_study", "SingularValueResult"):
        from .. import theory

        return getattr(theory, name)
    raise AttributeError(name)


__all__ = ["pretraining_study", "PretrainingConfig", "StudyResult", "red_line", "summarise", "plot_study",
           "Dataset", "IdxFormatError", "load_digits", "load_mnist_train", "read_idx", "balanced_subsets", "singular_value_study",
           "SingularValueResult"]
