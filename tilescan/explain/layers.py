"""Where a CAM looks: candidate layers, the logits tensor, and the model split at a layer.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError, ModelError
from ..model import DEFAULT_CAM_LAYER

LOGITS_LAYER = "logits"

#: Largest Dense kernel (features x classes) whose logits :func:`split_model` computes as
#: per-image sums (:func:`_row_dense`; the shipped model's: 512 x 30).
ROW_DENSE_MAX = 1 << 16


def _keras():
    from ..backend import import_keras  # lazily: importing this module must not import TensorFlow

    return import_keras()  # with tilescan's settings for TensorFlow, if this starts it


# --------------------------------------------------------------------------------------
# Splitting the model at a layer
# --------------------------------------------------------------------------------------


def candidate_layers(model) -> list[str]:
    """Layers a CAM can target: those with a 4-D (B, h, w, k) output, shallow to deep.

    For a tilescan ResNet-18 the useful ones are the block outputs ``conv{2..5}_block{1,2}_out``.
    """
    names = []
    for layer in model.layers:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and type(layer).__name__ != "InputLayer":
            names.append(layer.name)
    return names


def _block_outputs(model) -> list[str]:
    names = [n for n in candidate_layers(model) if n.endswith("_out")]
    return names or candidate_layers(model)


def _logits_tensor(model):
    """The symbolic logits of ``model``: the ``logits`` layer, else the input of a final
    softmax layer."""
    names = {l.name for l in model.layers}
    if LOGITS_LAYER in names:
        return model.get_layer(LOGITS_LAYER).output
    last = model.layers[-1]
    act = getattr(last, "activation", None)
    if type(last).__name__ == "Activation" and getattr(act, "__name__", "") == "softmax":
        return last.input
    raise ModelError(
        f"model {model.name!r} has no '{LOGITS_LAYER}' layer and does not end in a softmax "
        "Activation; CAMs explain the pre-softmax logits"
    )


def resolve_layer(model, layer: str | None = None) -> str:
    """The layer name a CAM will use (``None``: ``conv5_block2_out``, else the deepest 4-D
    layer). Raises ConfigError naming the candidates for an unknown or unusable layer."""
    candidates = candidate_layers(model)
    if layer is None:
        if DEFAULT_CAM_LAYER in candidates:
            return DEFAULT_CAM_LAYER
        if not candidates:
            raise ConfigError(f"model {model.name!r} has no layer with a (B, h, w, k) output to explain")
        return candidates[-1]
    if layer not in candidates:
        known = {l.name for l in model.layers}
        why = "has no (B, h, w, k) output" if layer in known else "is not a layer of the model"
        raise ConfigError(
            f"CAM layer {layer!r} {why}; candidate layers: {', '.join(_block_outputs(model))}"
        )
    return layer


def _rebuild_head(model, start_tensor, end_tensor):
    """Fallback head builder: re-apply the layers between ``start_tensor`` and
    ``end_tensor`` to a fresh ``keras.Input`` by walking the functional graph (nodes record
    their operation and call arguments). Residual branches are handled because every node
    is rebuilt once from its own inputs; a branch that reaches the model input without
    passing through ``start_tensor`` means the layer does not separate input from logits.
    """
    keras = _keras()
    fresh = keras.Input(shape=tuple(start_tensor.shape[1:]), dtype=start_tensor.dtype, name="cam_acts")
    built: dict[int, Any] = {id(start_tensor): fresh}

    def build(t):
        if id(t) in built:
            return built[id(t)]
        op, node_index, _ = t._keras_history
        node = op._inbound_nodes[node_index]
        if not node.input_tensors:
            raise ConfigError("the CAM layer does not separate the model input from the logits")
        for parent in node.input_tensors:
            build(parent)
        args, kwargs = node.arguments.fill_in(built)
        outs = op(*args, **kwargs)
        flat = outs if isinstance(outs, (list, tuple)) else [outs]
        for old, new in zip(node.outputs, flat):
            built[id(old)] = new
        return built[id(t)]

    return keras.Model(fresh, build(end_tensor), name="cam_head")


def split_model(model, layer: str, force_rebuild: bool = False):
    """(body, head, both): input -> acts, acts -> logits, input -> [acts, logits]."""
    keras = _keras()
    acts_t = model.get_layer(layer).output
    logits_t = _logits_tensor(model)
    inp = model.input
    if isinstance(inp, (list, tuple)):
        if len(inp) != 1:
            raise ModelError("CAMs need a single-input model")
        inp = inp[0]
    found = _gap_dense(model, layer)
    if found is not None and math.prod(found[0].kernel.shape) <= ROW_DENSE_MAX:
        logits_t = _row_dense(found[0])(found[1])  # each image's logits alike wherever it sits in the batch
    body = keras.Model(inp, acts_t, name="cam_body")
    both = keras.Model(inp, [acts_t, logits_t], name="cam_both")
    head = None
    if not force_rebuild:
        try:  # Keras 3 Functional accepts an intermediate tensor as input (it clones it)
            head = keras.Model(acts_t, logits_t, name="cam_head")
        except (ValueError, TypeError, KeyError):
            head = None
    if head is None:
        try:
            head = _rebuild_head(model, acts_t, logits_t)
        except ConfigError:
            raise ConfigError(
                f"CAM layer {layer!r} does not separate the model input from the logits (a "
                f"branch bypasses it); candidate layers: {', '.join(_block_outputs(model))}"
            ) from None
    return body, head, both


def _producer(tensor):
    """(operation, input tensors) of the node that made a symbolic tensor."""
    op, node_index, _ = tensor._keras_history
    return op, list(op._inbound_nodes[node_index].input_tensors)


def gap_dense_head(model, layer: str):
    """(kernel, bias) of the Dense layer when the head from ``layer`` to the logits is exactly
    GlobalAveragePooling2D -> Dense with a linear activation (a softmax ``predictions`` layer
    after the logits is allowed); None for any other head.

    Then d logit_c / d A_k(i, j) = kernel[k, c] / (h * w) everywhere, so Grad-CAM needs no
    backward pass. ``kernel`` (k, classes) and ``bias`` (classes,) or None are the layer's
    Keras variables, so a compiled step reads their current values.
    """
    found = _gap_dense(model, layer)
    if found is None:
        return None
    dense = found[0]
    return dense.kernel, (dense.bias if dense.use_bias else None)


def _gap_dense(model, layer: str):
    """(Dense layer, symbolic pooled tensor) of a GlobalAveragePooling2D -> Dense head after
    ``layer`` (:func:`gap_dense_head`), or None."""
    keras = _keras()
    try:
        acts_t = model.get_layer(layer).output
        dense, dense_in = _producer(_logits_tensor(model))
        if type(dense) is not keras.layers.Dense or len(dense_in) != 1:
            return None
        pool, pool_in = _producer(dense_in[0])
    except (AttributeError, IndexError, ValueError, ModelError):
        return None
    if type(pool) is not keras.layers.GlobalAveragePooling2D or len(pool_in) != 1 or pool_in[0] is not acts_t:
        return None
    if pool.data_format != "channels_last" or pool.keepdims:
        return None
    # exact Dense only: linear activation, plain float kernel (no LoRA, no quantised weights)
    if dense.activation is not keras.activations.linear or getattr(dense, "lora_enabled", False):
        return None
    if getattr(dense, "quantization_mode", None) or getattr(dense.dtype_policy, "quantization_mode", None):
        return None
    if len(dense.kernel.shape) != 2:
        return None
    return dense, dense_in[0]


def _row_dense(dense):
    """A layer computing ``dense``'s logits (with its own variables, in float32) as one sum of
    products per image and class, instead of the matrix product: a CPU matrix product (Eigen's,
    oneDNN's) adds up an image's products in an order that depends on the image's place in
    the batch, so its logits changed in the last bits when the same tile was batched with
    other tiles (several scenes at once, shards, a resumed run). Same maths; the gradient
    with respect to the pooled features is the same kernel column. It holds a batch x
    kernel array of products, hence only for kernels up to :data:`ROW_DENSE_MAX` values."""
    keras = _keras()
    ops = keras.ops

    class RowDense(keras.layers.Layer):
        def __init__(self):
            super().__init__(name=f"{dense.name}_rows", dtype="float32")
            self.dense = dense  # tracked: its kernel and bias are this layer's variables

        def call(self, pooled):
            w = ops.transpose(ops.cast(self.dense.kernel, "float32"))  # (classes, k)
            out = ops.sum(ops.expand_dims(ops.cast(pooled, "float32"), 1) * ops.expand_dims(w, 0), axis=-1)
            return out + ops.cast(self.dense.bias, "float32") if self.dense.use_bias else out

        def compute_output_shape(self, input_shape):
            return (input_shape[0], int(self.dense.kernel.shape[1]))

    return RowDense()
