"""DelgExtractor: official configs, host-side resize, parity with the official TF2 fixture."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delg_tf.extraction import extractor as extractor_lib
from delg_tf.extraction.config import load_delf_config
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.extraction.config import ExportConfig

PARITY = Path(__file__).resolve().parents[2] / "shared" / "parity"
CONFIGS = sorted(PARITY.glob("configs/*.pbtxt")) + sorted(PARITY.glob("tf1_slim/configs/*.pbtxt"))


@pytest.mark.skipif(not CONFIGS, reason=f"{PARITY} absent: official configs not available")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_official_configs_parse(path):
    config = load_delf_config(path)
    assert config.use_local_features and config.use_global_features
    assert len(config.image_scales) == 7
    assert list(config.delf_global_config.image_scales_ind) == [3, 4, 5]
    assert config.delf_local_config.max_feature_num == 1000
    assert ExportConfig.from_delf_config(config).mode == "local_and_global"


def test_bad_config_names_the_file(tmp_path):
    bad = tmp_path / "bad.pbtxt"
    bad.write_text("image_scalez: 1.0\n")
    with pytest.raises(ValueError, match="bad.pbtxt"):
        load_delf_config(bad)
    ok = tmp_path / "ok.pbtxt"
    ok.write_text('model_path: "MODEL_PATH"\n')
    with pytest.raises(ValueError, match="model_path"):
        DelgExtractor.from_config(ok)


def test_resize_like_official():
    image = random_image(300, 451)
    resized, factors = extractor_lib.resize_image_like_official(image, max_image_size=320)
    # round(451 * 320/451) = 320, round(300 * 320/451) = 213 (as the fixture: 213x320).
    assert resized.shape == (213, 320, 3)
    np.testing.assert_allclose(factors, [213 / 300, 320 / 451])
    expected = np.array(Image.fromarray(image).resize((320, 213), resample=Image.BILINEAR))
    np.testing.assert_array_equal(resized, expected)
    square, factors = extractor_lib.resize_image_like_official(image, use_square_images=True)
    assert square.shape == (451, 451, 3)
    same, factors = extractor_lib.resize_image_like_official(image, max_image_size=1024)
    assert same is image and list(factors) == [1.0, 1.0]
    up, _ = extractor_lib.resize_image_like_official(image, min_image_size=600)
    assert up.shape == (399, 600, 3)


def test_in_memory_extractor_on_array_and_path(tmp_path):
    config = ExportConfig(
        image_scales=(0.5, 1.0), global_scales_ind=(0, 1), score_threshold=0.0, max_image_size=48
    ).to_delf_config("")
    extractor = DelgExtractor.from_model(TinyDelgStandIn(), config)
    image = random_image(60, 96)
    Image.fromarray(image).save(tmp_path / "x.png")
    features = extractor(image)
    from_path = extractor(tmp_path / "x.png")
    np.testing.assert_allclose(features.descriptors, from_path.descriptors)
    np.testing.assert_allclose(features.scale_factors, [30 / 60, 48 / 96])
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(features.global_descriptor), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(features.keypoints, features.locations[:, ::-1])
    assert set(np.unique(features.scales)) <= {1.0, 2.0}
    tiny = extractor(random_image(8, 40))  # below the official 10-px minimum
    assert tiny.num_features == 0 and tiny.global_descriptor.size == 0


def _fixture_model(tmp_path_factory):
    generator = PARITY / "make_official_savedmodel.py"
    out = tmp_path_factory.mktemp("official_tf2") / "model"
    subprocess.run([sys.executable, str(generator), str(out)], check=True, capture_output=True)
    return out


@pytest.mark.skipif(
    not (PARITY / "make_official_savedmodel.py").exists(),
    reason=f"{PARITY} absent: official TF2 parity fixture not available",
)
def test_official_tf2_fixture_parity(tmp_path_factory):
    import skimage.data as skimage_data

    model_dir = _fixture_model(tmp_path_factory)
    config = load_delf_config(PARITY / "configs" / "r50delg_gld_parity_320.pbtxt")
    config.model_path = str(model_dir)
    extractor = DelgExtractor.from_config(config)
    assert extractor.raw_fn.model_format == "tf2"
    expected = np.load(PARITY / "expected" / "320_chelsea.npz")
    features = extractor(skimage_data.chelsea())
    np.testing.assert_allclose(
        features.global_descriptor, expected["global_descriptor"], atol=1e-5, rtol=0
    )
    assert features.num_features == len(expected["attention"])
    index = {
        (round(float(y), 2), round(float(x), 2), round(float(s), 5)): i
        for i, ((y, x), s) in enumerate(zip(features.locations, features.scales))
    }
    rows = [
        index[(round(float(y), 2), round(float(x), 2), round(float(s), 5))]
        for (y, x), s in zip(expected["locations"], expected["scales"])
    ]
    np.testing.assert_allclose(features.locations[rows], expected["locations"], atol=1e-3)
    np.testing.assert_allclose(features.descriptors[rows], expected["descriptors"], atol=1e-5)
    np.testing.assert_allclose(features.attention[rows], expected["attention"], atol=1e-4)
