"""gfs.pruning, model surgery: prune channel groups by greedy forward selection, export smaller models.

    result = gfs.prune(model, calibration, ratio=0.5)     # gfs.prune is api.prune
    result.model, result.report, result.summary()
    from gfs.pruning import save, load                     # JSON architecture + tensors, no pickle
    save(result.model, "pruned.safetensors"); model = load("pruned.safetensors")

Layout (one idea per file): groups (channel groups from the traced data flow), capture
(calibration batches, activations at layers, running the graph from a layer to the output),
criteria ("local" on the Gram layer statistics, "loss", "l1", "random"), loss (the whole
network's loss as a function of one consumer's input-channel scales, for "loss"), fold (slicing /
folding into new modules, params, FLOPs), resume (checkpoints of finished groups), io (save /
load without pickle), run (PruneRun: one call's state, one group at a time: capture, statistics
and selection, fold, fold check, report), result (PruneResult, LayerReport), api (prune: the
arguments checked, then a PruneRun), finetune (training, evaluation, timing).
"""

from .api import prune
from .criteria import CRITERIA, Decision, gram_statistics, group_statistics
from .groups import ChannelGroup, GroupScan, UnsupportedModelError, find_groups
from .io import UnsafeFileError, load, save
from .result import LayerReport, PruneResult
from .run import PruneRun

__all__ = [
    "prune",
    "PruneResult",
    "LayerReport",
    "PruneRun",
    "find_groups",
    "ChannelGroup",
    "GroupScan",
    "UnsupportedModelError",
    "group_statistics",
    "gram_statistics",
    "Decision",
    "CRITERIA",
    "save",
    "load",
    "UnsafeFileError",
]
