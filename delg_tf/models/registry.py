"""Model families by name: `build_model(family, config)`.

Each family registers (model class, config class). "delg" is built in. Other
families (e.g. "glocal", in `delg_tf/models/glocal.py`) are imported lazily
from `LAZY_FAMILY_MODULES`: that module must call
`register_model("glocal", GlocalModel, GlocalModelConfig)` at import time.
"""

import dataclasses
import importlib
import logging

logger = logging.getLogger(__name__)

# family -> (model class, config class)
_FAMILIES = {}
# family -> module that registers it when imported (the hook for new families).
LAZY_FAMILY_MODULES = {
    "delg": "delg_tf.models.delg",
    "glocal": "delg_tf.models.glocal",
}


def register_model(family, model_cls, config_cls):
    """Registers a model family. `model_cls(config)` must build the model."""
    _FAMILIES[family] = (model_cls, config_cls)


def _lookup(family):
    if family not in _FAMILIES and family in LAZY_FAMILY_MODULES:
        try:
            importlib.import_module(LAZY_FAMILY_MODULES[family])
        except ImportError as error:
            raise ValueError(
                f"model family {family!r} is not available: importing "
                f"{LAZY_FAMILY_MODULES[family]} failed ({error})."
            ) from error
    if family not in _FAMILIES:
        raise ValueError(
            f"model family must be one of {sorted(LAZY_FAMILY_MODULES)}, received {family!r}."
        )
    return _FAMILIES[family]


def model_config_class(family):
    """The config dataclass of a family (e.g. `DelgModelConfig` for "delg")."""
    return _lookup(family)[1]


def model_class(family):
    """The model class of a family (e.g. `DelgModel` for "delg")."""
    return _lookup(family)[0]


def model_families():
    """Names of the known families."""
    return sorted(set(LAZY_FAMILY_MODULES) | set(_FAMILIES))


def build_model(family, config, load_imagenet=True):
    """Builds (and creates the weights of) a model.

    Args:
      family: "delg" (or a registered family such as "glocal").
      config: the family's config dataclass, or a dict of its fields.
      load_imagenet: when the config has `imagenet_weights`, initialise the
        backbone from them (otherwise the backbone keeps its random init, which
        is logged).

    Returns:
      The built Keras model.
    """
    model_cls, config_cls = _lookup(family)
    if isinstance(config, dict):
        config = (
            config_cls.from_dict(config)
            if hasattr(config_cls, "from_dict")
            else config_cls(**config)
        )
    elif not (dataclasses.is_dataclass(config) and isinstance(config, config_cls)):
        raise TypeError(
            f"build_model({family!r}): config must be a {config_cls.__name__} or "
            f"a dict, received {type(config).__name__}."
        )
    if hasattr(config, "validate"):
        config.validate()
    model = model_cls(config)
    model.build()
    spec = getattr(config, "imagenet_weights", None)
    if load_imagenet and spec and hasattr(model, "load_imagenet_weights"):
        model.load_imagenet_weights(spec)
    else:
        logger.warning(
            "%s: backbone randomly initialised (no ImageNet weights given; pass "
            'imagenet_weights="imagenet" or a weights path).',
            family,
        )
    return model
