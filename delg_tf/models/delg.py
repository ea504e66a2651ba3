"""DELG: joint local and global features, with gradient stopping at tape level.

Model of Cao, Araujo, Sim, "Unifying Deep Local and Global Features for Image
Search", ECCV 2020 (Sec. 3, 4.1):

* backbone ResNet -> S (conv4, C_S channels) and D (conv5, C_D channels);
* global head: g = F GeM_p(D) + b_F (eq. 1), L2-normalised at inference; trained
  with the ArcFace cosine classifier (eqs. 2-3);
* local head on S: attention A = M(S), descriptors L = T(S), reconstruction
  S' = T'(L); trained with L_r (eq. 4) and L_a (eqs. 5-6);
* total loss L_g + lambda L_r + beta L_a, with the backbone updated by L_g only
  (`stop_gradients=True`) or by everything (the paper's naive ablation).

Inference API (used by extraction/export): `preprocess`, `backbone`,
`local_head`, `global_head`, `call`.
"""

import dataclasses
import logging
import math

import keras
import tensorflow as tf

from delg_tf.backbones import resnet
from delg_tf.configs import ConfigError, expect
from delg_tf.layers.attention_head import AttentionHead
from delg_tf.layers.attention_pooling import ATTENTION_POOL_REDUCTIONS, AttentionPooling
from delg_tf.layers.autoencoder import Autoencoder
from delg_tf.layers.cosine_classifier import CosineClassifier
from delg_tf.layers.gem_pooling import GeMPooling
from delg_tf.losses.arcface import arcface_loss
from delg_tf.losses.attention import attention_loss
from delg_tf.losses.reconstruction import reconstruction_loss
from delg_tf.ops import image as image_ops

logger = logging.getLogger(__name__)

BACKBONES = ("r50", "r101", "tiny")
# Where the attention network M reads from: "features" = S (paper Fig. 1, the
# released TF1/slim models); "reconstruction" = S' (the official TF2 code with
# the autoencoder computes the attention from the autoencoder's output).
ATTENTION_INPUTS = ("features", "reconstruction")
# What eq. 5 pools: "reconstruction" = S' (paper); "features" = S (official TF2).
ATTENTION_POOL_SOURCES = ("reconstruction", "features")
# The official TF2 training clips gradients by global norm 10.
DEFAULT_GRADIENT_CLIP_NORM = 10.0
MEDIAN_QUANTILE = 0.5
INPUT_CHANNELS = 3
# Variable groups (see `DelgModel.variable_groups`).
GROUP_BACKBONE = "backbone"
GROUP_GLOBAL_HEAD = "global_head"
GROUP_LOCAL_HEAD = "local_head"
VARIABLE_GROUPS = (GROUP_BACKBONE, GROUP_GLOBAL_HEAD, GROUP_LOCAL_HEAD)


@dataclasses.dataclass
class DelgModelConfig:
    """Configuration of `DelgModel` (defaults are the paper's, Sec. 4.1).

    Attributes:
      num_classes: number of training classes (landmarks).
      backbone: "r50", "r101" or "tiny" (test-size network).
      backbone_layout: "slim" (paper), "tf2_delf" or "keras" (see `resnet.ResNet`).
      block3_stride: move the conv5 stride into conv4 (S and D at stride 32).
      backbone_kwargs: extra `resnet.build_resnet` arguments (e.g. base_width).
      image_normalization: "delf", "delf_tf1", "caffe" or "vgg" (`ops.image`);
        None picks the layout's convention ("caffe" for "keras", "vgg" for "slim"
        initialised from a tf-slim ImageNet checkpoint, "delf" otherwise).
      gem_power: GeM power p.
      learn_gem_power: train p.
      embedding_dim: C_F, output of the whitening FC.
      local_dim: C_T, local descriptor dimension.
      attention_hidden: channels of the attention network's first conv.
      attention_use_bn / attention_conv1_bias: attention head variant (official
        TF2: BN and bias; TF1/slim: BN, no bias).
      attention_bn_epsilon: epsilon of the attention head's batch norm (Keras
        and slim default 1e-3).
      attention_input: "features" (M(S), paper) or "reconstruction" (M(S'),
        official TF2 code).
      attention_pool_source: what eq. 5 pools, "reconstruction" (S', paper) or
        "features" (S, official TF2 code).
      attention_pool_reduction: "sum" (eq. 5) or "mean" (official TF2 code).
      attention_pool_normalize: L2-normalise pooled features first (official TF2).
      arcface_margin: m.
      arcface_scale_init: initial gamma; None -> sqrt(embedding_dim) (45.25).
      learn_arcface_scale: gamma trainable (paper: learnable).
      reconstruction_weight: lambda.
      attention_weight: beta.
      stop_gradients: L_r and L_a do not train the backbone (paper's method).
      backbone_bn_training: backbone batch norm uses batch statistics (and
        updates its moving averages) in `train_step`; False freezes it.
      gradient_clip_norm: clip all gradients by this global norm; None disables.
      imagenet_weights: None, "imagenet" or a path; used by `build_model` /
        `DelgModel.load_imagenet_weights` (see `delg_tf.backbones.imagenet`).
    """

    num_classes: int
    backbone: str = "r50"
    backbone_layout: str = "slim"
    block3_stride: bool = True
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)
    image_normalization: str = None
    gem_power: float = 3.0
    learn_gem_power: bool = False
    embedding_dim: int = 2048
    local_dim: int = 128
    attention_hidden: int = 512
    attention_use_bn: bool = True
    attention_conv1_bias: bool = True
    attention_bn_epsilon: float = 1e-3
    attention_input: str = "features"
    attention_pool_source: str = "reconstruction"
    attention_pool_reduction: str = "sum"
    attention_pool_normalize: bool = False
    arcface_margin: float = 0.1
    arcface_scale_init: float = None
    learn_arcface_scale: bool = True
    reconstruction_weight: float = 10.0
    attention_weight: float = 1.0
    stop_gradients: bool = True
    backbone_bn_training: bool = True
    gradient_clip_norm: float = DEFAULT_GRADIENT_CLIP_NORM
    imagenet_weights: str = None

    def resolved_image_normalization(self):
        """The normalisation mode actually used."""
        if self.image_normalization is not None:
            return self.image_normalization
        if self.backbone_layout == "keras":
            return "caffe"
        if self.backbone_layout == "slim" and self.imagenet_weights:
            return "vgg"  # tf-slim resnet_v1 ImageNet checkpoints: vgg_preprocessing.
        return "delf"

    def resolved_arcface_scale_init(self):
        """Gamma at initialisation (sqrt(C_F) unless given)."""
        if self.arcface_scale_init is not None:
            return float(self.arcface_scale_init)
        return math.sqrt(self.embedding_dim)

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Checks every field (done at construction); returns self.

        Raises:
          ConfigError: naming the field, the expected and the received value.
        """

        def check(ok, field, expected):
            expect(ok, field, expected, getattr(self, field), owner="DelgModelConfig")

        check(
            isinstance(self.num_classes, int) and self.num_classes >= 1,
            "num_classes",
            "an integer >= 1 (the number of training classes)",
        )
        check(self.backbone in BACKBONES, "backbone", f"one of {BACKBONES}")
        check(self.backbone_layout in resnet.LAYOUTS, "backbone_layout", f"one of {resnet.LAYOUTS}")
        check(isinstance(self.backbone_kwargs, dict), "backbone_kwargs", "a dict")
        check(
            self.image_normalization is None
            or self.image_normalization in image_ops.NORMALIZATIONS,
            "image_normalization",
            f"None or one of {image_ops.NORMALIZATIONS}",
        )
        check(self.attention_bn_epsilon > 0, "attention_bn_epsilon", "a positive number")
        check(self.gem_power > 0, "gem_power", "a positive number (paper: 3.0)")
        for field in ("embedding_dim", "local_dim", "attention_hidden"):
            check(
                isinstance(getattr(self, field), int) and getattr(self, field) >= 1,
                field,
                "a positive integer",
            )
        check(
            self.attention_input in ATTENTION_INPUTS,
            "attention_input",
            f"one of {ATTENTION_INPUTS}",
        )
        check(
            self.attention_pool_source in ATTENTION_POOL_SOURCES,
            "attention_pool_source",
            f"one of {ATTENTION_POOL_SOURCES}",
        )
        check(
            self.attention_pool_reduction in ATTENTION_POOL_REDUCTIONS,
            "attention_pool_reduction",
            f"one of {ATTENTION_POOL_REDUCTIONS}",
        )
        check(
            0.0 <= self.arcface_margin < math.pi / 2,
            "arcface_margin",
            "a margin in radians in [0, pi/2) (paper: 0.1)",
        )
        check(
            self.arcface_scale_init is None or self.arcface_scale_init > 0,
            "arcface_scale_init",
            "None (sqrt(embedding_dim)) or a positive number",
        )
        check(self.reconstruction_weight >= 0, "reconstruction_weight", "a number >= 0")
        check(self.attention_weight >= 0, "attention_weight", "a number >= 0")
        check(
            self.gradient_clip_norm is None or self.gradient_clip_norm > 0,
            "gradient_clip_norm",
            "None or a positive number",
        )
        if self.backbone_layout != "keras" and self.imagenet_weights == "imagenet":
            raise ConfigError(
                "DelgModelConfig.imagenet_weights: 'imagenet' (keras.applications weights) "
                f"needs backbone_layout='keras', received backbone_layout="
                f"{self.backbone_layout!r}. Pass a tf-slim resnet_v1 checkpoint path for "
                "the 'slim' layout, or use backbone_layout='keras'."
            )
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Builds a config from a dict, refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"DelgModelConfig: unknown keys {unknown}; expected a subset of {sorted(known)}."
            )
        return cls(**values)


def _median(x):
    """Median-ish (the lower middle element) of all values of x."""
    flat = tf.sort(tf.reshape(x, [-1]))
    index = tf.cast(tf.cast(tf.size(flat) - 1, tf.float32) * MEDIAN_QUANTILE, tf.int32)
    return flat[index]


def _accuracy(logits, labels):
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.equal(predictions, tf.cast(labels, tf.int32)), tf.float32))


def _average_loss(per_example, global_batch_size):
    """Per-replica share of the global-batch mean (sums to the mean across replicas)."""
    return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)


@keras.saving.register_keras_serializable(package="delg_tf")
class DelgModel(keras.Model):
    """DELG with a custom `train_step` that stops L_r/L_a gradients at the backbone.

    Args:
      config: a `DelgModelConfig` (or a dict of its fields).

    Sublayers (names chosen for weight mapping): ``backbone`` (`resnet.ResNet`),
    ``gem`` (`GeMPooling`), ``whitening`` (Dense C_D -> C_F with bias),
    ``cosine_classifier`` (`CosineClassifier`, ArcFace), ``attention``
    (`AttentionHead`), ``autoencoder`` (`Autoencoder`), ``attention_pooling``
    (`AttentionPooling`), ``attention_classifier`` (Dense C_S -> K with bias).

    Inputs: images float [B, H, W, 3], RGB in [0, 255] (`call`, `train_step`);
    `preprocess` normalises them for the backbone.

    `call(images)` returns a dict: "global_descriptor" [B, C_F] (L2-normalised),
    "global_descriptor_raw" [B, C_F], "attention" [B, h, w, 1],
    "attention_logits" [B, h, w, 1], "local_descriptors" [B, h, w, C_T]
    (unnormalised), with h, w = ceil(H/32), ceil(W/32) with `block3_stride`.

    Training: `model.compile(optimizer=...)`, then `train_step((images, labels))`
    (also inside `tf.distribute.Strategy.run`). Set `global_batch_size` when the
    last batch may be smaller; otherwise per-replica batch * replicas is used.

    Reference: Cao et al., ECCV 2020, Sec. 3 and 4.1.
    """

    def __init__(self, config, **kwargs):
        kwargs.setdefault("name", "delg")
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = DelgModelConfig.from_dict(config)
        self.config = config.validate()
        self.global_batch_size = None
        self.backbone = resnet.build_resnet(
            config.backbone,
            layout=config.backbone_layout,
            block3_stride=config.block3_stride,
            **config.backbone_kwargs,
        )
        channels = self.backbone.feature_channels
        self.local_channels = channels["conv4"]
        self.global_channels = channels["conv5"]
        self.gem = GeMPooling(
            power=config.gem_power, learn_power=config.learn_gem_power, name="gem"
        )
        self.whitening = keras.layers.Dense(config.embedding_dim, use_bias=True, name="whitening")
        self.cosine_classifier = CosineClassifier(
            config.num_classes,
            scale_init=config.resolved_arcface_scale_init(),
            learn_scale=config.learn_arcface_scale,
            margin=config.arcface_margin,
            name="cosine_classifier",
        )
        self.attention = AttentionHead(
            hidden_channels=config.attention_hidden,
            use_bn=config.attention_use_bn,
            conv1_bias=config.attention_conv1_bias,
            bn_epsilon=config.attention_bn_epsilon,
            name="attention",
        )
        self.autoencoder = Autoencoder(
            local_dim=config.local_dim, output_dim=self.local_channels, name="autoencoder"
        )
        self.attention_pooling = AttentionPooling(
            reduction=config.attention_pool_reduction,
            normalize=config.attention_pool_normalize,
            name="attention_pooling",
        )
        self.attention_classifier = keras.layers.Dense(
            config.num_classes, use_bias=True, name="attention_classifier"
        )

    # ------------------------------------------------------------------ build
    def build(self, input_shape=None):
        """Creates all weights (runs the backbone once on a small dummy batch)."""
        if self.built:
            return
        self.backbone(tf.zeros([1, 2**6, 2**6, INPUT_CHANNELS]), training=False)
        s_shape = (None, None, None, self.local_channels)
        d_shape = (None, None, None, self.global_channels)
        self.gem.build(d_shape)
        self.whitening.build((None, self.global_channels))
        self.cosine_classifier.build((None, self.config.embedding_dim))
        self.autoencoder.build(s_shape)
        self.attention.build(s_shape)
        self.attention_pooling.build(s_shape, (None, None, None, 1))
        self.attention_classifier.build((None, self.local_channels))
        self.built = True

    # -------------------------------------------------------------- inference
    def preprocess(self, images):
        """RGB images in [0, 255] (uint8 or float) -> the backbone's input range."""
        return image_ops.normalize_images(images, self.config.resolved_image_normalization())

    def global_head(self, d, training=False):
        """D [B, h, w, C_D] -> g = F GeM(D) + b_F [B, C_F] (eq. 1), NOT L2-normalised."""
        del training  # No batch norm or dropout in the global head.
        return self.whitening(self.gem(d))

    def _local_branch(self, s, training=False):
        """S -> (attention_prob, attention_logits, descriptors L, reconstruction S')."""
        descriptors, reconstruction = self.autoencoder(s)
        attention_source = s if self.config.attention_input == "features" else reconstruction
        attention_prob, attention_logits = self.attention(attention_source, training=training)
        return attention_prob, attention_logits, descriptors, reconstruction

    def local_head(self, s, training=False):
        """S [B, h, w, C_S] -> (attention_prob [B, h, w, 1], descriptors [B, h, w, C_T]).

        The descriptors are unnormalised (L2-normalise them for matching).
        """
        attention_prob, _, descriptors, _ = self._local_branch(s, training=training)
        return attention_prob, descriptors

    def call(self, images, training=False):
        """Images RGB [0, 255] [B, H, W, 3] -> dict of descriptors (see class doc)."""
        features = self.backbone(self.preprocess(images), training=training)
        g = self.global_head(features["conv5"], training=training)
        attention_prob, attention_logits, descriptors, _ = self._local_branch(
            features["conv4"], training=training
        )
        return {
            "global_descriptor": tf.math.l2_normalize(g, axis=-1),
            "global_descriptor_raw": g,
            "attention": attention_prob,
            "attention_logits": attention_logits,
            "local_descriptors": descriptors,
        }

    # --------------------------------------------------------------- training
    def variable_groups(self):
        """Trainable variables by role: "backbone", "global_head", "local_head"."""
        if not self.built:
            self.build()
        return {
            GROUP_BACKBONE: list(self.backbone.trainable_variables),
            GROUP_GLOBAL_HEAD: (
                list(self.gem.trainable_variables)
                + list(self.whitening.trainable_variables)
                + list(self.cosine_classifier.trainable_variables)
            ),
            GROUP_LOCAL_HEAD: (
                list(self.attention.trainable_variables)
                + list(self.autoencoder.trainable_variables)
                + list(self.attention_classifier.trainable_variables)
            ),
        }

    def _forward_losses(self, images, labels, training=True):
        """One forward pass for training; returns (losses dict, outputs dict)."""
        config = self.config
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        x = self.preprocess(images)
        bn_training = training and config.backbone_bn_training
        features = self.backbone.call_to_conv4(x, training=bn_training)
        s = features["conv4"]
        d = self.backbone.call_conv5(s, training=bn_training)
        g = self.global_head(d, training=training)
        cosine = self.cosine_classifier(g)
        scale = tf.convert_to_tensor(self.cosine_classifier.scale)
        margin = config.arcface_margin if training else 0.0
        global_per_example = arcface_loss(cosine, labels, scale, margin)

        s_local = tf.stop_gradient(s) if config.stop_gradients else s
        attention_prob, _, _, reconstruction = self._local_branch(s_local, training=training)
        # The reconstruction target never trains the backbone through L_r's target side
        # when stopping; in naive mode both sides carry gradients (as one total loss would).
        reconstruction_per_example = reconstruction_loss(reconstruction, s_local)
        pool_source = (
            reconstruction if config.attention_pool_source == "reconstruction" else s_local
        )
        pooled = self.attention_pooling(pool_source, attention_prob)
        attention_logits = self.attention_classifier(pooled)
        attention_per_example = attention_loss(attention_logits, labels)

        gbs = self.global_batch_size
        losses = {
            "global_loss": _average_loss(global_per_example, gbs),
            "reconstruction_loss": _average_loss(reconstruction_per_example, gbs),
            "attention_loss": _average_loss(attention_per_example, gbs),
        }
        losses["local_loss"] = (
            config.reconstruction_weight * losses["reconstruction_loss"]
            + config.attention_weight * losses["attention_loss"]
        )
        losses["loss"] = losses["global_loss"] + losses["local_loss"]
        outputs = {
            "labels": labels,
            "cosine": cosine,
            "scale": scale,
            "s": s,
            "d": d,
            "attention": attention_prob,
            "attention_logits": attention_logits,
            "global_per_example": global_per_example,
            "reconstruction_per_example": reconstruction_per_example,
            "attention_per_example": attention_per_example,
        }
        return losses, outputs

    def _gradients(self, tape, losses):
        """(gradients, variables) following `config.stop_gradients`.

        Stopping: L_g -> backbone + global head; lambda L_r + beta L_a -> local head
        only (two gradient computations on one persistent tape, plus
        `tf.stop_gradient(S)` in the forward pass). Naive: the total loss -> all.
        """
        groups = self.variable_groups()
        if self.config.stop_gradients:
            global_vars = groups[GROUP_BACKBONE] + groups[GROUP_GLOBAL_HEAD]
            local_vars = groups[GROUP_LOCAL_HEAD]
            grads = tape.gradient(losses["global_loss"], global_vars) + tape.gradient(
                losses["local_loss"], local_vars
            )
            variables = global_vars + local_vars
        else:
            variables = (
                groups[GROUP_BACKBONE] + groups[GROUP_GLOBAL_HEAD] + groups[GROUP_LOCAL_HEAD]
            )
            grads = tape.gradient(losses["loss"], variables)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        return grads, variables

    def compile(self, *args, **kwargs):
        """`keras.Model.compile`, then creates the optimizer's slot variables.

        Creating them here (not lazily in the first `train_step`) is what makes
        `train_step` work inside `tf.distribute.Strategy.run` and `tf.function`:
        compile inside `strategy.scope()`.
        """
        super().compile(*args, **kwargs)
        if not self.built:
            self.build()
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def get_compile_config(self):
        return super().get_compile_config()

    def compile_from_config(self, config):
        """Re-compiles from `get_compile_config()` (used by `keras.models.load_model`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def _unscaled(self, per_example):
        return tf.reduce_mean(per_example)

    def train_step(self, data):
        """One optimisation step on (images [B, H, W, 3] in [0, 255], labels [B]).

        Returns a dict of scalar tensors, each the per-replica (batch) mean:
        loss, global_loss, reconstruction_loss, attention_loss, global_accuracy,
        attention_accuracy, arcface_scale, attention_mean/min/max/median,
        sparsity_conv4, sparsity_conv5, gradient_norm. Reduce across replicas
        with MEAN. Gradients use the global-batch-scaled losses.
        """
        images, labels = data[0], data[1]
        with tf.GradientTape(persistent=self.config.stop_gradients) as tape:
            losses, outputs = self._forward_losses(images, labels, training=True)
        grads, variables = self._gradients(tape, losses)
        del tape
        grads, gradient_norm = self._clip_global_gradient(grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        return self._train_logs(outputs, gradient_norm)

    def _clip_global_gradient(self, grads):
        """Global-norm clipping of the global batch's gradient; returns (grads, its norm).

        With R > 1 replicas each replica holds one share g_r of the gradient G = sum_r g_r
        (the losses are scaled by the global batch) and the optimizer sums the shares, so
        the clipping factor min(1, c / ||G||) must come from the all-reduced G: every share
        is scaled by it (one extra all-reduce per step). One replica: ``clip_by_global_norm``.
        """
        clip = self.config.gradient_clip_norm
        context = tf.distribute.get_replica_context()
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas == 1 or context is None:
            if clip is None:
                return grads, tf.linalg.global_norm(grads)
            return tf.clip_by_global_norm(grads, clip)
        present = [i for i, g in enumerate(grads) if g is not None]
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
        norm = tf.linalg.global_norm(summed)
        if clip is None:
            return grads, norm
        factor = clip / tf.maximum(norm, clip)
        clipped = list(grads)
        for i in present:
            clipped[i] = grads[i] * tf.cast(factor, grads[i].dtype)
        return clipped, norm

    def _train_logs(self, outputs, gradient_norm):
        config = self.config
        global_loss = self._unscaled(outputs["global_per_example"])
        reconstruction = self._unscaled(outputs["reconstruction_per_example"])
        attention = self._unscaled(outputs["attention_per_example"])
        scores = outputs["attention"]
        labels = outputs["labels"]
        return {
            "loss": (
                global_loss
                + config.reconstruction_weight * reconstruction
                + config.attention_weight * attention
            ),
            "global_loss": global_loss,
            "reconstruction_loss": reconstruction,
            "attention_loss": attention,
            "global_accuracy": _accuracy(outputs["cosine"], labels),
            "attention_accuracy": _accuracy(outputs["attention_logits"], labels),
            "arcface_scale": outputs["scale"],
            "attention_mean": tf.reduce_mean(scores),
            "attention_min": tf.reduce_min(scores),
            "attention_max": tf.reduce_max(scores),
            "attention_median": _median(scores),
            "sparsity_conv4": tf.math.zero_fraction(outputs["s"]),
            "sparsity_conv5": tf.math.zero_fraction(outputs["d"]),
            "gradient_norm": gradient_norm,
        }

    def test_step(self, data):
        """Validation metrics on (images, labels): accuracies and losses without margin."""
        images, labels = data[0], data[1]
        _, outputs = self._forward_losses(images, labels, training=False)
        return {
            "global_loss": self._unscaled(outputs["global_per_example"]),
            "reconstruction_loss": self._unscaled(outputs["reconstruction_per_example"]),
            "attention_loss": self._unscaled(outputs["attention_per_example"]),
            "global_accuracy": _accuracy(outputs["cosine"], outputs["labels"]),
            "attention_accuracy": _accuracy(outputs["attention_logits"], outputs["labels"]),
        }

    def compute_gradients(self, data):
        """Gradients of each loss part per variable group, for inspection (no update).

        Returns:
          {"global_loss": {group: [grad, ...]}, "local_loss": {group: [...]}} where
          "local_loss" is lambda L_r + beta L_a and groups are "backbone",
          "global_head", "local_head"; missing gradients are zeros. With
          `stop_gradients` the backbone gradients of "local_loss" are exactly zero.
        """
        images, labels = data[0], data[1]
        with tf.GradientTape(persistent=True) as tape:
            losses, _ = self._forward_losses(images, labels, training=True)
        groups = self.variable_groups()
        result = {}
        for loss_name in ("global_loss", "local_loss"):
            result[loss_name] = {}
            for group, variables in groups.items():
                grads = tape.gradient(losses[loss_name], variables)
                result[loss_name][group] = [
                    tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)
                ]
        del tape
        return result

    # ------------------------------------------------------------------ misc
    def load_imagenet_weights(self, spec=None):
        """Initialises the backbone from `spec` (default `config.imagenet_weights`).

        See `delg_tf.backbones.imagenet.load_imagenet_weights`. Returns a short
        description of what was loaded.
        """
        from delg_tf.backbones import imagenet  # Local import: optional dependency chain.

        spec = self.config.imagenet_weights if spec is None else spec
        if not self.built:
            self.build()
        return imagenet.load_imagenet_weights(self.backbone, spec)

    def get_config(self):
        return {"name": self.name, "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(DelgModelConfig.from_dict(config.pop("config")), **config)


def _register():
    from delg_tf.models import registry

    registry.register_model("delg", DelgModel, DelgModelConfig)


_register()
