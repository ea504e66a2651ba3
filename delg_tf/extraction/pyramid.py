"""In-graph multi-scale DELG extraction (paper Sec. 3.2 and 4.1), official semantics.

`PyramidExtractor(model)` builds one `tf.function` (input signature with None
dimensions: one trace for every image size and number of scales) that does, for
an RGB uint8 image [H, W, 3] and the official inputs:

* for each scale s (a `tf.while_loop`, no Python loop per scale): target size
  `tf.round([H, W] * s)` (round-half-even), `tf.image.resize` (bilinear,
  half-pixel centres, no antialias) of the normalised image, the backbone to
  S (conv4), then
  * local (if enabled): attention and 128-d descriptors of every cell; the
    receptive box of every cell divided by s; cells with attention >= abs_thres
    are kept;
  * global (if enabled and the scale's index is in `global_scales_ind`):
    conv5 (D) then GeM + whitening (raw, not L2-normalised). conv5 is not
    computed at other scales.
* local candidates of all scales are concatenated (scale 0 first) and passed to
  `tf.image.non_max_suppression` (IoU 1.0 suppresses nothing: it sorts by
  score) keeping the top min(max_feature_num, N);
* global rows come back in increasing scale index.

Outputs (names and meaning as the official DELG export, `export_model_utils.py`):
`boxes` f32[N,4] (ymin, xmin, ymax, xmax) in input-image pixels, `features`
f32[N,128] raw, `scales` f32[N] = 1 / pyramid scale, `scores` f32[N,1] attention,
`global_descriptors` f32[G,D] raw per selected scale.

The model is duck-typed: `preprocess(images)`, `backbone.call_to_conv4(x)["conv4"]`,
`backbone.call_conv5(s)`, `local_head(s) -> (attention_prob, descriptors)`,
`global_head(d) -> [B, D]` (`delg_tf.models.delg.DelgModel`), and optionally
`global_backbone` (same API as `backbone`): when it is another object than
`backbone` (SuperGlobal's ReLU+, `delg_tf.extraction.superglobal`), the global
scales run their own pass of it from the resized image, and the local path keeps
`backbone`'s conv4 (in local_and_global mode the backbone then runs twice at each
global scale).
"""

import numpy as np
import tensorflow as tf

from delg_tf.extraction import geometry
from delg_tf.extraction.config import (
    DEFAULT_GLOBAL_SCALES_IND,
    DEFAULT_IMAGE_SCALES,
    DEFAULT_IOU_THRESHOLD,
    DEFAULT_MAX_FEATURE_NUM,
    MODES,
    mode_uses_global,
    mode_uses_local,
)

# Re-exported for `delg_tf.export` (which calls `pyramid.mode_of`); defined in `config`.
from delg_tf.extraction.config import mode_of  # noqa: F401

OUTPUT_KEYS = {
    "local_and_global": ("boxes", "features", "scales", "scores", "global_descriptors"),
    "local": ("boxes", "features", "scales", "scores"),
    "global": ("global_descriptors",),
}
IMAGE_CHANNELS = 3
# Side of the dummy image used to discover the descriptor sizes of a model.
_PROBE_IMAGE_SIDE = 64


def input_signature(mode="local_and_global"):
    """`tf.TensorSpec`s of the official `serving_default` inputs for a mode, in order."""
    specs = [
        tf.TensorSpec([None, None, IMAGE_CHANNELS], tf.uint8, name="input_image"),
        tf.TensorSpec([None], tf.float32, name="input_scales"),
    ]
    if mode_uses_local(mode):
        specs += [
            tf.TensorSpec([], tf.int32, name="input_max_feature_num"),
            tf.TensorSpec([], tf.float32, name="input_abs_thres"),
        ]
    if mode_uses_global(mode):
        specs.append(tf.TensorSpec([None], tf.int32, name="input_global_scales_ind"))
    return specs


def _descriptor_dims(model):
    """(local_dim, global_dim) of a model: attributes if present, else one probe run."""
    local_dim = getattr(model, "local_descriptor_dim", None)
    global_dim = getattr(model, "global_descriptor_dim", None)
    if local_dim is not None and global_dim is not None:
        return int(local_dim), int(global_dim)
    probe = tf.zeros([1, _PROBE_IMAGE_SIDE, _PROBE_IMAGE_SIDE, IMAGE_CHANNELS], tf.uint8)
    s = model.backbone.call_to_conv4(model.preprocess(probe))["conv4"]
    _, descriptors = model.local_head(s)
    global_descriptor = model.global_head(model.backbone.call_conv5(s))
    return int(descriptors.shape[-1]), int(global_descriptor.shape[-1])


class PyramidExtractor:
    """Multi-scale DELG extraction as one traced function (official outputs).

    Args:
      model: a DELG model with the inference API described in the module doc.
      mode: "local_and_global", "local" or "global" (which outputs exist; the
        input signature follows the official export of that variant).
      iou_threshold: NMS IoU threshold (1.0: no suppression, just sort).
      receptive_field: `geometry.ReceptiveField` of S. None: the official 291/32/145
        (what the official exporters hard-code, for every DELG backbone), except for a
        backbone without the block3 stride (S at stride 16), whose field is derived
        from its layers.

    Attributes:
      extract: `tf.function` with `input_signature(mode)`; returns a dict with
        `OUTPUT_KEYS[mode]`.
    """

    def __init__(
        self,
        model,
        mode="local_and_global",
        iou_threshold=DEFAULT_IOU_THRESHOLD,
        receptive_field=None,
    ):
        if mode not in MODES:
            raise ValueError(f"PyramidExtractor mode must be one of {MODES}, received {mode!r}.")
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(
                f"iou_threshold must be in [0, 1] (1.0 = no suppression), received {iou_threshold}."
            )
        self.model = model
        self.mode = mode
        self.iou_threshold = float(iou_threshold)
        if receptive_field is None:
            receptive_field = geometry.OFFICIAL_RECEPTIVE_FIELD
            backbone = getattr(model, "backbone", None)
            if getattr(backbone, "block3_stride", True) is False:
                receptive_field = geometry.receptive_field(geometry.resnet_conv4_layers(backbone))
        self.receptive_field = receptive_field
        self.local_dim, self.global_dim = _descriptor_dims(model)
        self.extract = tf.function(
            self._extract_fn(), input_signature=input_signature(mode), reduce_retracing=True
        )

    @property
    def use_local(self):
        return mode_uses_local(self.mode)

    @property
    def use_global(self):
        return mode_uses_global(self.mode)

    def _extract_fn(self):
        mode = self.mode
        if mode == "local_and_global":

            def extract(
                input_image,
                input_scales,
                input_max_feature_num,
                input_abs_thres,
                input_global_scales_ind,
            ):
                return self._extract(
                    input_image,
                    input_scales,
                    input_max_feature_num,
                    input_abs_thres,
                    input_global_scales_ind,
                )
        elif mode == "local":

            def extract(input_image, input_scales, input_max_feature_num, input_abs_thres):
                return self._extract(
                    input_image, input_scales, input_max_feature_num, input_abs_thres, None
                )
        else:

            def extract(input_image, input_scales, input_global_scales_ind):
                return self._extract(input_image, input_scales, None, None, input_global_scales_ind)

        return extract

    def _extract(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        model = self.model
        use_local, use_global = self.use_local, self.use_global
        rf = self.receptive_field
        local_dim, global_dim = self.local_dim, self.global_dim
        global_backbone = getattr(model, "global_backbone", model.backbone)
        # The local path's conv4 serves the global scales unless they have their own pass.
        share_conv4 = global_backbone is model.backbone
        image_hw = tf.cast(tf.shape(image)[0:2], tf.float32)
        normalized = model.preprocess(tf.expand_dims(image, 0))
        num_scales = tf.shape(scales)[0]

        def resize(index):
            scale = tf.gather(scales, index)
            size = tf.cast(tf.round(image_hw * scale), tf.int32)
            return scale, tf.image.resize(normalized, size)

        def global_at(index, s=None):
            def compute():
                conv4 = s
                if conv4 is None:
                    conv4 = global_backbone.call_to_conv4(resize(index)[1])["conv4"]
                descriptor = model.global_head(global_backbone.call_conv5(conv4))
                return tf.reshape(tf.cast(descriptor, tf.float32), [1, global_dim])

            is_global = tf.reduce_any(tf.equal(global_scales_ind, index))
            return tf.cond(is_global, compute, lambda: tf.zeros([0, global_dim], tf.float32))

        def body(index, boxes, features, out_scales, scores, global_descriptors):
            if use_local:
                scale, resized = resize(index)
                s = model.backbone.call_to_conv4(resized)["conv4"]
                attention, descriptors = model.local_head(s)
                attention = tf.cast(attention, tf.float32)
                descriptors = tf.cast(descriptors, tf.float32)
                height, width = tf.shape(attention)[1], tf.shape(attention)[2]
                cell_boxes = geometry.receptive_boxes(height, width, rf) / scale
                attention = tf.reshape(attention, [-1])
                descriptors = tf.reshape(descriptors, [-1, local_dim])
                keep = tf.reshape(tf.where(attention >= abs_thres), [-1])
                kept_scores = tf.gather(attention, keep)
                boxes = tf.concat([boxes, tf.gather(cell_boxes, keep)], 0)
                features = tf.concat([features, tf.gather(descriptors, keep)], 0)
                out_scales = tf.concat([out_scales, tf.ones_like(kept_scores) / scale], 0)
                scores = tf.concat([scores, kept_scores], 0)
                if use_global:
                    shared = s if share_conv4 else None
                    global_descriptors = tf.concat(
                        [global_descriptors, global_at(index, shared)], 0
                    )
            else:
                global_descriptors = tf.concat([global_descriptors, global_at(index)], 0)
            return index + 1, boxes, features, out_scales, scores, global_descriptors

        loop_vars = (
            tf.constant(0, tf.int32),
            tf.zeros([0, geometry.BOX_COORDINATES], tf.float32),
            tf.zeros([0, local_dim], tf.float32),
            tf.zeros([0], tf.float32),
            tf.zeros([0], tf.float32),
            tf.zeros([0, global_dim], tf.float32),
        )
        invariants = (
            tf.TensorShape([]),
            tf.TensorShape([None, geometry.BOX_COORDINATES]),
            tf.TensorShape([None, local_dim]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            # [None, None] as the official export (its signature shape).
            tf.TensorShape([None, None]),
        )
        _, boxes, features, out_scales, scores, global_descriptors = tf.nest.map_structure(
            tf.stop_gradient,
            tf.while_loop(
                lambda index, *_: index < num_scales, body, loop_vars, shape_invariants=invariants
            ),
        )

        outputs = {}
        if use_local:
            max_boxes = tf.minimum(max_feature_num, tf.shape(boxes)[0])
            selected = tf.image.non_max_suppression(
                boxes, scores, max_boxes, iou_threshold=self.iou_threshold
            )
            outputs.update(
                boxes=tf.gather(boxes, selected, name="boxes"),
                features=tf.gather(features, selected, name="features"),
                scales=tf.gather(out_scales, selected, name="scales"),
                scores=tf.expand_dims(tf.gather(scores, selected), 1, name="scores"),
            )
        if use_global:
            outputs["global_descriptors"] = tf.identity(
                global_descriptors, name="global_descriptors"
            )
        return outputs

    def __call__(
        self,
        image,
        scales=DEFAULT_IMAGE_SCALES,
        max_feature_num=DEFAULT_MAX_FEATURE_NUM,
        abs_thres=0.0,
        global_scales_ind=DEFAULT_GLOBAL_SCALES_IND,
    ):
        """Eager convenience call with Python/numpy inputs; returns numpy arrays."""
        args = [tf.convert_to_tensor(np.asarray(image, np.uint8)), tf.constant(scales, tf.float32)]
        if self.use_local:
            args += [tf.constant(max_feature_num, tf.int32), tf.constant(abs_thres, tf.float32)]
        if self.use_global:
            args.append(tf.constant(global_scales_ind, tf.int32))
        return {k: v.numpy() for k, v in self.extract(*args).items()}
