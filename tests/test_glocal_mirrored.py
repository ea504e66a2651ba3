"""A Glocal train step under the mirrored strategy (2 logical CPUs) is the single-device step.

The proxy-anchor loss is not a per-example mean and the gradient values are clipped, so a
step is the global batch's only if the loss sees the embeddings of every replica and the
clipping sees the all-reduced gradient (Kim et al., Electronics 2023, Sec. 3.5.3;
proxy-anchor, Kim et al. CVPR 2020, Eq. 4). Logical devices must be configured before
TensorFlow initialises, hence the subprocess.
"""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 300

MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from delg_tf.models.glocal import GlocalModel, GlocalModelConfig

    # Batch statistics are per replica: every BatchNormalization is frozen (as in the DELG
    # mirrored test), at the statistics of the first batch so that activations stay in
    # range; everything else trains. Replica 0 gets classes 0-1, replica 1 classes 2-3,
    # class 4 is absent: the per-replica proxy-anchor losses (|P+| = 2 each) differ from
    # the global one (|P+| = 4).
    IMAGE_SIZE, STEPS, LEARNING_RATE = 64, 2, 1e-4
    CLIPPED_QUANTILE = 90  # the clip value: this percentile of the first step's |gradient|
    # Losses: relative tolerance. Weights: |single - mirrored| <= WEIGHT_ATOL (one float32
    # ulp of the weights, |w| < 2) + UPDATE_RTOL x the tensor's update (measured: <= 6e-8
    # absolute, i.e. rounding, for updates of 5e-6 .. 0.024).
    LOSS_RTOL, WEIGHT_ATOL, UPDATE_RTOL = 1e-5, 2.5e-7, 1e-3
    config = dict(num_classes=5, backbone="tiny", local_dim=16, embedding_dim=16,
                  image_normalization="delf", backbone_bn_training=False, aux_epochs=-1)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4, dtype="int32"), 2)
    batches = [(rng.uniform(0, 255, (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32"), labels)
               for _ in range(STEPS)]

    def batch_norms(model):
        return [layer for layer in model._flatten_layers()
                if isinstance(layer, keras.layers.BatchNormalization)]

    def make(clip, initial=None):
        model = GlocalModel(GlocalModelConfig(**config, gradient_clip_value=clip))
        model.build()
        if initial is None:  # Moving statistics := those of the first batch.
            for layer in batch_norms(model):
                layer.trainable, layer.momentum = True, 0.0
            model._forward(tf.constant(batches[0][0]), training=True)
        else:
            model.set_weights(initial)
        for layer in batch_norms(model):
            layer.trainable = False
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
        return model

    keras.utils.set_random_seed(0)
    probe = make(0.0)
    initial = probe.get_weights()
    with tf.GradientTape() as tape:
        loss = probe.compute_losses(*batches[0], training=True)["loss"]
    gradients = [g for g in tape.gradient(loss, probe.trainable_variables) if g is not None]
    magnitudes = np.concatenate([np.abs(g.numpy()).ravel() for g in gradients])
    clip_value = float(np.percentile(magnitudes, CLIPPED_QUANTILE))
    clipped = float(np.mean(magnitudes > clip_value))
    assert 0.05 < clipped < 0.2, clipped

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for clip in (0.0, clip_value):
        single = make(clip, initial)
        with strategy.scope():
            mirrored = make(clip, initial)
        single_step = tf.function(single.train_step)
        mirrored_step = tf.function(
            lambda batch: strategy.run(mirrored.train_step, args=(batch,)))
        for images, batch_labels in batches:
            single_logs = single_step((tf.constant(images), tf.constant(batch_labels)))
            dist = strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensors((images, batch_labels)))
            for batch in dist:
                logs = mirrored_step(batch)
            for name in ("loss", "metric_loss", "aux_loss"):
                value = float(strategy.reduce("MEAN", logs[name], axis=None))
                reference = float(single_logs[name])
                assert abs(value - reference) <= LOSS_RTOL * max(1.0, abs(reference)), (
                    name, value, reference)
        diff = 0.0
        for weight, a, b, start in zip(single.weights, single.get_weights(),
                                       mirrored.get_weights(), initial):
            update, error = np.abs(a - start).max(), np.abs(a - b).max()
            assert update > 0 or not weight.trainable, weight.path
            assert error <= WEIGHT_ATOL + UPDATE_RTOL * update, (clip, weight.path, error,
                                                                 update)
            diff = max(diff, error)
        print("OK clip", clip, "clipped", clipped, "max weight diff", diff)
""")


def test_glocal_step_under_mirrored_strategy_equals_single_device_step():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0 and result.stdout.count("OK") == 2, (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
