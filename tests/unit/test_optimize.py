import numpy as np
import pytest

from tasks.config import Params, PruneParams
from tasks.contracts import Dataset
from tasks.model import optimize
from tasks.model.keras_io import kernel_sparsity
from tasks.model.train import needs_qat


@pytest.mark.parametrize(
    ("strategy", "drop", "expected"),
    [("auto", 0.5, False), ("auto", 2.5, True), ("auto", 2.0, False), ("ptq", 9.0, False), ("qat", 0.0, True)],
)
def test_needs_qat_follows_the_recipe(strategy, drop, expected):
    wanted, reason = needs_qat(strategy, drop, 2.0)
    assert wanted is expected and reason


def _model_with_custom_layer():
    import tf_keras as keras

    from tasks.model.tfsetup import tensorflow

    tf = tensorflow()

    class Swish(keras.layers.Layer):  # a custom layer tfmot has no quantize config for
        def call(self, inputs):
            return inputs * tf.sigmoid(inputs)

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = Swish(name="custom_swish")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_unquantizable_layer_is_named_and_pipeline_falls_back():
    model = _model_with_custom_layer()
    assert optimize.unsupported_layers(model) == ["custom_swish"]
    outcome = optimize.quantize_aware(model)
    assert outcome.mode in ("partial", "fallback_ptq")
    assert outcome.unsupported_layers == ["custom_swish"]
    if outcome.mode == "partial":
        assert outcome.model is not None
        out = outcome.model.predict(np.zeros((1, 8, 8, 1), np.float32), verbose=0)
        assert out.shape == (1, 10)
    else:
        assert outcome.model is None and outcome.error


def test_supported_model_gets_full_qat(tiny_model):
    outcome = optimize.quantize_aware(optimize.copy_model(tiny_model))
    assert outcome.mode == "full" and outcome.unsupported_layers == []


def test_pruning_reaches_the_target_sparsity(tiny_model, digits):
    train = Dataset(digits.x[:300], digits.y[:300], digits.labels)
    val = Dataset(digits.x[300:400], digits.y[300:400], digits.labels)
    params = PruneParams(target_sparsities=[0.6], epochs=2)
    pruned = optimize.prune_to(tiny_model, 0.6, params, optimize.FineTuning(train, val, 32))
    assert abs(kernel_sparsity(pruned) - 0.6) < 0.02
    assert kernel_sparsity(tiny_model) < 0.01
    assert not any("prune" in layer.name for layer in pruned.layers)  # wrappers stripped


@pytest.mark.parametrize(("budget", "targets", "expect_highest"),
                         [(100.0, [0.3, 0.7], True), (0.0, [0.3, 0.99], False)])
def test_sparsity_search_keeps_highest_within_budget(tiny_model, digits, budget, targets, expect_highest):
    train = Dataset(digits.x[:300], digits.y[:300], digits.labels)
    val = Dataset(digits.x[300:500], digits.y[300:500], digits.labels)
    baseline = optimize.keras_accuracy(tiny_model, val)
    params = PruneParams(target_sparsities=targets, epochs=1, max_accuracy_drop_pts=budget)
    kept, trials, within = optimize.search_sparsity(tiny_model, baseline, params, optimize.FineTuning(train, val, 32))
    assert trials[0].target_sparsity == 0.3
    if expect_highest:
        assert within and len(trials) == 2
        assert abs(kernel_sparsity(kept) - 0.7) < 0.02
    else:  # keeping 1% of the weights costs accuracy: that trial is never the one kept
        assert trials[-1].drop_pts > 0.0
        assert kernel_sparsity(kept) < 0.5


def test_same_params_give_the_same_model(digits):
    """Seeded training is reproducible on the same machine."""
    from tasks.contracts import PreparedData
    from tasks.model.tfsetup import set_seeds
    from tasks.model.train import train_baseline

    params = Params.model_validate({"seed": 3, "train": {"epochs": 1, "batch_size": 64}})
    small = Dataset(digits.x[:256], digits.y[:256], digits.labels)
    prepared = PreparedData(small, small, small, small.x[:10])
    weights = []
    for _ in range(2):
        set_seeds(params.seed)
        weights.append(train_baseline(params.train, prepared)[0].get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*weights))


def test_unprunable_layer_is_reported_and_the_pruned_variant_skipped(digits, tmp_path):
    from tasks.contracts import Workspace
    from tasks.model.train import run_pruning

    model = _model_with_custom_layer()
    assert optimize.unsupported_layers(model, "prune") == ["custom_swish"]
    small = Dataset(digits.x[:64], digits.y[:64], digits.labels)
    params = Params.model_validate({"prune": {"epochs": 1, "target_sparsities": [0.5]}})
    tuning = optimize.FineTuning(small, small, 32)
    summary = run_pruning(model, 0.9, params.prune, params.quantize, tuning, Workspace(tmp_path))
    assert "supported layer" in summary.error and summary.unsupported_layers == ["custom_swish"]
    assert summary.int8 is None and summary.file is None


def test_a_bug_inside_tfmot_calls_is_not_mistaken_for_an_unsupported_layer():
    for bug in ("shapes do not broadcast", "can only convert an array of size 1 to a Python scalar"):
        with pytest.raises(ValueError, match=bug):
            with optimize.tfmot_refusals():
                raise ValueError(bug)
    with pytest.raises(optimize.TfmotRefused, match="is not supported"):
        with optimize.tfmot_refusals():
            raise RuntimeError("Layer x:<class 'X'> is not supported. You can quantize this layer by passing ...")


@pytest.mark.parametrize(("strategy", "pqat"), [("auto", True), ("qat", True), ("ptq", False)])
def test_pruned_int8_uses_pqat_unless_ptq_only(strategy, pqat):
    from tasks.model.train import pruned_int8_method

    assert pruned_int8_method(strategy)[0] is pqat
