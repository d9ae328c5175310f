"""Channel groups of a traced CNN: which channels have to slice together.

A network is traced with ``torch.fx`` and shape-propagated on an example
input. Every tensor with a channel dimension (dim 1 of ``(N, C, H, W)`` and of
``(N, C)``) gets a *channel spec*: the channel groups laid along that
dimension, in order. A group is a set of channels that must keep the same
prefix in every sub-network:

* a dense convolution or linear layer starts a new group (its output channels);
* a per-channel op (BatchNorm, activation, pooling, a depthwise convolution,
  multiplying by a scalar) keeps its input's spec;
* an elementwise op between two tensors (a residual add, a squeeze-excitation
  multiply) merges their groups, so a residual stream is one group however
  many layers write to it;
* concatenation along channels gives a composite spec ``(g1, g2, ...)``: each
  part slices on its own and :mod:`dsnet.convert.network` lays the parts out
  so that every sub-network's channels are still a prefix;
* flattening ``(N, C, H, W)`` to ``(N, C*H*W)`` keeps the spec, each channel
  now spanning ``H*W`` features (channel-major, so a channel prefix is a
  feature prefix).

Each layer's part in a group is recorded as a :class:`ChannelUse` (its output
channels, its input channels, or per-channel parameters it carries through),
which is what permuting and slicing a group needs. Anything the analysis does
not understand keeps full width: the groups it reads or writes are *fixed*
(never sliced), and the op is reported by name with the reason. The network's
input and output channels are fixed too (not reported: that is expected).

The same analysis runs on plain ``torch.nn`` networks (``make_dynamic``) and on
dsnet's own models traced at full width, whose sliced layers are leaves
(importance ordering of imported weights, :mod:`dsnet.layers.channel_order`).
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from dsnet.layers.sliced import SlicedBatchNorm2d, SlicedConv2d, SlicedLayerNorm, SlicedLinear
from dsnet.utils.modes import temporary_mode

__all__ = ["ChannelUse", "ChannelGroup", "Unsliceable", "Chan", "ChannelGraph", "analyse", "trace"]

SLICED_LEAVES = (SlicedConv2d, SlicedLinear, SlicedBatchNorm2d, SlicedLayerNorm)

# modules and functions that act on each channel separately (and keep the channel dim where it is)
_PER_CHANNEL_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
)
_PER_CHANNEL_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    torch.abs,
    torch.neg,
    operator.neg,
    torch.clamp,
    torch.clip,
    F.dropout,
    F.dropout2d,
    F.alpha_dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
}
_PER_CHANNEL_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "abs",
    "neg",
    "contiguous",
    "clone",
    "float",
    "detach",
}
_BINARY_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE_METHODS = {"view", "reshape"}
# ops that read a tensor's metadata, not its channels
_META_METHODS = {"size", "dim", "numel", "type", "get_device"}


@dataclass(frozen=True)
class ChannelUse:
    """One layer's part in some channel groups.

    ``role``: ``"out"`` (a dense conv/linear layer's output channels: weight
    dim 0 and bias), ``"in"`` (its input channels: weight dim 1) or
    ``"through"`` (per-channel parameters of a BatchNorm or depthwise
    convolution). ``spec`` lists the groups along that dimension. ``inner``: a
    linear layer reading a flattened feature map sees each channel as
    ``inner`` consecutive features. ``bn``/``bn_slot``: for ``"out"``, the
    BatchNorm that normalises exactly this output (and, for a dsnet BN, the
    statistics slot the full-width network uses), folded into importance.
    """

    module: str
    role: str
    spec: tuple[int, ...]
    inner: int = 1
    bn: str | None = None
    bn_slot: int | None = None


@dataclass
class ChannelGroup:
    """Channels that slice together; ``fixed`` says why a group keeps its full width (None: it slices)."""

    id: int
    size: int
    name: str
    uses: list[ChannelUse] = field(default_factory=list)
    fixed: str | None = None
    pre_gate: bool = False
    producers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Unsliceable:
    """A layer (or op) whose channels cannot slice, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True)
class Chan:
    """The channel layout of one traced tensor: groups along dim 1, each channel spanning ``inner`` features."""

    spec: tuple[int, ...]
    inner: int = 1


class _Tracer(fx.Tracer):
    """fx tracer that keeps dsnet's sliced layers as leaves and remembers where ``watch`` returns."""

    def __init__(self, watch: str | None) -> None:
        super().__init__()
        self.watch = watch
        self.watched: list = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, SLICED_LEAVES) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):  # noqa: ANN001
        out = super().call_module(m, forward, args, kwargs)
        if self.watch is not None and self.path_of_module(m) == self.watch:
            self.watched.append(out)
        return out


def trace(model: nn.Module, example: Tensor, watch: str | None = None) -> tuple[fx.GraphModule, fx.Node | None]:
    """Trace ``model`` with torch.fx and record every node's output shape on ``example``.

    Returns the graph module and the node that module ``watch`` (a qualified
    name, e.g. ``"layer2"``) returns, if asked. Errors name the problem in one line.
    """
    name = type(model).__name__
    if watch is not None:
        names = [n for n, _ in model.named_modules() if n]
        if watch not in names:
            close = difflib.get_close_matches(watch, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"gate_after={watch!r}: {name} has no such module{hint}")
    tracer = _Tracer(watch)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ... from user code
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"torch.fx cannot trace {name} ({type(err).__name__}: {first}); make_dynamic needs a forward "
            "without control flow on tensor values (if/while on a tensor, .item(), data-dependent shapes)"
        ) from None
    gm = fx.GraphModule(tracer.root, graph, name)
    watched = None
    if watch is not None:
        if not tracer.watched:
            raise ValueError(f"gate_after={watch!r}: {name}.forward never calls this module")
        if len(tracer.watched) > 1:
            raise ValueError(f"gate_after={watch!r}: the module is called {len(tracer.watched)} times; name one call")
        out = tracer.watched[0]
        if not isinstance(out, fx.Proxy):
            raise ValueError(f"gate_after={watch!r}: the module returns {type(out).__name__}, not one tensor")
        watched = out.node
    try:
        # grad mode on: dsnet's sliced layers then take their plain path and leave no inference caches behind
        with temporary_mode(gm, False), torch.enable_grad():
            ShapeProp(gm).propagate(example)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name} fails on the example input of shape {tuple(example.shape)}: {first}") from None
    return gm, watched


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _conv_is_sliceable(m: nn.Conv2d) -> str | None:
    """Why a plain ``nn.Conv2d`` cannot become a :class:`SlicedConv2d` (None if it can)."""

    def square(v: object) -> bool:
        return isinstance(v, int) or (isinstance(v, tuple) and len(set(v)) == 1)

    if not (square(m.kernel_size) and square(m.stride) and square(m.dilation)):
        return "non-square kernel, stride or dilation"
    if isinstance(m.padding, str) or not square(m.padding):
        return f"padding {m.padding!r} (sliced convolutions take one integer padding)"
    if m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode!r}"
    return None


class ChannelGraph:
    """The channel groups of a traced network (see the module docstring).

    Attributes after :func:`analyse`: ``gm`` (the traced graph module), ``chan``
    (node name -> :class:`Chan`), ``groups`` (id -> :class:`ChannelGroup`, in
    order of first appearance), ``issues`` (what cannot slice, and why),
    ``module_kind`` (called module name -> ``"conv"``, ``"depthwise"``,
    ``"bn"``, ``"linear"`` or ``"other"``).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.chan: dict[str, Chan] = {}
        self.groups: dict[int, ChannelGroup] = {}
        self.issues: list[Unsliceable] = []
        self.module_kind: dict[str, str] = {}
        self._parent: list[int] = []
        self._size: list[int] = []
        self._name: list[str] = []
        self._fixed: dict[int, str] = {}
        self._uses: list[ChannelUse] = []
        self._producers: dict[int, list[str]] = {}
        self._module_specs: dict[tuple[str, str], tuple[int, ...]] = {}
        self._split_into: dict[int, tuple[int, ...]] = {}  # a group found to be several groups side by side

    # ------------------------------------------------------------ union-find
    def _new(self, size: int, name: str, fixed: str | None = None) -> int:
        gid = len(self._parent)
        self._parent.append(gid)
        self._size.append(size)
        self._name.append(name)
        if fixed:
            self._fixed[gid] = fixed
        return gid

    def find(self, g: int) -> int:
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise ValueError(f"channel groups {self._name[ra]!r} and {self._name[rb]!r} meet with different sizes")
        lo, hi = min(ra, rb), max(ra, rb)  # the earlier group names the merged one
        self._parent[hi] = lo
        if hi in self._fixed and lo not in self._fixed:
            self._fixed[lo] = self._fixed[hi]

    def expand(self, spec: Sequence[int]) -> tuple[int, ...]:
        """``spec`` as current groups: roots, with split groups replaced by their parts."""
        out: list[int] = []
        for g in spec:
            root = self.find(g)
            out.extend(self.expand(self._split_into[root]) if root in self._split_into else (root,))
        return tuple(out)

    def _split(self, root: int, cuts: list[int]) -> None:
        """Replace group ``root`` by consecutive parts ending at the offsets ``cuts`` (the last is its size)."""
        parts, start = [], 0
        for end in cuts:
            part = self._new(end - start, self._name[root], self._fixed.get(root))
            self._producers[part] = list(self._producers.get(root, []))
            parts.append(part)
            start = end
        self._split_into[root] = tuple(parts)

    def _refine(self, spec: tuple[int, ...], bounds: set[int]) -> None:
        """Split every group of ``spec`` that a boundary in ``bounds`` falls inside."""
        offset = 0
        for g in spec:
            size = self._size[g]
            inside = sorted(b - offset for b in bounds if offset < b < offset + size)
            if inside:
                self._split(g, [*inside, size])
            offset += size

    def _union_specs(self, a: Chan, b: Chan) -> bool:
        """Make two layouts of the same channels one: groups that meet merge, groups that straddle split.

        A squeeze-excitation multiply of a concatenation ``cat([a, b]) * w``
        finds that ``w``'s producer writes two groups side by side.
        """
        if a.inner != b.inner:
            return False
        sa, sb = self.expand(a.spec), self.expand(b.spec)
        if self.spec_size(sa) != self.spec_size(sb):
            return False

        def bounds(spec: tuple[int, ...]) -> set[int]:
            out, total = set(), 0
            for g in spec:
                total += self._size[g]
                out.add(total)
            return out

        self._refine(sa, bounds(sb))
        self._refine(sb, bounds(sa))
        sa, sb = self.expand(a.spec), self.expand(b.spec)
        for x, y in zip(sa, sb, strict=True):
            self._union(x, y)
        return True

    def _fix(self, spec: Sequence[int], reason: str) -> None:
        for g in self.expand(spec):
            self._fixed.setdefault(g, reason)

    def spec_size(self, spec: Sequence[int]) -> int:
        return sum(self._size[g] for g in self.expand(spec))

    # --------------------------------------------------------------- helpers
    def _unsupported(self, node: fx.Node, label: str, reason: str, inputs: Sequence[Chan]) -> Chan | None:
        """Report ``label``; its input groups keep full width; its output is a new full-width group."""
        self.issues.append(Unsliceable(label, reason))
        for c in inputs:
            self._fix(c.spec, f"read by {label} ({reason})")
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            return Chan((self._new(shape[1], label, fixed=f"written by {label} ({reason})"),))
        return None

    def _input_chan(self, value: object, label: str) -> Chan | None:
        """The spec of an argument; a tensor the analysis could not follow gets a new full-width group."""
        if isinstance(value, fx.Node):
            if value.name in self.chan:
                return self.chan[value.name]
            shape = _shape(value)
            if shape is not None and len(shape) >= 2:
                c = Chan(
                    (self._new(shape[1], value.name, fixed=f"produced by {value.name}, which dsnet cannot follow"),)
                )
                self.chan[value.name] = c
                return c
        return None

    def _use(self, module: str, role: str, chan: Chan, **extra: object) -> None:
        key = (module, role)
        if key in self._module_specs:  # a module called twice (weight sharing): both calls slice alike
            if not self._union_specs(Chan(self._module_specs[key], chan.inner), chan):
                raise ValueError(f"module {module!r} is called on tensors with different channel layouts")
            return
        self._module_specs[key] = chan.spec
        self._uses.append(ChannelUse(module, role, chan.spec, chan.inner, **extra))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ nodes
    def _call_module(self, node: fx.Node) -> Chan | None:
        name = str(node.target)
        m = self.modules[name]
        x = self._input_chan(node.args[0], name) if node.args else None
        if x is None:
            self.module_kind.setdefault(name, "other")
            return None
        shape_in = _shape(node.args[0])
        if isinstance(m, SlicedConv2d | nn.Conv2d):
            if isinstance(m, nn.Conv2d):
                why = _conv_is_sliceable(m)
                depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
                if why is None and m.groups != 1 and not depthwise:
                    why = f"grouped convolution (groups={m.groups})"
            else:
                why, depthwise = None, m.depthwise
            if why is not None or x.inner != 1:
                self.module_kind[name] = "other"
                return self._unsupported(node, name, why or "input is not a feature map", [x])
            if depthwise:
                self.module_kind[name] = "depthwise"
                self._use(name, "through", x)
                return x
            self.module_kind[name] = "conv"
            self._use(name, "in", x)
            return self._produce(name, m.out_channels)
        if isinstance(m, SlicedBatchNorm2d | nn.BatchNorm2d):
            if isinstance(m, nn.BatchNorm2d) and not (m.affine and m.track_running_stats):
                self.module_kind[name] = "other"
                return self._unsupported(node, name, "BatchNorm without affine parameters or running statistics", [x])
            self.module_kind[name] = "bn"
            self._use(name, "through", x)
            return x
        if isinstance(m, SlicedLinear | nn.Linear):
            if shape_in is None or len(shape_in) != 2:
                self.module_kind[name] = "other"
                return self._unsupported(node, name, "linear layer on a tensor that is not (N, features)", [x])
            self.module_kind[name] = "linear"
            self._use(name, "in", x)
            return self._produce(name, m.out_features)
        if isinstance(m, _PER_CHANNEL_MODULES):
            self.module_kind[name] = "other"
            return x
        if isinstance(m, nn.Flatten):
            self.module_kind[name] = "other"
            return (
                self._flatten(node, x, name)
                if m.start_dim == 1
                else self._unsupported(node, name, f"flatten from dim {m.start_dim}", [x])
            )
        self.module_kind[name] = "other"
        return self._unsupported(node, name, f"{type(m).__name__} is not a layer dsnet can slice", [x])

    def _produce(self, name: str, size: int) -> Chan:
        """A dense layer's output: a new group (merged with the earlier call's if the layer is shared)."""
        out = Chan((self._new(size, name),))
        self._producers.setdefault(out.spec[0], []).append(name)
        self._use(name, "out", out)
        return out

    def _flatten(self, node: fx.Node, x: Chan, label: str) -> Chan | None:
        before, after = _shape(node.args[0]), _shape(node)
        if before is None or after is None or len(after) != 2 or len(before) < 2:
            return self._unsupported(node, label, "reshape that moves the channel dimension", [x])
        inner = 1
        for d in before[2:]:
            inner *= d
        if after[1] != before[1] * inner:
            return self._unsupported(node, label, "reshape that moves the channel dimension", [x])
        return Chan(x.spec, x.inner * inner)

    def _tracked_args(self, node: fx.Node) -> list[Chan]:
        out = []
        for a in node.all_input_nodes:
            if a.name in self.chan:
                out.append(self.chan[a.name])
        return out

    def _call_function(self, node: fx.Node) -> Chan | None:
        fn = node.target
        label = node.name
        method = node.op == "call_method"
        tracked = self._tracked_args(node)
        if not tracked:
            return None
        first = self.chan.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        if (method and fn in _META_METHODS) or fn is getattr:
            return None  # metadata (sizes, dtypes) only
        if (fn in _PER_CHANNEL_FUNCTIONS or (method and fn in _PER_CHANNEL_METHODS)) and first is not None:
            if len(tracked) == 1:
                return first
        if fn in _BINARY_FUNCTIONS or (method and fn in _BINARY_METHODS):
            return self._binary(node, label)
        if fn in _CAT_FUNCTIONS:
            return self._cat(node, label)
        if (fn in _REDUCE_FUNCTIONS or (method and fn in _REDUCE_METHODS)) and first is not None and len(tracked) == 1:
            shape_in, shape_out = _shape(node.args[0]), _shape(node)
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = (dims,) if isinstance(dims, int) else dims
            if shape_in and shape_out and dims is not None and len(shape_in) == 4 and first.inner == 1:
                norm = {d % len(shape_in) for d in dims}
                if norm <= {2, 3} and len(shape_out) >= 2 and shape_out[1] == shape_in[1]:
                    return first
            return self._unsupported(node, label, "reduction over the channel or batch dimension", tracked)
        if (fn is torch.flatten or (method and fn == "flatten")) and first is not None:
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            if start == 1 and node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1) == -1:
                return self._flatten(node, first, label)
            return self._unsupported(node, label, f"flatten from dim {start}", tracked)
        if ((method and fn in _RESHAPE_METHODS) or fn is torch.reshape) and first is not None and len(tracked) == 1:
            target = node.args[1:] if method else node.args[1:]
            target = target[0] if len(target) == 1 and isinstance(target[0], (tuple, list)) else target
            literals = [v for v in target if isinstance(v, int) and v != -1]
            if not literals:
                return self._flatten(node, first, label)
            return self._unsupported(node, label, f"reshape to fixed sizes {list(target)}", tracked)
        if fn is operator.getitem and first is not None and len(tracked) == 1:
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            full = slice(None, None, None)
            if index and index[0] is Ellipsis and all(i is None for i in index[1:]):
                return first
            if len(index) >= 2 and index[0] == full and index[1] == full and Ellipsis not in index[2:]:
                return first
            if len(index) == 1 and index[0] == full:
                return first
            return self._unsupported(node, label, f"indexing {index!r} that may cut channels", tracked)
        what = f"{fn}" if method else getattr(fn, "__name__", str(fn))
        return self._unsupported(
            node, label, f"{'method ' if method else ''}{what!r} is not an op dsnet can follow", tracked
        )

    def _binary(self, node: fx.Node, label: str) -> Chan | None:
        args = [a for a in list(node.args) + list(node.kwargs.values())]
        chans, others = [], []
        for a in args:
            if isinstance(a, fx.Node) and a.name in self.chan:
                chans.append(self.chan[a.name])
            elif isinstance(a, fx.Node):
                others.append(a)
        for o in others:  # a tensor we do not follow: fine if it broadcasts as a scalar
            shape = _shape(o)
            if shape is not None and any(d != 1 for d in shape):
                return self._unsupported(
                    node, label, f"elementwise op with {o.name}, which has per-channel values", chans
                )
        if len(chans) == 1:
            return chans[0]
        if len(chans) == 2 and self._union_specs(chans[0], chans[1]):
            return chans[0]
        return self._unsupported(node, label, "elementwise op on tensors with different channel layouts", chans)

    def _cat(self, node: fx.Node, label: str) -> Chan | None:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        shape = _shape(node)
        if not isinstance(parts, (list, tuple)) or shape is None or not isinstance(dim, int):
            return self._unsupported(node, label, "concatenation dsnet cannot follow", self._tracked_args(node))
        chans = [self._input_chan(p, label) for p in parts]
        if any(c is None or c.inner != 1 for c in chans):
            return self._unsupported(
                node, label, "concatenation of tensors that are not feature maps", [c for c in chans if c]
            )
        if dim % len(shape) == 1:
            return Chan(tuple(g for c in chans for g in c.spec))
        for c in chans[1:]:  # along another dim: every part has the same channels
            if not self._union_specs(chans[0], c):
                return self._unsupported(node, label, "concatenation of different channel layouts", chans)
        return chans[0]

    # --------------------------------------------------------------- finalize
    def _finalize(self) -> None:
        by_root: dict[int, ChannelGroup] = {}
        for gid in range(len(self._parent)):
            root = self.find(gid)
            if root in self._split_into:
                continue
            if root not in by_root:
                by_root[root] = ChannelGroup(root, self._size[root], self._name[root], fixed=self._fixed.get(root))
            by_root[root].producers.extend(self._producers.get(gid, []))
        seen: set[tuple] = set()
        for use in self._uses:
            spec = self.expand(use.spec)
            canon = ChannelUse(use.module, use.role, spec, use.inner, use.bn, use.bn_slot)
            key = (canon.module, canon.role)
            if key in seen:
                continue
            seen.add(key)
            for g in dict.fromkeys(spec):
                by_root[g].uses.append(canon)
        self.chan = {k: Chan(self.expand(c.spec), c.inner) for k, c in self.chan.items()}
        for g in by_root.values():  # name a group after its first producing layer, when it has one
            if g.producers:
                g.name = g.producers[0]
        self.groups = by_root


def analyse(gm: fx.GraphModule) -> ChannelGraph:
    """Channel groups, uses and unsliceable ops of a traced, shape-propagated network."""
    cg = ChannelGraph(gm)
    bn_of: dict[str, tuple[str, int | None]] = {}  # producer node -> the BN that alone reads it
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape is not None and len(shape) >= 2:
                cg.chan[node.name] = Chan((cg._new(shape[1], "input", fixed="the network's input"),))
            continue
        if node.op == "get_attr":
            continue
        if node.op == "output":
            out = node.args[0]
            for n in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(n, fx.Node) and n.name in cg.chan:
                    cg._fix(cg.chan[n.name].spec, "the network's output")
            continue
        if node.op == "call_module":
            result = cg._call_module(node)
            m = cg.modules[str(node.target)]
            src = node.args[0] if node.args else None
            if (
                isinstance(m, nn.BatchNorm2d | SlicedBatchNorm2d)
                and isinstance(src, fx.Node)
                and src.op == "call_module"
                and cg.module_kind.get(str(src.target)) in ("conv", "linear")
                and len(src.users) == 1
            ):
                slot = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else None
                bn_of[str(src.target)] = (str(node.target), slot)
        else:
            result = cg._call_function(node)
        if result is not None:
            cg.chan[node.name] = result
    # fold into each producer's importance the BN that normalises its output alone
    cg._uses = [
        ChannelUse(u.module, u.role, u.spec, u.inner, *bn_of[u.module]) if u.role == "out" and u.module in bn_of else u
        for u in cg._uses
    ]
    cg._finalize()
    return cg
