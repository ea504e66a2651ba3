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

Reference: Kim, Kim, Suh, "Glocal Retriever", Electronics 2023 (the model);
`delg_tf.models.glocal`.
"""

from pathlib import Path

import keras
import tensorflow as tf

EMBEDDING_KEY = "embedding"
RGB_CHANNELS = 3
SIGNATURE_IMAGES = "serving_default"
SIGNATURE_IMAGES_ALIAS = "embed_images"
SIGNATURE_UINT8 = "embed_uint8"
SIGNATURE_ENCODED = "embed_encoded"


def export_glocal(model, export_dir, image_size=None):
    """Writes `model`'s embedding function as a SavedModel.

    Args:
      model: a built `delg_tf.models.glocal.GlocalModel` (its `call` maps float
        images in [0, 255] to L2-normalised embeddings).
      export_dir: output folder (created; must not exist or be empty).
      image_size: optional side to which inputs are resized before embedding.

    Returns:
      Path of the export folder.
    """
    export_dir = Path(export_dir)
    if export_dir.exists() and any(export_dir.iterdir()):
        raise FileExistsError(f"export folder {export_dir} is not empty; choose a new "
                              f"--export_dir or delete the old export.")
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size must be a positive side in pixels or None, received "
                         f"{image_size!r}.")
    if not model.built:
        model.build()

    def embed(images):
        images = tf.cast(images, tf.float32)
        if image_size:
            images = tf.image.resize(images, [int(image_size), int(image_size)],
                                     method="bilinear")
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
    archive.add_endpoint(SIGNATURE_UINT8, embed_uint8, input_signature=[
        tf.TensorSpec([None, None, RGB_CHANNELS], tf.uint8, name="image")])
    archive.add_endpoint(SIGNATURE_ENCODED, embed_encoded, input_signature=[
        tf.TensorSpec([], tf.string, name="image_bytes")])
    export_dir.mkdir(parents=True, exist_ok=True)
    archive.write_out(str(export_dir), verbose=False)
    return export_dir
