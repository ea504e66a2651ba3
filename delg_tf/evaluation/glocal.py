"""Recall@K evaluation of an embedding model (Glocal Retriever) on a labelled dataset.

`evaluate_recall(model, dataset)` embeds every (images, labels) batch of a finite
tf.data dataset and returns Recall@K (K = 1, 2, 4, 8, 16, 32; cosine similarity,
query excluded) as in Kim, Kim, Suh, Electronics 2023, Tables 1-5. For CUB-200-2011
build the dataset with `delg_tf.data.cub.load_cub(root, "test")` and
`delg_tf.data.cub.make_metric_dataset(split, batch_size, training=False)` (resize
256, centre crop 224). `load_glocal_run(logdir)` restores a model trained by
`python -m delg_tf.train --model_family=glocal`.
"""

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from delg_tf.evaluation.recall_at_k import RECALL_KS, recall_at_k


def embed_dataset(embed_fn, dataset):
    """Embeds a finite dataset of (images, labels) batches.

    Args:
      embed_fn: callable images float [B, H, W, 3] -> embeddings [B, D] (e.g. a
        `GlocalModel`, called with training=False when it accepts it).
      dataset: finite iterable of (images, labels) batches.

    Returns:
      (embeddings float32 [N, D], labels int64 [N]).
    """
    if hasattr(embed_fn, "call"):
        model = embed_fn
        embed = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    else:
        embed = embed_fn
    embeddings, labels = [], []
    for batch in dataset:
        images, batch_labels = batch[0], batch[1]
        embeddings.append(np.asarray(embed(images), dtype=np.float32))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    if not embeddings:
        raise ValueError("evaluation dataset is empty: expected (images, labels) batches; "
                         "check the split's folder and class range.")
    return np.concatenate(embeddings), np.concatenate(labels)


def evaluate_recall(embed_fn, dataset, ks=RECALL_KS):
    """Recall@K of `embed_fn` on `dataset`; returns {K: recall in [0, 1]}."""
    embeddings, labels = embed_dataset(embed_fn, dataset)
    return recall_at_k(embeddings, labels, ks=ks)


def load_glocal_run(logdir, checkpoint=None):
    """Rebuilds and restores a `GlocalModel` from a `delg_tf.train` run folder.

    Uses the run's `config.json` (model and training configs) and restores with the
    trainer's optimizer attached, so variables reachable only through the optimizer
    in the checkpoint's object graph are restored as well.

    Args:
      logdir: the run's --logdir.
      checkpoint: a checkpoint prefix; default the latest in `logdir`.

    Returns:
      The restored model.
    """
    from delg_tf.models import registry
    from delg_tf.training import trainer
    from delg_tf.training.config import CONFIG_JSON_NAME, TrainConfig

    logdir = Path(logdir)
    config_path = logdir / CONFIG_JSON_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected the --logdir of a "
                                f"'python -m delg_tf.train --model_family=glocal' run.")
    record = json.loads(config_path.read_text(encoding="utf-8"))
    train_config = TrainConfig(**record["train"])
    if train_config.model_family != "glocal":
        raise ValueError(f"{logdir} is a {train_config.model_family!r} run; expected a "
                         f"'glocal' run.")
    path = checkpoint or tf.train.latest_checkpoint(str(logdir))
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {logdir}; train first or pass a "
                                f"checkpoint prefix.")
    model = registry.build_model("glocal", record["model"], load_imagenet=False)
    optimizer = trainer.make_optimizer(train_config,
                                       trainer.make_learning_rate_schedule(train_config))
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)
    status = tf.train.Checkpoint(model=model, optimizer=optimizer).restore(path)
    status.expect_partial().assert_existing_objects_matched()
    return model
