"""Config round trips of layers: `get_config()` is exactly the constructor arguments.

`assert_config_round_trip(cls, args, inputs)` constructs `cls` with `args` (every
constructor argument, each with a non-default value, checked against the signature)
plus non-default Keras base arguments (name, trainable, dtype), and asserts that

* `get_config()` returns exactly those arguments: each key and value, nothing missing,
  nothing extra;
* `cls.from_config(get_config())` builds a new layer whose config is again exactly
  those arguments;
* given `inputs`, the rebuilt layer with the original's weights computes the same
  outputs (bit for bit).
"""

import inspect

import keras
import numpy as np
import tensorflow as tf

# Non-default values of the arguments every Keras layer takes (its **kwargs).
BASE_ARGS = {
    "name": "config_probe",
    "trainable": False,
    "dtype": keras.dtype_policies.serialize(keras.DTypePolicy("float64")),
}


def seeded_initializer(class_name="HeNormal", seed=7):
    """A seeded initializer in the serialized form that `get_config()` returns."""
    return keras.initializers.serialize(getattr(keras.initializers, class_name)(seed=seed))


def constructor_arguments(cls):
    """{name: default or inspect.Parameter.empty} of `cls.__init__` (no self, **kwargs)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def _assert_every_argument_non_default(cls, args):
    expected = constructor_arguments(cls)
    assert sorted(args) == sorted(expected), (
        f"{cls.__name__}: the test must set every constructor argument; missing "
        f"{sorted(set(expected) - set(args))}, unknown {sorted(set(args) - set(expected))}"
    )
    for name, default in expected.items():
        if default is not inspect.Parameter.empty:
            assert args[name] != default, f"{cls.__name__}({name}=...) is its default {default!r}"


def _flat(outputs):
    return [np.asarray(t) for t in tf.nest.flatten(outputs)]


def assert_config_round_trip(cls, args, inputs=None, call_kwargs=None):
    """See the module doc. `inputs`: list of positional call arguments. Returns (layer, clone)."""
    _assert_every_argument_non_default(cls, args)
    for name, value in BASE_ARGS.items():
        layer_default = inspect.signature(keras.layers.Layer.__init__).parameters[name].default
        assert value != layer_default, name
    full = {**BASE_ARGS, **args}
    layer = cls(**full)
    config = layer.get_config()
    assert config == full, (
        f"{cls.__name__}.get_config() differs from its constructor arguments: missing "
        f"{sorted(set(full) - set(config))}, extra {sorted(set(config) - set(full))}, "
        f"changed {sorted(k for k in set(full) & set(config) if full[k] != config[k])}"
    )
    clone = cls.from_config(config)
    assert clone is not layer
    assert clone.get_config() == full
    if inputs is not None:
        call_kwargs = call_kwargs or {}
        expected = _flat(layer(*inputs, **call_kwargs))
        clone(*inputs, **call_kwargs)  # builds the clone's weights
        assert len(clone.weights) == len(layer.weights)
        clone.set_weights(layer.get_weights())
        got = _flat(clone(*inputs, **call_kwargs))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    return layer, clone
