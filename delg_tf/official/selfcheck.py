"""Self-check of a converted official DELG model against its source SavedModel.

`converted_raw_extraction` runs a delg_tf `DelgModel` the way the official
export graphs run (``export_model_utils.ExtractLocalAndGlobalFeatures`` and the
TF1 graphs): per pyramid scale s, resize the normalised image to
``round([H, W] * s)`` with ``tf.image.resize`` (bilinear, half-pixel centres,
no antialias), S = conv4, attention and descriptors on every cell, receptive
boxes ``(32 * [i, j, i, j] + [-145, -145, 145, 145]) / s``, cells with attention
>= threshold kept, global descriptors (GeM + whitening) at the selected scales
only; then all scales' cells sorted by descending attention and cut to
``max_feature_num``. Its output has the layout of the official raw call (see
`delg_tf.extraction.raw_model.RawExtractionFn`).

`compare_raw_outputs` matches two such outputs feature by feature by (box
centre, scale), never by index, and measures the differences of the final
global descriptor (per-scale L2, sum, L2), the L2-normalised local descriptors
and the attention.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from delg_tf.extraction import geometry

# Tolerances of the converter's self-check (issue 8).
GLOBAL_MAX_ABS_TOLERANCE = 1e-4
LOCAL_DESCRIPTOR_TOLERANCE = 1e-3
ATTENTION_TOLERANCE = 1e-3
LOCATION_TOLERANCE_PX = 1e-3
SCALE_RELATIVE_TOLERANCE = 1e-6
# Cells whose attention is this close to the threshold may be kept by one model only.
BORDERLINE_SCORE_MARGIN = 1e-4
L2_EPSILON = 1e-12
# Rounding used to key features by (centre y, centre x, scale) when matching.
LOCATION_KEY_DECIMALS = 2
SCALE_KEY_DECIMALS = 5


def l2_normalize_rows(x):
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, L2_EPSILON)


def final_global_descriptor(rows):
    """The official extractor's global descriptor: L2 each scale row, sum, L2."""
    rows = np.asarray(rows, np.float64)
    if rows.size == 0:
        return rows.reshape(-1)
    return l2_normalize_rows(l2_normalize_rows(rows).sum(axis=0))


class ConvertedRawExtraction:
    """Calls a `DelgModel` per pyramid scale like the official export graph.

    Args:
      model: a built `DelgModel` (numerics of the official model).
      jit_compile: XLA-compile the per-scale functions.

    Call: (image uint8 [H, W, 3], scales [S], max_feature_num, abs_thres,
    global_scales_ind [G]) -> dict(boxes, features, scales, scores,
    global_descriptors) as numpy arrays (official raw-call layout).
    """

    def __init__(self, model, jit_compile=False):
        self.model = model
        signature = [tf.TensorSpec([None, None, 3], tf.float32), tf.TensorSpec([], tf.float32)]
        self._local = tf.function(
            self._local_fn,
            input_signature=signature,
            jit_compile=jit_compile,
            reduce_retracing=True,
        )
        self._local_global = tf.function(
            self._local_global_fn,
            input_signature=signature,
            jit_compile=jit_compile,
            reduce_retracing=True,
        )

    def _conv4(self, normalized, scale):
        hw = tf.cast(tf.shape(normalized)[:2], tf.float32)
        size = tf.cast(tf.round(hw * scale), tf.int32)
        resized = tf.image.resize(normalized[tf.newaxis], size)
        return self.model.backbone.call_to_conv4(resized, training=False)["conv4"]

    def _local_outputs(self, s, scale):
        prob, descriptors = self.model.local_head(s, training=False)
        height, width = tf.shape(s)[1], tf.shape(s)[2]
        boxes = geometry.receptive_boxes(height, width) / scale
        return (
            boxes,
            tf.reshape(descriptors, [-1, tf.shape(descriptors)[-1]]),
            tf.reshape(prob, [-1]),
        )

    def _local_fn(self, normalized, scale):
        return self._local_outputs(self._conv4(normalized, scale), scale)

    def _local_global_fn(self, normalized, scale):
        s = self._conv4(normalized, scale)
        d = self.model.backbone.call_conv5(s, training=False)
        return self._local_outputs(s, scale) + (self.model.global_head(d, training=False)[0],)

    def __call__(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        normalized = self.model.preprocess(tf.convert_to_tensor(np.asarray(image)))
        global_set = {int(i) for i in np.asarray(global_scales_ind).reshape(-1)}
        boxes, features, fscales, scores, globals_ = [], [], [], [], []
        for index, scale in enumerate(np.asarray(scales, np.float32).reshape(-1)):
            scale_t = tf.constant(scale, tf.float32)
            if index in global_set:
                b, f, p, g = self._local_global(normalized, scale_t)
                globals_.append(g.numpy())
            else:
                b, f, p = self._local(normalized, scale_t)
            p = p.numpy()
            keep = p >= np.float32(abs_thres)
            boxes.append(b.numpy()[keep])
            features.append(f.numpy()[keep])
            scores.append(p[keep])
            fscales.append(np.full(int(keep.sum()), np.float32(1.0) / scale, np.float32))
        scores = np.concatenate(scores)
        # NMS with IoU 1.0 only sorts by descending score and cuts to max_feature_num.
        order = np.argsort(-scores, kind="stable")[: int(max_feature_num)]
        channels = self.model.global_channels if not globals_ else globals_[0].shape[-1]
        return {
            "boxes": np.concatenate(boxes)[order],
            "features": np.concatenate(features)[order],
            "scales": np.concatenate(fscales)[order],
            "scores": scores[order][:, None],
            "global_descriptors": (
                np.stack(globals_) if globals_ else np.zeros([0, channels], np.float32)
            ),
        }


@dataclasses.dataclass
class RawComparison:
    """Measured differences between a reference and a candidate raw output."""

    global_max_abs: float
    num_reference: int
    num_candidate: int
    num_matched: int
    num_missing: int
    num_extra: int
    descriptor_max_abs: float
    attention_max_abs: float
    location_max_abs: float

    def within(
        self,
        global_tol=GLOBAL_MAX_ABS_TOLERANCE,
        descriptor_tol=LOCAL_DESCRIPTOR_TOLERANCE,
        attention_tol=ATTENTION_TOLERANCE,
    ):
        return (
            self.global_max_abs <= global_tol
            and self.num_missing == 0
            and self.num_extra == 0
            and self.descriptor_max_abs <= descriptor_tol
            and self.attention_max_abs <= attention_tol
            and self.location_max_abs <= LOCATION_TOLERANCE_PX
        )

    def describe(self):
        return (
            f"global max abs {self.global_max_abs:.2e}; local features "
            f"{self.num_matched}/{self.num_reference} matched by (location, scale) "
            f"({self.num_missing} missing, {self.num_extra} extra); descriptors max abs "
            f"{self.descriptor_max_abs:.2e}; attention max abs "
            f"{self.attention_max_abs:.2e}"
        )


def box_centres(boxes):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (boxes[:, :2] + boxes[:, 2:]) / 2.0


def match_features(ref_locations, ref_scales, cand_locations, cand_scales):
    """Index into the candidate of each reference feature with the same (location, scale), or -1."""

    def key(location, scale):
        return (
            round(float(location[0]), LOCATION_KEY_DECIMALS),
            round(float(location[1]), LOCATION_KEY_DECIMALS),
            round(float(scale), SCALE_KEY_DECIMALS),
        )

    index = {key(loc, s): j for j, (loc, s) in enumerate(zip(cand_locations, cand_scales))}
    return np.array(
        [index.get(key(loc, s), -1) for loc, s in zip(ref_locations, ref_scales)], np.int64
    )


def compare_local(ref, cand, abs_thres=None, margin=BORDERLINE_SCORE_MARGIN):
    """Compares local features given as dicts of locations, scales, descriptors, attention.

    Features missing on either side count only when their attention is more
    than `margin` above `abs_thres` (borderline cells may flip).
    """
    idx = match_features(ref["locations"], ref["scales"], cand["locations"], cand["scales"])
    ok = idx >= 0
    ref_att = np.asarray(ref["attention"], np.float64).reshape(-1)
    cand_att = np.asarray(cand["attention"], np.float64).reshape(-1)

    def significant(att):
        return np.ones_like(att, bool) if abs_thres is None else att > abs_thres + margin

    missing = int(np.sum(~ok & significant(ref_att)))
    used = np.zeros(len(cand_att), bool)
    used[idx[ok]] = True
    extra = int(np.sum(~used & significant(cand_att)))
    if ok.any():
        ref_desc = l2_normalize_rows(np.asarray(ref["descriptors"])[ok])
        cand_desc = l2_normalize_rows(np.asarray(cand["descriptors"])[idx[ok]])
        desc = float(np.abs(ref_desc - cand_desc).max())
        att = float(np.abs(ref_att[ok] - cand_att[idx[ok]]).max())
        loc = float(
            np.abs(
                np.asarray(ref["locations"], np.float64)[ok]
                - np.asarray(cand["locations"], np.float64)[idx[ok]]
            ).max()
        )
    else:
        desc = att = loc = 0.0
    return dict(
        num_reference=len(ref_att),
        num_candidate=len(cand_att),
        num_matched=int(ok.sum()),
        num_missing=missing,
        num_extra=extra,
        descriptor_max_abs=desc,
        attention_max_abs=att,
        location_max_abs=loc,
    )


def raw_to_local(raw):
    return {
        "locations": box_centres(raw["boxes"]),
        "scales": np.asarray(raw["scales"]),
        "descriptors": raw["features"],
        "attention": np.asarray(raw["scores"]).reshape(-1),
    }


def compare_raw_outputs(reference, candidate, abs_thres=None):
    """Compares two official-layout raw outputs (see module doc). Returns `RawComparison`."""
    ref_g = final_global_descriptor(reference["global_descriptors"])
    cand_g = final_global_descriptor(candidate["global_descriptors"])
    if ref_g.shape != cand_g.shape:
        global_diff = float("inf")
    else:
        global_diff = float(np.abs(ref_g - cand_g).max()) if ref_g.size else 0.0
    local = compare_local(raw_to_local(reference), raw_to_local(candidate), abs_thres)
    return RawComparison(global_max_abs=global_diff, **local)
