"""Extraction speed and memory of DELG (paper Table 6: the joint model costs little more).

    python bench/extract.py [--quick] [--size=1024] [--backbone=r50] [--repeats=2]

Prints, for one random `size`x`size` image on the chosen backbone (random
weights; speed does not depend on them):

* floor: one backbone forward (conv1..conv5) at scale 1;
* backbone over the pyramid: conv4 at every local scale + conv5 at the global
  scales, nothing else (what any multi-scale DELG must at least compute);
* global only, 3 scales (the "global model" of Table 6);
* delg_tf extraction, 3 global + 7 local scales (the paper's setting);
* delg_tf extraction, 3 global + 3 local scales;
each as median seconds of `repeats` interleaved runs after one warm-up (tracing)
run, with the ratios to the floor and to the pyramid backbone; then the peak host
memory (ru_maxrss) and, if TF reports it, the TF CPU allocator peak.
`--quick` uses 512 px, the tiny backbone and one repeat (a smoke run).
"""

import argparse
import resource
import statistics
import sys
import time

import tensorflow as tf

from delg_tf.extraction.config import DEFAULT_IMAGE_SCALES
from delg_tf.extraction.pyramid import PyramidExtractor
from delg_tf.extraction.testing import random_image

PAPER_GLOBAL_SCALES_IND = (3, 4, 5)  # 1/sqrt(2), 1, sqrt(2)
THREE_SCALES = DEFAULT_IMAGE_SCALES[3:6]
QUICK_SIZE = 512
KIB = 1024.0


def build_model(backbone):
    from delg_tf.models import registry
    from delg_tf.models.delg import DelgModelConfig

    return registry.build_model(
        "delg", DelgModelConfig(num_classes=10, backbone=backbone), load_imagenet=False
    )


def time_cases(cases, repeats):
    """Median seconds per case; cases interleaved round-robin so that load changes on a
    shared machine hit all of them alike. One untimed warm-up call each (tracing)."""
    for _, fn in cases:
        fn()
    times = {name: [] for name, _ in cases}
    for _ in range(repeats):
        for name, fn in cases:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def tf_cpu_peak_mib():
    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        return None
    return info.get("peak", 0) / KIB / KIB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--backbone", default="r50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.backbone, args.repeats = QUICK_SIZE, "tiny", 1
    model = build_model(args.backbone)
    image = tf.constant(random_image(args.size, args.size))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def floor(img):
        s = model.backbone.call_to_conv4(model.preprocess(img[None]))["conv4"]
        return model.backbone.call_conv5(s)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def backbone_pyramid(img):
        normalized = model.preprocess(img[None])
        hw = tf.cast(tf.shape(img)[:2], tf.float32)
        total = tf.constant(0.0)
        for index, scale in enumerate(DEFAULT_IMAGE_SCALES):  # Unrolled: reference only.
            resized = tf.image.resize(normalized, tf.cast(tf.round(hw * scale), tf.int32))
            s = model.backbone.call_to_conv4(resized)["conv4"]
            total += tf.reduce_sum(s[..., :1])
            if index in PAPER_GLOBAL_SCALES_IND:
                total += tf.reduce_sum(model.backbone.call_conv5(s)[..., :1])
        return total

    joint = PyramidExtractor(model)
    global_only = PyramidExtractor(model, mode="global")
    scales7 = tf.constant(DEFAULT_IMAGE_SCALES, tf.float32)
    scales3 = tf.constant(THREE_SCALES, tf.float32)
    cases = [
        ("floor: backbone forward, 1 scale", lambda: floor(image)),
        ("backbone only over the pyramid (7 conv4 + 3 conv5)", lambda: backbone_pyramid(image)),
        (
            "global only, 3 scales",
            lambda: global_only.extract(image, scales7, tf.constant(PAPER_GLOBAL_SCALES_IND)),
        ),
        (
            "delg_tf 3 global + 7 local scales",
            lambda: joint.extract(
                image,
                scales7,
                tf.constant(1000),
                tf.constant(0.0),
                tf.constant(PAPER_GLOBAL_SCALES_IND),
            ),
        ),
        (
            "delg_tf 3 global + 3 local scales",
            lambda: joint.extract(
                image, scales3, tf.constant(1000), tf.constant(0.0), tf.constant([0, 1, 2])
            ),
        ),
    ]
    print(
        f"bench/extract.py: {args.size}x{args.size} image, backbone {args.backbone}, "
        f"median of {args.repeats} after 1 warm-up, TF {tf.__version__}, "
        f"{len(tf.config.list_physical_devices('CPU'))} CPU device(s)"
    )
    results = time_cases(cases, args.repeats)
    floor_time = results[cases[0][0]]
    pyramid_time = results[cases[1][0]]
    for name, _ in cases:
        print(
            f"  {name:<52s} {results[name]:8.3f} s   x{results[name] / floor_time:5.2f} floor"
            f"   x{results[name] / pyramid_time:5.2f} pyramid backbone"
        )
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB  # Linux: KiB
    tf_peak = tf_cpu_peak_mib()
    print(
        f"  peak host memory (ru_maxrss): {peak_host:.0f} MiB; TF CPU allocator peak: "
        + (f"{tf_peak:.0f} MiB" if tf_peak is not None else "not reported by this TF build")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
