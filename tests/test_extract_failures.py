"""`delg_tf.extract.main`: bad images vs a failing model (in process, a tiny stand-in).

Unreadable images are per-image rows of errors.tsv and the run goes on; a run where
every image fails, or where the model raises on a readable image, stops with an
`ExtractRunError` (exit `EXIT_RUN_ERROR` on the command line, see
tests/test_faults_pipeline.py for the CLI).
"""

import pytest
import tensorflow as tf
from PIL import Image

from delg_tf import cli, extract
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.store import FeatureStore
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.extraction.config import ExportConfig

CONFIG = ExportConfig(
    image_scales=(0.5, 1.0),
    global_scales_ind=(1,),
    score_threshold=0.0,
    max_feature_num=10,
    max_image_size=64,
)
IMAGE_SIDE = 48


@pytest.fixture(scope="module")
def extractor():
    return DelgExtractor.from_model(TinyDelgStandIn(), CONFIG.to_delf_config(""))


class GraphErrorModel:
    """Extracts like `extractor` until the image named `fail_at` (by call order), then
    raises the InvalidArgumentError a graph op gives (reshape to a wrong size)."""

    def __init__(self, extractor, fail_at):
        self.extractor = extractor
        self.fail_at = fail_at
        self.calls = 0

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def _broken_graph(self, image):  # unknown shape: fails when run, not when traced
        return tf.reshape(image, [-1, 7, 7, 5])

    def __call__(self, image):
        self.calls += 1
        if self.calls == self.fail_at:
            self._broken_graph(tf.constant(image))
        return self.extractor(image)


def _folder(tmp_path, good=0, bad=0):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i in range(good):
        Image.fromarray(random_image(IMAGE_SIDE, IMAGE_SIDE, seed=i)).save(folder / f"good_{i}.png")
    for i in range(bad):
        (folder / f"bad_{i}.jpg").write_bytes(b"not a jpeg")
    return folder


def _config(tmp_path, **kwargs):
    return extract.ExtractConfig(
        output_dir=str(tmp_path / "out"),
        images=str(tmp_path / "images"),
        model_path="the_model",
        progress=False,
        **kwargs,
    )


def _logged(tmp_path):
    lines = (tmp_path / "out" / "errors.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] + "\n" == extract.ERROR_LOG_HEADER
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines[1:]}


def test_some_bad_images_are_logged_and_the_run_succeeds(tmp_path, extractor, capsys):
    _folder(tmp_path, good=2, bad=1)
    store = extract.main(_config(tmp_path), extractor=extractor)
    assert sorted(FeatureStore(store).names) == ["good_0.png", "good_1.png"]
    assert _logged(tmp_path) == {"bad_0.jpg": "not_an_image"}
    assert "2 extracted, 0 already done, 1 failed" in capsys.readouterr().out
    # A rerun where only the bad image is left: still a usable store, no error.
    assert extract.main(_config(tmp_path), extractor=extractor) == store


def test_every_image_bad_is_one_error_with_the_counts_and_the_log(tmp_path, extractor):
    _folder(tmp_path, bad=3)
    config = _config(tmp_path)
    with pytest.raises(extract.NoImageExtractedError) as info:
        extract.main(config, extractor=extractor)
    message = cli.one_line(info.value)
    assert message == str(info.value)  # one line as raised
    assert "all 3 of 3 images failed" in message and str(config.error_log) in message
    assert isinstance(info.value, ValueError)  # one line in evaluate / demo too
    assert sorted(_logged(tmp_path)) == ["bad_0.jpg", "bad_1.jpg", "bad_2.jpg"]
    assert not config.store_path.exists()


def test_every_image_of_a_shard_bad_names_the_shard(tmp_path, extractor):
    _folder(tmp_path, good=1, bad=2)  # bad_0, bad_1, good_0: shard 0 = bad_0, good_0
    config = _config(tmp_path, shard_index=1, num_shards=2)
    with pytest.raises(extract.NoImageExtractedError, match="all 1 of 1 images of shard 1/2"):
        extract.main(config, extractor=extractor)
    assert config.error_log.name == "errors-00001-of-00002.tsv"


def test_a_model_error_stops_the_run_and_is_not_a_bad_image(tmp_path, extractor):
    _folder(tmp_path, good=4, bad=1)  # bad_0.jpg, good_0 ... good_3 (sorted)
    config = _config(tmp_path, flush_every=1)
    model = GraphErrorModel(extractor, fail_at=3)  # good_2.png
    with pytest.raises(extract.ExtractModelError) as info:
        extract.main(config, extractor=model)
    message = str(info.value)
    assert "\n" not in message
    assert "'good_2.png'" in message and "--model_path=the_model" in message
    assert "InvalidArgumentError" in message and "not a bad image" in message
    assert "the 2 image(s) extracted so far are kept" in message
    # The op's own message, not TF's "Graph execution error:" header or node traces.
    assert "Input to reshape is a tensor with" in message and "(node Reshape)" in message
    assert "Graph execution error" not in message and "[[" not in message
    assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)
    assert _logged(tmp_path) == {"bad_0.jpg": "not_an_image"}  # only the bad image
    assert not config.store_path.exists()
    assert sorted(FeatureStore(config.parts_dir).names) == ["good_0.png", "good_1.png"]
    store = extract.main(config, extractor=extractor)  # the model fixed: resumes
    assert sorted(FeatureStore(store).names) == [f"good_{i}.png" for i in range(4)]


def test_any_exception_of_the_model_on_a_readable_image_stops_the_run(tmp_path):
    _folder(tmp_path, good=1)

    def broken(image):
        raise RuntimeError("ops not registered\nsecond line")

    with pytest.raises(extract.ExtractModelError, match="RuntimeError: ops not registered;"):
        extract.main(_config(tmp_path), extractor=broken)
    config = extract.ExtractConfig(
        output_dir=str(tmp_path / "o2"),
        images=str(tmp_path / "images"),
        delf_config="cfg.pbtxt",
        progress=False,
    )
    with pytest.raises(extract.ExtractModelError, match="--delf_config=cfg.pbtxt"):
        extract.main(config, extractor=broken)


def test_error_summary_keeps_the_message_of_the_op():
    graph_error = (
        "Graph execution error:\n\nDetected at node Reshape defined at (most recent "
        'call last):\n  File "x.py", line 5, in <module>\n\n  File "x.py", line '
        "3, in f\n\nInput to reshape is a tensor with 6912 values\n\t [[{{node "
        "Reshape}}]] [Op:__inference_f_9]"
    )
    error = tf.errors.InvalidArgumentError(None, None, graph_error)
    assert (
        extract.error_summary(error) == "Input to reshape is a tensor with 6912 values "
        "(node Reshape)"
    )
    assert extract.error_summary(ValueError("first\nsecond")) == "first"
    assert extract.error_summary(RuntimeError()) == "RuntimeError"
