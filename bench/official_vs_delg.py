"""Official DELG SavedModel vs delg_tf extraction of the same (converted) weights.

    python bench/official_vs_delg.py [--format=tf1|tf2|both] [--size=1024] [--repeats=3]
        [--variants=official,pyramid,per_scale,per_scale_xla]

For each official parity fixture (../shared/parity: TF2 export at the root, TF1
tf-slim release format in tf1_slim/, regenerated into a temporary directory),
converts the weights into a delg_tf `DelgModel` (no self-check here: the parity
tests cover it), then times one `size`-px image (astronaut upscaled with Pillow
to size x size; 7 local + 3 global scales, the official R50 DELG config with the
fixture's score threshold, max_image_size 1024 so nothing is resized on the
host) through `DelgExtractor` with

* official:      the official SavedModel, called as the official extractor does
                 (TF1: `.prune` by tensor names; TF2: `serving_default`);
* pyramid:       delg_tf `PyramidExtractor` (one traced graph, `tf.while_loop`
                 over scales, conv5 only at the global scales);
* per_scale:     one traced function per pyramid level, with or without conv5
                 (`delg_tf.official.selfcheck.ConvertedRawExtraction`);
* per_scale_xla: the same with XLA (`jit_compile=True`; one compilation per
                 level size, amortised in the warm-up call);
* folded_pyramid_bf16: the folded pyramid with bfloat16 backbone convolutions
                 (opt-in `compute_dtype="bfloat16"`; not within parity tolerances).

Calls are interleaved (official, ours, official, ...) after one warm-up call
each; prints medians, the ratio official / variant, and each variant's parity
with the official outputs on that image (global max abs, local features matched
by (location, scale), descriptor and attention max abs).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PARITY_DIR = REPO.parent / "shared" / "parity"
FIXTURES = {
    "tf2": (PARITY_DIR / "make_official_savedmodel.py",
            PARITY_DIR / "configs" / "r50delg_gld_parity_1024.pbtxt"),
    "tf1": (PARITY_DIR / "tf1_slim" / "make_tf1_savedmodel.py",
            PARITY_DIR / "tf1_slim" / "configs" / "r50delg_tf1sim_gld_config.pbtxt"),
}
VARIANTS_ALL = ("official", "pyramid", "per_scale", "per_scale_xla", "folded_pyramid",
                "folded_per_scale", "folded_per_scale_xla", "unrolled", "folded_unrolled",
                "folded_pyramid_bf16")
VARIANTS = ("official", "pyramid", "folded_pyramid", "folded_per_scale", "folded_per_scale_xla")


def regenerate(fmt, out):
    script, _ = FIXTURES[fmt]
    subprocess.run([sys.executable, str(script), str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def convert_weights(model_dir):
    """DelgModel with the official weights (what convert() does, minus self-check and I/O)."""
    from delg_tf.official import convert, mapping, variables

    official = variables.read_official_variables(model_dir)
    backbone = {50: "r50", 101: "r101"}[mapping.infer_depth(official.tensors, official.format)]
    model = convert.build_converted_model(convert.official_model_config(official.format, backbone),
                                          convert.attention_bn_epsilon(official.format))
    result = mapping.map_official_variables(official.tensors, official.format,
                                            mapping.model_targets(model))
    mapping.assign_to_model(model, result, official.tensors)
    return model


def bench_image(size):
    from PIL import Image
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size, size),
                                                                       Image.BILINEAR))


def make_extractors(fmt, model_dir, config_path, variants):
    from delg_tf.extraction import raw_model
    from delg_tf.extraction.extractor import DelgExtractor
    from delg_tf.extraction.folded import fold_delg_model
    from delg_tf.official.selfcheck import ConvertedRawExtraction
    from delg_tf.official.unrolled import UnrolledPyramid

    text = Path(config_path).read_text().replace("MODEL_PATH", str(model_dir))
    config = load_delf_config_text(text)
    model = convert_weights(model_dir) if set(variants) - {"official"} else None
    folded = fold_delg_model(model) if model is not None else None
    extractors = {}
    for variant in variants:
        if variant == "official":
            extractors[variant] = DelgExtractor(raw_model.load_raw_extraction_fn(model_dir),
                                                config)
        elif variant == "pyramid":
            extractors[variant] = DelgExtractor.from_model(model, config, fold_batch_norm=False)
        elif variant == "folded_pyramid":
            extractors[variant] = DelgExtractor.from_model(folded, config)
        elif variant == "folded_pyramid_bf16":
            extractors[variant] = DelgExtractor.from_model(model, config,
                                                           compute_dtype="bfloat16")
        else:
            if variant.endswith("unrolled"):
                runner = UnrolledPyramid(folded if variant.startswith("folded") else model)
            else:
                runner = ConvertedRawExtraction(folded if variant.startswith("folded") else model,
                                                jit_compile=variant.endswith("xla"))

            def call(_runner=runner, **kw):
                return _runner(kw["input_image"], kw["input_scales"],
                               kw["input_max_feature_num"], kw["input_abs_thres"],
                               kw["input_global_scales_ind"])

            extractors[variant] = DelgExtractor(raw_model.from_function(call), config)
    return extractors, config


def load_delf_config_text(text):
    from google.protobuf import text_format
    from delg_tf.protos import delf_config_pb2

    return text_format.Parse(text, delf_config_pb2.DelfConfig())


def pyramid_conv_macs(model, image_hw, scales, global_scales_ind):
    """Multiply-adds of every convolution / matmul one pyramid extraction runs.

    Traced per scale with static shapes (``round(hw * s)``, as the pyramid
    resizes): backbone to S + local head at every scale, conv5 + global head only
    at the global scales (what delg_tf runs).
    """
    import tensorflow as tf

    def traced_macs(fn, shape):
        graph = tf.function(fn).get_concrete_function(
            tf.TensorSpec(shape, tf.float32)).graph
        macs = 0
        for op in graph.get_operations():
            if op.type in ("Conv2D", "MatMul"):
                out = op.outputs[0].shape.as_list()
                weights = op.inputs[1].shape.as_list()
                macs += int(np.prod(out)) * int(np.prod(weights[:-1]))
        return macs, graph

    total = 0
    for index, scale in enumerate(scales):
        height, width = (int(np.round(n * scale)) for n in image_hw)

        def local(x):
            s = model.backbone.call_to_conv4(x)["conv4"]
            return model.local_head(s), s

        macs, graph = traced_macs(local, [1, height, width, 3])
        total += macs
        if index in global_scales_ind:
            s_shape = [o for o in graph.outputs if o.shape.rank == 4][-1].shape.as_list()
            macs, _ = traced_macs(
                lambda s: model.global_head(model.backbone.call_conv5(s)), s_shape)
            total += macs
    return total


def conv_ceiling_gflops(repeats=5):
    """GFLOP/s of one large 3x3 convolution (256 -> 256 channels, 128x128): this CPU's
    practical float32 convolution throughput, measured in the same run."""
    import tensorflow as tf

    x = tf.random.stateless_normal([1, 128, 128, 256], seed=[0, 1])
    w = tf.random.stateless_normal([3, 3, 256, 256], seed=[0, 2])
    conv = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))
    conv(x, w)
    best = min(_timed(lambda: conv(x, w).numpy()) for _ in range(repeats))
    return 2 * 128 * 128 * 9 * 256 * 256 / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def parity(reference, candidate, threshold):
    from delg_tf.official import selfcheck

    ref = {"locations": reference.locations, "scales": reference.scales,
           "descriptors": reference.descriptors, "attention": reference.attention}
    got = {"locations": candidate.locations, "scales": candidate.scales,
           "descriptors": candidate.descriptors, "attention": candidate.attention}
    local = selfcheck.compare_local(ref, got, abs_thres=threshold)
    global_diff = float(np.abs(reference.global_descriptor - candidate.global_descriptor).max())
    return (f"global max abs {global_diff:.1e}, local {local['num_matched']}/"
            f"{local['num_reference']} matched ({local['num_missing']} missing, "
            f"{local['num_extra']} extra), desc {local['descriptor_max_abs']:.1e}, "
            f"att {local['attention_max_abs']:.1e}")


def run(fmt, size, repeats, variants, workdir):
    model_dir = regenerate(fmt, Path(workdir) / fmt)
    extractors, config = make_extractors(fmt, model_dir, FIXTURES[fmt][1], variants)
    image = bench_image(size)
    outputs, times, cpu = {}, {v: [] for v in variants}, {v: [] for v in variants}
    for variant in variants:  # warm-up (tracing, XLA compilation)
        start = time.perf_counter()
        outputs[variant] = extractors[variant](image)
        print(f"  [{fmt}] warm-up {variant}: {time.perf_counter() - start:.2f} s", flush=True)
    for _ in range(repeats):
        for variant in variants:
            start, start_cpu = time.perf_counter(), time.process_time()
            extractors[variant](image)
            times[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - start_cpu)
    medians = {v: statistics.median(t) for v, t in times.items()}
    cpu_medians = {v: statistics.median(t) for v, t in cpu.items()}
    threshold = config.delf_local_config.score_threshold
    print(f"\n{fmt.upper()} fixture, {size}x{size} image, 7 local + 3 global scales, "
          f"{repeats} interleaved runs (median wall s, ratio; median process CPU s, ratio; "
          f"all wall runs):")
    base = medians.get("official")
    cpu_base = cpu_medians.get("official")
    for variant in variants:
        ratio = (f" x{base / medians[variant]:.2f}  cpu {cpu_medians[variant]:6.2f} "
                 f"x{cpu_base / cpu_medians[variant]:.2f}") if base else ""
        check = ("" if variant == "official" or "official" not in outputs
                 else "  | " + parity(outputs["official"], outputs[variant], threshold))
        runs = " ".join(f"{t:.2f}" for t in times[variant])
        print(f"  {variant:20s} {medians[variant]:6.2f}{ratio}  ({runs}){check}")
    folded = extractors.get("folded_pyramid")
    if folded is not None:
        macs = pyramid_conv_macs(folded.pyramid.model, image.shape[:2], folded.image_scales,
                                 tuple(folded.global_scales_ind))
        ceiling = conv_ceiling_gflops()
        achieved = 2 * macs / medians["folded_pyramid"] / 1e9
        print(f"\n  work of one extraction (delg_tf graph): {macs / 1e9:.1f} G multiply-adds; "
              f"folded_pyramid runs it at {achieved:.0f} GFLOP/s = {achieved / ceiling:.0%} of "
              f"one large 3x3 convolution on this CPU ({ceiling:.0f} GFLOP/s). At equal float32 "
              f"work no variant can be more than x{ceiling / achieved:.2f} faster than it.")
    return medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=("tf1", "tf2", "both"), default="both")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    if not PARITY_DIR.is_dir():
        print(f"parity fixtures not found at {PARITY_DIR}; nothing to compare.")
        return 1
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS_ALL))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected a subset of {list(VARIANTS_ALL)}")
    formats = ("tf1", "tf2") if args.format == "both" else (args.format,)
    with tempfile.TemporaryDirectory(prefix="official_bench_") as workdir:
        for fmt in formats:
            run(fmt, args.size, args.repeats, variants, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
