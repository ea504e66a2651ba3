"""Glocal Retriever on the embedded photos: Recall@K before vs after training, per split.

    python bench/glocal_recall.py [--flagfile=configs/glocal_demo.flags] [--ks=1,2,4,8]
        [--checkpoint=PREFIX] [--embed_batch_size=32] [any delg_tf.train flag, e.g. --max_iters=300]

Trains the Glocal run of ``--flagfile`` with ``delg_tf.train`` (the demo's
``configs/glocal_demo.flags``: ``demo_output/glocal_train``; a finished run is reused,
an unfinished one resumed; other ``--flag=value`` arguments are passed to the trainer
after the flagfile), then embeds three parts of the embedded dataset with the run's
model at its seeded initialisation (the baseline: ``checkpoint=untrained``) and after
training (the latest checkpoint, or ``--checkpoint``), and prints Recall@K of each with
the gain in points:

* held-out views of the training landmarks (the 20 % the trainer keeps for validation;
  what ``tests/test_glocal_embedded_recall.py`` checks),
* all views of the training landmarks,
* the unseen test landmarks (what ``python -m delg_tf.evaluate --model_family=glocal
  --dataset=embedded`` scores).

Images are resized to 256/224 of the run's ``--image_size`` and centre-cropped, as in
``delg_tf.evaluation.glocal``.
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FLAGFILE = REPO / "configs" / "glocal_demo.flags"


def _cell(before, after):
    return f"{100 * before:.1f} -> {100 * after:.1f} ({100 * (after - before):+.1f})"


def recalls(model, split, ks, batch_size, image_size):
    from delg_tf.data import cub
    from delg_tf.evaluation import glocal as glocal_eval
    from delg_tf.evaluation.recall_at_k import recall_at_k
    from delg_tf.training import data as training_data

    dataset = cub.make_metric_dataset(
        split,
        batch_size,
        training=False,
        image_size=image_size,
        resize_size=training_data.metric_resize_size(image_size),
    )
    embeddings, labels = glocal_eval.embed_dataset(model, dataset)
    return recall_at_k(embeddings, labels, ks=ks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--flagfile",
        default=str(DEFAULT_FLAGFILE),
        help="delg_tf.train flagfile of a Glocal run on the embedded data",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint prefix of the trained model (default: the latest)",
    )
    parser.add_argument("--ks", default="1,2,4,8", help="comma-separated K of Recall@K")
    parser.add_argument("--embed_batch_size", type=int, default=32, help="images embedded at once")
    args, train_args = parser.parse_known_args(argv)
    unexpected = [a for a in train_args if not a.startswith("--")]
    if unexpected:
        parser.error(f"unexpected arguments {unexpected}; trainer settings are --flag=value")
    ks = tuple(int(k) for k in args.ks.split(",") if k)

    from delg_tf import train as train_entry
    from delg_tf.configs import ConfigError
    from delg_tf.data import cub
    from delg_tf.evaluation import glocal as glocal_eval
    from delg_tf.training import data as training_data
    from delg_tf.training import trainer

    try:
        train_config, model_config = train_entry.parse_flags(
            ["train", f"--flagfile={args.flagfile}", *train_args]
        )
    except ConfigError as error:
        parser.error(str(error))
    if train_config.model_family != "glocal" or train_config.data_source != "embedded":
        parser.error(
            f"{args.flagfile}: expected a Glocal run on the embedded data "
            f"(--model_family=glocal --data_source=embedded), got "
            f"{train_config.model_family} on {train_config.data_source}"
        )
    start = time.perf_counter()
    try:
        trainer.train(train_config, model_config)
    except ConfigError as error:  # e.g. a --logdir holding a run with other flags
        parser.error(str(error))
    train_seconds = time.perf_counter() - start

    paths = training_data.embedded_metric_paths(train_config.data_dir, train_config.embedded_preset)
    training_views = cub.embedded_metric_split(paths, "train")
    _, held_out = training_data.split_holdout(
        training_views, training_data.VALIDATION_FRACTION, training_data.EMBEDDED_SPLIT_SEED
    )
    splits = [
        ("training landmarks, held-out views", held_out),
        ("training landmarks, all views", training_views),
        ("unseen test landmarks", cub.embedded_metric_split(paths, "test")),
    ]
    models = {
        "untrained": glocal_eval.load_glocal_run(train_config.logdir, glocal_eval.UNTRAINED),
        "trained": glocal_eval.load_glocal_run(train_config.logdir, args.checkpoint),
    }
    results = {
        name: {
            label: recalls(model, split, ks, args.embed_batch_size, train_config.image_size)
            for label, split in splits
            if split is not None
        }
        for name, model in models.items()
    }

    print(
        f"\nGlocal Retriever, {train_config.logdir} ({args.flagfile}; "
        f"{train_config.max_iters} steps, {train_config.image_size} px; training or "
        f"reuse took {train_seconds:.1f} s); Recall@K in percent, untrained = the run's "
        f"seeded initialisation, gain = trained - untrained:"
    )
    header = "".join(f"{f'R@{k}':>24s}" for k in ks)
    print(f"  {'images':44s}{header}")
    for label, split in splits:
        if split is None:
            print(f"  {label + ' (none)':44s}")
            continue
        before, after = results["untrained"][label], results["trained"][label]
        cells = "".join(f"{_cell(before[k], after[k]):>24s}" for k in ks)
        print(f"  {f'{label} ({len(split)})':44s}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
