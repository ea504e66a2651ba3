"""Multi-scale DELG extraction with the pyramid levels unrolled in one graph.

`UnrolledPyramid(model)` computes exactly what the official export graph (and
`delg_tf.extraction.pyramid.PyramidExtractor`) computes -- per scale: resize to
``round([H, W] * s)`` with ``tf.image.resize``, S = conv4, attention and
descriptors, receptive boxes / s, cells with attention >= threshold; conv5 +
GeM + whitening only at the selected global scales (``tf.cond``: the other
branch is not run); then ``tf.image.non_max_suppression`` with IoU 1.0 (sort by
score, keep the top ``max_feature_num``) -- but with the levels written out as
independent branches of one traced function (one trace per number of scales,
any image size) instead of a sequential loop. TensorFlow's executor then runs
the small levels concurrently with the large ones, which keeps both cores busy
on a CPU where a single small convolution cannot.

Call: (image uint8 [H, W, 3], scales [S], max_feature_num, abs_thres,
global_scales_ind [G]) -> dict(boxes, features, scales, scores,
global_descriptors) of numpy arrays (official raw layout).
"""

import numpy as np
import tensorflow as tf

from delg_tf.extraction import geometry

NMS_IOU_THRESHOLD = 1.0  # Official DELG: suppresses nothing, only sorts by score.


class UnrolledPyramid:
    """See the module doc.

    Args:
      model: object with the DELG inference API (`DelgModel` or `FoldedDelg`).
      receptive_field: `geometry.ReceptiveField` of S (official 291/32/145).
      jit_compile: XLA-compile the whole function.
    """

    use_local = True
    use_global = True

    def __init__(self, model, receptive_field=geometry.OFFICIAL_RECEPTIVE_FIELD, jit_compile=False):
        self.model = model
        self.receptive_field = receptive_field
        self.jit_compile = jit_compile
        self._functions = {}
        probe = tf.zeros([1, 64, 64, 3], tf.uint8)
        s = model.backbone.call_to_conv4(model.preprocess(probe))["conv4"]
        self.local_dim = int(model.local_head(s)[1].shape[-1])
        self.global_dim = int(model.global_head(model.backbone.call_conv5(s)).shape[-1])

    def _function(self, num_scales):
        if num_scales not in self._functions:
            signature = [
                tf.TensorSpec([None, None, 3], tf.uint8),
                tf.TensorSpec([num_scales], tf.float32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ]
            self._functions[num_scales] = tf.function(
                lambda *args: self._extract(num_scales, *args),
                input_signature=signature,
                jit_compile=self.jit_compile,
            )
        return self._functions[num_scales]

    def _extract(self, num_scales, image, scales, max_feature_num, abs_thres, global_scales_ind):
        model, rf = self.model, self.receptive_field
        normalized = model.preprocess(tf.expand_dims(image, 0))
        image_hw = tf.cast(tf.shape(image)[0:2], tf.float32)
        boxes, features, out_scales, scores, global_descriptors = [], [], [], [], []
        for index in range(num_scales):
            scale = scales[index]
            size = tf.cast(tf.round(image_hw * scale), tf.int32)
            s = model.backbone.call_to_conv4(tf.image.resize(normalized, size))["conv4"]
            prob, descriptors = model.local_head(s)
            cell_boxes = geometry.receptive_boxes(tf.shape(s)[1], tf.shape(s)[2], rf) / scale
            prob = tf.reshape(prob, [-1])
            keep = tf.reshape(tf.where(prob >= abs_thres), [-1])
            kept_scores = tf.gather(prob, keep)
            boxes.append(tf.gather(cell_boxes, keep))
            features.append(tf.gather(tf.reshape(descriptors, [-1, self.local_dim]), keep))
            scores.append(kept_scores)
            out_scales.append(tf.ones_like(kept_scores) / scale)
            wanted = tf.reduce_any(tf.equal(global_scales_ind, index))
            global_descriptors.append(
                tf.cond(
                    wanted,
                    lambda s=s: model.global_head(model.backbone.call_conv5(s)),
                    lambda: tf.zeros([0, self.global_dim], tf.float32),
                )
            )
        boxes = tf.concat(boxes, 0)
        scores = tf.concat(scores, 0)
        selected = tf.image.non_max_suppression(
            boxes,
            scores,
            tf.minimum(max_feature_num, tf.shape(boxes)[0]),
            iou_threshold=NMS_IOU_THRESHOLD,
        )
        return {
            "boxes": tf.gather(boxes, selected),
            "features": tf.gather(tf.concat(features, 0), selected),
            "scales": tf.gather(tf.concat(out_scales, 0), selected),
            "scores": tf.expand_dims(tf.gather(scores, selected), 1),
            "global_descriptors": tf.concat(global_descriptors, 0),
        }

    def __call__(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        scales = np.asarray(scales, np.float32).reshape(-1)
        outputs = self._function(len(scales))(
            tf.convert_to_tensor(np.asarray(image, np.uint8)),
            tf.constant(scales),
            tf.constant(int(np.asarray(max_feature_num)), tf.int32),
            tf.constant(np.float32(np.asarray(abs_thres))),
            tf.constant(np.asarray(global_scales_ind, np.int32).reshape(-1)),
        )
        return {key: value.numpy() for key, value in outputs.items()}
