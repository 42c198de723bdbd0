"""The papers' studies as library code.

- `pretraining_study`: "How much pre-training is enough to discover a good subnetwork?",
  Section 5 / Figure 1 (two-layer network, data-set size x pre-training iterations, red line).
- `singular_value_study`: Appendix C, the smallest singular value of the hidden output matrix at
  random initialisation vs width, data-set size and input dimension.

Their data (scikit-learn's digits, MNIST from IDX files, class-balanced subsets) come from
gfs.data; their least-squares fits from `gfs.experiments.fits`.

Command line: `gfs study pretraining|singular-values ...` (or `python -m gfs.experiments study ...`).
"""

from .pretraining import PretrainingConfig, StudyResult, plot_study, pretraining_study, red_line, summarise
from .singular_values import SingularValueResult, plot_singular_values, singular_value_study

__all__ = [
    "pretraining_study",
    "PretrainingConfig",
    "StudyResult",
    "red_line",
    "summarise",
    "plot_study",
    "singular_value_study",
    "SingularValueResult",
    "plot_singular_values",
]
