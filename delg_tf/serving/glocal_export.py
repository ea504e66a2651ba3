"""SavedModel export of the Glocal Retriever embedding model (TF Serving ready).

The SavedModel needs only TensorFlow to load (no delg_tf, no Keras import):

    loaded = tf.saved_model.load(export_dir)
    out = loaded.signatures["serving_default"](images=float_batch)   # [B, H, W, 3]
    out["embedding"]                                                 # [B, D], unit L2

Signatures (each returns {"embedding": float32 [B, D]}, L2-normalised):

* ``serving_default`` / ``embed_images``: ``images`` float32 [B, H, W, 3], RGB in
  [0, 255];
* ``embed_uint8``: ``image`` uint8 [H, W, 3], one RGB image (B = 1);
* ``embed_encoded``: ``image_bytes`` string scalar, a JPEG/PNG/BMP/GIF file's bytes
  (decoded to RGB; B = 1).

With `image_size`, every input is first resized (bilinear) to image_size x image_size,
e.g. 224 for models trained on 224 crops; otherwise the network runs at the input
size (it is fully convolutional up to its global pooling).

`assets.extra/glocal_export.json` records the image size, the embedding size, the
model config and, when given, the training run's `config.json` record (used by
`delg_tf.evaluation.glocal.evaluate_glocal` to find the run's data); TF Serving
ignores it. `read_export_metadata(export_dir)` reads it back.

Reference: Kim, Kim, Suh, "Glocal Retriever", Electronics 2023 (the model);
`delg_tf.models.glocal`.
"""

import json
from pathlib import Path

import keras
import tensorflow as tf

from delg_tf import atomic
from delg_tf.extraction.config import ASSETS_EXTRA_DIR

EMBEDDING_KEY = "embedding"
RGB_CHANNELS = 3
SIGNATURE_IMAGES = "serving_default"
SIGNATURE_IMAGES_ALIAS = "embed_images"
SIGNATURE_UINT8 = "embed_uint8"
SIGNATURE_ENCODED = "embed_encoded"
EXTRA_DIR = ASSETS_EXTRA_DIR  # TF Serving's folder for extra files (warm-up requests).
METADATA_NAME = "glocal_export.json"
METADATA_FORMAT_VERSION = 1


def export_glocal(model, export_dir, image_size=None, overwrite=False, run_record=None):
    """Writes `model`'s embedding function as a SavedModel.

    The export is written to a temporary sibling folder and renamed at the end, so
    an interrupted export never looks complete.

    Args:
      model: a built `delg_tf.models.glocal.GlocalModel` (its `call` maps float
        images in [0, 255] to L2-normalised embeddings).
      export_dir: output folder (must not exist or be empty, unless `overwrite`).
      image_size: optional side to which inputs are resized before embedding.
      overwrite: replace an existing export folder.
      run_record: optional training run `config.json` record stored in the metadata.

    Returns:
      Path of the export folder.
    """
    export_dir = Path(export_dir).absolute()
    if export_dir.exists() and any(export_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export folder {export_dir} is not empty; choose a new "
            f"--export_path, pass --overwrite (overwrite=True) or delete "
            f"the old export."
        )
    if image_size is not None and int(image_size) < 1:
        raise ValueError(
            f"image_size must be a positive side in pixels or None, received {image_size!r}."
        )
    if not model.built:
        model.build()

    def embed(images):
        images = tf.cast(images, tf.float32)
        if image_size:
            images = tf.image.resize(images, [int(image_size), int(image_size)], method="bilinear")
        return {EMBEDDING_KEY: model(images, training=False)}

    def embed_uint8(image):
        return embed(image[None])

    def embed_encoded(image_bytes):
        image = tf.io.decode_image(image_bytes, channels=RGB_CHANNELS, expand_animations=False)
        image.set_shape([None, None, RGB_CHANNELS])
        return embed(image[None])

    images_spec = tf.TensorSpec([None, None, None, RGB_CHANNELS], tf.float32, name="images")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE_IMAGES, embed, input_signature=[images_spec])
    archive.add_endpoint(SIGNATURE_IMAGES_ALIAS, embed, input_signature=[images_spec])
    archive.add_endpoint(
        SIGNATURE_UINT8,
        embed_uint8,
        input_signature=[tf.TensorSpec([None, None, RGB_CHANNELS], tf.uint8, name="image")],
    )
    archive.add_endpoint(
        SIGNATURE_ENCODED,
        embed_encoded,
        input_signature=[tf.TensorSpec([], tf.string, name="image_bytes")],
    )
    with atomic.staged_directory(export_dir) as tmp:
        archive.write_out(str(tmp), verbose=False)
        metadata = {
            "format_version": METADATA_FORMAT_VERSION,
            "image_size": int(image_size) if image_size else None,
            "embedding_dim": int(model.config.embedding_dim),
            "model": model.config.to_dict(),
            "run": run_record,
        }
        (tmp / EXTRA_DIR).mkdir(exist_ok=True)
        (tmp / EXTRA_DIR / METADATA_NAME).write_text(
            json.dumps(metadata, indent=1, default=str) + "\n", encoding="utf-8"
        )
    return export_dir


def read_export_metadata(export_dir):
    """The `assets.extra/glocal_export.json` dict of an export, or None if absent."""
    path = Path(export_dir) / EXTRA_DIR / METADATA_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def is_glocal_export(export_dir):
    """True if `export_dir` is a SavedModel written by `export_glocal`."""
    return (Path(export_dir) / "saved_model.pb").is_file() and (
        Path(export_dir) / EXTRA_DIR / METADATA_NAME
    ).is_file()
