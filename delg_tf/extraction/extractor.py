"""`DelgExtractor`: the official DELG extractor's host-side steps around any DELG model.

Reproduces tensorflow/models research/delf `extractor.py` (TF2 `MakeExtractor`)
and `utils.ResizeImage`:

1. resize on the host with Pillow bilinear (which antialiases when shrinking)
   if the largest side is above `max_image_size` or below `min_image_size`, or
   to a square if `use_square_images`; new size = round(side * factor)
   (Python round, half-to-even); scale factors (h, w) = new / original;
2. images smaller than 10 px on a side after resizing give empty features;
3. one call of the model's raw function (official inputs, see `raw_model`);
4. global: L2-normalise each scale's descriptor, sum, L2-normalise
   (optional PCA as the official code); with SuperGlobal's Scale-GeM (an export
   made with ``--superglobal=scale_gem``, read from its asset by `raw_model`, or
   `from_model(..., superglobal=...)`) the element-wise max over the scales
   replaces the sum (`raw_fn.global_aggregation`);
5. local: location = centre of the receptive box / scale factors, (y, x) in
   original-image pixels (unless `use_resized_coordinates`); descriptors
   L2-normalised (optional PCA then L2); attention = scores.

Constructors: `from_saved_model(path, config=None)`, `from_config(pbtxt)`,
`from_model(model, config=None, superglobal=())` (in memory, via `PyramidExtractor`).
"""

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from delg_tf.extraction import config as config_lib
from delg_tf.extraction import folded, geometry, pyramid, raw_model
from delg_tf.extraction import superglobal as superglobal_lib


@dataclasses.dataclass
class DelgFeatures:
    """Features of one image (official extractor output, plus conveniences).

    Attributes:
      global_descriptor: f32[D] L2-normalised (empty if the model has no global head
        or the image is too small).
      locations: f32[N, 2] (y, x) keypoints in original-image pixels (official order).
      descriptors: f32[N, d] L2-normalised local descriptors.
      scales: f32[N] 1 / pyramid scale of each feature.
      attention: f32[N] attention scores.
      image_shape: (H, W, 3) of the input image.
      scale_factors: f64[2] host-side resize factors (h, w).
    """

    global_descriptor: np.ndarray
    locations: np.ndarray
    descriptors: np.ndarray
    scales: np.ndarray
    attention: np.ndarray
    image_shape: tuple
    scale_factors: np.ndarray

    @property
    def keypoints(self):
        """f32[N, 2] (x, y), the usual image-coordinate order."""
        return self.locations[:, ::-1].copy()

    @property
    def scores(self):
        """Alias of `attention`."""
        return self.attention

    @property
    def num_features(self):
        return int(self.attention.shape[0])

    def to_official_dict(self):
        """The dict returned by the official `ExtractorFn`."""
        return {
            "global_descriptor": self.global_descriptor,
            "local_features": {
                "locations": self.locations,
                "descriptors": self.descriptors,
                "scales": self.scales,
                "attention": self.attention,
            },
        }


def resize_image_like_official(
    image, max_image_size=-1, min_image_size=-1, use_square_images=False, resize_factor=1.0
):
    """The official `utils.ResizeImage` (Pillow bilinear, antialiased when shrinking).

    Returns:
      (uint8 [H', W', 3], float64 [2] scale factors (h, w)).
    """
    if resize_factor < 0.0:
        raise ValueError(f"resize_factor must be >= 0, received {resize_factor}.")
    if image.ndim != raw_model.IMAGE_RANK or image.shape[2] != raw_model.IMAGE_CHANNELS:
        raise ValueError(f"image must have shape [H, W, 3], received {image.shape}.")
    height, width = image.shape[:2]
    max_size = resize_factor * max_image_size
    min_size = resize_factor * min_image_size
    largest_side = max(width, height)
    if max_size >= 0 and largest_side > max_size:
        scale_factor = max_size / largest_side
    elif min_size >= 0 and largest_side < min_size:
        scale_factor = min_size / largest_side
    elif use_square_images and height != width:
        scale_factor = 1.0
    else:
        return image, np.ones(2, dtype=float)
    if use_square_images:
        side = int(round(largest_side * scale_factor))
        new_wh = (side, side)
    else:
        new_wh = (int(round(width * scale_factor)), int(round(height * scale_factor)))
    scale_factors = np.array([new_wh[1] / height, new_wh[0] / width], dtype=float)
    resized = np.array(Image.fromarray(image).resize(new_wh, resample=Image.BILINEAR))
    return resized, scale_factors


def _read_pca(pca_parameters):
    from delg_tf.extraction import delf_io

    params = {
        "mean": delf_io.read_datum(pca_parameters.mean_path).astype(np.float32),
        "matrix": delf_io.read_datum(pca_parameters.projection_matrix_path).astype(np.float32),
        "dim": pca_parameters.pca_dim,
        "variances": None,
    }
    if pca_parameters.use_whitening:
        params["variances"] = np.squeeze(
            delf_io.read_datum(pca_parameters.pca_variances_path)
        ).astype(np.float32)
    return params


def _l2_normalize(x, axis):
    """tf.nn.l2_normalize semantics: x / sqrt(max(sum(x^2), 1e-12))."""
    x = np.asarray(x, np.float32)
    square_sum = np.sum(np.square(x), axis=axis, keepdims=True)
    return x / np.sqrt(np.maximum(square_sum, np.float32(1e-12)))


def _aggregate(per_scale, aggregation):
    """Final global descriptor [D] from the post-processed per-scale rows [G, D]:
    l2(sum) (official), or l2(element-wise max) for SuperGlobal's Scale-GeM
    (`config.AGGREGATION_MAX`); no rows give zeros.
    """
    if aggregation == config_lib.AGGREGATION_MAX and len(per_scale):
        return _l2_normalize(np.max(per_scale, axis=0), axis=0)
    return _l2_normalize(np.sum(per_scale, axis=0), axis=0)


def _post_process(descriptors, use_pca, pca):
    """Official `PostProcessDescriptors`: L2, optional PCA (+whitening) then L2."""
    out = _l2_normalize(descriptors, axis=1)
    if use_pca:
        out = (out - pca["mean"]) @ pca["matrix"][: pca["dim"]].T
        if pca["variances"] is not None:
            out = out / np.sqrt(pca["variances"][: pca["dim"]])
        out = _l2_normalize(out, axis=1)
    return out


class DelgExtractor:
    """Callable image -> `DelgFeatures`, with the official host-side steps.

    Args:
      raw_fn: `raw_model.RawExtractionFn` (or compatible).
      config: DelfConfig proto (extraction parameters; `model_path` not used here).
    """

    def __init__(self, raw_fn, config):
        self.raw_fn = raw_fn
        self.config = config
        self.use_local = bool(config.use_local_features) and raw_fn.use_local
        self.use_global = bool(config.use_global_features) and raw_fn.use_global
        if config.use_local_features and not raw_fn.use_local:
            raise ValueError(
                "the config asks for local features (use_local_features: true) "
                "but the model has no local outputs; set use_local_features: "
                "false or use a local+global export."
            )
        if config.use_global_features and not raw_fn.use_global:
            raise ValueError(
                "the config asks for global features (use_global_features: true) "
                "but the model has no global outputs; set use_global_features: "
                "false or use a local+global export."
            )
        if not (self.use_local or self.use_global):
            raise ValueError(
                "invalid config: at least one of use_local_features / "
                "use_global_features must be true."
            )
        # sum (official) or max (SuperGlobal Scale-GeM) of the per-scale descriptors.
        self.global_aggregation = getattr(raw_fn, "global_aggregation", config_lib.AGGREGATION_SUM)
        self.image_scales = np.asarray(
            list(config.image_scales) or config_lib.DEFAULT_IMAGE_SCALES, np.float32
        )
        indices = list(config.delf_global_config.image_scales_ind)
        self.global_scales_ind = np.asarray(
            indices if indices else range(len(self.image_scales)), np.int32
        )
        self.local_pca = (
            _read_pca(config.delf_local_config.pca_parameters)
            if self.use_local and config.delf_local_config.use_pca
            else None
        )
        self.global_pca = (
            _read_pca(config.delf_global_config.pca_parameters)
            if self.use_global and config.delf_global_config.use_pca
            else None
        )

    # Constructors ---------------------------------------------------------------

    @classmethod
    def from_saved_model(cls, path, config=None):
        """From a SavedModel directory (delg_tf export, official TF2 or TF1 DELG).

        Args:
          path: SavedModel directory.
          config: DelfConfig proto / pbtxt path / None. None: the config baked into
            a delg_tf export, else the official R50 DELG defaults
            (`config.saved_model_delf_config`).
        """
        raw_fn = raw_model.load_raw_extraction_fn(path)
        if config is None:
            config = config_lib.saved_model_delf_config(path, raw_fn.use_local, raw_fn.use_global)
        return cls(raw_fn, config_lib.load_delf_config(config))

    @classmethod
    def from_config(cls, pbtxt_path, model_path=None):
        """From an official DelfConfig text file (its `model_path` is the SavedModel).

        A relative `model_path` is resolved against the config file's folder.
        """
        config = config_lib.load_delf_config(pbtxt_path)
        path = model_path or config.model_path
        if not path or path == config_lib.MODEL_PATH_PLACEHOLDER:
            raise ValueError(
                f"{pbtxt_path}: model_path is {config.model_path!r}; expected the "
                "SavedModel directory (or pass model_path=...)."
            )
        if not os.path.isabs(path) and isinstance(pbtxt_path, (str, os.PathLike)):
            candidate = Path(pbtxt_path).parent / path
            if candidate.exists():
                path = str(candidate)
        config.model_path = str(path)
        return cls(raw_model.load_raw_extraction_fn(path), config)

    @classmethod
    def from_model(
        cls,
        model,
        config=None,
        fold_batch_norm=True,
        compute_dtype="float32",
        superglobal=(),
    ):
        """From an in-memory DELG model (`DelgModel`), via `PyramidExtractor`.

        `fold_batch_norm`: run the batch-norm-folded view of a `DelgModel`
        (`delg_tf.extraction.folded`; weights copied now, same outputs up to float
        rounding, faster on CPU). False runs the Keras layers themselves.
        `compute_dtype="bfloat16"`: backbone convolutions in bfloat16 (folded graph
        only; ~1.8x faster on AVX512_BF16 CPUs, not within official parity).
        `superglobal`: SuperGlobal modules (names of
        `config.SUPERGLOBAL_MODULES`, as `ExportConfig.superglobal` /
        ``--superglobal``; `delg_tf.extraction.superglobal`), the same computation
        as an export made with them.
        """
        config = (
            config_lib.load_delf_config(config)
            if config is not None
            else (config_lib.ExportConfig().to_delf_config(""))
        )
        mode = config_lib.mode_of(config.use_local_features, config.use_global_features)
        modules = config_lib.canonical_superglobal(superglobal, mode)
        inference = folded.inference_model(model, fold_batch_norm, compute_dtype)
        if compute_dtype == folded.BFLOAT16:
            folded.check_bfloat16_runs()
        extractor = pyramid.PyramidExtractor(
            superglobal_lib.superglobal_inference(inference, modules),
            mode=mode,
            iou_threshold=config.delf_local_config.iou_threshold,
        )
        raw_fn = raw_model.from_function(
            extractor.extract, extractor.use_local, extractor.use_global, superglobal=modules
        )
        instance = cls(raw_fn, config)
        instance.pyramid = extractor
        return instance

    # Extraction -----------------------------------------------------------------

    def raw(self, image):
        """Raw model outputs for an already resized uint8 image (official inputs)."""
        local = self.config.delf_local_config
        return self.raw_fn(
            image,
            self.image_scales,
            local.max_feature_num,
            local.score_threshold,
            self.global_scales_ind,
        )

    def _empty(self, image_shape, scale_factors):
        local_dim = 0
        return DelgFeatures(
            np.zeros([0], np.float32),
            np.zeros([0, 2], np.float32),
            np.zeros([0, local_dim], np.float32),
            np.zeros([0], np.float32),
            np.zeros([0], np.float32),
            tuple(image_shape),
            scale_factors,
        )

    def __call__(self, image, resize_factor=1.0):
        """Extracts the features of an RGB uint8 array [H, W, 3] or an image file path."""
        if isinstance(image, (str, os.PathLike)):
            from delg_tf.data.images import load_image_rgb

            # alpha dropped like the official RgbLoader (Image.convert("RGB")).
            image = load_image_rgb(image, alpha="drop")
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise TypeError(
                f"DelgExtractor expects a uint8 RGB image [H, W, 3], received dtype "
                f"{image.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)."
            )
        if image.ndim != raw_model.IMAGE_RANK or image.shape[2] != raw_model.IMAGE_CHANNELS:
            raise ValueError(
                f"DelgExtractor expects an RGB image of shape [H, W, 3], received "
                f"{image.shape}; pass one image without batch dimension."
            )
        config = self.config
        resized, scale_factors = resize_image_like_official(
            image,
            config.max_image_size,
            config.min_image_size,
            config.use_square_images,
            resize_factor,
        )
        if min(resized.shape[:2]) < config_lib.MIN_EXTRACTION_SIDE:
            return self._empty(image.shape, scale_factors)
        raw = self.raw(resized)
        global_descriptor = np.zeros([0], np.float32)
        if self.use_global:
            per_scale = _post_process(
                raw["global_descriptors"], config.delf_global_config.use_pca, self.global_pca
            )
            global_descriptor = _aggregate(per_scale, self.global_aggregation)
        if self.use_local:
            boxes = raw["boxes"].astype(np.float32)
            locations = geometry.box_centers(boxes)
            if not config.delf_local_config.use_resized_coordinates:
                locations = locations / scale_factors.astype(np.float32)
            descriptors = _post_process(
                raw["features"], config.delf_local_config.use_pca, self.local_pca
            )
            scales = raw["scales"].astype(np.float32)
            attention = raw["scores"].reshape([-1]).astype(np.float32)
        else:
            locations = np.zeros([0, 2], np.float32)
            descriptors = np.zeros([0, 0], np.float32)
            scales = attention = np.zeros([0], np.float32)
        return DelgFeatures(
            global_descriptor,
            locations,
            descriptors,
            scales,
            attention,
            tuple(image.shape),
            scale_factors,
        )
