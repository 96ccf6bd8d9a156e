"""What a classifier's head emits, the loss that matches it, and models that always emit probabilities.

Never assumed: a user's model (and every zoo model) is inspected. ``softmax`` heads emit
probabilities; ``linear`` heads emit logits (many Keras examples and most PyTorch-style exports) and
are trained with ``from_logits=True``, then exported with a softmax appended, so every variant emits
probabilities and the device's confidence, the drift rule's 0.85 floor and the cascade threshold
mean what they say. Anything else (a sigmoid multi-label head, relu, tanh, a layer without an
activation) is refused, naming the layer.
"""

from __future__ import annotations

from typing import Any, Literal

from tasks.errors import ModelZooError

OutputKind = Literal["probabilities", "logits"]
EXPORT_SOFTMAX_NAME = "edgeloop_export_softmax"
# layers that pass values through unchanged (at inference): look behind them for the real head
PASS_THROUGH = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "Flatten", "Reshape",
                "ActivityRegularization")


def _head_layer(model: Any) -> Any:
    layer = model.layers[-1]
    while type(layer).__name__ in PASS_THROUGH and layer.inbound_nodes:
        inbound = layer.inbound_nodes[0].inbound_layers
        layer = inbound[0] if isinstance(inbound, list) else inbound
    return layer


def _activation_name(layer: Any) -> str | None:
    import tf_keras as keras

    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    return None if activation is None else getattr(activation, "__name__", str(activation))


def output_kind(model: Any) -> OutputKind:
    """``probabilities`` (softmax head) or ``logits`` (linear head); :class:`ModelZooError` for anything else."""
    layer = _head_layer(model)
    activation = _activation_name(layer)
    if activation == "softmax":
        return "probabilities"
    if activation == "linear":
        return "logits"
    what = f"ends in activation {activation!r}" if activation else "has no activation edgeloop can read"
    hint = (" (a sigmoid head scores each class on its own: multi-label or binary, but edgeloop trains "
            "single-label classifiers, one class per image)" if activation == "sigmoid" else "")
    raise ModelZooError(
        f"the model's output layer {layer.name!r} ({type(layer).__name__}) {what}{hint}; end the model with "
        f"Dense(num_classes) for logits or Dense(num_classes, activation='softmax') for probabilities")


def loss(kind: OutputKind) -> Any:
    """The sparse categorical cross-entropy that matches the head."""
    import tf_keras as keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=kind == "logits")


def with_probabilities(model: Any, kind: OutputKind) -> Any:
    """``model`` itself for a softmax head; for a logits head, the same model with a softmax appended."""
    if kind == "probabilities":
        return model
    import tf_keras as keras

    outputs = keras.layers.Softmax(name=EXPORT_SOFTMAX_NAME)(model.outputs[0])
    return keras.Model(model.inputs, outputs, name=model.name)
