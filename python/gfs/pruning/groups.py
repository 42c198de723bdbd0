"""Channel groups, found automatically from the traced data flow (torch.fx).

A *channel group* is a set of channels that can be removed together without changing anything
else in the network:

    producer  ->  per-channel layers  ->  consumer
    (Conv2d groups=1 or Linear:        (BatchNorm, activations,      (Conv2d groups=1 or Linear:
     its output channels go)            pooling, dropout, depthwise   its input channels go)
                                        Conv2d, squeeze-excitation,
                                        flatten of a 1x1 map)

How they are found. The model is traced with ``torch.fx.symbolic_trace`` (on a copy in eval
mode) and one example batch is propagated through the graph to learn every tensor's shape. From
each dense Conv2d / Linear (a candidate producer) the walk follows the data forward, node by
node, while the node's output has exactly one user and that user acts on each channel on its own.
It ends at the first dense Conv2d / Linear that reads the channels (the consumer). Anything else
stops the walk and the producer is *not* a group; the reason is recorded:

- the tensor feeds two or more operations (a residual ``add``, a concatenation, a branch): the
  channels are shared, so the residual stream of ResNet / MobileNet is left whole by design;
- an operation that mixes or reshapes channels (LayerNorm, GroupNorm, a grouped convolution, a
  view/reshape, a flatten of a map larger than 1x1, softmax over channels, ...), or an operation
  gfs does not know: unknown is treated as unsafe, never as per-channel;
- a module called more than once (shared weights), or the tensor is the model's output.

Squeeze-excitation is recognised as a side branch: the tensor h feeds exactly a ``mul`` and a
gate ``pool -> 1x1 conv (fc1) -> act -> 1x1 conv (fc2) -> act`` whose result is that ``mul``'s
other operand. h's channels then go together with fc1's input channels and fc2's output channels.

What this gives on torchvision models (weights=None or not); ``gfs.prune`` prunes all of them
unless ``layers=`` says otherwise:

- ResNet BasicBlock: conv1 -> bn1 -> relu -> conv2. Bottleneck: conv1 -> bn1 -> relu -> conv2 and
  conv2 -> bn2 -> relu -> conv3. conv2 (BasicBlock) / conv3 (Bottleneck) feed the residual add,
  as do the stem and every downsample, so they are left whole. Nothing else is a group.
- MobileNetV2 / V3 inverted residuals with an expand layer: expand 1x1 -> BN -> act -> depthwise
  -> BN -> act [-> SE] -> project (``features.i.conv.0.0`` / ``features.i.block.0.0``).
  Blocks with expand_ratio 1 have no expand layer: their hidden channels are the block's input,
  produced by the previous layer. They form a group with that layer as the producer exactly when
  its output is used by nothing else: the stem of MobileNetV2 (features.0.0 -> features.1.conv.1)
  and of MobileNetV3-Small; in MobileNetV3-Large the stem also feeds a residual add, so there it
  is left whole.
- Also found, because nothing else shares them: the squeeze-excitation bottleneck itself
  (``*.fc1 -> *.fc2``), a block's projected output when the next block has no residual add
  (MobileNetV2 features.1.conv.1 -> features.2.conv.0.0, features.17.conv.2 -> features.18.0;
  MobileNetV3-Small features.1.block.2.0 -> features.2.block.0.0), and the classifier chains
  ending in a 1x1 map (MobileNetV2 features.18.0 -> classifier.1; MobileNetV3 last conv ->
  classifier.0 and classifier.0 -> classifier.3). To prune only the hidden channels of the
  inverted residuals, pass e.g. ``layers=["features.0.0", "features.*.conv.0.0"]`` (V2) or
  ``layers=["features.*.block.0.0"]`` (V3; add "features.0.0" for V3-Small).
- Sequential MLPs and CNNs: every Linear -> act -> Linear and Conv -> BN -> act [-> pool] -> Conv
  link, and Conv -> ... -> global pool -> flatten -> Linear.

Use ``layers=`` in :func:`gfs.prune` to restrict pruning to some of the groups.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
import sys
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp


class UnsupportedModelError(ValueError):
    """The model (or the requested layer) has a structure gfs.prune cannot prune safely."""


@dataclass(frozen=True)
class Member:
    """A layer between producer and consumer whose parameters follow the group's channels.

    kind: "norm" (BatchNorm: sliced), "depthwise" (Conv2d with groups == channels: sliced),
    "se" (squeeze-excitation: ``name`` is fc1, ``fc2`` its output layer; fc1 input and fc2
    output channels are sliced).
    """

    kind: str
    name: str
    fc2: str | None = None


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: producer's outputs == consumer's inputs (after per-channel ops).

    Attributes
    ----------
    name : str
        The group's name: the producer's module name (what ``layers=`` selects).
    producer, consumer : str
        Module names: the layer whose output channels go, and the one whose input channels go.
    channels : int
        N, the number of channels (= candidates).
    members : tuple of Member
        The per-channel layers with parameters that are sliced with the group.
    path : tuple of str
        Every operation from producer to consumer, for display.
    order : int
        Position of the consumer in the traced graph (groups are pruned in this order).
    """

    name: str
    producer: str
    consumer: str
    channels: int
    members: tuple = ()
    path: tuple = ()
    order: int = 0

    @property
    def has_se(self) -> bool:
        return any(m.kind == "se" for m in self.members)

    def __str__(self) -> str:
        return f"{self.producer} -> {self.consumer} ({self.channels} channels: {' -> '.join(self.path)})"


@dataclass
class GroupScan:
    """The result of :func:`find_groups`: the groups, and every other dense layer with the
    reason its output channels cannot be pruned."""

    groups: list = field(default_factory=list)
    rejected: dict = field(default_factory=dict)
    graph: object = field(default=None, repr=False)  # the traced torch.fx.Graph (module names as targets)

    def __getitem__(self, name):
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def names(self) -> list:
        return [g.name for g in self.groups]


# ---- what counts as per-channel ------------------------------------------------------------

_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)


def _fns(*names, where=(F, torch)):
    out = set()
    for n in names:
        for mod in where:
            f = getattr(mod, n, None)
            if f is not None:
                out.add(f)
    return out


_ELEMENTWISE_FUNCTIONS = _fns(
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "silu",
    "gelu",
    "elu",
    "leaky_relu",
    "mish",
    "sigmoid",
    "tanh",
    "softplus",
    "dropout",
    "dropout1d",
    "dropout2d",
)
_POOL_FUNCTIONS = _fns(
    "max_pool1d",
    "max_pool2d",
    "avg_pool1d",
    "avg_pool2d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
)
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_SCALAR_OPS = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add}
_MUL = {operator.mul, torch.mul}


def _is_dense(m) -> bool:
    """A layer whose input channels are all mixed into each output: a candidate producer/consumer."""
    return isinstance(m, nn.Linear) or (type(m) is nn.Conv2d and m.groups == 1)


def _is_depthwise(m, c) -> bool:
    return type(m) is nn.Conv2d and m.groups == c and m.in_channels == c and m.out_channels == c


def _shape(node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _desc(node, modules) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}()"
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


class _Reject(Exception):
    pass


# ---- tracing -------------------------------------------------------------------------------


def _trace(twin: nn.Module, example: torch.Tensor, name: str):
    """GraphModule of ``twin`` (already a copy in eval mode) with every node's shape recorded."""
    try:
        gm = fx.symbolic_trace(twin)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: cannot analyse
        raise UnsupportedModelError(
            f"cannot trace {name} with torch.fx ({type(e).__name__}: {e}); gfs.prune finds channel groups from "
            f"the traced data flow, so models with data-dependent control flow are not supported; Torch-Pruning "
            f"traces with autograd instead: prune through gfs.integrations.torch_pruning.GFSImportance "
            f"(pip install 'gfs[torch-pruning]')"
        ) from None
    prop = _ShapeProp(gm)
    printed = io.StringIO()  # ShapeProp prints a traceback of a failing node to stderr: keep it out
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            prop.propagate(example)
    except Exception as e:  # noqa: BLE001
        cause = e
        while cause.__cause__ is not None:  # ShapeProp wraps the module's own error
            cause = cause.__cause__
        node, at = prop.current, ""
        if node is not None and node.op == "call_module":
            at = f" at module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
        elif node is not None:
            at = f" at {node.op} {getattr(node.target, '__name__', node.target)}"
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise UnsupportedModelError(
            f"running {name} on the calibration batch (shape {tuple(example.shape)}, dtype {example.dtype}) failed"
            f"{at}: {type(cause).__name__}: {first}; check that the calibration batches are valid inputs of the model"
        ) from None
    sys.stderr.write(printed.getvalue())  # anything else printed (warnings) is passed on
    return gm


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running (for the error message)."""

    current = None

    def run_node(self, n):
        self.current = n
        return super().run_node(n)


def find_groups(model: nn.Module, example: torch.Tensor) -> GroupScan:
    """Every channel group of ``model`` (see the module docstring), in forward order.

    Parameters
    ----------
    model : nn.Module
        Traceable by torch.fx; it is copied, never modified.
    example : Tensor
        One input batch (a couple of samples is enough), to learn the tensors' shapes.

    Returns
    -------
    GroupScan
        ``.groups`` (list of ChannelGroup, ordered by consumer) and ``.rejected``
        ({module name: why its output channels are not a group}).
    """
    return _find(copy.deepcopy(model).eval(), example)


def _find(twin: nn.Module, example: torch.Tensor) -> GroupScan:
    gm = _trace(twin, example, type(twin).__name__)
    modules = dict(gm.named_modules())
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    scan = GroupScan(graph=gm.graph)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_dense(modules[node.target]):
            continue
        try:
            scan.groups.append(_follow(node, modules, calls, position))
        except _Reject as r:
            scan.rejected[node.target] = str(r)
    scan.groups.sort(key=lambda g: g.order)
    return scan


# ---- the walk ------------------------------------------------------------------------------


def _follow(start, modules, calls, position) -> ChannelGroup:
    name = start.target
    layer = modules[name]
    if calls[name] > 1:
        raise _Reject(f"{name} is called {calls[name]} times in forward (shared weights)")
    shape = _shape(start)
    if shape is None:
        raise _Reject(f"no shape recorded for the output of {name}")
    if isinstance(layer, nn.Linear):
        C, cdim = layer.out_features, len(shape) - 1
    else:
        C, cdim = layer.out_channels, 1
    members, path, used = [], [name], {name}
    cur = start

    def once(target):
        if calls.get(target, 0) > 1:
            raise _Reject(f"{target} is called {calls[target]} times in forward (shared weights)")
        if target in used:
            raise _Reject(f"{target} appears twice in the chain from {name}")
        used.add(target)

    while True:
        users = list(cur.users)
        if not users:
            raise _Reject(f"the output of {_desc(cur, modules)} is not used")
        if len(users) == 2:
            se = _match_se(cur, users, modules, C, cdim)
            if se is not None:
                fc1, fc2, mul, gate_path = se
                once(fc1)
                once(fc2)
                members.append(Member("se", fc1, fc2))
                path.append(f"SE[{' -> '.join(gate_path)}]")
                cur = mul
                continue
        if len(users) > 1:
            raise _Reject(
                f"the output of {_desc(cur, modules)} feeds {len(users)} operations "
                f"({', '.join(_desc(u, modules) for u in users)}): a residual connection or a branch shares "
                f"these channels, so they are left whole"
            )
        u = users[0]
        if u.op == "output":
            raise _Reject(f"the output of {_desc(cur, modules)} is the model's output")
        others = [a for a in u.all_input_nodes if a is not cur]
        if others:
            raise _Reject(
                f"{_desc(u, modules)} combines the channels of {name} with another tensor "
                f"({', '.join(_desc(a, modules) for a in others)}): a residual connection or a merge shares "
                f"these channels, so they are left whole"
            )
        if u.args[:1] != (cur,) and u.op != "call_function":
            raise _Reject(f"{_desc(u, modules)} does not take the channels as its input")
        out_shape = _shape(u)
        if u.op == "call_module":
            m = modules[u.target]
            if _is_dense(m):
                if u.args[:1] != (cur,) or len(u.args) != 1 or u.kwargs:
                    raise _Reject(f"{_desc(u, modules)} is called with extra arguments")
                in_ch = m.in_features if isinstance(m, nn.Linear) else m.in_channels
                in_shape = _shape(cur)
                ok_dim = (cdim == len(in_shape) - 1) if isinstance(m, nn.Linear) else (cdim == 1 and len(in_shape) == 4)
                if in_ch != C or not ok_dim:
                    raise _Reject(
                        f"{_desc(u, modules)} does not read the {C} channels of {name} along its input-channel "
                        f"dimension (tensor shape {in_shape})"
                    )
                once(u.target)
                path.append(u.target)
                return ChannelGroup(
                    name=name,
                    producer=name,
                    consumer=u.target,
                    channels=C,
                    members=tuple(members),
                    path=tuple(path),
                    order=position[u],
                )
            if isinstance(m, _NORM_MODULES):
                if cdim != 1 or m.num_features != C:
                    raise _Reject(f"{_desc(u, modules)} does not normalise the {C} channels along dimension 1")
                once(u.target)
                members.append(Member("norm", u.target))
            elif _is_depthwise(m, C):
                if cdim != 1:
                    raise _Reject(f"{_desc(u, modules)} needs channels along dimension 1")
                once(u.target)
                members.append(Member("depthwise", u.target))
            elif isinstance(m, _ELEMENTWISE_MODULES) or (isinstance(m, nn.PReLU) and m.num_parameters == 1):
                pass
            elif isinstance(m, _POOL_MODULES):
                if cdim != 1 or len(out_shape) < 3:
                    raise _Reject(f"{_desc(u, modules)} would pool across the channels of {name}")
            elif isinstance(m, nn.Flatten):
                cdim = _flatten(u, cur, C, cdim, (m.start_dim, m.end_dim), modules)
            elif type(m) is nn.Conv2d:
                raise _Reject(
                    f"{_desc(u, modules)} is a grouped convolution (groups={m.groups}, {m.in_channels} -> "
                    f"{m.out_channels} channels): only dense (groups=1) and depthwise (one filter per channel) "
                    f"convolutions are supported"
                )
            else:
                raise _Reject(
                    f"{_desc(u, modules)} is not a per-channel operation gfs.prune knows (it may mix channels), "
                    f"so the output channels of {name} are left whole"
                )
            path.append(u.target)
        elif u.op == "call_function":
            f = u.target
            if f in _ELEMENTWISE_FUNCTIONS and u.args[:1] == (cur,):
                pass
            elif f in _POOL_FUNCTIONS and u.args[:1] == (cur,):
                if cdim != 1 or len(out_shape) < 3:
                    raise _Reject(f"{_desc(u, modules)} would pool across the channels of {name}")
            elif f is torch.flatten and u.args[:1] == (cur,):
                start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
                end = u.args[2] if len(u.args) > 2 else u.kwargs.get("end_dim", -1)
                cdim = _flatten(u, cur, C, cdim, (start, end), modules)
            elif (
                f in _SCALAR_OPS
                and len(u.args) == 2
                and not u.kwargs
                and cur in u.args
                and all(isinstance(a, (int, float)) for a in u.args if a is not cur)
            ):
                pass
            else:
                raise _Reject(
                    f"{_desc(u, modules)} is not a per-channel operation gfs.prune knows (it may mix or reshape "
                    f"channels), so the output channels of {name} are left whole"
                )
            path.append(_desc(u, modules))
        elif u.op == "call_method":
            if u.target in _ELEMENTWISE_METHODS and len(u.args) == 1 and not u.kwargs:
                pass
            elif u.target == "flatten":
                start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
                end = u.args[2] if len(u.args) > 2 else u.kwargs.get("end_dim", -1)
                cdim = _flatten(u, cur, C, cdim, (start, end), modules)
            else:
                raise _Reject(
                    f"{_desc(u, modules)} is not a per-channel operation gfs.prune knows, so the output channels "
                    f"of {name} are left whole"
                )
            path.append(_desc(u, modules))
        else:
            raise _Reject(f"unexpected graph node {u.op} after {_desc(cur, modules)}")
        if out_shape is None or len(out_shape) <= cdim or out_shape[cdim] != C:
            raise _Reject(f"{_desc(u, modules)} changes the {C} channels of {name} (output shape {out_shape})")
        cur = u


def _flatten(u, cur, C, cdim, dims, modules) -> int:
    """A flatten keeps channels only for (B, C, 1, ..., 1) -> (B, C)."""
    in_shape, out_shape = _shape(cur), _shape(u)
    start, end = dims
    if (
        cdim == 1
        and start == 1
        and end in (-1, len(in_shape) - 1)
        and out_shape == (in_shape[0], C)
        and all(s == 1 for s in in_shape[2:])
    ):
        return 1
    raise _Reject(
        f"{_desc(u, modules)} flattens a map of shape {in_shape}: only a flatten of a 1x1 map (after global "
        f"pooling) keeps one feature per channel"
    )


def _match_se(h, users, modules, C, cdim):
    """Recognise h -> {mul(gate, h), pool -> fc1 -> act -> fc2 -> act -> gate}; None if not."""
    if cdim != 1 or len(_shape(h) or ()) != 4:
        return None
    muls = [u for u in users if u.op == "call_function" and u.target in _MUL and len(u.args) == 2 and h in u.args]
    if len(muls) != 1:
        return None
    mul = muls[0]
    gate_out = mul.args[0] if mul.args[1] is h else mul.args[1]
    if not isinstance(gate_out, fx.Node) or gate_out is h:
        return None
    node = next(u for u in users if u is not mul)
    seq = []
    while True:
        seq.append(node)
        if node is gate_out:
            break
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if node is mul:
            return None

    # pool, fc1, elementwise..., fc2, elementwise...
    def is_pool(n):
        if n.op == "call_module":
            m = modules[n.target]
            return isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and _shape(n)[2:] == (1, 1)
        return n.op == "call_function" and n.target in _POOL_FUNCTIONS and _shape(n)[2:] == (1, 1)

    def is_act(n):
        if n.op == "call_module":
            return isinstance(modules[n.target], _ELEMENTWISE_MODULES)
        if n.op == "call_function":
            return n.target in _ELEMENTWISE_FUNCTIONS
        return n.op == "call_method" and n.target in _ELEMENTWISE_METHODS

    def is_conv1x1(n, cin=None, cout=None):
        if n.op != "call_module":
            return False
        m = modules[n.target]
        return (
            type(m) is nn.Conv2d
            and m.groups == 1
            and m.kernel_size == (1, 1)
            and m.padding in ((0, 0), "valid")
            and (cin is None or m.in_channels == cin)
            and (cout is None or m.out_channels == cout)
        )

    if len(seq) < 3 or not is_pool(seq[0]) or not is_conv1x1(seq[1], cin=C):
        return None
    i = 2
    while i < len(seq) and is_act(seq[i]):
        i += 1
    if i >= len(seq) or not is_conv1x1(seq[i], cin=modules[seq[1].target].out_channels, cout=C):
        return None
    fc2 = seq[i]
    if not all(is_act(n) for n in seq[i + 1 :]):
        return None
    if _shape(mul) != _shape(h):
        return None
    return seq[1].target, fc2.target, mul, [_desc(n, modules) for n in seq]


def describe_rejected(scan: GroupScan, limit: int = 12) -> str:
    items = list(scan.rejected.items())
    lines = [f"  {k}: {v}" for k, v in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)
