"""tf.train.Checkpoint must save every weight of the backbone and of the DELG model.

Keras 3 keeps layers held in Python lists out of TF's object graph; the ResNet stages
are lists, so each block is also an attribute. Without that, checkpoints silently
held only the stem.
"""

import numpy as np
import tensorflow as tf

from delg_tf.backbones.resnet import build_resnet
from delg_tf.models.delg import DelgModel, DelgModelConfig


def _checkpoint_keys(prefix):
    return {
        name
        for name, _ in tf.train.list_variables(prefix)
        if name.startswith("model/") and name.endswith(".ATTRIBUTES/VARIABLE_VALUE")
    }


def test_backbone_checkpoint_holds_every_variable(tmp_path):
    backbone = build_resnet("tiny")
    backbone(tf.zeros([1, 64, 64, 3]))
    prefix = tf.train.Checkpoint(model=backbone).save(str(tmp_path / "ckpt"))
    assert len(_checkpoint_keys(prefix)) == len(backbone.variables)


def test_delg_model_weights_round_trip_through_checkpoint(tmp_path):
    config = DelgModelConfig(
        num_classes=3, backbone="tiny", embedding_dim=16, local_dim=8, attention_hidden=8
    )
    images = tf.random.uniform([1, 64, 64, 3], 0, 255, seed=1)
    source = DelgModel(config)
    source(images)
    prefix = tf.train.Checkpoint(model=source).save(str(tmp_path / "ckpt"))
    assert len(_checkpoint_keys(prefix)) >= len(source.variables)

    target = DelgModel(config)
    target(images)
    tf.train.Checkpoint(model=target).restore(prefix).assert_existing_objects_matched()
    for a, b in zip(source.variables, target.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
