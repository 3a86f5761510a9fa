"""Image folders as data: class labels, resize/crop/normalise, layout, subsets, errors."""

import numpy as np
import pytest
from PIL import Image

from fixtures import GraphBuilder

from gkp_onnx.cli import main
from gkp_onnx.errors import GkpError
from gkp_onnx.graph import InputSpec
from gkp_onnx.images import ImageSpec
from gkp_onnx.validate import load_dataset

NCHW = [InputSpec("x", [1, 3, 16, 16], np.dtype(np.float32))]


@pytest.fixture
def folder(tmp_path):
    """Two classes ('cat' sorted before 'dog'), images of 20x24 pixels, one PNG and one JPEG each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("dog", "cat"):
        (root / name).mkdir(parents=True)
        for i, ext in enumerate(("png", "jpg", "png")):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.{ext}")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_labels_follow_sorted_class_folders(folder):
    data = load_dataset(folder, NCHW)
    assert data.inputs["x"].shape == (6, 3, 16, 16) and data.inputs["x"].dtype == np.float32
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_resize_crop_and_normalise_like_the_spec_says(folder):
    spec = ImageSpec(resize=18, crop=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x = load_dataset(folder, NCHW, images=spec).inputs["x"]
    with Image.open(folder / "cat" / "0.png") as image:
        resized = image.resize((22, 18), Image.BILINEAR)  # shorter side 20 -> 18, width 24 -> 22 (rounded)
    expected = np.asarray(resized, np.float32)[1:17, 3:19] / 255.0
    expected = (expected - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    np.testing.assert_allclose(x[0], expected.transpose(2, 0, 1), atol=1e-6)
    bgr = load_dataset(folder, NCHW, images=ImageSpec(resize=18, crop=16, bgr=True)).inputs["x"]
    rgb = load_dataset(folder, NCHW, images=ImageSpec(resize=18, crop=16)).inputs["x"]
    np.testing.assert_array_equal(bgr[:, ::-1], rgb)


def test_channels_last_inputs_and_subsets(folder):
    nhwc = [InputSpec("x", [1, 16, 16, 3], np.dtype(np.float32))]
    whole = load_dataset(folder, NCHW).inputs["x"]
    channels_last = load_dataset(folder, nhwc).inputs["x"]
    np.testing.assert_array_equal(channels_last, whole.transpose(0, 2, 3, 1))
    subset = load_dataset(folder, NCHW, limit=4, seed=3)
    assert len(subset) == 4
    rows = [int(np.flatnonzero((whole == row).all(axis=(1, 2, 3)))[0]) for row in subset.inputs["x"]]
    assert rows == sorted(rows) and subset.labels.tolist() == [0 if r < 3 else 1 for r in rows]


def test_bad_folders_are_one_line_errors(folder, tmp_path):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(GkpError, match="no images"):
        load_dataset(tmp_path / "empty", NCHW)
    with pytest.raises(GkpError, match="--crop 12 does not match"):
        load_dataset(folder, NCHW, images=ImageSpec(crop=12))
    with pytest.raises(GkpError, match="shaped"):
        load_dataset(folder, [InputSpec("x", [1, 8, 10, 10], np.dtype(np.float32))])
    (folder / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(GkpError, match="cannot decode image"):
        load_dataset(folder, NCHW)


def test_cli_calibrates_on_an_image_folder(folder, tmp_path, capsys):
    import onnx

    b = GraphBuilder(in_channels=3, size=16)  # a 3-channel CNN for the folder's images
    y = b.op("Relu", [b.conv("x", 16)])
    path = tmp_path / "cnn.onnx"
    onnx.save(b.build(b.conv(b.conv(y, 16), 16)), path)
    code = main(["optimize", str(path), str(tmp_path / "out.onnx"), "--calib", str(folder), "--reconstruct",
                 "--min-group-width", "1", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"(6 samples, {folder})" in printed.out and "2 layers refit" in printed.out
