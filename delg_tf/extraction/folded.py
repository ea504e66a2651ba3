"""Batch-norm-folded inference view of a `DelgModel`: the extraction graph by default.

`fold_delg_model(model)` returns a `FoldedDelg` (a `tf.Module`) with the
inference API that `delg_tf.extraction.pyramid.PyramidExtractor` and the export
use -- ``preprocess``, ``backbone.call_to_conv4``, ``backbone.call_conv5``,
``local_head``, ``global_head`` -- computed with plain TF ops on weights where
every frozen batch norm is folded into the preceding convolution:

    W' = W * gamma / sqrt(var + eps),  b' = (b - mean) * gamma / sqrt(var + eps) + beta

so each conv + BN (+ ReLU) is one ``Conv2D`` + ``BiasAdd`` (+ ``Relu``), which
TensorFlow's graph optimizer fuses into a single oneDNN kernel on CPU (Keras 3's
``BatchNormalization`` is several element-wise passes over every feature map).
Padding, stride placement and pooling follow the model's backbone layout exactly
(`delg_tf.backbones.resnet`).

One more exact saving: in the layouts that compute conv4 at stride 16 and then
keep every other cell (``tf2_delf`` / ``keras`` with ``block3_stride``, the
official TF2 DELG), the last conv4 unit is only evaluated at the kept cells (its
3x3 conv with stride 2 on the same padding, its 1x1 conv and shortcut on the
subsampled map), which is the same arithmetic for every kept output.

Optionally (``compute_dtype="bfloat16"``) the backbone convolutions run in
bfloat16 (the heads, GeM and whitening stay float32): ~1.8x faster on CPUs with
AVX512_BF16, but ~4e-3 relative error per layer -- outside the official parity
tolerances (measured in docs/readme_official.md); opt-in only. Only CPUs with
native bfloat16 (AVX512_BF16 or AMX-BF16) gain: elsewhere oneDNN emulates it and
it was measured slower than float32 (AVX2-only CPU), so asking for bfloat16 there
logs one warning (`emulated_bfloat16_reason`, `warn_if_bfloat16_emulated`).

In float32 only rounding changes (~1e-6 relative); the parity tests
(``tests/test_official_parity.py``, ``tests/test_extraction_folded.py``) and
``bench/official_vs_delg.py`` measure it. The folded weights are non-trainable
``tf.Variable``s (an export stores them in ``variables/``, not in the graph);
they are copied at fold time: later changes to the model are not seen.
"""

import functools
import logging
import os

import numpy as np
import tensorflow as tf

from delg_tf.ops import pooling

logger = logging.getLogger(__name__)

# Spatial subsampling of the layouts with conv4 at stride 16 (a 1x1/2 max-pool).
CONV4_SUBSAMPLE_STRIDE = 2
BFLOAT16 = "bfloat16"
# Dtypes the folded backbone can compute in (float32: parity with the Keras model).
COMPUTE_DTYPES = ("float32", BFLOAT16)

# Native bfloat16 arithmetic: x86 /proc/cpuinfo flags of oneDNN's AVX512_CORE_BF16 and
# AMX ISAs. Without one of them oneDNN emulates bfloat16 (slower than float32).
NATIVE_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO_PATH = "/proc/cpuinfo"
CPUINFO_FLAGS_KEY = "flags"  # x86 lines `flags : fpu vme ...` (other CPUs: unknown).
# oneDNN's ISA cap, new name first (the DNNL_ spelling is read when the first is unset).
ONEDNN_ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# oneDNN x86 ISA names below AVX512_CORE_BF16 (the first with bfloat16 instructions): a
# cap at one of them makes oneDNN emulate bfloat16 even on a CPU that has it.
ONEDNN_ISAS_WITHOUT_BFLOAT16 = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
)
# TensorFlow's switch of its oneDNN CPU kernels; off, convolutions use Eigen (emulated).
TF_ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
TF_ONEDNN_OFF_VALUES = ("0", "false")


def cpu_flags(cpuinfo_text):
    """The x86 CPU flags of a /proc/cpuinfo text (its `flags : ...` lines), or None when it
    has none (another architecture, no /proc). A text without any ':' is read as a bare
    space-separated flags list.
    """
    lines = [line.partition(":") for line in cpuinfo_text.splitlines()]
    flags = {
        flag
        for key, colon, value in lines
        if colon and key.strip() == CPUINFO_FLAGS_KEY
        for flag in value.split()
    }
    if flags:
        return frozenset(flags)
    if cpuinfo_text.strip() and ":" not in cpuinfo_text:
        return frozenset(cpuinfo_text.split())
    return None


def emulated_bfloat16_reason(cpuinfo_text=None, env=None):
    """Why bfloat16 is emulated (not native) on this CPU, or None if native or unknown.

    Pure given both arguments (tests pass sample texts); None reads `CPUINFO_PATH` /
    `os.environ`.

    Args:
      cpuinfo_text: /proc/cpuinfo text (or a bare flags list); see `cpu_flags`.
      env: environment mapping.

    Returns:
      None when the CPU has one of `NATIVE_BFLOAT16_CPU_FLAGS` and nothing caps oneDNN
      below it, or when the flags are unknown (no warning without evidence); else a
      short reason naming the flags or the variable.
    """
    if env is None:
        env = os.environ
    if cpuinfo_text is None:
        try:
            with open(CPUINFO_PATH, encoding="utf-8", errors="replace") as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ""
    switch = env.get(TF_ONEDNN_VARIABLE, "").strip()
    if switch.lower() in TF_ONEDNN_OFF_VALUES:
        return f"{TF_ONEDNN_VARIABLE}={switch} turns TensorFlow's oneDNN kernels off"
    for variable in ONEDNN_ISA_CAP_VARIABLES:
        cap = env.get(variable, "").strip()
        if cap:
            if cap.upper() in ONEDNN_ISAS_WITHOUT_BFLOAT16:
                return f"{variable}={cap} caps oneDNN below AVX512_CORE_BF16"
            break
    flags = cpu_flags(cpuinfo_text)
    if flags is not None and not flags.intersection(NATIVE_BFLOAT16_CPU_FLAGS):
        return f"the CPU flags have neither {' nor '.join(NATIVE_BFLOAT16_CPU_FLAGS)}"
    return None


def warn_if_bfloat16_emulated(
    compute_dtype, what="compute_dtype=bfloat16", cpuinfo_text=None, env=None
):
    """Logs ONE warning line if `compute_dtype` is bfloat16 and this CPU emulates it.

    Args:
      compute_dtype: the requested compute dtype (nothing happens unless bfloat16).
      what: what asked for bfloat16 (a flag or an export path), starts the message.
      cpuinfo_text, env: as `emulated_bfloat16_reason` (None: this machine).

    Returns:
      The message logged, or None.
    """
    if compute_dtype != BFLOAT16:
        return None
    reason = emulated_bfloat16_reason(cpuinfo_text, env)
    if reason is None:
        return None
    message = (
        f"{what}: no native bfloat16 on this CPU ({reason}), oneDNN emulates it: "
        "bfloat16 will likely be slower than float32 here (measured slower on an "
        "AVX2-only CPU); use float32 unless it runs on a CPU with AVX512_BF16 or "
        "AMX-BF16."
    )
    logger.warning("%s", message)
    return message


class BFloat16UnavailableError(ValueError):
    """bfloat16 convolutions cannot run in this process (CPU / oneDNN configuration)."""


@functools.cache
def bfloat16_convolution_error():
    """None if this process can run a fused bfloat16 convolution, else the reason.

    oneDNN creates no bfloat16 convolution primitive below its AVX512_CORE ISA on some
    CPUs (seen with ``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX-512 Xeon: "could not create a
    primitive descriptor for the convolution forward propagation primitive"), while an
    AVX2-only CPU runs them emulated. Probed once per process with a 3x3 conv + bias +
    ReLU in a ``tf.function`` (the graph form extraction runs).
    """

    @tf.function
    def conv(x, kernel, bias):
        return tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))

    try:
        conv(
            tf.ones([1, 8, 8, 16], tf.bfloat16),
            tf.ones([3, 3, 16, 16], tf.bfloat16),
            tf.zeros([16], tf.bfloat16),
        ).numpy()
    except tf.errors.OpError as e:
        lines = [line.strip() for line in e.message.splitlines() if line.strip()]
        detail = next(
            (line for line in lines if "primitive" in line),
            lines[0] if lines else type(e).__name__,
        )
        return f"{type(e).__name__}: {detail[:200]}"
    return None


def _isa_cap_text(env=None):
    env = os.environ if env is None else env
    caps = [f"{name}={env[name]}" for name in ONEDNN_ISA_CAP_VARIABLES if env.get(name)]
    return f" with {', '.join(caps)}" if caps else ""


def check_bfloat16_runs(what="compute_dtype=bfloat16"):
    """Raises BFloat16UnavailableError (one line naming `what` and the fix) where
    `bfloat16_convolution_error()` reports that bfloat16 convolutions cannot run.
    """
    error = bfloat16_convolution_error()
    if error is not None:
        raise BFloat16UnavailableError(
            f"{what}: this CPU / oneDNN configuration{_isa_cap_text()} cannot run bfloat16 "
            f"convolutions ({error}); use float32 (--compute_dtype=float32, a float32 "
            "export), or run where oneDNN supports bfloat16 (AVX512_BF16 / AMX, or without "
            "an ONEDNN_MAX_CPU_ISA cap)."
        )


def check_compute_dtype(compute_dtype):
    """Returns `compute_dtype` if it is one of `COMPUTE_DTYPES`, else raises ValueError."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be one of {COMPUTE_DTYPES}, received {compute_dtype!r}."
        )
    return compute_dtype


def _fold(conv, bn):
    """(kernel, bias) float32 numpy arrays of conv followed by frozen BN (bn may be None)."""
    kernel = np.asarray(conv.kernel.numpy(), np.float64)
    bias = (
        np.asarray(conv.bias.numpy(), np.float64)
        if conv.bias is not None
        else np.zeros(kernel.shape[-1])
    )
    if bn is not None:
        gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.scale else 1.0
        beta = np.asarray(bn.beta.numpy(), np.float64) if bn.center else 0.0
        scale = gamma / np.sqrt(np.asarray(bn.moving_variance.numpy(), np.float64) + bn.epsilon)
        kernel = kernel * scale
        bias = (bias - np.asarray(bn.moving_mean.numpy(), np.float64)) * scale + beta
    return kernel.astype(np.float32), bias.astype(np.float32)


class FoldedConv(tf.Module):
    """One convolution (+ folded batch norm) (+ ReLU) as Conv2D + BiasAdd (+ Relu).

    Args:
      conv: a built `keras.layers.Conv2D`.
      bn: its `keras.layers.BatchNormalization`, or None.
      strides: convolution stride.
      explicit_padding: ((top, bottom), (left, right)) padded before a VALID
        convolution (tf-slim ``conv2d_same``), or None for 'SAME'.
      activation: apply ReLU.
      name: module (and variable scope) name.

    Shapes: [B, H, W, C_in] -> [B, H', W', C_out].
    """

    def __init__(self, conv, bn, strides, explicit_padding, activation, name):
        super().__init__(name=name)
        kernel, bias = _fold(conv, bn)
        with self.name_scope:
            self.kernel = tf.Variable(kernel, trainable=False, name="kernel")
            self.bias = tf.Variable(bias, trainable=False, name="bias")
        self.kernel_size = int(kernel.shape[0])
        self.strides = int(strides)
        self.explicit_padding = explicit_padding
        self.activation = bool(activation)

    def _finish(self, y):
        y = tf.nn.bias_add(y, tf.cast(self.bias, y.dtype))
        return tf.nn.relu(y) if self.activation else y

    def _kernel(self, x):
        return tf.cast(self.kernel, x.dtype)  # the stored float32 weights; a no-op in float32

    def __call__(self, x):
        if self.explicit_padding is not None:
            (top, bottom), (left, right) = self.explicit_padding
            x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
            padding = "VALID"
        else:
            padding = "SAME"
        return self._finish(tf.nn.conv2d(x, self._kernel(x), self.strides, padding))

    def subsampled(self, x, stride):
        """``self(x)[:, ::stride, ::stride, :]`` computed only at the kept cells.

        Valid for a stride-1 convolution with an odd kernel and centred ('SAME'
        or symmetric) padding: pad (k - 1) / 2 on every side, VALID, `stride`.
        """
        if self.strides != 1 or self.kernel_size % 2 != 1:
            raise ValueError(
                f"{self.name}: subsampled() needs a stride-1 convolution with an "
                f"odd kernel, got stride {self.strides} and kernel "
                f"{self.kernel_size}."
            )
        half = (self.kernel_size - 1) // 2
        if half:
            x = tf.pad(x, [[0, 0], [half, half], [half, half], [0, 0]])
        return self._finish(tf.nn.conv2d(x, self._kernel(x), stride, "VALID"))


def _folded_conv_bn(layer, name):
    explicit = layer.pad.padding if layer.pad is not None else None
    return FoldedConv(layer.conv, layer.bn, layer.strides, explicit, layer.activation, name)


class FoldedBottleneck(tf.Module):
    """A `resnet.Bottleneck` with folded batch norm (same function).

    Called as ``block(x, activation=tf.nn.relu)``: `activation` is applied to the
    residual sum shortcut(x) + F(x) (the ReLU of the unit; SuperGlobal's ReLU+ passes
    `delg_tf.ops.pooling.relu_plus`, `delg_tf.extraction.superglobal`).
    """

    def __init__(self, block, name):
        super().__init__(name=name)
        self.strides = block.strides
        with self.name_scope:
            self.convs = [
                _folded_conv_bn(c, f"conv_{i}")
                for i, c in enumerate((block.conv_1, block.conv_2, block.conv_3), 1)
            ]
            self.shortcut = (
                _folded_conv_bn(block.shortcut, "shortcut") if block.shortcut is not None else None
            )

    def _shortcut(self, x):
        if self.shortcut is not None:
            return self.shortcut(x)
        if self.strides > 1:
            return x[:, :: self.strides, :: self.strides, :]
        return x

    def __call__(self, x, activation=tf.nn.relu):
        y = x
        for conv in self.convs:
            y = conv(y)
        return activation(self._shortcut(x) + y)

    def can_subsample(self):
        """True if `subsampled` applies: a stride-1 unit of 1x1 / kxk / 1x1 convolutions."""
        first, middle, last = self.convs
        return (
            self.strides == 1
            and all(c.strides == 1 for c in self.convs)
            and first.kernel_size == 1
            and last.kernel_size == 1
            and middle.kernel_size % 2 == 1
            and (self.shortcut is None or self.shortcut.kernel_size == 1)
        )

    def subsampled(self, x, stride, activation=tf.nn.relu):
        """``self(x, activation)[:, ::stride, ::stride, :]``, evaluating only the kept cells."""
        first, middle, last = self.convs
        y = last(middle.subsampled(first(x), stride))
        kept = x[:, ::stride, ::stride, :]
        shortcut = self.shortcut(kept) if self.shortcut is not None else kept
        return activation(shortcut + y)


class FoldedResNet(tf.Module):
    """`resnet.ResNet` inference with folded batch norm (same call API).

    Computes in `compute_dtype`; outputs are float32. `call_to_conv4(images,
    residual_activation=f)` applies `f` instead of the ReLU to the residual sums of
    the conv2_x..conv4_x units (the stem keeps its ReLU; conv5_x is `call_conv5`,
    always ReLU); SuperGlobal's ReLU+ (`delg_tf.extraction.superglobal`).
    """

    def __init__(self, resnet, compute_dtype="float32", name="backbone"):
        super().__init__(name=name)
        self.compute_dtype = tf.as_dtype(compute_dtype)
        with self.name_scope:
            self.stem = _folded_conv_bn(resnet.stem, "stem")
            self.stages = [
                [FoldedBottleneck(block, f"{stage}_unit_{i}") for i, block in enumerate(blocks, 1)]
                for stage, blocks in zip(("conv2", "conv3", "conv4", "conv5"), resnet.stages)
            ]
        self.pool1_pad = resnet.pool1_pad is not None
        self.pool1_size = resnet.pool1.pool_size
        self.pool1_strides = resnet.pool1.strides
        self.pool1_padding = resnet.pool1.padding.upper()
        self.conv4_subsample = resnet.conv4_subsample
        self.feature_channels = resnet.feature_channels

    def call_to_conv4(self, images, training=False, residual_activation=tf.nn.relu):
        del training
        outputs = {}
        x = self.stem(tf.cast(images, self.compute_dtype))
        outputs["conv1"] = x
        if self.pool1_pad:
            x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        x = tf.nn.max_pool2d(x, self.pool1_size, self.pool1_strides, self.pool1_padding)
        for name, blocks in zip(("conv2", "conv3"), self.stages[:2]):
            for block in blocks:
                x = block(x, residual_activation)
            outputs[name] = x
        conv4_blocks = self.stages[2]
        subsample_last = self.conv4_subsample and conv4_blocks[-1].can_subsample()
        for block in conv4_blocks[:-1] if subsample_last else conv4_blocks:
            x = block(x, residual_activation)
        if subsample_last:
            # Only S (the subsampled map) is returned for these layouts.
            outputs["conv4"] = conv4_blocks[-1].subsampled(
                x, CONV4_SUBSAMPLE_STRIDE, residual_activation
            )
        elif self.conv4_subsample:
            outputs["conv4"] = x[:, ::CONV4_SUBSAMPLE_STRIDE, ::CONV4_SUBSAMPLE_STRIDE, :]
        else:
            outputs["conv4"] = x
        return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}

    def call_conv5(self, s, training=False):
        del training
        x = tf.cast(s, self.compute_dtype)
        for block in self.stages[3]:
            x = block(x)
        return tf.cast(x, tf.float32)


class FoldedDelg(tf.Module):
    """Inference view of a built `DelgModel` with folded batch norm (see module doc).

    Args:
      model: a built `delg_tf.models.delg.DelgModel` (weights are copied).
      compute_dtype: "float32" (parity with the model) or "bfloat16" (backbone
        convolutions only; faster on AVX512_BF16 CPUs, outside parity tolerances).
      name: module name.

    Same inference API and outputs as the model: `preprocess` (uint8 RGB ->
    normalised), `backbone.call_to_conv4` / `backbone.call_conv5`, `local_head(S)
    -> (attention [B, h, w, 1], descriptors [B, h, w, C_T])`, `global_head(D) ->
    [B, C_F]` (GeM + whitening, not normalised), i.e. `whiten(gem_pool(D))`, its two
    parts (`gem_pool(D [B, h, w, C_D]) -> [B, C_D]` with the model's power,
    `whiten([B, C_D]) -> [B, C_F]`, the FC F, b_F of eq. 1).

    Reference: Cao, Araujo, Sim, "Unifying Deep Local and Global Features for
    Image Search", ECCV 2020, Sec. 3 (the heads) and 4.1 (the extraction setup).
    """

    def __init__(self, model, compute_dtype="float32", name="folded_delg"):
        super().__init__(name=name)
        self.compute_dtype = check_compute_dtype(compute_dtype)
        self.config = model.config
        self._preprocess = model.preprocess
        self.local_channels = model.local_channels
        self.global_channels = model.global_channels
        attention = model.attention
        with self.name_scope:
            self.backbone = FoldedResNet(model.backbone, compute_dtype)
            self.attention_conv1 = FoldedConv(
                attention.conv1, attention.bn_conv1, 1, None, True, "attention_conv1"
            )
            self.attention_conv2 = FoldedConv(
                attention.conv2, None, 1, None, False, "attention_conv2"
            )
            self.encoder = FoldedConv(model.autoencoder.conv1, None, 1, None, False, "encoder")
            self.decoder = FoldedConv(model.autoencoder.conv2, None, 1, None, True, "decoder")
            self.whitening_kernel = tf.Variable(
                model.whitening.kernel.numpy(), trainable=False, name="whitening_kernel"
            )
            self.whitening_bias = tf.Variable(
                model.whitening.bias.numpy(), trainable=False, name="whitening_bias"
            )
        self.attention_on_reconstruction = model.config.attention_input == "reconstruction"
        self.gem_power = float(model.gem.power.numpy())
        self.gem_eps = model.gem.eps
        self.local_descriptor_dim = int(self.encoder.kernel.shape[-1])
        self.global_descriptor_dim = int(self.whitening_kernel.shape[-1])

    def preprocess(self, images):
        return self._preprocess(images)

    def local_head(self, s, training=False):
        del training
        descriptors = self.encoder(s)
        source = self.decoder(descriptors) if self.attention_on_reconstruction else s
        logits = self.attention_conv2(self.attention_conv1(source))
        return tf.nn.softplus(logits), descriptors

    def gem_pool(self, d):
        return pooling.gem(d, power=self.gem_power, eps=self.gem_eps)

    def whiten(self, pooled):
        return tf.nn.bias_add(tf.matmul(pooled, self.whitening_kernel), self.whitening_bias)

    def global_head(self, d, training=False):
        del training
        return self.whiten(self.gem_pool(d))


def fold_delg_model(model, compute_dtype="float32"):
    """Returns a `FoldedDelg` of a built `DelgModel`."""
    return FoldedDelg(model, compute_dtype)


def inference_model(model, fold_batch_norm=True, compute_dtype="float32"):
    """The model that extraction runs: `FoldedDelg` for a `DelgModel` when folding, else as is.

    Objects that only duck-type the inference API (tests' stand-ins, an already
    folded model) are returned unchanged. `compute_dtype` other than float32 needs
    the folded graph (ValueError otherwise); bfloat16 logs one warning on CPUs that
    emulate it (`warn_if_bfloat16_emulated`).
    """
    from delg_tf.models.delg import DelgModel

    check_compute_dtype(compute_dtype)
    foldable = fold_batch_norm and isinstance(model, DelgModel)
    if compute_dtype != "float32" and not foldable:
        raise ValueError(
            f"compute_dtype={compute_dtype!r} runs the batch-norm-folded graph of "
            "a DelgModel; keep fold_batch_norm=True (--fold_batch_norm) and pass "
            "a DelgModel, or use compute_dtype='float32'."
        )
    if foldable:
        warn_if_bfloat16_emulated(compute_dtype)
        return fold_delg_model(model, compute_dtype)
    return model
