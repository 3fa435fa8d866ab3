"""Exact receptive fields of layer outputs, for any graph the flat walker can read.

For a layer output position o (per spatial axis, since every supported layer is
separable in H and W) the receptive field is the set of model-input pixels that
influence it. It is computed by propagating sets of positions from the layer
back to the input, layer by layer, through the flattened graph of
pipeline.graph (nested models included):

* a convolution or pooling window with kernel k, stride s, dilation d and
  leading padding p reads, for output o, the input taps o*s - p + j*d,
  j = 0..k-1; Keras 'same' padding puts total // 2 pixels before (the extra
  one goes bottom/right), 'valid' puts none;
* taps that fall outside an intermediate map (in its padding) read nothing
  and are dropped, at every layer on the way;
* where branches meet (Add, Concatenate, Multiply, ...) the sets are united.

Sets are kept exactly (boolean masks over each intermediate axis, one row per
output position), so the box is the bounding box of the true support: the
pixels where the gradient of the unit is non-zero in a network with positive
weights. The unclipped field (taps never dropped, so it may start below zero)
is tracked beside it, to place a box cut by the image border inside a
fixed-size frame where the uncut field would have been.

Inputs of a merge that are broadcast from a 1x1 map (squeeze-and-excitation
style gates computed from global pooling) are left out of the union, with a
note in `Geometry.message`: the boxes then show the local receptive field.

Transposed convolutions, UpSampling2D and Resizing (nearest and bilinear, the taps
tf.image.resize reads) are mapped too, as are Reshape and Permute that keep the grid,
and normalisations (their whole-map statistics are left out, with a note).

A layer whose path to the input crosses something without a spatial mapping
(global pooling, Flatten, a Reshape that rearranges the grid, a layer type this module
does not know) is "unmappable": every box is the whole image and `message` says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import keras
import numpy as np

from pipeline import graph
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Geometry:
    """Receptive-field boxes of every output position of one layer.

    rows[o] = (lo, hi): half-open range of input rows read by output row o, clipped
    to the image; cols likewise. `frame` is the clipped box size of the centre unit
    (H // 2, W // 2); `row_offset[o]` is where row o's box starts inside that frame
    (lo - unclipped lo), so a box cut by the top border sits lower in the frame, as
    in the uncut field, and the rest of the frame stays empty. The offset is capped
    so that the box ends inside the frame: where the field is larger than the image
    (the centre's box is cut by both borders) a border box keeps its side but stays
    whole. A box larger than the frame (rare) is cut by whoever cuts patches. A
    unit that reads only padding along an axis has an
    empty range there (lo == hi == 0, offset 0), and `boxes` gives it (0, 0, 0, 0).
    """

    rows: np.ndarray  # (H, 2) int32
    cols: np.ndarray  # (W, 2) int32
    row_offset: np.ndarray  # (H,) int32
    col_offset: np.ndarray  # (W,) int32
    frame: tuple[int, int]
    rf_size: tuple[int, int]  # == frame
    rf_stride: tuple  # product of strides from the input to the layer (fractional after upsampling)
    input_size: tuple[int, int]
    mappable: bool = True
    message: str = ""

    def boxes(self, y, x) -> np.ndarray:
        """(..., 4) int32 boxes y0, x0, y1, x1 for broadcastable arrays of positions."""
        y, x = np.broadcast_arrays(np.asarray(y, np.int64), np.asarray(x, np.int64))
        if not self.mappable:
            h, w = self.input_size
            out = np.zeros(y.shape + (4,), np.int32)
            out[..., 2], out[..., 3] = h, w
            return out
        return interval_boxes(self.rows, self.cols, y, x)

    def offsets(self, y, x) -> np.ndarray:
        """(..., 2) int32 start of each box inside the frame (row, col)."""
        y, x = np.broadcast_arrays(np.asarray(y, np.int64), np.asarray(x, np.int64))
        if not self.mappable:
            return np.zeros(y.shape + (2,), np.int32)
        return np.stack([self.row_offset[y], self.col_offset[x]], axis=-1).astype(np.int32)


def interval_boxes(rows: np.ndarray, cols: np.ndarray, y, x) -> np.ndarray:
    """(..., 4) int32 boxes from per-row (H, 2) and per-column (W, 2) input intervals."""
    r, c = rows[np.asarray(y, np.int64)], cols[np.asarray(x, np.int64)]
    out = np.stack([r[..., 0], c[..., 0], r[..., 1], c[..., 1]], axis=-1).astype(np.int32)
    empty = (r[..., 0] == r[..., 1]) | (c[..., 0] == c[..., 1])
    out[empty] = 0  # a unit that reads only padding along either axis reads nothing
    return out


def layer_geometry(model, name: str, pointwise=()) -> Geometry:
    """Receptive-field geometry of the output of layer `name` (qualified as in graph.py).
    `pointwise`: custom layer class names declared pointwise (same spatial size, each output
    position reading only the same input position), as in geometry.pointwise."""
    pointwise = KNOWN_POINTWISE | {str(c) for c in pointwise}
    flat = graph._flatten(model)
    [qname] = graph._resolve(model, flat, [name])
    nodes = flat.nodes
    by_name = {n.name: n for n in nodes}
    image, in_hw = _image_input(model, nodes)
    target = by_name[qname]
    out_hw = _hw(target.output_shape, _fmt(target.layer))
    try:
        return _propagate(nodes, by_name, target, out_hw, image, in_hw, pointwise)
    except _Unmappable as err:
        culprit = err.node
        if culprit is target:
            where = f"layer {qname!r} ({type(target.layer).__name__}) {err.reason}"
        else:
            where = (f"layer {qname!r} comes after {culprit.name!r} "
                     f"({type(culprit.layer).__name__}), which {err.reason}")
        message = f"{where}, so it has no spatial receptive field; boxes cover the whole image"
        log.debug(message)
        return _whole_image(out_hw or (1, 1), in_hw, message)


# ---------------------------------------------------------------------------
# layer classification

class _AxisMap(NamedTuple):
    """A window (convolution, pooling): output o of one axis reads input taps
    o*s - pb + j*d, j = 0..k-1."""
    k: int = 1
    s: int = 1
    d: int = 1
    pb: int = 0

    def taps(self, o: np.ndarray):
        return [(o * self.s - self.pb + j * self.d, None) for j in range(self.k)]

    def span(self, lo: np.ndarray, hi: np.ndarray):
        return lo * self.s - self.pb, (hi - 1) * self.s - self.pb + self.d * (self.k - 1) + 1

    @property
    def stride(self) -> float:
        return float(self.s)


class _Transposed(NamedTuple):
    """A transposed convolution: input i feeds outputs i*s - pb + j*d, so output o reads
    the inputs (o + pb - j*d) / s that are whole numbers."""
    k: int
    s: int
    d: int
    pb: int

    def taps(self, o: np.ndarray):
        out = []
        for j in range(self.k):
            num = o + self.pb - j * self.d
            out.append((num // self.s, num % self.s == 0))
        return out

    def span(self, lo: np.ndarray, hi: np.ndarray):
        return -((self.d * (self.k - 1) - lo - self.pb) // self.s), (hi - 1 + self.pb) // self.s + 1

    @property
    def stride(self) -> float:
        return 1.0 / self.s


class _Resize(NamedTuple):
    """tf.image.resize of n_in to n_out samples (half-pixel centres, no antialiasing):
    nearest reads floor((o + 0.5) * r); bilinear reads the two samples around
    (o + 0.5) * r - 0.5 (the second only where its weight is not zero), clamped."""
    n_in: int
    n_out: int
    method: str

    def _centre(self, o: np.ndarray) -> np.ndarray:
        return (o + 0.5) * (self.n_in / self.n_out) - (0.5 if self.method == "bilinear" else 0.0)

    def taps(self, o: np.ndarray):
        c = self._centre(o)
        first = np.floor(c).astype(np.int64)
        if self.method == "nearest":
            return [(np.minimum(first, self.n_in - 1), None)]
        frac = c - first
        return [(np.clip(first, 0, self.n_in - 1), frac < 1), (np.clip(first + 1, 0, self.n_in - 1), frac > 0)]

    def span(self, lo: np.ndarray, hi: np.ndarray):
        extra = 1 if self.method == "bilinear" else 0
        return np.floor(self._centre(lo)).astype(np.int64), np.floor(self._centre(hi - 1)).astype(np.int64) + 1 + extra

    @property
    def stride(self) -> float:
        return self.n_in / self.n_out


_IDENTITY = _AxisMap()


class _Unmappable(Exception):
    def __init__(self, node, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


_L = keras.layers
_WINDOWED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D")
_MERGES = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate")
_POINTWISE = ("InputLayer", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "BatchNormalization", "Dropout",
              "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Rescaling",
              "Normalization", "Identity", "Masking")
# normalisations: pointwise, their statistics left out (with a note) where they span the map
_NORMALISATIONS = ("LayerNormalization", "UnitNormalization", "GroupNormalization")
# element-wise keras.ops calls recorded in functional graphs (by class name)
_ELEMENTWISE_OPS = frozenset({
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Power",
    "Negative", "Abs", "Absolute", "Square", "Sqrt", "Exp", "Log", "Log1p", "Tanh", "Clip",
    "Reciprocal", "Sign", "Cast", "Relu", "Relu6", "Sigmoid", "HardSigmoid", "Silu", "Swish",
    "HardSilu", "HardSwish", "Gelu", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Mish",
})
_GLOBAL = {"GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
           "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
           "AdaptiveAveragePooling2D", "AdaptiveMaxPooling2D"}
# layer class names known to be pointwise beyond the isinstance checks; a run adds its own
# (geometry.pointwise, part of the fingerprint of every stage that maps fields)
KNOWN_POINTWISE = frozenset({"LayerScale", "StochasticDepth"})


def _fmt(layer) -> str:
    fmt = getattr(layer, "data_format", None)
    return fmt if fmt in ("channels_last", "channels_first") else keras.config.image_data_format()


def _hw(shape: tuple, fmt: str) -> tuple[int, int] | None:
    """Spatial size of an output shape without the batch axis, None if not a 2-D map."""
    if len(shape) != 3:
        return None
    hw = shape[0:2] if fmt == "channels_last" else shape[1:3]
    if any(v is None for v in hw):
        return None
    return int(hw[0]), int(hw[1])


def _channel_axis(fmt: str) -> int:
    return 3 if fmt == "channels_last" else 1  # with the batch axis


def _window_map(k: int, s: int, d: int, padding: str, n_in: int, n_out: int, node) -> _AxisMap:
    span = d * (k - 1) + 1
    if padding == "same":
        expect = -(-n_in // s)
        pb = max((expect - 1) * s + span - n_in, 0) // 2
    elif padding == "valid":
        expect = (n_in - span) // s + 1
        pb = 0
    else:
        raise _Unmappable(node, f"uses padding {padding!r}, which is not mapped")
    if expect != n_out:
        raise _Unmappable(node, f"maps size {n_in} to {n_out}, not the expected {expect}")
    return _AxisMap(k, s, d, pb)


@dataclass
class _At:
    """What a layer rule reads of one node: the layer, its data format, its output's
    spatial size and its inputs (name, shape, spatial size or None)."""

    node: object
    fmt: str
    out_hw: tuple[int, int]
    srcs: list[tuple[str, tuple, tuple[int, int] | None]]
    notes: list[tuple[str, str]]

    @property
    def layer(self):
        return self.node.layer

    def single(self) -> tuple[str, tuple[int, int]]:
        if len(self.srcs) != 1 or self.srcs[0][2] is None:
            raise _Unmappable(self.node, "does not read a single 2-D map")
        return self.srcs[0][0], self.srcs[0][2]

    def on_channels(self, axes) -> bool:
        """Whether every axis in `axes` (an int or a list) is the channel axis."""
        axes = axes if isinstance(axes, (list, tuple)) else [axes]
        return all(a is not None and int(a) % 4 == _channel_axis(self.fmt) for a in axes)


def _unknown(at: _At):
    cls = type(at.layer).__name__
    raise _Unmappable(at.node, f"is a layer type the receptive-field mapper does not know (if each of "
                      f"its output positions reads only the same input position, declare it with "
                      f"geometry.pointwise=[{cls}])")


def _same_grid(at: _At, merge: bool = False) -> list:
    """Every input on the output's grid, position for position; a merge ignores inputs
    broadcast from a 1x1 map (a gate), with a note."""
    edges = []
    for src, _, in_hw in at.srcs:
        if in_hw == at.out_hw:
            edges.append((src, _IDENTITY, _IDENTITY, in_hw))
        elif merge and at.out_hw != (1, 1) and (in_hw is None or in_hw == (1, 1)):
            at.notes.append((BROADCAST_NOTE, f"{at.node.name} ignores the input {src!r} broadcast from a 1x1 map"))
        else:
            raise _Unmappable(at.node, f"combines maps of size {in_hw} into {at.out_hw}")
    if not edges:
        raise _Unmappable(at.node, "has only inputs broadcast from a 1x1 map")
    return edges


def _transposed(at: _At) -> list:
    layer, out_hw = at.layer, at.out_hw
    src, in_hw = at.single()
    if getattr(layer, "output_padding", None) is not None:
        raise _Unmappable(at.node, "is a transposed convolution with output_padding, which is not mapped")
    padding = str(layer.padding).lower()
    maps = []
    for a in (0, 1):
        k, s, d = int(layer.kernel_size[a]), int(layer.strides[a]), int(layer.dilation_rate[a])
        span = d * (k - 1) + 1
        expect = in_hw[a] * s if padding == "same" else (in_hw[a] - 1) * s + span
        if expect != out_hw[a]:
            raise _Unmappable(at.node, f"maps size {in_hw[a]} to {out_hw[a]}, not the expected {expect}")
        # the transpose of a 'same' convolution from out_hw to in_hw
        pb = max((in_hw[a] - 1) * s + span - out_hw[a], 0) // 2 if padding == "same" else 0
        maps.append(_Transposed(k, s, d, pb))
    return [(src, maps[0], maps[1], in_hw)]


def _resized(at: _At) -> list:
    layer, out_hw, node = at.layer, at.out_hw, at.node
    src, in_hw = at.single()
    method = str(getattr(layer, "interpolation", "nearest")).lower()
    if method not in ("nearest", "bilinear"):
        raise _Unmappable(node, f"resizes with {method!r} interpolation; only nearest and bilinear are mapped")
    if isinstance(layer, _L.Resizing) and in_hw != out_hw:
        if getattr(layer, "crop_to_aspect_ratio", False) or getattr(layer, "pad_to_aspect_ratio", False):
            raise _Unmappable(node, "resizes to another aspect ratio by cropping or padding, which is not mapped")
        if getattr(layer, "antialias", False) and any(o < i for i, o in zip(in_hw, out_hw)):
            raise _Unmappable(node, "shrinks with antialiasing, which is not mapped")
    if in_hw == out_hw:
        return [(src, _IDENTITY, _IDENTITY, in_hw)]
    return [(src, _Resize(in_hw[0], out_hw[0], method), _Resize(in_hw[1], out_hw[1], method), in_hw)]


def _reshaped(at: _At) -> list:
    src, in_hw = at.single()
    if isinstance(at.layer, _L.Permute):
        same = tuple(at.layer.dims) == (1, 2, 3)
    else:
        same = tuple(at.srcs[0][1]) == tuple(at.node.output_shape)
    if not same:
        raise _Unmappable(at.node, "rearranges the spatial grid")
    return [(src, _IDENTITY, _IDENTITY, in_hw)]


def _normalised(at: _At) -> list:
    """Pointwise, but statistics taken over the whole map (or over a spatial axis) are left out, with a note."""
    src, in_hw = at.single()
    if isinstance(at.layer, _L.GroupNormalization) or not at.on_channels(getattr(at.layer, "axis", -1)):
        at.notes.append((WHOLE_MAP_NOTE, f"{at.node.name} ({type(at.layer).__name__}) normalises with statistics "
                                         f"of the whole map; they are left out"))
    return [(src, _IDENTITY, _IDENTITY, in_hw)]


def _windowed(at: _At) -> list:
    layer = at.layer
    src, in_hw = at.single()
    if isinstance(layer, (_L.MaxPooling2D, _L.AveragePooling2D)):
        k, s, d = layer.pool_size, layer.strides, (1, 1)
    else:
        k, s, d = layer.kernel_size, layer.strides, layer.dilation_rate
    padding = str(layer.padding).lower()
    maps = [_window_map(int(k[a]), int(s[a]), int(d[a]), padding, in_hw[a], at.out_hw[a], at.node) for a in (0, 1)]
    return [(src, maps[0], maps[1], in_hw)]


def _padded(at: _At) -> list:
    src, in_hw = at.single()
    (top, bottom), (left, right) = at.layer.padding
    if (in_hw[0] + top + bottom, in_hw[1] + left + right) != at.out_hw:
        raise _Unmappable(at.node, "pads to an unexpected size")
    return [(src, _AxisMap(pb=int(top)), _AxisMap(pb=int(left)), in_hw)]


def _cropped(at: _At) -> list:
    src, in_hw = at.single()
    (top, bottom), (left, right) = at.layer.cropping
    if (in_hw[0] - top - bottom, in_hw[1] - left - right) != at.out_hw:
        raise _Unmappable(at.node, "crops to an unexpected size")
    return [(src, _AxisMap(pb=-int(top)), _AxisMap(pb=-int(left)), in_hw)]


def _merged(at: _At) -> list:
    if isinstance(at.layer, _L.Concatenate) and at.layer.axis % 4 != _channel_axis(at.fmt):
        raise _Unmappable(at.node, "concatenates along a spatial axis")
    return _same_grid(at, merge=True)


def _pointwise(at: _At) -> list:
    return _same_grid(at)


def _activation(at: _At) -> list:
    """Pointwise, except a softmax over the channels of a channels_first map."""
    act = getattr(at.layer.activation, "__name__", "")
    return _same_grid(at) if at.fmt == "channels_last" or act not in ("softmax", "log_softmax") else _unknown(at)


def _on_channel_axis(at: _At) -> list:
    """Softmax: pointwise where it normalises over the channels only."""
    return _same_grid(at) if at.on_channels(at.layer.axis) else _unknown(at)


def _dense(at: _At) -> list:
    return _same_grid(at) if at.fmt == "channels_last" else _unknown(at)  # acts on the last axis only


# Keras layer class name -> the rule that maps its output positions to its inputs'. A layer
# takes the rule of the nearest class in its own class hierarchy that is listed here.
_RULES = {
    **dict.fromkeys(_POINTWISE, _pointwise),
    **dict.fromkeys(_MERGES, _merged),
    **dict.fromkeys(_WINDOWED, _windowed),
    **dict.fromkeys(_NORMALISATIONS, _normalised),
    "Conv2DTranspose": _transposed,
    "UpSampling2D": _resized, "Resizing": _resized,
    "Reshape": _reshaped, "Permute": _reshaped,
    "ZeroPadding2D": _padded, "Cropping2D": _cropped,
    "Activation": _activation,  # replaces _pointwise above: a channels_first softmax is not pointwise
    "Softmax": _on_channel_axis,
    "Dense": _dense,
}


def _rule(layer):
    """The rule of `layer`: its class's, else its nearest Keras base class's; element-wise
    keras.ops calls recorded in functional graphs merge; None when nothing here knows it."""
    if not isinstance(layer, _L.Layer):
        ops = type(layer).__name__ in _ELEMENTWISE_OPS and type(layer).__module__.startswith("keras.src.ops")
        return _merged if ops else None
    for c in type(layer).__mro__:
        if c.__module__.startswith("keras.") and c.__name__ in _RULES:
            return _RULES[c.__name__]
    return None


def _edges(node, by_name: dict, notes: list[tuple[str, str]], pointwise: frozenset) -> list[tuple[str, _AxisMap, _AxisMap, tuple]]:
    """(source name, row map, col map, source spatial size) for each input that counts:
    the rule of the node's layer (_RULES), a declared pointwise class, or unmappable."""
    layer = node.layer
    cls = type(layer).__name__
    fmt = _fmt(layer)
    out_hw = _hw(node.output_shape, fmt)
    if cls in _GLOBAL or isinstance(layer, _L.Flatten):
        raise _Unmappable(node, "pools over all positions" if cls in _GLOBAL
                          else "flattens the spatial grid")
    if out_hw is None:
        raise _Unmappable(node, "has no spatial dimensions")
    srcs = []
    for src, idx in node.sources:
        shape = by_name[src].output_shapes[idx]
        srcs.append((src, shape, _hw(shape, fmt)))
    if not srcs:
        raise _Unmappable(node, "has no inputs")
    at = _At(node, fmt, out_hw, srcs, notes)
    rule = _rule(layer) or (_pointwise if cls in pointwise else _unknown)
    return rule(at)


# ---------------------------------------------------------------------------
# propagation

class _Axis(NamedTuple):
    mask: np.ndarray  # (T, n) bool: which positions of this map each target unit reads
    lo: np.ndarray  # (T,) unclipped start, in this map's coordinates
    hi: np.ndarray  # (T,) unclipped end (exclusive)


def _start(n: int) -> _Axis:
    o = np.arange(n, dtype=np.int64)
    return _Axis(np.eye(n, dtype=bool), o, o + 1)


def _back(ax: _Axis, m, n_in: int) -> _Axis:
    """Map a target-by-output mask to a target-by-input mask through one axis map."""
    n_out = ax.mask.shape[1]
    if m is _IDENTITY and n_in == n_out:
        return ax
    o = np.arange(n_out, dtype=np.int64)
    reads = np.zeros((n_out, n_in), np.float32)  # output -> input positions it reads
    for i, valid in m.taps(o):
        ok = (i >= 0) & (i < n_in) & (True if valid is None else valid)
        reads[o[ok], i[ok]] = 1.0
    out = (ax.mask.astype(np.float32) @ reads) > 0
    lo, hi = m.span(ax.lo, ax.hi)
    return _Axis(out, lo, hi)


def _union(a: _Axis | None, b: _Axis) -> _Axis:
    if a is None:
        return b
    return _Axis(a.mask | b.mask, np.minimum(a.lo, b.lo), np.maximum(a.hi, b.hi))


def _propagate(nodes, by_name, target, out_hw, image, in_hw, pointwise: frozenset) -> Geometry:
    index = {n.name: i for i, n in enumerate(nodes)}
    state: dict[str, tuple[_Axis, _Axis]] = {}
    reached_only: set[str] = set()  # ancestors of an unmappable node, to find the first one
    if out_hw is None:  # not a 2-D map: only look for where the spatial grid was lost
        reached_only.add(target.name)
    else:
        state[target.name] = (_start(out_hw[0]), _start(out_hw[1]))
    edges_of: dict[str, list] = {}
    bad: list[_Unmappable] = []
    notes: list[tuple[str, str]] = []  # (kind, text)

    for node in reversed(nodes[: index[target.name] + 1]):
        live = node.name in state
        if not live and node.name not in reached_only:
            continue
        if node.kind == "input":
            if live and node is not image:
                bad.append(_Unmappable(node, "is a model input other than the image"))
            continue
        try:
            edges = _edges(node, by_name, notes, pointwise)
        except _Unmappable as err:
            bad.append(err)
            reached_only.update(src for src, _ in node.sources)
            continue
        if not live:
            reached_only.update(src for src, *_ in edges)
            continue
        edges_of[node.name] = edges
        rows, cols = state[node.name]
        for src, rmap, cmap, src_hw in edges:
            r = _back(rows, rmap, src_hw[0])
            c = _back(cols, cmap, src_hw[1])
            prev = state.get(src, (None, None))
            state[src] = (_union(prev[0], r), _union(prev[1], c))

    if bad:
        raise min(bad, key=lambda e: index[e.node.name])
    if out_hw is None:
        raise _Unmappable(target, "has no spatial dimensions")
    if image.name not in state:
        raise _Unmappable(target, "does not depend on the image input")

    stride = {image.name: (1.0, 1.0)}
    for node in nodes[: index[target.name] + 1]:
        if node.name in edges_of:
            cand = [(stride[src][0] * rm.stride, stride[src][1] * cm.stride)
                    for src, rm, cm, _ in edges_of[node.name] if src in stride]
            if cand:
                stride[node.name] = (max(v[0] for v in cand), max(v[1] for v in cand))
    rf_stride = tuple(int(v) if float(v).is_integer() else float(v) for v in stride.get(target.name, (1, 1)))

    rows_ax, cols_ax = state[image.name]
    rows, row_off = _boxes(rows_ax)
    cols, col_off = _boxes(cols_ax)
    frame = (int(rows[out_hw[0] // 2, 1] - rows[out_hw[0] // 2, 0]),
             int(cols[out_hw[1] // 2, 1] - cols[out_hw[1] // 2, 0]))
    # Where a field is larger than the image (deep layers), the uncut offset would push
    # a border box mostly out of the frame; keep the whole box inside, on the far side.
    row_off = np.clip(row_off, 0, np.maximum(frame[0] - (rows[:, 1] - rows[:, 0]), 0)).astype(np.int32)
    col_off = np.clip(col_off, 0, np.maximum(frame[1] - (cols[:, 1] - cols[:, 0]), 0)).astype(np.int32)
    details = list(dict.fromkeys(text for _, text in notes))
    message = "; ".join(details)
    if message:
        message += "; boxes show the local receptive field"
        log.info("layer %s: %s", target.name, notes_summary(notes))
        for text in details:
            log.debug("layer %s: %s", target.name, text)
    return Geometry(rows=rows, cols=cols, row_offset=row_off, col_offset=col_off, frame=frame,
                    rf_size=frame, rf_stride=rf_stride,
                    input_size=in_hw, mappable=True, message=message)


def _boxes(ax: _Axis) -> tuple[np.ndarray, np.ndarray]:
    """Clipped [lo, hi) per target unit and its offset inside the frame."""
    mask = ax.mask
    n = mask.shape[1]
    any_ = mask.any(axis=1)
    lo = np.where(any_, mask.argmax(axis=1), 0)
    hi = np.where(any_, n - mask[:, ::-1].argmax(axis=1), 0)
    offset = np.where(any_, lo - ax.lo, 0)
    return np.stack([lo, hi], axis=1).astype(np.int32), offset.astype(np.int32)


def _image_input(model, nodes) -> tuple[graph.FlatNode, tuple[int, int]]:
    for node in nodes:
        if node.kind != "input" or len(node.output_shape) != 3:
            continue
        shape = node.output_shape
        hw = shape[0:2] if keras.config.image_data_format() == "channels_last" else shape[1:3]
        if any(v is None for v in hw):
            raise PipelineError(
                f"model {model.name!r} has no fixed input size (input shape {shape}); "
                "set model.input_size so receptive fields can be computed")
        return node, (int(hw[0]), int(hw[1]))
    raise PipelineError(f"model {model.name!r} has no image input (no input with shape H, W, C)")


# what a note left out of a receptive field, said once per kind in the log's summary line
WHOLE_MAP_NOTE = "normalise with statistics of the whole map (left out)"
BROADCAST_NOTE = "ignore an input broadcast from a 1x1 map (e.g. a squeeze-and-excitation gate)"


def notes_summary(notes: list[tuple[str, str]]) -> str:
    """One short line for the notes of a layer's receptive field: a count per kind (one
    layer named), the note itself where it is the only one of its kind."""
    by_kind: dict[str, list[str]] = {}
    for kind, text in dict.fromkeys(notes):
        by_kind.setdefault(kind, []).append(text)
    parts = []
    for kind, texts in by_kind.items():
        if len(texts) == 1:
            parts.append(texts[0])
        else:
            parts.append(f"{len(texts)} layers {kind}, such as {texts[0].split(' ', 1)[0]}")
    extra = " (each at debug level)" if any(len(t) > 1 for t in by_kind.values()) else ""
    return "; ".join(parts) + "; boxes show the local receptive field" + extra


def _whole_image(out_hw: tuple[int, int], in_hw: tuple[int, int], message: str) -> Geometry:
    h, w = out_hw
    rows = np.tile(np.array([[0, in_hw[0]]], np.int32), (h, 1))
    cols = np.tile(np.array([[0, in_hw[1]]], np.int32), (w, 1))
    return Geometry(rows=rows, cols=cols, row_offset=np.zeros(h, np.int32),
                    col_offset=np.zeros(w, np.int32), frame=tuple(in_hw), rf_size=tuple(in_hw),
                    rf_stride=tuple(in_hw), input_size=tuple(in_hw), mappable=False,
                    message=message)
