"""Glocal SavedModel export, reloaded in a process that cannot import delg_tf."""

import io
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from delg_tf.models.glocal import GlocalModelConfig, build_glocal_model
from delg_tf.serving.glocal_export import export_glocal
from no_delg_tf import BLOCK_DELG_TF_IMPORTS

IMAGE_SIZE = 64

_RELOAD_SCRIPT = BLOCK_DELG_TF_IMPORTS + textwrap.dedent("""
    import numpy as np
    import tensorflow as tf

    export_dir, data_dir = sys.argv[1], sys.argv[2]
    loaded = tf.saved_model.load(export_dir)
    images = np.load(data_dir + "/images.npy")
    batch = loaded.signatures["serving_default"](images=tf.constant(images))["embedding"]
    single = loaded.signatures["embed_uint8"](
        image=tf.constant(images[0].astype(np.uint8)))["embedding"]
    png = open(data_dir + "/image.png", "rb").read()
    encoded = loaded.signatures["embed_encoded"](image_bytes=tf.constant(png))["embedding"]
    np.save(data_dir + "/batch.npy", batch.numpy())
    np.save(data_dir + "/single.npy", single.numpy())
    np.save(data_dir + "/encoded.npy", encoded.numpy())
    assert "delg_tf" not in sys.modules
""")


def test_export_reloads_without_the_package(tmp_path):
    model = build_glocal_model(
        GlocalModelConfig(
            num_classes=3, backbone="tiny", local_dim=16, embedding_dim=8, aux_weight=0.0
        )
    )
    export_dir = export_glocal(model, tmp_path / "export")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    buffer = io.BytesIO()
    Image.fromarray(images[0].astype(np.uint8)).save(buffer, format="PNG")
    (tmp_path / "image.png").write_bytes(buffer.getvalue())
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(export_dir), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = model(images, training=False).numpy()
    batch = np.load(tmp_path / "batch.npy")
    np.testing.assert_allclose(batch, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "single.npy"), expected[:1], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "encoded.npy"), expected[:1], atol=1e-5)
