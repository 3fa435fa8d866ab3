"""Image sources and the stream, with real files of every awkward kind."""

import gzip
import struct

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import save_image
from pipeline.datasets import BatchStream, list_images, read_idx
from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing

SPEC = Preprocessing(height=16, width=16, resize="exact", normalize="none")


def _dataset(kind, path=None, **extra):
    return OmegaConf.create(dict(kind=kind, path=path, split=extra.get("split"), limit=extra.get("limit")))


def _collect(stream):
    got = {}
    for ids, pixels in stream:
        for i, p in zip(ids, pixels.numpy()):
            assert int(i) not in got, "an image came twice"
            got[int(i)] = p
    return got


@pytest.fixture
def awkward_folder(tmp_path):
    root = tmp_path / "awkward"
    rng = np.random.default_rng(1)
    rgb = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    save_image(root / "00_ok.png", rgb)
    Image.fromarray(np.full((30, 40, 3), (200, 30, 60), np.uint8)).convert("CMYK").save(root / "01_cmyk.jpg", quality=100)
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(root / "02_grey16.png")
    save_image(root / "03_rgba.png", np.dstack([rgb, np.full((30, 40), 128, np.uint8)]))
    save_image(root / "04_grey.jpg", np.full((25, 30), 90, np.uint8), quality=100)
    save_image(root / "05_tiny.png", np.full((1, 1, 3), (10, 20, 30), np.uint8))
    save_image(root / "06_huge.jpg", np.full((4000, 6000, 3), 77, np.uint8), quality=90)
    save_image(root / "07_tiff.tif", np.full((12, 12, 3), (5, 150, 250), np.uint8))
    Image.fromarray(np.full((14, 14, 3), (250, 20, 40), np.uint8)).convert("P").save(root / "07b_palette.png")
    (root / "08_empty.jpg").write_bytes(b"")
    (root / "09_text.png").write_text("this is not an image")
    jpeg = (root / "00_ok.png").read_bytes()
    (root / "10_truncated.png").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "11_garbage.jpg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def test_bad_images_are_recorded_and_skipped_and_odd_ones_decoded(awkward_folder):
    table = list_images(_dataset("folder", str(awkward_folder)))
    names = [p.rsplit("/", 1)[-1] for p in table.paths]
    assert names == sorted(names) and "notes.txt" not in names
    stream = BatchStream(table, SPEC, batch_size=4)
    got = _collect(stream)
    bad = {names[i]: reason for i, reason in stream.errors.items()}
    assert set(bad) == {"08_empty.jpg", "09_text.png", "10_truncated.png", "11_garbage.jpg"}
    assert bad["08_empty.jpg"] == "empty file (0 bytes)"
    assert all(reason for reason in bad.values())
    assert len(got) == len(table) - 4
    by_name = {names[i]: p for i, p in got.items()}
    for p in by_name.values():
        assert p.shape == (16, 16, 3) and p.dtype == np.uint8
    np.testing.assert_allclose(by_name["01_cmyk.jpg"].reshape(-1, 3).mean(0), (200, 30, 60), atol=6)
    assert abs(int(by_name["02_grey16.png"][8, 8, 0]) - 40000 / 257) <= 1
    assert (by_name["02_grey16.png"][..., 0] == by_name["02_grey16.png"][..., 2]).all()
    assert abs(int(by_name["04_grey.jpg"][5, 5, 1]) - 90) <= 2
    assert (by_name["05_tiny.png"] == (10, 20, 30)).all()
    assert (abs(by_name["06_huge.jpg"].astype(int) - 77) <= 2).all()
    assert (by_name["07_tiff.tif"] == (5, 150, 250)).all()  # TIFF: decoded by the Pillow fallback
    np.testing.assert_allclose(by_name["07b_palette.png"].reshape(-1, 3).mean(0), (250, 20, 40), atol=8)


def test_folder_labels_come_from_class_subfolders(photo_folder):
    table = list_images(_dataset("folder", str(photo_folder)))
    assert table.class_names == ["a_cls", "b_cls"]
    for path, label in zip(table.paths, table.labels):
        assert label == (0 if "/a_cls/" in path else 1)


def test_filelist_relative_paths_labels_and_missing_files(tmp_path, photo_folder):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\nphotos/a_cls/img1.png 3\n{photo_folder}/b_cls/flat.png 7\nphotos/missing.png 1\n")
    table = list_images(_dataset("filelist", str(listing)))
    assert list(table.labels) == [3, 7, 1]
    stream = BatchStream(table, SPEC, batch_size=8)
    got = _collect(stream)
    assert sorted(got) == [0, 1] and stream.errors == {2: "file not found"}


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(">u1").tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_images_and_labels(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(5, dtype=np.uint8), gz)
    table = list_images(_dataset("idx", str(tmp_path), split="t10k"))
    assert list(table.labels) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), images)
    spec = Preprocessing(height=28, width=28, channels=3, resize="exact")
    got = _collect(BatchStream(table, spec, batch_size=2))
    for i in range(5):  # grey becomes 3 equal channels, pixels unchanged at the same size
        np.testing.assert_array_equal(got[i][..., 1], images[i])


def test_limit_and_missing_path_errors(tmp_path, photo_folder):
    assert len(list_images(_dataset("folder", str(photo_folder), limit=3))) == 3
    with pytest.raises(PipelineError, match="does not exist"):
        list_images(_dataset("folder", str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="holds no images"):
        list_images(_dataset("folder", str(tmp_path / "empty")))


def test_samples_are_at_least_twelve_natural_photos():
    table = list_images(_dataset("samples"))
    assert len(table) >= 12
    assert any(p.endswith("chelsea.png") for p in table.paths)
    assert any(p.endswith("grace_hopper.jpg") for p in table.paths)


@pytest.mark.parametrize("channels_in", [1, 3, 4])
@pytest.mark.parametrize("channels_out", [1, 3])
def test_channel_matching_for_grey_and_colour_models(channels_in, channels_out):
    import tensorflow as tf

    from pipeline.preprocess import to_model_pixels

    colour = np.array([200, 100, 50, 255][:channels_in], np.uint8)
    image = np.broadcast_to(colour, (10, 12, channels_in)).copy()
    spec = Preprocessing(height=8, width=8, channels=channels_out, resize="exact")
    unknown = tf.function(lambda x: to_model_pixels(x, spec),
                          input_signature=[tf.TensorSpec((None, None, None), tf.uint8)])
    expected = (colour[:1] if channels_in == 1 else
                colour[:3] if channels_out == 3 else [round(0.2989 * 200 + 0.587 * 100 + 0.114 * 50)])
    for out in (to_model_pixels(tf.constant(image), spec), unknown(tf.constant(image))):
        assert out.shape == (8, 8, channels_out)
        assert np.all(np.abs(out.numpy().astype(int) - np.resize(expected, channels_out)) <= 1)
