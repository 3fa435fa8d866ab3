"""Walk a Keras 3 functional model as one flat graph, nested models expanded.

Keras keeps a model used as a layer inside another model as a single node of the
outer graph, and the tensors inside it belong to the inner model's own graph:
`keras.Model(outer.inputs, inner_layer.output)` fails with "Graph disconnected".
This module flattens such models into one graph of layer calls with qualified
names ('<outer model-layer name>/<inner layer name>', recursively), and builds
feature-extraction models by calling the same layer objects again on fresh
tensors, so weights are shared, never copied (`replay` is that one loop, used by
every module that rebuilds a graph). `logits_head` finds the class logits of a
classifier's output.

Naming rules:

* a layer called once in a model is named after the layer;
* the second, third ... call of the same layer object inside one model is
  'name@1', 'name@2' ... (a nested model called twice gives 'inner' and
  'inner@1', and its layers 'inner/conv' and 'inner@1/conv');
* the model input(s) get nodes of kind 'input', named after their InputLayer;
  the InputLayers of nested models are not nodes: their consumers read directly
  from whatever feeds the nested model.

Keras internals used (stable across Keras 3 releases, but private):
`KerasTensor._keras_history` (operation, node_index, tensor_index),
`Operation._inbound_nodes`, and `Node.arguments` / `Node.input_tensors` /
`Node.outputs`.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import keras

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

Ref = tuple[str, int]  # (qualified node name, output index)


@dataclass(frozen=True, eq=False)
class FlatNode:
    """One call of one layer (or a model input) in the flattened graph."""

    name: str  # qualified, unique within the flattened graph
    layer: Any  # the Keras layer/operation object that was called
    inputs: list[str]  # qualified names of the nodes feeding this one, in call order
    output_shape: tuple  # shape of the (first) output, without the batch axis
    kind: str = "layer"  # 'input' | 'layer' | 'op' (a keras.ops call) | 'model' (not expandable)
    depth: int = 0  # nesting depth: 0 for nodes of the outer model itself
    sources: tuple[Ref, ...] = ()  # (producer, output index) per input tensor, in call order
    output_shapes: tuple[tuple, ...] = ()  # every output, without the batch axis
    call: Any = field(default=None, repr=False)  # the keras Node of this call (None for inputs)
    tensors: tuple = field(default=(), repr=False)  # the symbolic outputs of this call


@dataclass(frozen=True)
class _Flat:
    nodes: list[FlatNode]
    aliases: dict[str, str]  # nested model name -> qualified name of its output node


def flat_layers(model) -> list[FlatNode]:
    """All layer calls of `model` in topological order, nested models expanded."""
    return _flatten(model).nodes


def ancestors(by_name: dict[str, FlatNode], names: Iterable[str]) -> set[str]:
    """`names` and every node they depend on (names qualified, `by_name` from flat_layers)."""
    needed, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(src for src, _ in by_name[name].sources)
    return needed


def resolve_layer_names(model, names: str | Iterable[str], renamed: Mapping[str, str] | None = None) -> list[str]:
    """Map user-given layer names to qualified node names.

    Accepted, in this order: a qualified name; a name TensorFlow refused, through
    `renamed` (old -> new: the loaded model's ModelBundle.renamed); the name of a nested
    model (meaning its single output); an unqualified inner name that matches exactly
    one node ('conv1' for 'backbone/conv1'). Anything else raises PipelineError, one
    line, with the nearest valid names.
    """
    return _resolve(model, _flatten(model), names, renamed)


def feature_model(model, names: str | Iterable[str], name: str | None = None) -> keras.Model:
    """A functional model from `model.inputs` to the outputs of the named nodes.

    Outputs follow the order of `names`; with a single name Keras makes the model
    return a bare tensor instead of a one-element list. Nodes of the outer model
    reuse their existing symbolic tensors; only layers inside nested models are
    called again (on tensors traced from the outer graph), so the new model shares
    every weight with `model` and computes only what the requested outputs need.
    """
    flat = _flatten(model)
    qualified = _resolve(model, flat, names)
    by_name = {n.name: n for n in flat.nodes}
    order = {n.name: i for i, n in enumerate(flat.nodes)}

    needed: set[str] = set()
    stack = [q for q in qualified if by_name[q].depth > 0]
    while stack:
        q = stack.pop()
        if q in needed:
            continue
        needed.add(q)
        stack.extend(src for src, _ in by_name[q].sources if by_name[src].depth > 0)

    # outer nodes keep their own symbolic tensors; only the nested calls are replayed
    values: dict[Ref, Any] = {(n.name, i): t for n in flat.nodes if n.depth == 0
                              for i, t in enumerate(n.tensors)}
    values = replay([by_name[q] for q in sorted(needed, key=order.__getitem__)], values)

    outputs = [values[(q, 0)] for q in qualified]
    log.debug("feature model for %s: %d nested layer call(s) replayed", qualified, len(needed))
    inputs = model.inputs
    # same input structure as the model: one tensor, or the model's own list/dict
    inputs = inputs[0] if len(inputs) == 1 else model.input
    return keras.Model(inputs=inputs, outputs=outputs, name=name or f"{model.name}_features")


def replay(nodes: Iterable[FlatNode], values: dict[Ref, Any],
           call: Callable[[FlatNode, tuple, dict], Any] | None = None) -> dict[Ref, Any]:
    """Call the layers of `nodes` again, in the given order, on the tensors in `values`.

    Keras keeps a nested model as one node of the outer graph, so its inner tensors
    cannot be outputs of a new model; calling the same layer objects again on new
    tensors gives a connected graph with every weight shared. `values` maps
    (qualified node name, output index) to a tensor and must hold every source of
    the first node that reads it; `nodes` (FlatNodes with a call, producers before
    consumers) fill it in. Each node's call arguments are those of its recorded
    call with the tensors swapped; `call(node, args, kwargs)` replaces the plain
    `node.layer(*args, **kwargs)` when given. Returns a new dict: `values` plus
    every flattened output of every node, under (node.name, i).
    """
    values = dict(values)
    for node in nodes:
        fill = {id(kt): values[src] for kt, src in zip(node.call.input_tensors, node.sources)}
        args, kwargs = node.call.arguments.fill_in(fill)
        out = node.layer(*args, **kwargs) if call is None else call(node, args, kwargs)
        for i, t in enumerate(keras.tree.flatten(out)):
            values[(node.name, i)] = t
    return values


# ---------------------------------------------------------------------------
# class logits


class NoClassScores(PipelineError):
    """The model (or its chosen output) gives no vector of class scores."""


_SQUASHING = ("softmax", "sigmoid")


def output_names(model) -> list[str]:
    return [t._keras_history.operation.name for t in model.outputs]


def choose_output(model, output=None) -> int:
    """Index of the model output that `model.output` names (a name or an index; None: the
    first, said once when the model has several)."""
    names = output_names(model)
    if output is None:
        if len(names) > 1:
            log.info("model has %d outputs (%s): explaining the first, %s (model.output=NAME|INDEX "
                     "chooses another)", len(names), ", ".join(names), names[0])
        return 0
    if isinstance(output, int) or str(output).lstrip("-").isdigit():
        index = int(output)
        if not -len(names) <= index < len(names):
            raise PipelineError(f"model.output={output}: the model has outputs 0 to {len(names) - 1} "
                                f"({', '.join(names)})")
        return index % len(names)
    if str(output) not in names:
        raise PipelineError(f"model.output={output} is not an output of the model: use one of "
                            f"{', '.join(names)} (or an index)")
    return names.index(str(output))


def logits_head(model, output=None) -> tuple[str, Callable | None]:
    """(node name, head) such that head(output of node) gives the class logits.

    The node is the chosen model output (`model.output`: name or index; the first by
    default), or, when it ends in a softmax or sigmoid, the input of that layer; for a
    Dense layer with such an activation the head computes x @ W + b. The head is None
    when the node's output is the logits itself. Never a probability.
    """
    out = model.outputs[choose_output(model, output)]
    nodes = flat_layers(model)
    node = next((n for n in nodes if any(t is out for t in n.tensors)), None)
    if node is None:  # the output of a nested model: Keras names it after the nested model
        qualified = resolve_layer_names(model, [out._keras_history.operation.name])[0]
        node = next(n for n in nodes if n.name == qualified)
    if len(node.output_shape) != 1:
        raise NoClassScores(f"model {model.name!r} outputs shape {node.output_shape}, not a vector of class "
                            "scores: the Grad-CAM family, occlusion and class patterns need a classifier")
    squash = _is_squashing(node.layer)
    if squash is None:
        return node.name, None
    source = node.sources[0][0]
    if isinstance(node.layer, keras.layers.Dense):
        dense = node.layer

        def head(z):
            y = keras.ops.matmul(z, dense.kernel)
            return y + dense.bias if dense.bias is not None else y

        log.info("model ends in %s with %s: using x @ W + b of its input %s as logits",
                 node.name, squash, source)
        return source, head
    if isinstance(node.layer, (keras.layers.Activation, keras.layers.Softmax)) or node.kind == "op":
        log.info("model ends in %s (%s): using its input %s as logits", node.name, squash, source)
        return source, None
    raise PipelineError(f"model {model.name!r} ends in {node.name} with a {squash} activation that cannot be "
                        "undone: give a model that outputs logits")


def _is_squashing(layer) -> str | None:
    """'softmax'/'sigmoid' when the layer turns logits into probabilities, else None."""
    if isinstance(layer, keras.layers.Softmax) or type(layer).__name__ in ("Softmax", "Sigmoid"):
        return type(layer).__name__.lower()
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None)
    if name in _SQUASHING:
        return name
    return None


# ---------------------------------------------------------------------------
# internals


def _model_io(model) -> tuple[list, list] | None:
    """(inputs, outputs) of a functional/Sequential model, None when it has no graph."""
    if not isinstance(model, keras.Model):
        return None
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError, TypeError):
        return None
    if not inputs or not outputs:
        return None
    return inputs, outputs


def _flatten(model) -> _Flat:
    io = _model_io(model)
    if io is None:
        raise PipelineError(
            f"model {getattr(model, 'name', model)!r} has no functional graph (subclassed, or a "
            "Sequential model without an input shape); build it with keras.Input / an input shape")
    inputs, _ = io
    nodes: list[FlatNode] = []
    aliases: dict[str, str] = {}
    refs: list[Ref] = []
    seen: set[str] = set()
    for t in inputs:
        op = t._keras_history.operation if hasattr(t, "_keras_history") else None
        base = op.name if op is not None else (getattr(t, "name", None) or "input")
        qname, k = base, 0
        while qname in seen:
            k += 1
            qname = f"{base}@{k}"
        seen.add(qname)
        nodes.append(FlatNode(name=qname, layer=op, inputs=[], output_shape=tuple(t.shape[1:]),
                              kind="input", depth=0, output_shapes=(tuple(t.shape[1:]),),
                              tensors=(t,)))
        refs.append((qname, 0))
    _walk(model, "", refs, 0, nodes, aliases)
    return _Flat(nodes, aliases)


def _walk(model, prefix: str, input_refs: list[Ref], depth: int,
          out: list[FlatNode], aliases: dict[str, str]) -> list[Ref]:
    """Append the nodes of `model` (inputs already mapped to `input_refs`) to `out`."""
    inputs, outputs = _model_io(model)
    ref: dict[int, Ref] = {id(t): r for t, r in zip(inputs, input_refs)}
    calls: dict[int, int] = {}
    for node in _topo_nodes(model, inputs, outputs):
        op = node.operation
        k = calls.get(id(op), 0)
        calls[id(op)] = k + 1
        qname = prefix + (op.name if k == 0 else f"{op.name}@{k}")
        sources = tuple(ref[id(t)] for t in node.input_tensors)

        inner_io = _model_io(op)
        call_inputs = _call_inputs(node)
        if inner_io is not None and len(call_inputs) == len(inner_io[0]):
            inner_refs = [ref[id(t)] for t in call_inputs]
            out_refs = _walk(op, qname + "/", inner_refs, depth + 1, out, aliases)
            for t, r in zip(node.outputs, out_refs):
                ref[id(t)] = r
            if len(out_refs) == 1:
                aliases[qname] = out_refs[0][0]
            continue
        if inner_io is not None:
            log.warning("nested model %r is called with %d tensor(s) but has %d input(s); "
                        "kept as one opaque node", qname, len(call_inputs), len(inner_io[0]))

        if isinstance(op, keras.Model):
            kind = "model"
        elif isinstance(op, keras.layers.Layer):
            kind = "layer"
        else:
            kind = "op"
        shapes = tuple(tuple(t.shape[1:]) for t in node.outputs)
        out.append(FlatNode(name=qname, layer=op, inputs=[s for s, _ in sources],
                            output_shape=shapes[0] if shapes else (), kind=kind, depth=depth,
                            sources=sources, output_shapes=shapes, call=node,
                            tensors=tuple(node.outputs)))
        for i, t in enumerate(node.outputs):
            ref[id(t)] = (qname, i)
    missing = [t for t in outputs if id(t) not in ref]
    if missing:  # pragma: no cover - Keras validates this when building the model
        raise PipelineError(f"model {model.name!r}: output {missing[0].name!r} is not connected "
                            "to its inputs")
    return [ref[id(t)] for t in outputs]


def _call_inputs(node) -> list:
    """The tensors passed as the first positional argument (what a model maps to its inputs)."""
    args = node.arguments.args
    if args:
        return [t for t in keras.tree.flatten(args[0]) if hasattr(t, "_keras_history")]
    return list(node.input_tensors)


def _topo_nodes(model, inputs: list, outputs: list) -> list:
    """The keras Nodes between `inputs` and `outputs`, producers before consumers."""
    stop = {id(t) for t in inputs}

    def producer(t):
        if id(t) in stop:
            return None
        hist = getattr(t, "_keras_history", None)
        if hist is None or hist.operation is None:
            raise PipelineError(f"model {model.name!r}: tensor {t.name!r} has no producing layer")
        node = hist.operation._inbound_nodes[hist.node_index]
        if node.is_input:
            raise PipelineError(f"model {model.name!r}: input {hist.operation.name!r} is used "
                                "but is not one of the model's inputs")
        return node

    order, state = [], {}
    stack = [(n, False) for n in (producer(t) for t in reversed(outputs)) if n is not None]
    while stack:
        node, finished = stack.pop()
        if finished:
            state[id(node)] = 2
            order.append(node)
            continue
        if id(node) in state:
            continue
        state[id(node)] = 1
        stack.append((node, True))
        for t in reversed(node.input_tensors):
            parent = producer(t)
            if parent is not None and id(parent) not in state:
                stack.append((parent, False))
    return order


def _resolve(model, flat: _Flat, names: str | Iterable[str], renamed: Mapping[str, str] | None = None) -> list[str]:
    if isinstance(names, str):
        names = [names]
    valid = [n.name for n in flat.nodes]
    known = set(valid)
    renamed = renamed or {}
    out = []
    for name in names:
        name = str(name)
        if name not in known and name in renamed:
            name = renamed[name]
        if name in known:
            out.append(name)
            continue
        if name in flat.aliases:
            log.info("layer %r is a nested model; using its output %r", name, flat.aliases[name])
            out.append(flat.aliases[name])
            continue
        suffix = [v for v in valid if v.endswith("/" + name)]
        if len(suffix) == 1:
            log.info("layer %r resolved to %r", name, suffix[0])
            out.append(suffix[0])
            continue
        if len(suffix) > 1:
            raise PipelineError(
                f"layer name {name!r} is ambiguous in model {model.name!r}: it matches "
                f"{', '.join(suffix[:6])}{' ...' if len(suffix) > 6 else ''}; "
                "use the qualified name")
        close = difflib.get_close_matches(name, valid + list(flat.aliases), n=5, cutoff=0.5)
        hint = f"nearest: {', '.join(close)}" if close else "no similar names"
        raise PipelineError(
            f"unknown layer {name!r} in model {model.name!r} ({hint}); "
            "see the model summary for all layer names")
    return out
