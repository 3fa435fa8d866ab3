"""Which layers to scan: presets and user-given names."""

from __future__ import annotations

import keras

from pipeline.errors import PipelineError
from pipeline.graph import flat_layers, resolve_layer_names

PRESETS = ("default", "activations", "conv", "last", "all")

_CONV = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
_ACTIVATIONS = (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.PReLU)


def _is_activation(layer) -> bool:
    if isinstance(layer, _ACTIVATIONS):
        return True
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    if isinstance(layer, keras.layers.Activation):
        return name not in ("linear", "softmax")
    return isinstance(layer, _CONV) and name not in ("linear", "None")


def _spatial(node) -> bool:
    shape = node.output_shape
    return len(shape) == 3 and shape[0] is not None and shape[0] > 1 and shape[1] > 1


def select_layers(model: keras.Model, layers, renamed=None) -> list[str]:
    """Qualified layer names for a preset name or a list of names (`renamed`: the
    bundle's names TensorFlow refused, old -> new)."""
    if isinstance(layers, str):
        if layers not in PRESETS:
            return resolve_layer_names(model, [layers], renamed)
        return preset(model, layers)
    names = [str(n) for n in layers]
    if not names:
        raise PipelineError("layers=[] selects nothing: name layers or use a preset "
                            f"({', '.join(PRESETS)})")
    return resolve_layer_names(model, names, renamed)


def chosen_layers(model: keras.Model, layers, renamed=None) -> list[tuple[str, str]]:
    """(stored key, qualified name) of each chosen layer. The key is the name as the user
    wrote it ('/' becomes '.'): layers=[inner] for a nested model is stored as layers/inner,
    whatever inner layer it resolves to; a preset's layers keep their qualified names."""
    from pipeline.store import stored_name

    qualified = select_layers(model, layers, renamed)
    if isinstance(layers, str) and layers in PRESETS:
        requested = qualified
    else:
        requested = [layers] if isinstance(layers, str) else [str(n) for n in layers]
    chosen: dict[str, str] = {}
    for name, resolved in zip(requested, qualified):
        key = stored_name(name)
        while chosen.get(key, resolved) != resolved:  # two layers, one safe name: tell them apart
            key += "_"
        chosen[key] = resolved  # the same layer asked for twice is kept once
    return list(chosen.items())


def preset(model: keras.Model, name: str) -> list[str]:
    """default: the last activation at each spatial resolution (stage ends);
    activations: every activation output; conv: every convolution output;
    last: the last spatial map; all: every spatial output."""
    nodes = [n for n in flat_layers(model) if _spatial(n) and getattr(n, "kind", "layer") != "input"]
    if name == "all":
        chosen = nodes
    elif name == "conv":
        chosen = [n for n in nodes if isinstance(n.layer, _CONV)]
    else:
        activations = [n for n in nodes if _is_activation(n.layer)] or \
            [n for n in nodes if isinstance(n.layer, _CONV)]
        if name == "activations":
            chosen = activations
        elif name == "last":
            chosen = activations[-1:] or nodes[-1:]
        else:
            last_at = {}
            for n in activations:
                last_at[tuple(n.output_shape[:2])] = n
            keep = {id(n) for n in last_at.values()}
            chosen = [n for n in activations if id(n) in keep]
    if not chosen:
        raise PipelineError(f"layer preset {name!r} selects nothing in this model: name layers with layers=[...]")
    return [n.name for n in chosen]


def default_layers(model, scanned: list[str]) -> list[str]:
    """The scanned layers plus the input of the model's last Dense layer (the classifier's
    feature vector, Zeiler & Fergus' layer 7) when there is one and it is not among them."""
    nodes = flat_layers(model)
    dense = [n for n in nodes if isinstance(n.layer, keras.layers.Dense)]
    names = list(scanned)
    if dense and dense[-1].inputs:
        source = dense[-1].inputs[0]
        node = next(n for n in nodes if n.name == source)
        if node.kind != "input" and source not in names:
            names.append(source)
    return names
