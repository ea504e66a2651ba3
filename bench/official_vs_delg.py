"""Official DELG SavedModel vs delg_tf extraction of the same (converted) weights.

    python bench/official_vs_delg.py [--format=tf1|tf2|both] [--size=1024] [--repeats=3]
        [--variants=official,pyramid,per_scale,per_scale_xla] [--per_scale]
        [--conv_layers] [--selfcheck]

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
* whole_xla:     every pyramid level in one XLA-compiled function (the whole
                 network graph under XLA; threshold and sort on the host, as
                 per_scale);
* folded_pyramid_bf16: the folded pyramid with bfloat16 backbone convolutions
                 (opt-in `compute_dtype="bfloat16"`; not within parity tolerances);
* folded_*:      the same on the batch-norm-folded model (`delg_tf.extraction.folded`).

Calls are interleaved (official, ours, official, ...) after one warm-up call
each; prints medians, the ratio official / variant, and each variant's parity
with the official outputs on that image (global max abs, local features matched
by (location, scale), descriptor and attention max abs). The header names the
CPU and whether it has native bfloat16 (AVX512_BF16 / AMX_BF16) or emulates it.

--per_scale      also times each pyramid level alone (official and every variant
                 called with that one scale; conv5 + global head only at the global
                 scales), a table per level with the ratio official / variant.
--conv_layers    times single 3x3 convolutions of the sizes of one `size`-px
                 extraction (conv2..conv5 widths at the matching resolutions):
                 oneDNN's direct float32 convolution (the baseline), Winograd
                 F(2x2,3x3) and F(4x4,3x3) written in TF ops (with and without XLA)
                 and a bfloat16 convolution; ratio direct / method and the relative
                 error against the direct float32 output. Needs no fixture.
--selfcheck      runs the converter's self-check (`delg_tf.official.convert`, default
                 3 photos at 320 px, every cell kept) on each fixture and prints its
                 lines: the converted model vs the official SavedModel.
`--variants=` (empty) skips the extraction timings.
"""

import argparse
import os
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
    "tf2": (
        PARITY_DIR / "make_official_savedmodel.py",
        PARITY_DIR / "configs" / "r50delg_gld_parity_1024.pbtxt",
    ),
    "tf1": (
        PARITY_DIR / "tf1_slim" / "make_tf1_savedmodel.py",
        PARITY_DIR / "tf1_slim" / "configs" / "r50delg_tf1sim_gld_config.pbtxt",
    ),
}
VARIANTS_ALL = (
    "official",
    "pyramid",
    "per_scale",
    "per_scale_xla",
    "folded_pyramid",
    "folded_per_scale",
    "folded_per_scale_xla",
    "unrolled",
    "folded_unrolled",
    "whole_xla",
    "folded_whole_xla",
    "folded_pyramid_bf16",
)
VARIANTS = ("official", "pyramid", "folded_pyramid", "folded_per_scale", "folded_per_scale_xla")


# --conv_layers: (divisor of the image size, channels in = out) of 3x3 convolutions
# at the resolutions one extraction runs them (size 1024: 128x128x256, 256x256x128,
# 512x512x64 at the scale-2 level's conv4/conv3/conv2 widths, 32x32x512 conv5).
CONV_LAYERS = ((8, 256), (4, 128), (2, 64), (32, 512))
# Winograd F(m x m, 3x3) matrices (Lavin & Gray 2016): B^T [a, a], G [a, 3], A^T [m, a],
# a = m + 2.
WINOGRAD = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_description():
    """CPU model and whether bfloat16 arithmetic is native here (from /proc/cpuinfo)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        return model + " (no /proc/cpuinfo: bfloat16 support unknown)"
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    vector = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "no avx2")
    bf16 = (
        "native bfloat16 (" + ", ".join(native) + ")"
        if native
        else "bfloat16 emulated (no " + " / ".join(BF16_CPU_FLAGS) + ")"
    )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cpus, {vector}, {bf16}; load average {load}"


class WholeGraphXla:
    """Every pyramid level in one XLA-compiled function (one compilation per image size,
    scales and global levels); threshold, sort and cut on the host exactly as
    `ConvertedRawExtraction` (whose per-level functions it replays)."""

    use_local = True
    use_global = True

    def __init__(self, model):
        from delg_tf.official.selfcheck import ConvertedRawExtraction

        self.levels = ConvertedRawExtraction(model)
        self._compiled = {}

    def _dense(self, scales, global_set):
        import tensorflow as tf

        key = (scales, global_set)
        if key not in self._compiled:
            levels = self.levels

            def dense(normalized):
                return [
                    levels._local_global_fn(normalized, tf.constant(scale))
                    if index in global_set
                    else levels._local_fn(normalized, tf.constant(scale))
                    for index, scale in enumerate(scales)
                ]

            self._compiled[key] = tf.function(dense, jit_compile=True)
        return self._compiled[key]

    def __call__(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        import tensorflow as tf

        scales = tuple(float(s) for s in np.asarray(scales, np.float32).reshape(-1))
        global_set = frozenset(int(i) for i in np.asarray(global_scales_ind).reshape(-1))
        normalized = self.levels.model.preprocess(tf.convert_to_tensor(np.asarray(image)))
        outputs = iter(self._dense(scales, global_set)(normalized))
        replay = lambda *_: next(outputs)  # noqa: E731 -- levels in the order they are asked
        levels = self.levels
        saved = levels._local, levels._local_global
        levels._local = levels._local_global = replay
        try:
            return levels(image, scales, max_feature_num, abs_thres, global_scales_ind)
        finally:
            levels._local, levels._local_global = saved


def regenerate(fmt, out):
    if (out / "saved_model.pb").is_file():  # already regenerated in this run
        return out
    script, _ = FIXTURES[fmt]
    subprocess.run(
        [sys.executable, str(script), str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return out


def convert_weights(model_dir):
    """DelgModel with the official weights (what convert() does, minus self-check and I/O)."""
    from delg_tf.official import convert, mapping, variables

    official = variables.read_official_variables(model_dir)
    backbone = {50: "r50", 101: "r101"}[mapping.infer_depth(official.tensors, official.format)]
    model = convert.build_converted_model(
        convert.official_model_config(official.format, backbone),
        convert.attention_bn_epsilon(official.format),
    )
    result = mapping.map_official_variables(
        official.tensors, official.format, mapping.model_targets(model)
    )
    mapping.assign_to_model(model, result, official.tensors)
    return model


def bench_image(size):
    from PIL import Image
    import skimage.data

    return np.asarray(
        Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BILINEAR)
    )


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
            extractors[variant] = DelgExtractor(raw_model.load_raw_extraction_fn(model_dir), config)
        elif variant == "pyramid":
            extractors[variant] = DelgExtractor.from_model(model, config, fold_batch_norm=False)
        elif variant == "folded_pyramid":
            extractors[variant] = DelgExtractor.from_model(folded, config)
        elif variant == "folded_pyramid_bf16":
            extractors[variant] = DelgExtractor.from_model(model, config, compute_dtype="bfloat16")
        else:
            source = folded if variant.startswith("folded") else model
            if variant.endswith("unrolled"):
                runner = UnrolledPyramid(source)
            elif variant.endswith("whole_xla"):
                runner = WholeGraphXla(source)
            else:
                runner = ConvertedRawExtraction(source, jit_compile=variant.endswith("xla"))

            def call(_runner=runner, **kw):
                return _runner(
                    kw["input_image"],
                    kw["input_scales"],
                    kw["input_max_feature_num"],
                    kw["input_abs_thres"],
                    kw["input_global_scales_ind"],
                )

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
        graph = tf.function(fn).get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
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
                lambda s: model.global_head(model.backbone.call_conv5(s)), s_shape
            )
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

    ref = {
        "locations": reference.locations,
        "scales": reference.scales,
        "descriptors": reference.descriptors,
        "attention": reference.attention,
    }
    got = {
        "locations": candidate.locations,
        "scales": candidate.scales,
        "descriptors": candidate.descriptors,
        "attention": candidate.attention,
    }
    local = selfcheck.compare_local(ref, got, abs_thres=threshold)
    global_diff = float(np.abs(reference.global_descriptor - candidate.global_descriptor).max())
    return (
        f"global max abs {global_diff:.1e}, local {local['num_matched']}/"
        f"{local['num_reference']} matched ({local['num_missing']} missing, "
        f"{local['num_extra']} extra), desc {local['descriptor_max_abs']:.1e}, "
        f"att {local['attention_max_abs']:.1e}"
    )


def time_per_scale(fmt, extractors, variants, image, config, repeats):
    """Each pyramid level alone: every variant's raw call with that one scale (conv5 and
    the global head only if it is a global scale), interleaved; prints one table."""
    any_extractor = extractors[variants[0]]
    scales = any_extractor.image_scales
    global_set = {int(i) for i in any_extractor.global_scales_ind}
    local = config.delf_local_config
    medians = {}
    for index, scale in enumerate(scales):
        global_ind = np.int32([0] if index in global_set else [])
        calls = {
            v: (
                lambda e=extractors[v], s=np.float32([scale]): e.raw_fn(
                    image, s, local.max_feature_num, local.score_threshold, global_ind
                )
            )
            for v in variants
        }
        for call in calls.values():  # warm-up: tracing / compilation for this level size
            call()
        times = {v: [] for v in variants}
        for _ in range(repeats):
            for variant, call in calls.items():
                times[variant].append(_timed(call))
        medians[index] = {v: statistics.median(t) for v, t in times.items()}
    print(
        f"\n{fmt.upper()} fixture, one pyramid level at a time ({image.shape[0]}x"
        f"{image.shape[1]} image; median wall s of {repeats} interleaved runs"
        + (", ratio official / variant" if "official" in variants else "")
        + "):"
    )
    print("  " + f"{'scale':<19s}" + "".join(f"{v:>22s}" for v in variants))
    for index, scale in enumerate(scales):
        kind = "local+global" if index in global_set else "local"
        row = medians[index]
        cells = []
        for variant in variants:
            cell = f"{row[variant]:.3f}"
            if "official" in row and variant != "official":
                cell += f" x{row['official'] / row[variant]:.2f}"
            cells.append(f"{cell:>22s}")
        print(f"  {scale:6.4f} {kind:<12s}" + "".join(cells))
    totals = {v: sum(medians[i][v] for i in medians) for v in variants}
    cells = [
        f"{totals[v]:.3f}"
        + (
            f" x{totals['official'] / totals[v]:.2f}"
            if "official" in totals and v != "official"
            else ""
        )
        for v in variants
    ]
    print(f"  {'sum of levels':<19s}" + "".join(f"{c:>22s}" for c in cells))


def winograd_kernel(kernel, m):
    """U = G g G^T of a [3, 3, C, K] kernel, as [a * a, C, K] (a = m + 2)."""
    import tensorflow as tf

    g = tf.constant(WINOGRAD[m][1], tf.float32)
    a = m + 2
    u = tf.einsum("ij,jkcn,lk->ilcn", g, kernel, g)
    return tf.reshape(u, [a * a, kernel.shape[2], kernel.shape[3]])


def winograd_conv3x3(x, u, m):
    """3x3 convolution, stride 1, SAME, of x [1, H, W, C] by Winograd F(m x m, 3x3)
    with the transformed kernel u = `winograd_kernel(kernel, m)`."""
    import tensorflow as tf

    bt = tf.constant(WINOGRAD[m][0], tf.float32)
    at = tf.constant(WINOGRAD[m][2], tf.float32)
    a = m + 2
    _, height, width, channels = x.shape
    tiles_h, tiles_w = -(-height // m), -(-width // m)
    padded = tf.pad(
        x, [[0, 0], [1, tiles_h * m + 1 - height], [1, tiles_w * m + 1 - width], [0, 0]]
    )
    d = tf.image.extract_patches(padded, [1, a, a, 1], [1, m, m, 1], [1, 1, 1, 1], "VALID")
    d = tf.reshape(d, [tiles_h * tiles_w, a, a, channels])
    v = tf.einsum("ij,tjkc,lk->iltc", bt, d, bt)  # B^T d B
    v = tf.reshape(v, [a * a, tiles_h * tiles_w, channels])
    product = tf.matmul(v, u)  # [a*a, tiles, K]
    product = tf.reshape(product, [a, a, tiles_h * tiles_w, -1])
    y = tf.einsum("ij,jktn,lk->tiln", at, product, at)  # A^T M A: [tiles, m, m, K]
    y = tf.reshape(y, [tiles_h, tiles_w, m, m, -1])
    y = tf.reshape(tf.transpose(y, [0, 2, 1, 3, 4]), [1, tiles_h * m, tiles_w * m, -1])
    return y[:, :height, :width, :]


def time_conv_layers(size, repeats):
    """Per-layer table: direct float32 (oneDNN) vs Winograd in TF ops vs bfloat16."""
    import tensorflow as tf

    layers = [(max(size // div, 4), ch) for div, ch in CONV_LAYERS]
    methods = (
        "direct float32 (oneDNN)",
        "Winograd F(2x2,3x3)",
        "Winograd F(4x4,3x3)",
        "Winograd F(2x2,3x3) XLA",
        "Winograd F(4x4,3x3) XLA",
        "bfloat16 direct",
    )
    results = {name: [] for name in methods}
    for side, channels in layers:
        x = tf.random.stateless_normal([1, side, side, channels], seed=[0, 1])
        w = tf.random.stateless_normal([3, 3, channels, channels], seed=[0, 2]) * (
            1.0 / (3.0 * channels**0.5)
        )
        direct = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))
        u = {m: winograd_kernel(w, m) for m in (2, 4)}  # weight transform: once, untimed
        winograd = {m: tf.function(lambda x, u, m=m: winograd_conv3x3(x, u, m)) for m in (2, 4)}
        winograd_xla = {
            m: tf.function(lambda x, u, m=m: winograd_conv3x3(x, u, m), jit_compile=True)
            for m in (2, 4)
        }
        x16, w16 = tf.cast(x, tf.bfloat16), tf.cast(w, tf.bfloat16)
        calls = {
            methods[0]: lambda: direct(x, w),
            methods[1]: lambda: winograd[2](x, u[2]),
            methods[2]: lambda: winograd[4](x, u[4]),
            methods[3]: lambda: winograd_xla[2](x, u[2]),
            methods[4]: lambda: winograd_xla[4](x, u[4]),
            methods[5]: lambda: tf.cast(direct(x16, w16), tf.float32),
        }
        reference = calls[methods[0]]().numpy()
        scale = float(np.abs(reference).max())
        errors = {
            name: float(np.abs(call().numpy() - reference).max()) / scale
            for name, call in calls.items()
        }  # also the warm-up (tracing, XLA)
        times = {name: [] for name in methods}
        for _ in range(repeats):
            for name, call in calls.items():
                times[name].append(_timed(lambda: call().numpy()))
        for name in methods:
            results[name].append((statistics.median(times[name]), errors[name]))
    print(
        f"\nsingle 3x3 convolutions (stride 1, SAME, channels in = out), median ms of "
        f"{repeats} interleaved runs; ratio = direct float32 / method; err = max |y - "
        f"y_direct| / max |y_direct|:"
    )
    header = "".join(f"{f'{side}x{side}x{ch}':>28s}" for side, ch in layers)
    print(f"  {'method':26s}{header}")
    base = results[methods[0]]
    for name in methods:
        cells = []
        for (t, err), (t0, _) in zip(results[name], base):
            cell = (
                f"{t * 1e3:.1f}"
                if name == methods[0]
                else (f"{t * 1e3:.1f} x{t0 / t:.2f} err {err:.1e}")
            )
            cells.append(f"{cell:>28s}")
        print(f"  {name:26s}" + "".join(cells))


def run_selfcheck(fmt, workdir):
    """The converter's self-check on the regenerated fixture (prints its lines)."""
    from delg_tf.official.convert import ConvertConfig, convert

    model_dir = regenerate(fmt, Path(workdir) / fmt)
    print(
        f"\n{fmt.upper()} fixture: converter self-check (converted Keras model vs the official "
        f"SavedModel, every cell kept):"
    )
    convert(
        ConvertConfig(
            model_path=str(model_dir),
            output_dir=str(Path(workdir) / (fmt + "_converted")),
            overwrite=True,
            export=False,
        ),
        log=lambda line: print("  " + line) if line.startswith("self-check") else None,
    )


def run(fmt, size, repeats, variants, workdir, per_scale=False):
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
    print(
        f"\n{fmt.upper()} fixture, {size}x{size} image, 7 local + 3 global scales, "
        f"{repeats} interleaved runs (median wall s, ratio; median process CPU s, ratio; "
        f"all wall runs):"
    )
    base = medians.get("official")
    cpu_base = cpu_medians.get("official")
    for variant in variants:
        ratio = (
            (
                f" x{base / medians[variant]:.2f}  cpu {cpu_medians[variant]:6.2f} "
                f"x{cpu_base / cpu_medians[variant]:.2f}"
            )
            if base
            else ""
        )
        check = (
            ""
            if variant == "official" or "official" not in outputs
            else "  | " + parity(outputs["official"], outputs[variant], threshold)
        )
        runs = " ".join(f"{t:.2f}" for t in times[variant])
        print(f"  {variant:20s} {medians[variant]:6.2f}{ratio}  ({runs}){check}")
    folded = extractors.get("folded_pyramid")
    if folded is not None:
        macs = pyramid_conv_macs(
            folded.pyramid.model,
            image.shape[:2],
            folded.image_scales,
            tuple(folded.global_scales_ind),
        )
        ceiling = conv_ceiling_gflops()
        achieved = 2 * macs / medians["folded_pyramid"] / 1e9
        print(
            f"\n  work of one extraction (delg_tf graph): {macs / 1e9:.1f} G multiply-adds; "
            f"folded_pyramid runs it at {achieved:.0f} GFLOP/s = {achieved / ceiling:.0%} of "
            f"one large 3x3 convolution on this CPU ({ceiling:.0f} GFLOP/s). At equal float32 "
            f"work no variant can be more than x{ceiling / achieved:.2f} faster than it."
        )
    if per_scale:
        time_per_scale(fmt, extractors, variants, image, config, repeats)
    return medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=("tf1", "tf2", "both"), default="both")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated; empty: no extraction timings",
    )
    parser.add_argument(
        "--per_scale",
        action="store_true",
        help="also time each pyramid level alone (official and every variant)",
    )
    parser.add_argument(
        "--conv_layers",
        action="store_true",
        help="time single 3x3 convolutions: direct float32, Winograd, bfloat16",
    )
    parser.add_argument(
        "--selfcheck", action="store_true", help="print the converter's self-check on each fixture"
    )
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS_ALL))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected a subset of {list(VARIANTS_ALL)}")
    print(f"CPU: {cpu_description()}")
    if args.conv_layers:
        time_conv_layers(args.size, args.repeats)
    if not (variants or args.selfcheck):
        return 0
    if not PARITY_DIR.is_dir():
        print(f"parity fixtures not found at {PARITY_DIR}; nothing to compare.")
        return 1
    formats = ("tf1", "tf2") if args.format == "both" else (args.format,)
    with tempfile.TemporaryDirectory(prefix="official_bench_") as workdir:
        for fmt in formats:
            if args.selfcheck:
                run_selfcheck(fmt, workdir)
            if variants:
                run(fmt, args.size, args.repeats, variants, workdir, args.per_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
