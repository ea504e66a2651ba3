"""Recall@K evaluation of an embedding model (Glocal Retriever) on a labelled dataset.

`evaluate_recall(model, dataset)` embeds every (images, labels) batch of a finite
tf.data dataset and returns Recall@K (K = 1, 2, 4, 8, 16, 32; cosine similarity,
query excluded) as in Kim, Kim, Suh, Electronics 2023, Tables 1-5. For CUB-200-2011
build the dataset with `delg_tf.data.cub.load_cub(root, "test")` and
`delg_tf.data.cub.make_metric_dataset(split, batch_size, training=False)` (resize
256, centre crop 224). `load_glocal_run(logdir)` restores a model trained by
`python -m delg_tf.train --model_family=glocal`.

`evaluate_glocal(run_or_export, dataset="cub" | "embedded", ...)` does it end to
end: it loads a training run (its latest checkpoint) or a Glocal SavedModel export
(`python -m delg_tf.export`), embeds the test split (CUB-200-2011 classes
101-200, or the embedded dataset's test landmarks, never seen in training),
computes Recall@K and writes the JSON (Recall in percent, like the DELG JSONs).
"""

import logging
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from delg_tf.evaluation.recall_at_k import RECALL_KS, recall_at_k
from delg_tf.training import runs
from delg_tf.training.runs import UNTRAINED

logger = logging.getLogger(__name__)

DATASETS = ("cub", "embedded")
DEFAULT_BATCH_SIZE = 32
DEFAULT_EMBEDDED_PRESET = "default"
DEFAULT_OUTPUT_DIR = "eval_output"
RESULTS_NAME = "results.json"
PERCENT = 100.0
GLOCAL_FAMILY = "glocal"
SAVED_MODEL_FILE = "saved_model.pb"
SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "images"
SERVING_OUTPUT = "embedding"


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
        raise ValueError(
            "evaluation dataset is empty: expected (images, labels) batches; "
            "check the split's folder and class range."
        )
    return np.concatenate(embeddings), np.concatenate(labels)


def evaluate_recall(embed_fn, dataset, ks=RECALL_KS):
    """Recall@K of `embed_fn` on `dataset`; returns {K: recall in [0, 1]}."""
    embeddings, labels = embed_dataset(embed_fn, dataset)
    return recall_at_k(embeddings, labels, ks=ks)


def load_glocal_run(logdir, checkpoint=None):
    """Rebuilds and restores a `GlocalModel` from a `delg_tf.train` run folder.

    `delg_tf.training.runs.load_run` for the "glocal" family: the model of the run's
    `config.json`, compiled with the run's optimizer, whose state is restored too.

    Args:
      logdir: the run's --logdir.
      checkpoint: a checkpoint prefix; default the latest in `logdir`; `UNTRAINED`
        for the run's model at its random initialisation (a before-training baseline).

    Returns:
      The restored model.
    """
    return runs.load_run(logdir, checkpoint, family=GLOCAL_FAMILY)


def _read_run_record(logdir):
    path = runs.config_path(logdir)
    record = runs.read_run_record(logdir)
    family = record.get("train", {}).get("model_family")
    if family != GLOCAL_FAMILY:
        raise ValueError(
            f"{path}: model_family is {family!r}; expected a 'glocal' run "
            "(python -m delg_tf.train --model_family=glocal). DELG runs are "
            "evaluated with mAP by python -m delg_tf.evaluate."
        )
    return record


def _export_embed_fn(export_dir, model_flag):
    """The embedding function of a Glocal SavedModel (serving_default signature)."""
    loaded = tf.saved_model.load(str(export_dir))
    signature = loaded.signatures.get(SERVING_SIGNATURE)
    inputs = set(signature.structured_input_signature[1]) if signature is not None else set()
    outputs = set(signature.structured_outputs) if signature is not None else set()
    if SERVING_INPUT not in inputs or SERVING_OUTPUT not in outputs:
        raise ValueError(
            f"--{model_flag}={export_dir} is a SavedModel but not a Glocal "
            f"embedding export (its {SERVING_SIGNATURE} signature takes "
            f"{sorted(inputs)} and returns {sorted(outputs)}; expected "
            f"'{SERVING_INPUT}' -> '{SERVING_OUTPUT}'); export the run with "
            f"python -m delg_tf.export --checkpoint_dir=LOGDIR --export_path=DIR."
        )

    def embed(images):
        return signature(**{SERVING_INPUT: tf.cast(images, tf.float32)})[SERVING_OUTPUT]

    embed.saved_model = loaded  # Keeps the loaded object (and its variables) alive.
    return embed


def _load_embedder(model_path, checkpoint, model_flag):
    """Returns (embed_fn, info dict, run record or None, export metadata or None)."""
    from delg_tf.serving.glocal_export import read_export_metadata
    from delg_tf.training.config import CONFIG_JSON_NAME

    path = Path(model_path)
    if runs.is_run(path):
        record = _read_run_record(path)
        if checkpoint == UNTRAINED:
            return (
                runs.untrained_model(record),
                {"model_kind": "run", "checkpoint": UNTRAINED},
                record,
                None,
            )
        resolved = checkpoint or tf.train.latest_checkpoint(str(path))
        model = load_glocal_run(path, resolved)
        return model, {"model_kind": "run", "checkpoint": resolved}, record, None
    if (path / SAVED_MODEL_FILE).is_file():
        if checkpoint:
            raise ValueError(
                f"checkpoint={checkpoint!r} applies to training runs only; "
                f"--{model_flag}={path} is a SavedModel export."
            )
        metadata = read_export_metadata(path)
        record = (metadata or {}).get("run")
        return (
            _export_embed_fn(path, model_flag),
            {"model_kind": "export", "checkpoint": None},
            record,
            metadata,
        )
    raise FileNotFoundError(
        f"--{model_flag}={model_path}: neither a training run (no {CONFIG_JSON_NAME}) nor "
        f"a SavedModel (no {SAVED_MODEL_FILE}); pass the --logdir of python -m delg_tf.train "
        "--model_family=glocal or the --export_path of python -m delg_tf.export."
    )


def _test_split(dataset, data_dir, record, embedded_preset, data_dir_flag):
    """The unseen-class test split of `dataset` (a `delg_tf.data.cub.MetricSplit`)."""
    from delg_tf.data import cub
    from delg_tf.training.config import TrainConfig
    from delg_tf.training.data import embedded_metric_paths

    train = (record or {}).get("train", {})
    if dataset == "cub":
        if data_dir is None and train.get("data_source") == "cub":
            data_dir = train.get("data_dir")
        return cub.load_cub(data_dir, "test", flag=data_dir_flag)
    preset = embedded_preset or train.get("embedded_preset") or DEFAULT_EMBEDDED_PRESET
    if data_dir is None:
        if train.get("data_source") != "embedded":
            raise ValueError(
                f"dataset 'embedded' needs --{data_dir_flag}: the folder where the trainer "
                "built the embedded dataset (the run's --data_dir, e.g. demo_output/data); "
                "it could not be read from the model's run config."
            )
        data_dir = TrainConfig.from_dict(train).resolved_data_dir
    paths = embedded_metric_paths(data_dir, preset)
    return cub.embedded_metric_split(paths, "test")


def default_output_json(dataset):
    """Default results path: `eval_output/glocal_<dataset>/results.json`."""
    return Path(DEFAULT_OUTPUT_DIR) / f"glocal_{dataset}" / RESULTS_NAME


def evaluate_glocal(
    logdir_or_export,
    dataset="cub",
    data_dir=None,
    ks=RECALL_KS,
    batch_size=DEFAULT_BATCH_SIZE,
    *,
    image_size=None,
    embedded_preset=None,
    checkpoint=None,
    output_json=None,
    data_dir_flag="data_dir",
    model_flag="model_path",
):
    """Recall@K of a Glocal Retriever on the unseen test classes; writes the JSON.

    Args:
      logdir_or_export: a `python -m delg_tf.train --model_family=glocal` logdir
        (latest checkpoint, or `checkpoint`) or a `python -m delg_tf.export` folder.
      dataset: "cub" (CUB-200-2011 classes 101-200, 5,924 images) or "embedded"
        (the embedded dataset's test landmarks, the second half of
        `delg_tf.data.cub.embedded_metric_split`).
      data_dir: "cub": the CUB_200_2011 folder; "embedded": the folder in which the
        trainer builds the embedded dataset (its --data_dir; built if missing).
        None = the run's --data_dir when the run trained on the same dataset.
      ks: the K values (the paper: 1, 2, 4, 8, 16, 32).
      batch_size: images embedded at once.
      image_size: centre-crop side (resize the shorter side to 256/224 of it
        first). None = the run's training --image_size, else the export's resize
        size, else 224.
      embedded_preset: embedded dataset preset; None = the run's, else "default".
      checkpoint: runs only: a checkpoint prefix (default the latest), or
        `UNTRAINED` for the randomly initialised model (the before-training
        baseline).
      output_json: results path; None = `eval_output/glocal_<dataset>/results.json`.
      data_dir_flag, model_flag: flag names used in error messages.

    Returns:
      The dict written as JSON: "recall" {"R@K": percent}, "dataset", "split",
      "num_images", "num_classes", "model_path", "model_kind" ("run"/"export"),
      "checkpoint", "image_size", "resize_size", "ks", "timings" (seconds) and
      "output_json".

    Raises:
      ValueError, FileNotFoundError, delg_tf.data.errors.DataError: bad model path,
        dataset or data folder; the message names the flag and the fix. OSError:
        unwritable output_json.
    """
    from delg_tf.data import cub
    from delg_tf.evaluation.ranks import write_json
    from delg_tf.training.data import metric_resize_size

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; received {dataset!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be an integer >= 1; received {batch_size!r}.")
    ks = tuple(int(k) for k in ks)
    tic = time.perf_counter()
    embed_fn, info, record, metadata = _load_embedder(logdir_or_export, checkpoint, model_flag)
    load_seconds = time.perf_counter() - tic
    split = _test_split(dataset, data_dir, record, embedded_preset, data_dir_flag)
    if image_size is None:
        image_size = (
            (record or {}).get("train", {}).get("image_size")
            or (metadata or {}).get("image_size")
            or cub.METRIC_IMAGE_SIZE
        )
    resize_size = metric_resize_size(int(image_size))
    test = cub.make_metric_dataset(
        split,
        int(batch_size),
        training=False,
        image_size=int(image_size),
        resize_size=resize_size,
        repeat=False,
        drop_remainder=False,
    )
    tic = time.perf_counter()
    embeddings, labels = embed_dataset(embed_fn, test)
    embed_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    recalls = recall_at_k(embeddings, labels, ks=ks)
    recall_seconds = time.perf_counter() - tic
    output = Path(output_json) if output_json else default_output_json(dataset)
    results = {
        "model_family": "glocal",
        "recall": {f"R@{k}": PERCENT * recalls[k] for k in ks},
        "dataset": dataset,
        "split": split.name,
        "num_images": int(len(labels)),
        "num_classes": int(split.num_classes),
        "model_path": str(logdir_or_export),
        **info,
        "image_size": int(image_size),
        "resize_size": int(resize_size),
        "ks": list(ks),
        "embedding_dim": int(embeddings.shape[1]),
        "timings": {
            "load_seconds": load_seconds,
            "embed_seconds": embed_seconds,
            "recall_seconds": recall_seconds,
        },
        "output_json": str(output),
    }
    write_json(results, output)
    logger.info(
        "Recall@K on %s (%d images, %d classes): %s",
        split.name,
        len(labels),
        split.num_classes,
        "  ".join(f"{k} {v:.2f}" for k, v in results["recall"].items()),
    )
    return results
