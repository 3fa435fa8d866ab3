"""Convolution kernels of a model: the kernel table, which convolution feeds a layer one
channel to one channel, and the stored weights (the filters stage writes them)."""

from __future__ import annotations

import h5py
import keras
import numpy as np

from pipeline.render.filters import KERNEL_TABLE, Kernel
from pipeline.store import stored_name, write_strings

WEIGHT_MODES = ("selected", "all", "none")

_CONV = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
         keras.layers.Conv2DTranspose)
# layers that pass a convolution's channels through one to one
_PASS = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation, keras.layers.LeakyReLU,
         keras.layers.ELU, keras.layers.PReLU, keras.layers.ZeroPadding2D, keras.layers.Cropping2D,
         keras.layers.Dropout, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
         keras.layers.SpatialDropout2D, keras.layers.LayerNormalization)


def conv_kernels(model: keras.Model) -> list[Kernel]:
    """Every convolution kernel of `model` (nested models included), in graph order."""
    from pipeline.graph import flat_layers

    rows, seen = [], set()
    for node in flat_layers(model):
        layer = node.layer
        if not isinstance(layer, _CONV) or id(layer) in seen:
            continue
        seen.add(id(layer))
        for var in kernel_variables(layer):
            rows.append(Kernel(node.name, type(layer).__name__, var, tuple(int(d) for d in getattr(layer, var).shape)))
    return rows


def kernel_variables(layer) -> list[str]:
    if isinstance(layer, keras.layers.SeparableConv2D):
        return ["depthwise_kernel", "pointwise_kernel"]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return ["kernel"] if hasattr(layer, "kernel") else ["depthwise_kernel"]
    return ["kernel"]


def feeding_conv(model: keras.Model, name: str) -> str | None:
    """The convolution whose channels `name` passes on one to one (through batch norm,
    activations, padding, pooling), or None."""
    from pipeline.graph import flat_layers

    by_name = {n.name: n for n in flat_layers(model)}
    node = by_name.get(name)
    while node is not None:
        if isinstance(node.layer, _CONV):
            return node.name
        if not isinstance(node.layer, _PASS) or len(node.inputs) != 1:
            return None
        node = by_name.get(node.inputs[0])
    return None


def weight_layers(mode: str, model, kernels: list[Kernel], pattern_layers: list[str]) -> list[str]:
    convs = list(dict.fromkeys(k.layer for k in kernels))
    if mode == "none" or not convs:
        return []
    if mode == "all":
        return convs
    chosen = {convs[0]}
    for name in pattern_layers:
        conv = feeding_conv(model, name)
        if conv is not None:
            chosen.add(conv)
    return [c for c in convs if c in chosen]


def write_weights(f: h5py.File, model, names: list[str]) -> None:
    from pipeline.graph import flat_layers

    layers = {n.name: n.layer for n in flat_layers(model)}
    for name in names:
        layer = layers[name]
        g = f.require_group(f"filters/{stored_name(name)}")
        variables = kernel_variables(layer)
        main = np.asarray(getattr(layer, variables[0]).numpy(), np.float32)
        if isinstance(layer, keras.layers.Conv2DTranspose):  # Keras holds (kh, kw, out, in)
            main = main.transpose(0, 1, 3, 2)
        g.create_dataset("weights", data=main, compression="gzip", shuffle=True)
        if len(variables) > 1:
            g.create_dataset("pointwise", data=np.asarray(getattr(layer, variables[1]).numpy(), np.float32),
                             compression="gzip", shuffle=True)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            g["bias"] = np.asarray(bias.numpy(), np.float32)
        g.attrs.update(name=name, kind=type(layer).__name__,
                       kernel_shape=np.asarray(main.shape, np.int64))


def write_conv_links(f: h5py.File, model, jobs: list, weight_layers: list[str]) -> None:
    """filters/<layer>.attrs['conv']: the convolution whose stored weights make the units
    of a pattern layer (unit cards read it instead of guessing from names)."""
    for job in jobs:
        conv = feeding_conv(model, job.layer)
        if conv is not None and conv in weight_layers and stored_name(conv) != job.key:
            f.require_group(f"filters/{job.key}").attrs["conv"] = conv



def write_kernel_table(root: h5py.Group, kernels: list[Kernel]) -> None:
    t = root.create_group(KERNEL_TABLE)
    write_strings(t, "layer", [k.layer for k in kernels])
    write_strings(t, "kind", [k.kind for k in kernels])
    write_strings(t, "variable", [k.variable for k in kernels])
    shapes = np.zeros((len(kernels), 4), np.int64)
    for i, k in enumerate(kernels):
        shapes[i, :len(k.shape)] = k.shape[:4]
    t["shape"] = shapes
