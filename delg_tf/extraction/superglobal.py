"""SuperGlobal pooling at extraction time: an inference view of a DELG model.

Shao, Chen, Karpur, Cui, Araujo, Cao, "Global Features are All You Need for Image
Retrieval and Reranking", ICCV 2023 (code: github.com/ShihaoShao-GH/SuperGlobal,
commit 6db11a7, ``model/resnet.py`` and ``modules/coarse_retrieval/``). Four
training-free modules, each an option of the export (`ExportConfig.superglobal`,
``--superglobal``) that applies to any trained DELG backbone; the formulas are the
pure functions of `delg_tf.ops.pooling`:

* ``gem_plus`` (GeM+): the global head pools conv5 (D) with
  g = (mean_{h,w} max(D, 1e-8)^4.6)^(1/4.6) instead of the model's GeM power
  (p = 3, or the learned p), then the whitening FC F g + b_F as usual (DELG eq. 1).
  The reference's CVNet head L2-normalises g before its FC; DELG's head (and so
  this option) does not.
* ``regional_gem`` (regional-GeM): before the GeM, D is replaced by
  0.5 * (mean_{5x5} D^2.5)^(1/2.5) + 0.5 * D, the window mean over 5 x 5
  neighbourhoods, stride 1, on D reflection-padded by 2 (`pooling.regional_gem`).
  Reflection padding needs maps larger than 2 cells on each side: on a smaller D
  (an image side below about 96 px at that scale for stride-32 backbones) the
  module is the identity for that scale.
* ``scale_gem`` (Scale-GeM): the aggregation of the global scales. Each scale's
  descriptor is L2-normalised, the element-wise max over the scales is taken,
  then L2-normalised (the reference ``sgem.py`` default, infinite power) --
  instead of the official per-scale L2, sum, L2. It does not change the raw
  per-scale rows of ``serving_default``; it is applied by the export's
  ``serving_image_bytes`` post-processing and by the host-side `DelgExtractor`,
  which learns it from the export's asset `config.SUPERGLOBAL_ASSET`
  (`aggregate_global_descriptors`, `superglobal_asset`).
* ``relu_plus`` (ReLU+): on the global path, the ReLU after the residual addition
  of every bottleneck of conv2_x, conv3_x and conv4_x becomes max(x, 0.014)
  (`pooling.relu_plus`); the stem and conv5_x keep the ReLU. This follows the
  module's description (residual-block outputs, all but the last stage) and the
  reference ``ResBlock``. The reference additionally clamps inside the stage-1
  (conv2_x, 256-channel) bottlenecks after their first two batch norms, because
  ``BottleneckTransform`` receives the ``relup`` class itself as its truthy flag
  (see `pooling.relu_plus`); that side effect of the code is NOT reproduced here.
  The local head reads conv4, so local features stay those of the plain backbone:
  in ``local_and_global`` mode the global scales run a second backbone pass with
  ReLU+ (`pyramid.PyramidExtractor` uses `global_backbone`), i.e. conv1..conv4 are
  computed twice at each global scale; in ``global`` mode there is one pass.

`superglobal_inference(model, modules)` returns the model unchanged for ``()``
(the paper's DELG pooling, the default) and otherwise a `SuperGlobalInference`
with the inference API the pyramid uses. Both views of a `DelgModel` are
supported: the batch-norm-folded `folded.FoldedDelg` and the Keras model itself.
All modules are inference-only.
"""

import tensorflow as tf

from delg_tf.extraction import config as config_lib
from delg_tf.extraction import folded
from delg_tf.ops import pooling

STAGES_WITH_RELU_PLUS = 3  # conv2_x, conv3_x, conv4_x (all but conv5_x).
REGIONAL_GEM_PAD = (pooling.REGIONAL_GEM_WINDOW - 1) // 2
SPATIAL = slice(1, 3)


def superglobal_asset(modules):
    """The JSON object of the export asset `config.SUPERGLOBAL_ASSET` for `modules`.

    Args:
      modules: canonical SuperGlobal module names (`config.canonical_superglobal`).

    Returns:
      dict: ``modules`` and ``aggregation`` (what readers use,
      `config.read_superglobal_asset`), plus the parameters baked into the graph
      for each module (`delg_tf.ops.pooling` constants), for the record.
    """
    asset = {
        config_lib.SUPERGLOBAL_ASSET_MODULES_KEY: list(modules),
        "aggregation": config_lib.global_aggregation(modules),
    }
    if config_lib.GEM_PLUS in modules:
        asset.update(
            gem_plus_p=pooling.SUPERGLOBAL_GEM_P, gem_plus_eps=pooling.SUPERGLOBAL_GEM_EPSILON
        )
    if config_lib.REGIONAL_GEM in modules:
        asset.update(
            regional_gem_p=pooling.REGIONAL_GEM_P,
            regional_gem_window=pooling.REGIONAL_GEM_WINDOW,
            regional_gem_mix=pooling.REGIONAL_GEM_MIX,
        )
    if config_lib.SCALE_GEM in modules:
        asset.update(scale_gem="L2 per scale, element-wise max over scales, L2")
    if config_lib.RELU_PLUS in modules:
        asset.update(
            relu_plus_threshold=pooling.RELU_PLUS_THRESHOLD,
            relu_plus_stages=["conv2_x", "conv3_x", "conv4_x"],
        )
    return asset


def aggregate_global_descriptors(per_scale, aggregation=config_lib.AGGREGATION_SUM):
    """Final global descriptor from the L2-normalised per-scale rows (TF).

    Official: l2(sum_s x_s); Scale-GeM (`config.AGGREGATION_MAX`): l2(max_s x_s),
    the element-wise max (`pooling.scale_gem`, infinite power). No rows give zeros.

    Args:
      per_scale: f32 [G, D], each row L2-normalised.
      aggregation: `config.AGGREGATION_SUM` or `config.AGGREGATION_MAX`.

    Returns:
      f32 [D], L2-normalised.
    """
    if aggregation == config_lib.AGGREGATION_SUM:
        combined = tf.reduce_sum(per_scale, axis=0)
    elif aggregation == config_lib.AGGREGATION_MAX:
        combined = tf.cond(
            tf.shape(per_scale)[0] > 0,
            lambda: pooling.scale_gem(tf.expand_dims(per_scale, 1))[0],
            lambda: tf.reduce_sum(per_scale, axis=0),
        )
    else:
        raise ValueError(
            f"aggregation must be {config_lib.AGGREGATION_SUM!r} or "
            f"{config_lib.AGGREGATION_MAX!r}, received {aggregation!r}."
        )
    return tf.nn.l2_normalize(combined, axis=0)


def regional_gem_or_identity(d):
    """`pooling.regional_gem(d)` where reflection padding is defined, else `d`.

    Args:
      d: f32 [B, h, w, C] (conv5 map D).

    Returns:
      f32 [B, h, w, C]: regional-GeM of `d` if h and w are > 2
      (`REGIONAL_GEM_PAD`), else `d` unchanged (decided at trace time for static
      shapes, in the graph for dynamic ones).
    """
    static = d.shape[SPATIAL]
    if static.is_fully_defined():
        return pooling.regional_gem(d) if min(static) > REGIONAL_GEM_PAD else d
    fits = tf.reduce_min(tf.shape(d)[SPATIAL]) > REGIONAL_GEM_PAD
    return tf.cond(fits, lambda: pooling.regional_gem(d), lambda: tf.identity(d))


class ReluPlusBackbone:
    """The global-path backbone with ReLU+ (see the module doc): same call API.

    Args:
      backbone: a `folded.FoldedResNet` or a Keras `delg_tf.backbones.resnet.ResNet`
        (its variables are used, none is created).

    `call_to_conv4(images)` -> dict with "conv4" (S [B, h, w, C_S], the units of
    conv2_x..conv4_x ending in `pooling.relu_plus`); `call_conv5(S)` -> D, the
    backbone's own conv5_x (ReLU).
    """

    def __init__(self, backbone):
        from delg_tf.backbones.resnet import ResNet

        if not isinstance(backbone, (folded.FoldedResNet, ResNet)):
            raise TypeError(
                "superglobal relu_plus needs a DelgModel backbone (Keras ResNet or its "
                f"batch-norm-folded view), received {type(backbone).__name__}."
            )
        self.backbone = backbone

    def call_to_conv4(self, images, training=False):
        del training
        return self.backbone.call_to_conv4(images, residual_activation=pooling.relu_plus)

    def call_conv5(self, s, training=False):
        del training
        return self.backbone.call_conv5(s)


def _global_head_parts(model):
    """(GeM with the model's power, whitening FC) of a `FoldedDelg` or a `DelgModel`."""
    from delg_tf.models.delg import DelgModel

    if isinstance(model, folded.FoldedDelg):
        return model.gem_pool, model.whiten
    if isinstance(model, DelgModel):
        return model.gem, model.whitening
    raise TypeError(
        "superglobal gem_plus / regional_gem need a DelgModel (or its batch-norm-folded "
        f"view) to split the global head into GeM and whitening, received "
        f"{type(model).__name__}."
    )


class SuperGlobalInference:
    """A DELG inference model with SuperGlobal modules (see the module doc).

    Args:
      model: `folded.FoldedDelg` or `delg_tf.models.delg.DelgModel` (not copied:
        its variables are the ones the traced functions read).
      modules: non-empty SuperGlobal module names (`config.canonical_superglobal`).

    Attributes:
      modules: the canonical module tuple.
      aggregation: `config.AGGREGATION_MAX` with scale_gem, else `AGGREGATION_SUM`.
      backbone: the model's backbone (the local path, and receptive fields).
      global_backbone: the backbone of the global scales (`ReluPlusBackbone` with
        relu_plus, else `backbone` itself).

    API of `pyramid.PyramidExtractor`: `preprocess`, `backbone.call_to_conv4`,
    `backbone.call_conv5`, `local_head` (all the model's), `global_head(D [B, h, w,
    C_D]) -> [B, C_F]` (optional regional-GeM, GeM+ or the model's GeM, whitening;
    not L2-normalised) and `global_backbone`.
    """

    def __init__(self, model, modules):
        self.modules = config_lib.canonical_superglobal(modules)
        if not self.modules:
            raise ValueError("SuperGlobalInference needs at least one module; use the model.")
        self.model = model
        self.aggregation = config_lib.global_aggregation(self.modules)
        self.backbone = model.backbone
        self.global_backbone = (
            ReluPlusBackbone(model.backbone)
            if config_lib.RELU_PLUS in self.modules
            else model.backbone
        )
        self.gem_plus = config_lib.GEM_PLUS in self.modules
        self.regional_gem = config_lib.REGIONAL_GEM in self.modules
        self._head_parts = _global_head_parts(model) if self.gem_plus or self.regional_gem else None
        for name in ("local_descriptor_dim", "global_descriptor_dim"):
            if getattr(model, name, None) is not None:
                setattr(self, name, getattr(model, name))

    def preprocess(self, images):
        return self.model.preprocess(images)

    def local_head(self, s, training=False):
        del training
        return self.model.local_head(s)

    def global_head(self, d, training=False):
        del training
        if self._head_parts is None:
            return self.model.global_head(d)
        gem, whiten = self._head_parts
        if self.regional_gem:
            d = regional_gem_or_identity(d)
        pooled = pooling.gem_plus(d) if self.gem_plus else gem(d)
        return whiten(pooled)


def superglobal_inference(model, modules=()):
    """`model` itself for no modules, else `SuperGlobalInference(model, modules)`.

    Args:
      model: the inference model (`folded.inference_model`).
      modules: SuperGlobal module names (validated, any order).

    Returns:
      an object with the inference API of `pyramid.PyramidExtractor`.
    """
    modules = config_lib.canonical_superglobal(modules)
    return SuperGlobalInference(model, modules) if modules else model
