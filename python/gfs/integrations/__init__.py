"""gfs inside the pipelines people already use.

- :mod:`gfs.integrations.torch_pruning`: ``GFSImportance``, greedy forward selection as a
  Torch-Pruning importance, with compensation (the selection's weights folded into the layers
  that read the kept channels), calibration capture, sequential and one-shot modes, and
  ``prune`` (one call). Needs the optional extra: ``pip install 'gfs[torch-pruning]'``.
- :mod:`gfs.integrations.nn_prune`: ``GFSStructured`` / ``gfs_structured``, a
  ``torch.nn.utils.prune`` method whose structured mask keeps the output channels gfs selects
  from calibration activations (works with ``prune.remove``).

The submodules are imported on demand: ``import gfs`` never needs Torch-Pruning.
"""
