"""Calibration batches, and activations captured at named layers with forward hooks.

The calibration data are read once and kept as a list of input tensors: local imitation compares
the original and the pruned network on the *same* batches layer after layer, so a shuffling
DataLoader must not be re-iterated. (Integer labels, when batches are (x, y), are kept for
criterion "loss".) GraphRunner.run_tail runs the graph from a checkpoint's live values to the
output (criterion "loss" runs it with a consumer's input rescaled).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn


def as_batches(calibration, device=None, *, with_labels=False, dtype=None):
    """The input tensors of ``calibration``, on ``device``.

    ``calibration`` is a tensor (one batch), or an iterable (e.g. a DataLoader) of batches, each a
    tensor ``x`` or a tuple/list whose first item is ``x``. With ``with_labels=True`` the result
    is ``(batches, labels)``: labels[i] is the second item of batch i when that is an integer
    tensor (class labels), else None.

    ``dtype`` (the model's floating-point dtype): floating-point batches of another dtype are
    converted to it (copies: the caller's tensors are never modified), so float64 or float16 data
    calibrate a float32 model as its float32 values would. Floating-point batches must be finite:
    a NaN or Inf is a ValueError naming the batch and the first such index.
    """
    single = isinstance(calibration, torch.Tensor)
    if single:
        items = [calibration]
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be a tensor, a DataLoader or an iterable of batches, got {type(calibration).__name__}"
        )
    else:
        items = list(calibration)
    batches, labels = [], []
    for i, b in enumerate(items):
        what = (
            "calibration (the tensor passed to gfs.prune)"
            if single
            else f"calibration batch {i} (of the calibration data passed to gfs.prune)"
        )
        x = b[0] if isinstance(b, (tuple, list)) and len(b) > 0 else b
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"calibration batch {i} is a {type(b).__name__}; each batch must be an input tensor x or an "
                f"(x, y) tuple with x a tensor"
            )
        if not (x.is_floating_point() or x.is_complex()) and x.dtype not in (torch.long, torch.int):
            raise TypeError(f"calibration batch {i} has dtype {x.dtype}; pass the model's inputs")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"calibration batch {i} has shape {tuple(x.shape)}; it needs at least one sample")
        if x.is_floating_point() or x.is_complex():
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                first = tuple(int(v) for v in (~finite).nonzero()[0])
                raise ValueError(
                    f"{what} contains NaN or Inf (first at index {first}); remove or impute those "
                    f"samples before pruning"
                )
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)  # a new tensor
        batches.append(x.to(device) if device is not None else x)
        y = b[1] if isinstance(b, (tuple, list)) and len(b) > 1 else None
        is_label = isinstance(y, torch.Tensor) and not (
            y.is_floating_point() or y.is_complex() or y.dtype == torch.bool
        )
        labels.append(y.to(device) if is_label and device is not None else (y if is_label else None))
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch of inputs")
    return (batches, labels) if with_labels else batches


def _version(t: torch.Tensor):
    """The tensor's version counter (bumped by every in-place operation on it or a view of it);
    None for an inference tensor, which has none."""
    try:
        return t._version
    except RuntimeError:  # an inference tensor (created under torch.inference_mode)
        return None


def _storage_bytes(envs) -> int:
    """Bytes of the distinct tensor storages referenced by the values of ``envs``."""
    seen, total = set(), 0
    for env in envs:
        for v in env.values():
            if isinstance(v, torch.Tensor):
                try:
                    s = v.untyped_storage()
                except (RuntimeError, NotImplementedError):  # pragma: no cover - a tensor without storage
                    total += v.numel() * v.element_size()
                    continue
                key = (s.data_ptr(), v.device)
                if key not in seen:
                    seen.add(key)
                    total += s.nbytes()
    return total


class GraphRunner:
    """Runs a traced graph on a live model segment by segment, one batch at a time.

    The graph comes from torch.fx (gfs.pruning.groups); ``call_module`` nodes look their module up
    in ``root`` *when they run*, so modules replaced in ``root`` after pruning a group are used
    by the next segment. Values no longer needed are freed as the run goes.

    Checkpoints make the layer-by-layer loop cost about one forward pass in all instead of one
    per group: ``run(start, stop, ...)`` resumes from the checkpoint taken at node ``start``
    (position 0: the input) and takes new checkpoints at the positions asked for. A checkpoint at
    position q holds, per batch, the values of the nodes before q still needed at or after q; it
    stays valid until a module at a position >= q changes (see :meth:`invalidate_after`).

    A checkpoint holds *references* to the live values, not copies: a run from it continues on
    the same tensors, so taking one costs nothing and the memory it adds is only the values it
    keeps alive past their last use. What could spoil it, an in-place operation of a later node on
    one of those tensors (``ReLU(inplace=True)`` on a value still live, ``x += y``), is detected
    from the tensors' version counters when the checkpoint is used: such a checkpoint is dropped,
    the run starts from an earlier one (at worst the input) and the runner copies the values of
    every checkpoint from then on (``copies``), as it would for inference tensors, which have no
    version counter. The result is the same values either way.

    ``budget`` (bytes, or None for no bound): a checkpoint that would bring the storage held by
    all checkpoints (this runner's and its ``peers``') above it is not taken (``skipped`` counts
    them); runs then start from an earlier one, recomputing the values in between. Changes made
    by means that bypass the version counters (writes through ``.data`` or ``.numpy()``) are not
    seen.
    """

    def __init__(self, graph, root: nn.Module, batches, *, budget: int | None = None):
        self.nodes = list(graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(
                f"gfs.prune supports models with one tensor input; the traced graph has "
                f"{len(placeholders)} inputs ({', '.join(n.name for n in placeholders)})"
            )
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.pos[u] for u in n.users), default=self.pos[n]) for n in self.nodes}
        self.root = root
        self.batches = batches
        self.budget = budget
        self.copies = False  # True once a checkpoint was found changed in place: copy values from then on
        self.skipped = 0  # checkpoints not taken (over the budget)
        self.spoiled = 0  # checkpoints found changed in place (dropped)
        self.peak_bytes = 0  # the most storage the checkpoints held at once
        self.peers: list = []  # runners whose checkpoints count against the same budget
        self.checkpoints: dict = {0: [{} for _ in batches]}
        self._versions: dict = {0: [{} for _ in batches]}

    def start_for(self, position: int) -> int:
        """The latest valid checkpoint at or before ``position`` (checkpoints whose values were
        changed in place since they were taken are dropped on the way)."""
        while True:
            q = max(q for q in self.checkpoints if q <= position)
            if self._intact(q):
                return q
            del self.checkpoints[q], self._versions[q]
            self.spoiled += 1
            self.copies = True

    def _intact(self, q: int) -> bool:
        for env, versions in zip(self.checkpoints[q], self._versions[q], strict=True):
            for node, v in versions.items():
                if v is not None and _version(env[node]) != v:
                    return False
        return True

    def invalidate_after(self, position: int) -> None:
        """A module at node ``position`` changed: checkpoints after it are stale."""
        for q in [q for q in self.checkpoints if q > position]:
            del self.checkpoints[q], self._versions[q]

    def keep_only(self, positions) -> None:
        """Drop checkpoints that no future run needs: keep those in ``positions`` (and 0), and,
        when there is none at their minimum, the latest one before it (a start for the run that
        needs it)."""
        positions = set(positions)
        low = min(positions, default=0)
        below = [q for q in self.checkpoints if q < low]
        keep = positions | {0} | ({max(below)} if below and low not in self.checkpoints else set())
        for q in [q for q in self.checkpoints if q not in keep]:
            del self.checkpoints[q], self._versions[q]

    def held_bytes(self) -> int:
        """Bytes of the distinct storages the checkpoints hold."""
        return _storage_bytes(env for envs in self.checkpoints.values() for env in envs if env is not None)

    def _value(self, node, env):
        return fx.node.map_arg(node.args, lambda a: env[a]), fx.node.map_arg(node.kwargs, lambda a: env[a])

    def _eval(self, node, env, x):
        """The value of ``node`` given the values it reads in ``env`` (x: the model input)."""
        if node.op == "placeholder":
            return x
        args, kwargs = self._value(node, env)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return _attr(self.root, node.target)
        raise RuntimeError(f"unexpected node {node.op}")  # pragma: no cover

    def _free(self, node, env, i):
        for a in node.all_input_nodes:
            if self.last_use[a] <= i:
                env.pop(a, None)
        if self.last_use[node] <= i:
            env.pop(node, None)

    def _take(self, env: dict):
        """A checkpoint of ``env``: its values (references; copies once ``copies`` is set, and
        for tensors without a version counter) and their versions."""
        snap, versions = {}, {}
        for node, v in env.items():
            if isinstance(v, torch.Tensor):
                if self.copies or _version(v) is None:
                    v = v.clone()
                versions[node] = _version(v)
            snap[node] = v
        return snap, versions

    def _resume(self, snap: dict, versions: dict) -> dict:
        """The env a run continues from a checkpoint with: the same values (copies of those the
        checkpoint could not guard, or of all of them once ``copies`` is set)."""
        return {
            node: (v.clone() if isinstance(v, torch.Tensor) and (self.copies or versions.get(node) is None) else v)
            for node, v in snap.items()
        }

    @torch.no_grad()
    def run(
        self, start: int, stop: int, *, inputs=(), outputs=(), taps=None, checkpoint_at=(), force=(), consume=False
    ) -> dict:
        """Run nodes [start, stop) on every batch, from the checkpoint at ``start``.

        inputs: nodes whose first argument to record (the node at ``stop`` included: its input is
        recorded without running it); outputs: nodes whose result to record (cloned); taps:
        {node: f(batch index, value)}, called with each node's value as soon as it is computed
        (before a later node could change it in place); checkpoint_at: positions in (start, stop]
        to take checkpoints at (within the budget; those in ``force`` regardless of it);
        consume: the checkpoint at ``start`` is not needed again (it is dropped and its values
        are run on directly).
        Returns {("in" or "out", node): tensor concatenated over batches}.
        """
        inputs, outputs, taps = set(inputs), set(outputs), taps or {}
        want = {q for q in checkpoint_at if start < q <= stop}
        force = set(force)
        store: dict = {}
        taking: dict = {}
        base, versions = self.checkpoints[start], self._versions[start]
        consume = consume and start != 0 and self._intact(start)
        if consume:
            del self.checkpoints[start], self._versions[start]
        for b, x in enumerate(self.batches):
            env = dict(base[b]) if consume else self._resume(base[b], versions[b])
            for i in range(start, stop):
                if i in want:
                    self._checkpoint(i, b, env, i in force, taking)
                node = self.nodes[i]
                if node.op == "output":
                    break
                if node in inputs:
                    store.setdefault(("in", node), []).append(self._value(node, env)[0][0])
                val = self._eval(node, env, x)
                if node in taps:
                    taps[node](b, val)
                if node in outputs:
                    store.setdefault(("out", node), []).append(val.clone())
                env[node] = val
                self._free(node, env, i)
            if stop < len(self.nodes) and self.nodes[stop] in inputs:  # the input of the node run stops at
                store.setdefault(("in", self.nodes[stop]), []).append(self._value(self.nodes[stop], env)[0][0])
            if stop in want:
                self._checkpoint(stop, b, env, stop in force, taking)
        return {k: torch.cat(v, 0) for k, v in store.items()}

    def _checkpoint(self, i: int, b: int, env: dict, forced: bool, taking: dict) -> None:
        """Take batch b's part of the checkpoint at position i: all batches or none, as the first
        batch decides from the budget (``taking``: the decisions of this run)."""
        if b == 0:
            taking[i] = (
                forced
                or self.budget is None
                or (self.held_bytes() + _storage_bytes([env]) * len(self.batches) <= self.budget)
            )
            if not taking[i]:
                self.skipped += 1
                return
            self.checkpoints[i] = [None] * len(self.batches)
            self._versions[i] = [None] * len(self.batches)
        elif not taking[i]:
            return
        self.checkpoints[i][b], self._versions[i][b] = self._take(env)
        if b == len(self.batches) - 1:
            self.peak_bytes = max(self.peak_bytes, self.held_bytes())

    def run_tail(self, start: int, env: dict):
        """Run nodes [start, end) from the values in ``env`` (consumed: values are freed as the
        run goes) and return the model's output. No gradient mode is set: the caller chooses."""
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "output":
                return fx.node.map_arg(node.args[0], lambda a: env[a])
            env[node] = self._eval(node, env, None)
            self._free(node, env, i)
        raise RuntimeError("the traced graph has no output node")  # pragma: no cover

    def input_dependent(self) -> set:
        """The nodes whose value depends on the model input (the others are constants)."""
        dep = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
                dep.add(n)
        return dep


def _attr(root, target):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
