"""Glocal Retriever: global descriptors (SPoC/MAC/GeM) fused with DOLG local features.

Kim, Kim, Suh, "Glocal Retriever: Glocal Image Retrieval Using the Combination of
Global and Local Descriptors", Electronics 12(2):442, 2023 (Figure 1, Sec. 3):

* backbone ResNet-50; the global module pools layer3 (our "conv4", 1024 channels
  for R50) and the local module reads layer2 ("conv3", 512 channels)
  (Sec. 4.1; Table 1 compares global from layer4 = "conv5", local from layer3);
* global module: any combination of SPoC, MAC, GeM (CGD), each followed by an FC
  layer to the local-feature dimension;
* local module: DOLG multi-atrous block + Softplus attention (`LocalBranch`);
* orthogonal fusion module (DOLG) per global descriptor ("after_ofm", the paper's
  best) or once for the concatenated global descriptors ("before_ofm", Table 3);
* an FC layer per fused descriptor, concatenation, L2 normalisation = embedding;
* auxiliary module (CGD): BN + FC classifier on the first global descriptor's
  pooled vector, trained with label-smoothed, temperature-scaled cross-entropy;
* loss = L_M + lambda * L_A, L_M = proxy-anchor (one proxy per class), lambda = 3,
  L_A active during the first 2 epochs only (Sec. 3.5.2, Table 2).

PyTorch -> package layer names: layer1 = conv2, layer2 = conv3, layer3 = conv4,
layer4 = conv5 (both spellings are accepted in the config).

Training hyper-parameters not given by the paper follow the official proxy-anchor
code (tjddus9597/Proxy-Anchor-CVPR2020, CUB): AdamW, lr 1e-4, weight decay 1e-4,
proxies with a 100x learning rate, gradient values clipped at 10.

Proxies get their own optimizer (`proxy_optimizer`, the main optimizer's class and
config with learning rate x `proxy_lr_multiplier`), because for Adam(W) scaling the
gradients does *not* scale the step. It is an attribute of the model, so a
`tf.train.Checkpoint(model=...)` saves its slots and iteration count.
"""

import dataclasses
from typing import Tuple

import keras
import tensorflow as tf

from delg_tf.backbones.resnet import build_resnet
from delg_tf.configs import ConfigError, expect
from delg_tf.layers.global_descriptor import GlobalDescriptor, parse_descriptor_codes
from delg_tf.layers.local_branch import LocalBranch
from delg_tf.layers.multi_atrous import DOLG_ATROUS_RATES
from delg_tf.layers.orthogonal_fusion import OrthogonalFusion
from delg_tf.losses.proxy_anchor import PROXY_ANCHOR_ALPHA, PROXY_ANCHOR_MARGIN, proxy_anchor_loss
from delg_tf.losses.smoothed_ce import CGD_LABEL_SMOOTHING, CGD_TEMPERATURE, smoothed_cross_entropy
from delg_tf.ops.image import NORMALIZATIONS, normalize_images
from delg_tf.ops.pooling import spoc

CONCAT_STAGES = ("after_ofm", "before_ofm")
# Table 4's ablation: both descriptor types (the method), only global, only local.
DESCRIPTOR_BRANCHES = ("global,local", "global", "local")
AUX_ALL_EPOCHS = -1  # aux_epochs value: auxiliary loss during the whole training.
PYTORCH_LAYER_NAMES = {"layer1": "conv2", "layer2": "conv3", "layer3": "conv4", "layer4": "conv5"}
BACKBONE_FEATURES = ("conv2", "conv3", "conv4", "conv5")
PAPER_AUX_WEIGHT = 3.0  # lambda of Eq. 1 (Table 2's best).
PAPER_AUX_EPOCHS = 2
PROXY_ANCHOR_PROXY_LR_MULTIPLIER = 100.0
PROXY_ANCHOR_GRADIENT_CLIP = 10.0
BUILD_IMAGE_SIZE = 64  # Spatial size of the dummy batch that creates the weights.


@dataclasses.dataclass(frozen=True)
class GlocalModelConfig:
    """Configuration of `GlocalModel` (defaults: the paper's best model on CUB).

    Attributes:
      num_classes: number of training classes (one proxy and one auxiliary logit
        each; 100 for the CUB-200-2011 train split).
      backbone: "r50" (paper), "r101" or "tiny" (tests, CPU demos).
      backbone_layout: ResNet layout; "keras" has the torchvision strides.
      block3_stride: False (default): layer3 ("conv4") at stride 16 as in torchvision.
      backbone_kwargs: extra `resnet.build_resnet` arguments (e.g. base_width).
      image_normalization: "delf", "delf_tf1" or "caffe"; None picks the layout's
        convention ("caffe" for "keras", "delf" otherwise).
      backbone_bn_training: False freezes the backbone batch norms (inference mode,
        fixed scale/offset: proxy-anchor's --bn-freeze 1, for pretrained backbones).
      imagenet_weights: None, "imagenet" or a weights path for the backbone
        (see `delg_tf.backbones.imagenet`); the paper starts from ImageNet.
      global_descriptors: combination of S (SPoC), M (MAC), G (GeM), e.g. "G,M".
      global_layer: feature map pooled by the global module ("conv4" = layer3).
      local_layer: feature map of the local module ("conv3" = layer2).
      local_dim: channels C of the local features and of each projected global
        descriptor (the orthogonal fusion needs them equal).
      atrous_rates: dilation rates of the multi-atrous block, (3, 6, 9) or (6, 12, 18).
      gem_power: GeM power p.
      learn_gem_power: train p.
      concat_stage: "after_ofm" (fuse each global descriptor, then concatenate: the
        paper's best) or "before_ofm" (concatenate, project to C, fuse once: Table 3).
      descriptor_branches: "global,local" (the method), "global" (no local module, no
        fusion: CGD-like) or "local" (pooled local features only; the global module
        is kept for the auxiliary classifier): Table 4's "Only GD" / "Only LD".
      embedding_dim: size of the L2-normalised embedding; with "after_ofm" a
        multiple of the number of global descriptors.
      aux_weight: lambda of Eq. 1 (paper: 3); 0 removes the auxiliary module.
      aux_epochs: epochs with the auxiliary loss (paper: 2); -1 = all epochs.
      steps_per_epoch: optimizer steps per epoch (training images // batch size);
        the trainer fills it from the data when 0.
      label_smoothing: epsilon of the auxiliary cross-entropy (CGD: 0.1).
      temperature: softmax temperature of the auxiliary cross-entropy (CGD: 0.5).
      proxy_alpha: proxy-anchor scale alpha (32).
      proxy_margin: proxy-anchor margin delta (0.1).
      proxy_lr_multiplier: learning rate of the proxies / the main learning rate
        (proxy-anchor: 100); the proxies have their own optimizer.
      gradient_clip_value: clip every gradient value to +-this (proxy-anchor: 10);
        0 disables.
    """

    num_classes: int = 100
    backbone: str = "r50"
    backbone_layout: str = "keras"
    block3_stride: bool = False
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)
    image_normalization: str = None
    backbone_bn_training: bool = True
    imagenet_weights: str = None
    global_descriptors: str = "G,M"
    global_layer: str = "conv4"
    local_layer: str = "conv3"
    local_dim: int = 512
    atrous_rates: Tuple[int, ...] = DOLG_ATROUS_RATES
    gem_power: float = 3.0
    learn_gem_power: bool = False
    concat_stage: str = "after_ofm"
    descriptor_branches: str = "global,local"
    embedding_dim: int = 512
    aux_weight: float = PAPER_AUX_WEIGHT
    aux_epochs: int = PAPER_AUX_EPOCHS
    steps_per_epoch: int = 0
    label_smoothing: float = CGD_LABEL_SMOOTHING
    temperature: float = CGD_TEMPERATURE
    proxy_alpha: float = PROXY_ANCHOR_ALPHA
    proxy_margin: float = PROXY_ANCHOR_MARGIN
    proxy_lr_multiplier: float = PROXY_ANCHOR_PROXY_LR_MULTIPLIER
    gradient_clip_value: float = PROXY_ANCHOR_GRADIENT_CLIP

    def __post_init__(self):
        # Canonical spellings (layer aliases, "GM" -> "G,M"); validation in validate().
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("global_layer", PYTORCH_LAYER_NAMES.get(self.global_layer, self.global_layer))
        set_("local_layer", PYTORCH_LAYER_NAMES.get(self.local_layer, self.local_layer))
        set_("atrous_rates", tuple(int(r) for r in self.atrous_rates))
        set_("backbone_kwargs", dict(self.backbone_kwargs or {}))
        set_(
            "descriptor_branches",
            ",".join(part.strip().lower() for part in str(self.descriptor_branches).split(",")),
        )
        try:
            set_("global_descriptors", ",".join(parse_descriptor_codes(self.global_descriptors)))
        except ValueError:
            pass  # Reported by validate().
        self.validate()

    def validate(self):
        """Checks every field (done at construction); returns self.

        Raises:
          ConfigError: naming the field, the expected and the received value (a
            ValueError of `parse_descriptor_codes` for `global_descriptors`).
        """

        def check(ok, field, expected):
            expect(ok, field, expected, getattr(self, field), owner="GlocalModelConfig")

        check(
            isinstance(self.num_classes, int) and self.num_classes >= 1,
            "num_classes",
            "an integer >= 1 (the number of training classes)",
        )
        parse_descriptor_codes(self.global_descriptors)  # Raises with its own message.
        for field in ("global_layer", "local_layer"):
            check(
                getattr(self, field) in BACKBONE_FEATURES,
                field,
                f"one of {BACKBONE_FEATURES} (or PyTorch's {sorted(PYTORCH_LAYER_NAMES)})",
            )
        check(self.concat_stage in CONCAT_STAGES, "concat_stage", f"one of {CONCAT_STAGES}")
        check(
            self.descriptor_branches in DESCRIPTOR_BRANCHES,
            "descriptor_branches",
            f"one of {DESCRIPTOR_BRANCHES}",
        )
        check(
            self.image_normalization is None or self.image_normalization in NORMALIZATIONS,
            "image_normalization",
            f"None or one of {NORMALIZATIONS}",
        )
        check(
            self.atrous_rates and min(self.atrous_rates) >= 1,
            "atrous_rates",
            "positive dilation rates such as 3,6,9",
        )
        for field in ("embedding_dim", "local_dim"):
            check(
                isinstance(getattr(self, field), int) and getattr(self, field) >= 1,
                field,
                "an integer >= 1",
            )
        num_descriptors = len(self.descriptor_codes)
        check(
            self.concat_stage == "before_ofm"
            or not self.uses_global_descriptors
            or self.embedding_dim % num_descriptors == 0,
            "embedding_dim",
            f"a multiple of the number of global descriptors "
            f"({num_descriptors}: {self.global_descriptors}) with concat_stage=after_ofm",
        )
        check(self.aux_weight >= 0, "aux_weight", "lambda >= 0 (0 = no auxiliary loss)")
        check(
            self.aux_epochs >= AUX_ALL_EPOCHS,
            "aux_epochs",
            f"an integer >= 0, or {AUX_ALL_EPOCHS} for all epochs",
        )
        check(self.steps_per_epoch >= 0, "steps_per_epoch", "an integer >= 0")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "a value in [0, 1)")
        check(self.temperature > 0, "temperature", "a value > 0")
        check(self.proxy_alpha > 0, "proxy_alpha", "a value > 0")
        check(self.proxy_lr_multiplier > 0, "proxy_lr_multiplier", "a value > 0")
        check(self.gradient_clip_value >= 0, "gradient_clip_value", "a value >= 0 (0 = off)")
        return self

    def check_steps_per_epoch(self):
        """The epoch-limited auxiliary loss needs steps_per_epoch (known after the data)."""
        expect(
            not (self.use_aux and self.aux_epochs > 0 and self.steps_per_epoch < 1),
            "steps_per_epoch",
            f">= 1 with aux_epochs={self.aux_epochs} (optimizer steps "
            "per epoch = training images // batch size)",
            self.steps_per_epoch,
            owner="GlocalModelConfig",
            fix=f"set --steps_per_epoch, or --aux_epochs="
            f"{AUX_ALL_EPOCHS} (all epochs) or --aux_weight=0 (off)",
        )

    def resolved_image_normalization(self):
        """The normalisation mode actually used."""
        if self.image_normalization is not None:
            return self.image_normalization
        return "caffe" if self.backbone_layout == "keras" else "delf"

    @property
    def descriptor_codes(self):
        return parse_descriptor_codes(self.global_descriptors)

    @property
    def uses_local_descriptor(self):
        return "local" in self.descriptor_branches.split(",")

    @property
    def uses_global_descriptors(self):
        """Whether the global descriptors are part of the embedding."""
        return "global" in self.descriptor_branches.split(",")

    @property
    def use_aux(self):
        """Whether the auxiliary module exists (lambda > 0 and at least one epoch)."""
        return self.aux_weight > 0 and self.aux_epochs != 0

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["atrous_rates"] = list(self.atrous_rates)
        return d

    @classmethod
    def from_dict(cls, values):
        """Builds a config from a dict, refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"GlocalModelConfig: unknown keys {unknown}; expected a subset of {sorted(known)}."
            )
        return cls(**values)


class GlocalModel(keras.Model):
    """The Glocal Retriever embedding network with its training losses.

    Args:
      config: a `GlocalModelConfig` (or its dict form).

    `call(images)`: images float [B, H, W, 3], RGB in [0, 255] -> L2-normalised
    embedding [B, embedding_dim].
    `train_step((images, labels))`: one optimisation step with `self.optimizer`
    (network) and `self.proxy_optimizer` (proxies); call `compile` first.

    Reference: Kim, Kim, Suh, Electronics 2023, Figure 1 and Sec. 3.
    """

    def __init__(self, config, **kwargs):
        kwargs.setdefault("name", "glocal")
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = GlocalModelConfig.from_dict(config)
        config.validate()
        config.check_steps_per_epoch()
        self.config = config
        codes = config.descriptor_codes
        self.backbone = build_resnet(
            config.backbone,
            layout=config.backbone_layout,
            block3_stride=config.block3_stride,
            **config.backbone_kwargs,
        )
        # One attribute per sublayer (not lists): Keras 3 lists of layers are not
        # tf.train.Checkpoint dependencies, so they would not be saved by name.
        if not (config.uses_global_descriptors or config.use_aux):
            codes = ()
        self._global_codes = tuple(codes)
        for code in codes:
            setattr(
                self,
                f"global_{code.lower()}",
                GlobalDescriptor(
                    code,
                    units=config.local_dim,
                    gem_power=config.gem_power,
                    learn_gem_power=config.learn_gem_power,
                    name=f"global_{code.lower()}",
                ),
            )
        if config.uses_local_descriptor:
            self.local_module = LocalBranch(
                config.local_dim, rates=config.atrous_rates, name="local_module"
            )
            self.fusion = OrthogonalFusion(name="orthogonal_fusion")
        else:
            self.local_module = self.fusion = None
        if not config.uses_global_descriptors:
            self.concat_projection = None
            self.fusion_fc = keras.layers.Dense(config.embedding_dim, name="fusion_fc")
        elif config.concat_stage == "after_ofm":
            self.concat_projection = None
            per_descriptor = config.embedding_dim // len(codes)
            for code in codes:
                setattr(
                    self,
                    f"fusion_fc_{code.lower()}",
                    keras.layers.Dense(per_descriptor, name=f"fusion_fc_{code.lower()}"),
                )
        else:
            self.concat_projection = keras.layers.Dense(
                config.local_dim, use_bias=False, name="global_concat_fc"
            )
            self.fusion_fc = keras.layers.Dense(config.embedding_dim, name="fusion_fc")
        if config.use_aux:
            self.aux_bn = keras.layers.BatchNormalization(name="aux_bn")
            self.aux_classifier = keras.layers.Dense(config.num_classes, name="aux_classifier")
        else:
            self.aux_bn = self.aux_classifier = None
        self.proxy_optimizer = None

    @property
    def global_modules(self):
        """The `GlobalDescriptor` layers, in the order of `config.global_descriptors`."""
        return [getattr(self, f"global_{c.lower()}") for c in self._global_codes]

    @property
    def fusion_fcs(self):
        """FC layers after the fusion: one per descriptor ("after_ofm") or one."""
        if self.config.concat_stage == "before_ofm" or not self.config.uses_global_descriptors:
            return [self.fusion_fc]
        return [getattr(self, f"fusion_fc_{c.lower()}") for c in self.config.descriptor_codes]

    # ----------------------------------------------------------------- building
    def build(self, input_shape=None):
        """Creates every weight (backbone, heads, proxies) with a dummy batch."""
        if self.built:
            return
        self.proxies = self.add_weight(
            name="proxies",
            shape=(self.config.num_classes, self.config.embedding_dim),
            initializer=keras.initializers.HeNormal(),
            trainable=True,
        )
        if "conv5" not in (self.config.global_layer, self.config.local_layer):
            # conv5 is never run; if a weight loader builds it, it must not be trained
            # (no gradients, but optimizer slots and weight decay).
            for block in self.backbone.stages[3]:
                block.trainable = False
        dummy = tf.zeros([1, BUILD_IMAGE_SIZE, BUILD_IMAGE_SIZE, 3])
        self._forward(dummy, training=False)
        if not self.config.backbone_bn_training:
            for layer in self.backbone._flatten_layers(include_self=False, recursive=True):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
        self.built = True

    def load_imagenet_weights(self, spec=None):
        """Initialises the backbone from `spec` (default `config.imagenet_weights`).

        See `delg_tf.backbones.imagenet.load_imagenet_weights`; returns its description.
        """
        from delg_tf.backbones import imagenet  # Local import: optional dependency chain.

        spec = self.config.imagenet_weights if spec is None else spec
        if not self.built:
            self.build()
        return imagenet.load_imagenet_weights(self.backbone, spec)

    def compile(self, optimizer="adamw", **kwargs):
        """Compiles and creates `proxy_optimizer` from the main optimizer's config.

        The proxy optimizer has the main optimizer's class and hyper-parameters and
        the learning rate `main learning rate (current value, schedules included) x
        proxy_lr_multiplier`.
        """
        super().compile(optimizer=optimizer, **kwargs)
        if not self.built:
            self.build()
        main = self.optimizer
        proxy_config = dict(main.get_config(), name="proxy_optimizer")
        proxy_config.pop("learning_rate", None)
        multiplier = self.config.proxy_lr_multiplier
        self.proxy_optimizer = main.__class__(
            learning_rate=lambda: main.learning_rate * multiplier, **proxy_config
        )
        self.proxy_optimizer.build([self.proxies])

    # ------------------------------------------------------------------ forward
    def _forward(self, images, training=False, with_aux=True):
        """Returns (embedding [B, D] L2-normalised, aux logits [B, classes] or None)."""
        cfg = self.config
        x = normalize_images(images, cfg.resolved_image_normalization())
        needs_conv5 = "conv5" in (cfg.global_layer, cfg.local_layer)
        features = (
            self.backbone(x, training=training)
            if needs_conv5
            else self.backbone.call_to_conv4(x, training=training)
        )
        global_map = features[cfg.global_layer]
        local_features = None
        if self.local_module is not None:
            local_features, _ = self.local_module(features[cfg.local_layer], training=training)
        pooled_and_projected = [module(global_map) for module in self.global_modules]
        globals_ = [g for _, g in pooled_and_projected]

        def fuse(g):
            return g if local_features is None else self.fusion(local_features, g)

        if not cfg.uses_global_descriptors:
            embedding = self.fusion_fc(spoc(local_features))
        elif self.concat_projection is None:
            embedding = tf.concat(
                [fc(fuse(g)) for fc, g in zip(self.fusion_fcs, globals_)], axis=-1
            )
        else:
            g = self.concat_projection(tf.concat(globals_, axis=-1))
            embedding = self.fusion_fcs[0](fuse(g))
        embedding = tf.math.l2_normalize(embedding, axis=-1)
        logits = None
        if with_aux and self.aux_classifier is not None:
            first_pooled = pooled_and_projected[0][0]
            logits = self.aux_classifier(self.aux_bn(first_pooled, training=training))
        return embedding, logits

    def call(self, images, training=False):
        return self._forward(images, training=training, with_aux=False)[0]

    # ------------------------------------------------------------------- losses
    def aux_loss_weight(self, step):
        """Lambda if the auxiliary loss is active at optimizer step `step`, else 0."""
        cfg = self.config
        if not cfg.use_aux:
            return tf.constant(0.0)
        if cfg.aux_epochs == AUX_ALL_EPOCHS:
            return tf.constant(cfg.aux_weight)
        limit = tf.cast(cfg.aux_epochs * cfg.steps_per_epoch, tf.int64)
        active = tf.cast(tf.cast(step, tf.int64) < limit, tf.float32)
        return cfg.aux_weight * active

    def compute_losses(self, images, labels, training):
        """Returns a dict: loss (total), metric_loss, aux_loss, aux_weight."""
        cfg = self.config
        embedding, logits = self._forward(images, training=training)
        metric_loss = proxy_anchor_loss(
            embedding, labels, self.proxies, cfg.proxy_alpha, cfg.proxy_margin
        )
        optimizer = getattr(self, "optimizer", None)
        step = optimizer.iterations if optimizer is not None else 0
        weight = self.aux_loss_weight(step)
        if logits is not None:
            aux_loss = smoothed_cross_entropy(labels, logits, cfg.label_smoothing, cfg.temperature)
        else:
            aux_loss = tf.constant(0.0)
        total = metric_loss + weight * aux_loss
        return {
            "loss": total,
            "metric_loss": metric_loss,
            "aux_loss": aux_loss,
            "aux_weight": weight,
        }

    # ----------------------------------------------------------- train and test
    def train_step(self, data):
        """One step on (images float [B, H, W, 3] in [0, 255], labels int [B]).

        Under a strategy with R > 1 replicas (B = the replica's share of the global
        batch) the step is the global batch's, as on one device:

        * L_M (proxy-anchor) is not a per-example mean: it is computed on the
          embeddings and labels all-gathered from every replica. Each replica
          differentiates L_M / R; the gather's gradient sums the replicas' upstream
          gradients, so a replica gets dL_M for its own embeddings and dL_M / R for
          the proxies, and the optimizers' all-reduce sum gives the global gradient;
        * L_A (auxiliary cross-entropy) is a batch mean: a replica contributes its mean
          x B / global batch;
        * value clipping applies to the global gradient: all-reduced here, clipped and
          divided by R before the optimizers sum it over the replicas again (one more
          all-reduce per step when `gradient_clip_value` > 0).

        BatchNormalization layers use per-replica batch statistics.

        Returns:
          The replica's dict of `compute_losses` (loss, metric_loss, aux_loss,
          aux_weight); its MEAN over the replicas is the global batch's (metric_loss
          is the global value on every replica, aux_loss the replica's mean).
        """
        if self.proxy_optimizer is None:
            raise RuntimeError(
                "GlocalModel.train_step needs compile(optimizer=...) first; it "
                "also creates the proxies' optimizer."
            )
        images, labels = data[0], data[1]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        network_variables = [v for v in self.trainable_variables if v is not self.proxies]
        all_labels = None
        if replicas > 1:
            all_labels = tf.distribute.get_replica_context().all_gather(
                tf.convert_to_tensor(labels), axis=0
            )
        with tf.GradientTape() as tape:
            if replicas == 1:
                losses = self.compute_losses(images, labels, training=True)
                share = losses["loss"]
            else:
                losses, share = self._replica_losses(images, labels, all_labels, replicas)
        gradients = tape.gradient(share, network_variables + [self.proxies])
        gradients = self._clipped_gradients(gradients, replicas)
        self.optimizer.apply_gradients(zip(gradients[:-1], network_variables))
        self.proxy_optimizer.apply_gradients([(gradients[-1], self.proxies)])
        return losses

    def _replica_losses(self, images, labels, all_labels, replicas):
        """(global-batch losses as in `compute_losses`, this replica's share of the loss
        to differentiate), in a replica context (see `train_step`).
        """
        cfg = self.config
        embedding, logits = self._forward(images, training=True)
        all_embeddings = tf.distribute.get_replica_context().all_gather(embedding, axis=0)
        metric_loss = proxy_anchor_loss(
            all_embeddings, all_labels, self.proxies, cfg.proxy_alpha, cfg.proxy_margin
        )
        weight = self.aux_loss_weight(self.optimizer.iterations)
        if logits is not None:
            aux_loss = smoothed_cross_entropy(labels, logits, cfg.label_smoothing, cfg.temperature)
        else:
            aux_loss = tf.constant(0.0)
        batch_share = tf.cast(tf.shape(embedding)[0], metric_loss.dtype) / tf.cast(
            tf.shape(all_embeddings)[0], metric_loss.dtype
        )
        share = metric_loss / tf.cast(replicas, metric_loss.dtype) + weight * aux_loss * batch_share
        losses = {
            "loss": metric_loss + weight * aux_loss,
            "metric_loss": metric_loss,
            "aux_loss": aux_loss,
            "aux_weight": weight,
        }
        return losses, share

    def _clipped_gradients(self, gradients, replicas):
        """Clips the global gradient's values to +-gradient_clip_value (see `train_step`);
        with R > 1 replicas returns clip(all-reduced gradient) / R.
        """
        clip = self.config.gradient_clip_value
        if clip <= 0:
            return gradients
        if replicas == 1:
            return [None if g is None else tf.clip_by_value(g, -clip, clip) for g in gradients]
        present = [i for i, g in enumerate(gradients) if g is not None]
        summed = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [gradients[i] for i in present]
        )
        clipped = list(gradients)
        for i, gradient in zip(present, summed):
            clipped[i] = tf.clip_by_value(gradient, -clip, clip) / replicas
        return clipped

    def test_step(self, data):
        """Validation losses on (images, labels); Recall@K needs the whole set, see
        `delg_tf.evaluation.glocal.evaluate_recall`.
        """
        images, labels = data[0], data[1]
        return self.compute_losses(images, labels, training=False)

    def get_config(self):
        return {"name": self.name, "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(GlocalModelConfig.from_dict(config.pop("config")), **config)


def build_glocal_model(config):
    """Builds (creates all weights of) a `GlocalModel` from a config or dict."""
    model = GlocalModel(config)
    model.build()
    return model


def _register():
    from delg_tf.models import registry

    registry.register_model("glocal", GlocalModel, GlocalModelConfig)


_register()
