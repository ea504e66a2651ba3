"""SavedModel export of DELG with the official signature (TF Serving ready).

`export_saved_model(model, export_path, config)` writes a SavedModel with

* `serving_default` -- identical to the official DELG export
  (tensorflow/models research/delf `export_local_and_global_model.py`): inputs
  `input_image` u8[H,W,3], `input_scales` f32[S], `input_max_feature_num` i32[],
  `input_abs_thres` f32[], `input_global_scales_ind` i32[G]; outputs `boxes`
  f32[N,4], `features` f32[N,128], `scales` f32[N], `scores` f32[N,1],
  `global_descriptors` f32[G,D] (raw). The local-only / global-only variants have
  the official local-only / global-only inputs and outputs.
* `serving_image_bytes` -- one encoded image (JPEG/PNG/GIF/BMP string, input
  `image_bytes`, for TF Serving REST `{"b64": ...}`), decoded in the graph, with
  the config's resize rules (`max_image_size`, `min_image_size`,
  `use_square_images`; resize with antialiasing, close to the official host-side
  Pillow bilinear but not bit-identical) and defaults baked in; returns final
  features: `global_descriptor` f32[D] (per-scale L2, sum, L2), `locations`
  f32[N,2] (y, x) in original-image pixels, `descriptors` f32[N,128]
  (L2-normalised), `scales` f32[N], `attention` f32[N].
* `assets.extra/tf_serving_warmup_requests` (one request per signature) and
  `assets.extra/delf_config.pbtxt` (the baked-in DelfConfig, `model_path` ".").

SuperGlobal pooling (`ExportConfig.superglobal`, Shao et al. ICCV 2023;
`delg_tf.extraction.superglobal`): GeM+, regional-GeM and ReLU+ change the values
of the raw per-scale `global_descriptors` of `serving_default` (its inputs,
outputs, names, dtypes and shapes stay the official ones); Scale-GeM changes the
aggregation of `serving_image_bytes` (per-scale L2, element-wise max over the
scales, L2, instead of the sum). An export with modules also has
`assets.extra/delg_tf_superglobal.json` (`{"modules": [...], "aggregation": ...,
parameters}`), from which `DelgExtractor.from_saved_model` learns the aggregation;
the official DelfConfig asset is unchanged. Without modules (the default) the
export is the DELG one, without that asset.

Only `tf.Variable`s and traced functions are saved: loading needs TensorFlow
only (no delg_tf, no Keras objects). The export is written to a temporary
directory next to `export_path` and renamed when complete; an existing export is
refused unless `overwrite=True`.
"""

import json
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import text_format

from delg_tf import atomic
from delg_tf.extraction import folded, geometry, pyramid, superglobal
from delg_tf.extraction.config import (
    AGGREGATION_SUM,
    ASSETS_EXTRA_DIR,
    CONFIG_ASSET,
    MIN_EXTRACTION_SIDE,
    SUPERGLOBAL_ASSET,
    ExportConfig,
    global_aggregation,
)
from delg_tf.extraction.raw_model import SIGNATURE_DEFAULT
from delg_tf.serving import warmup

logger = logging.getLogger(__name__)

SIGNATURE_IMAGE_BYTES = "serving_image_bytes"
IMAGE_BYTES_INPUT = "image_bytes"
WARMUP_IMAGE_SIDE = 64
WARMUP_JPEG_QUALITY = 90


def resize_scale_factor_tf(height_width, max_image_size, min_image_size, use_square_images):
    """In-graph version of the official `ResizeImage` decision (float64, like Python).

    Returns:
      (needs_resize bool[], new_size int32[2], scale_factors float64[2]).
    """
    hw = tf.cast(height_width, tf.float64)
    largest = tf.reduce_max(hw)
    max_size = tf.constant(max_image_size, tf.float64)
    min_size = tf.constant(min_image_size, tf.float64)
    too_large = tf.logical_and(max_size >= 0, largest > max_size)
    too_small = tf.logical_and(min_size >= 0, largest < min_size)
    not_square = tf.logical_and(tf.constant(use_square_images), hw[0] != hw[1])
    factor = tf.where(
        too_large,
        max_size / largest,
        tf.where(too_small, min_size / largest, tf.constant(1.0, tf.float64)),
    )
    needs_resize = too_large | too_small | not_square
    target = tf.fill([2], largest) if use_square_images else hw
    new_size = tf.where(needs_resize, tf.round(target * factor), hw)
    return needs_resize, tf.cast(new_size, tf.int32), new_size / hw


def _postprocess(raw, scale_factors, use_local, use_global, aggregation=AGGREGATION_SUM):
    """Official extractor post-processing of raw outputs (TF).

    Global: per-scale L2, then sum (official) or, for SuperGlobal's Scale-GeM
    (`aggregation` "max"), element-wise max, then L2
    (`superglobal.aggregate_global_descriptors`).
    """
    outputs = {}
    if use_global:
        per_scale = tf.nn.l2_normalize(raw["global_descriptors"], axis=1)
        if aggregation == AGGREGATION_SUM:
            outputs["global_descriptor"] = tf.nn.l2_normalize(
                tf.reduce_sum(per_scale, axis=0), axis=0
            )
        else:
            outputs["global_descriptor"] = superglobal.aggregate_global_descriptors(
                per_scale, aggregation
            )
    if use_local:
        centers = geometry.box_centers(raw["boxes"])
        outputs["locations"] = centers / tf.cast(scale_factors, tf.float32)
        outputs["descriptors"] = tf.nn.l2_normalize(raw["features"], axis=1)
        outputs["scales"] = raw["scales"]
        outputs["attention"] = tf.reshape(raw["scores"], [-1])
    return outputs


class DelgServingModule(tf.Module):
    """The object saved by `export_saved_model` (variables + traced functions only).

    Args:
      model: DELG model with the inference API (see `delg_tf.extraction.pyramid`).
      config: `delg_tf.extraction.config.ExportConfig` (its `superglobal` modules
        wrap `model`, `superglobal.superglobal_inference`).
    """

    def __init__(self, model, config, name="delg_serving"):
        super().__init__(name=name)
        self._config = config
        self._aggregation = global_aggregation(config.superglobal)
        self._pyramid = pyramid.PyramidExtractor(
            superglobal.superglobal_inference(model, config.superglobal),
            mode=config.mode,
            iou_threshold=config.iou_threshold,
        )
        self.extract = self._pyramid.extract
        self.extract_image_bytes = tf.function(
            self._extract_image_bytes,
            input_signature=[tf.TensorSpec([], tf.string, name=IMAGE_BYTES_INPUT)],
        )
        # Track only the plain tf.Variables the traced functions read (not the
        # Keras objects, not training-only weights such as classifiers).
        used = {}
        for concrete in self.signatures().values():
            for variable in concrete.variables:
                used.setdefault(id(variable), variable)
        self.model_variables = list(used.values())

    def _default_inputs(self):
        config = self._config
        inputs = {"input_scales": tf.constant(config.image_scales, tf.float32)}
        if config.use_local:
            inputs["input_max_feature_num"] = tf.constant(config.max_feature_num, tf.int32)
            inputs["input_abs_thres"] = tf.constant(config.score_threshold, tf.float32)
        if config.use_global:
            inputs["input_global_scales_ind"] = tf.constant(config.global_scales_ind, tf.int32)
        return inputs

    def _empty_outputs(self):
        config = self._config
        outputs = {}
        if config.use_global:
            outputs["global_descriptor"] = tf.zeros([self._pyramid.global_dim], tf.float32)
        if config.use_local:
            outputs.update(
                locations=tf.zeros([0, 2]),
                descriptors=tf.zeros([0, self._pyramid.local_dim]),
                scales=tf.zeros([0]),
                attention=tf.zeros([0]),
            )
        return outputs

    def _extract_image_bytes(self, image_bytes):
        config = self._config
        image = tf.io.decode_image(
            image_bytes, channels=pyramid.IMAGE_CHANNELS, dtype=tf.uint8, expand_animations=False
        )
        image.set_shape([None, None, pyramid.IMAGE_CHANNELS])
        needs_resize, new_size, scale_factors = resize_scale_factor_tf(
            tf.shape(image)[0:2],
            config.max_image_size,
            config.min_image_size,
            config.use_square_images,
        )

        def resized():
            # Bilinear with antialiasing (like Pillow's BILINEAR when shrinking), rounded.
            out = tf.image.resize(image, new_size, method="bilinear", antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

        image = tf.cond(needs_resize, resized, lambda: image)
        large_enough = tf.reduce_min(tf.shape(image)[0:2]) >= MIN_EXTRACTION_SIDE

        def extract():
            inputs = self._default_inputs()
            raw = self.extract(input_image=image, **inputs)
            return _postprocess(
                raw, scale_factors, config.use_local, config.use_global, self._aggregation
            )

        return tf.cond(large_enough, extract, self._empty_outputs)

    def signatures(self):
        """The signatures dict for `tf.saved_model.save`."""
        return {
            SIGNATURE_DEFAULT: self.extract.get_concrete_function(),
            SIGNATURE_IMAGE_BYTES: self.extract_image_bytes.get_concrete_function(),
        }


def _warmup_requests(config):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (WARMUP_IMAGE_SIDE, WARMUP_IMAGE_SIDE, 3), dtype=np.uint8)
    default_inputs = {
        "input_image": image,
        "input_scales": np.asarray(config.image_scales, np.float32),
    }
    if config.use_local:
        default_inputs["input_max_feature_num"] = np.int32(config.max_feature_num)
        default_inputs["input_abs_thres"] = np.float32(config.score_threshold)
    if config.use_global:
        default_inputs["input_global_scales_ind"] = np.asarray(config.global_scales_ind, np.int32)
    jpeg = tf.io.encode_jpeg(image, quality=WARMUP_JPEG_QUALITY).numpy()
    return [
        (SIGNATURE_DEFAULT, default_inputs),
        (SIGNATURE_IMAGE_BYTES, {IMAGE_BYTES_INPUT: np.array(jpeg, dtype=object)}),
    ]


def export_saved_model(
    model, export_path, config=None, overwrite=False, fold_batch_norm=True, compute_dtype="float32"
):
    """Exports `model` as a DELG SavedModel (see the module doc).

    Args:
      model: DELG model with the inference API (`delg_tf.models.delg.DelgModel`).
      export_path: target directory (must not exist unless `overwrite`).
      config: `delg_tf.extraction.config.ExportConfig` (defaults: official DELG R50
        values; `superglobal` for SuperGlobal pooling, see the module doc).
      overwrite: replace an existing export.
      fold_batch_norm: export the batch-norm-folded graph of a `DelgModel`
        (`delg_tf.extraction.folded`: same outputs up to float rounding, faster on
        CPU); False exports the Keras layers as they are.
      compute_dtype: "float32", or "bfloat16" for backbone convolutions in
        bfloat16 (folded graph only; faster on AVX512_BF16 CPUs, outside the
        official parity tolerances).

    Returns:
      Path of the export.

    Raises:
      FileExistsError: `export_path` exists and `overwrite` is False.
    """
    config = config or ExportConfig()
    export_path = Path(export_path).absolute()
    if export_path.exists() and not overwrite:
        raise FileExistsError(
            f"export path {export_path} already exists; expected a new directory. "
            "Pass --overwrite (overwrite=True) to replace it, or choose another --export_path."
        )
    unavailable = compute_dtype == folded.BFLOAT16 and folded.bfloat16_convolution_error()
    if unavailable:
        logger.warning(
            "compute_dtype=bfloat16: this machine cannot run bfloat16 convolutions "
            "(%s); the export is written, serve it where oneDNN supports bfloat16.",
            unavailable,
        )
    with atomic.staged_directory(export_path) as tmp:
        module = DelgServingModule(
            folded.inference_model(model, fold_batch_norm, compute_dtype), config
        )
        tf.saved_model.save(module, str(tmp), signatures=module.signatures())
        extra = tmp / ASSETS_EXTRA_DIR
        if config.warmup:
            warmup.write_warmup_file(tmp, _warmup_requests(config))
        extra.mkdir(exist_ok=True)
        (extra / CONFIG_ASSET).write_text(text_format.MessageToString(config.to_delf_config()))
        if config.superglobal:
            asset = superglobal.superglobal_asset(config.superglobal)
            (extra / SUPERGLOBAL_ASSET).write_text(json.dumps(asset, indent=2) + "\n")
    return export_path
