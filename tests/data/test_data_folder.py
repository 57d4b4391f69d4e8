"""The image-folder dataset: classes, channels, sizes, splits, normalisation, and every malformed folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hwquant.data import (
    DATASET_NAMES,
    canonical_name,
    channel_stats,
    default_augment,
    find_image_folder,
    load_dataset,
    make_loaders,
    parse_image_size,
    resolve_dataset,
)
from hwquant.errors import ConfigError, DataError


def _png(path: Path, arr: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _folder(root: Path, classes=("b_dog", "a_cat", "c_emu"), per_class=5, size=(6, 5), rgb=False, seed=0):
    """``root/<class>/<i>.png`` images; returns {path: array} of what was written."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        for i in range(per_class):
            shape = (*size, 3) if rgb else size
            written[root / name / f"{i}.png"] = _png(root / name / f"{i}.png",
                                                     rng.integers(0, 256, shape, dtype=np.uint8))
    return written


def test_folder_is_a_dataset_name():
    assert "folder" in DATASET_NAMES and canonical_name("Folder") == "folder"


def test_classes_sorted_gray_pixels_exact_and_stats_from_train(tmp_path):
    written = _folder(tmp_path)
    train, test, info = load_dataset("folder", tmp_path)
    assert (info.name, info.in_channels, info.num_classes, info.image_size) == ("folder", 1, 3, (6, 5))
    assert info.source == str(tmp_path.resolve())
    assert len(train) + len(test) == 15 and len(test) == 3  # one test image of 5 per class
    layout = find_image_folder(tmp_path)
    assert layout.classes == ("a_cat", "b_dog", "c_emu") and layout.split == "seeded"
    # every image comes back bit for bit, under the label of its sorted class name
    for (path, label), img, y in zip(layout.train, train.images, train.labels, strict=True):
        assert layout.classes[label] == path.parent.name and int(y) == label
        np.testing.assert_array_equal(img[0].numpy(), written[path])
    assert torch.bincount(test.labels).tolist() == [1, 1, 1]
    assert (info.mean, info.std) == channel_stats(train.images)
    assert info.augment == default_augment("folder", (6, 5)).describe() == "pad 1 + random crop"


def test_seeded_split_is_fixed_and_independent_of_the_run_seed(tmp_path):
    _folder(tmp_path, per_class=10)
    a, b = find_image_folder(tmp_path), find_image_folder(tmp_path)
    assert a.test == b.test and len(a.test) == 6  # 0.2 x 10 per class
    assert not set(a.test) & set(a.train)
    ta = load_dataset("folder", tmp_path, seed=0)[1]
    tb = load_dataset("folder", tmp_path, seed=5)[1]
    assert torch.equal(ta.images, tb.images)


def test_train_test_or_val_folders_give_the_splits(tmp_path):
    _folder(tmp_path / "train", per_class=3)
    _folder(tmp_path / "val", classes=("a_cat", "c_emu"), per_class=2, seed=1)  # a class may lack test images
    train, test, info = load_dataset("folder", tmp_path)
    assert (len(train), len(test), info.num_classes) == (9, 4, 3)
    assert test.labels.tolist() == [0, 0, 2, 2]
    assert find_image_folder(tmp_path).split == "folders"


def test_rgb_if_any_image_is_color_and_the_most_common_size(tmp_path):
    _folder(tmp_path, classes=("a", "b"), per_class=3, size=(4, 4))
    color = _png(tmp_path / "b" / "color.png", np.full((8, 6, 3), (10, 200, 30), dtype=np.uint8))
    train, test, info = load_dataset("folder", tmp_path)
    assert info.in_channels == 3 and info.image_size == (4, 4)
    layout = find_image_folder(tmp_path)
    allx = torch.cat([train.images, test.images])
    paths = [p for p, _ in layout.train + layout.test]
    resized = allx[paths.index(tmp_path / "b" / "color.png")]
    assert resized.shape == (3, 4, 4)
    assert resized[:, 1:3, 1:3].permute(1, 2, 0).reshape(-1, 3).tolist() == [color[0, 0].tolist()] * 4
    gray = allx[paths.index(tmp_path / "a" / "0.png")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # gray images repeat into RGB


def test_image_size_option_palette_gray_and_16_bit(tmp_path):
    pal = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20).convert("P")
    (tmp_path / "a").mkdir()
    pal.save(tmp_path / "a" / "pal.png")
    _png(tmp_path / "a" / "wide.png", (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16))
    _png(tmp_path / "b" / "x.gif", np.zeros((3, 4), dtype=np.uint8))
    _png(tmp_path / "b" / "y.bmp", np.full((3, 4), 255, dtype=np.uint8))
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    train, test, info = load_dataset("folder", tmp_path, image_size="5x7")
    assert info.in_channels == 1 and info.image_size == (5, 7) and train.images.shape[1:] == (1, 5, 7)
    train, test, info = load_dataset("folder", tmp_path)
    layout = find_image_folder(tmp_path)
    allx = torch.cat([train.images, test.images])
    paths = [p for p, _ in layout.train + layout.test]
    np.testing.assert_array_equal(allx[paths.index(tmp_path / "a" / "pal.png")][0].numpy(),
                                  np.arange(12).reshape(3, 4) * 20)
    wide = allx[paths.index(tmp_path / "a" / "wide.png")][0].numpy()
    np.testing.assert_array_equal(wide, np.rint(np.arange(12).reshape(3, 4) * 5000 / 257).astype(np.uint8))


def test_parse_image_size():
    assert parse_image_size(None) is None
    assert parse_image_size(32) == parse_image_size("32") == (32, 32)
    assert parse_image_size("28x32") == parse_image_size("28,32") == parse_image_size([28, 32]) == (28, 32)
    for bad in ("0", "a", "1x2x3", "-4"):
        with pytest.raises(ConfigError, match="image_size"):
            parse_image_size(bad)
    with pytest.raises(ConfigError, match="folder dataset only"):
        load_dataset("digits", image_size=8)


def test_make_loaders_normalise_with_train_stats_and_cap_calibration(tmp_path):
    _folder(tmp_path, per_class=10, size=(8, 8))
    loaders = make_loaders("folder", data_dir=tmp_path, batch_size=4, calib_size=1000, max_calib_fraction=0.1,
                           drop_last=False)
    assert loaders.calib_size == 2 and len(loaders.calib.data) == 2  # a tenth of 24 training images
    assert loaders.info.augment == "pad 1 + random crop"
    x, y = next(iter(loaders.test))
    info = loaders.info
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32
    expect = (loaders.test.data.images.double() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(x.double(), expect, atol=1e-5, rtol=0)
    train_full = torch.cat([loaders.train.data.images, loaders.calib.data.images])
    assert (info.mean, info.std) == channel_stats(train_full)  # the whole training split, not the test images
    with pytest.raises(ConfigError, match="too large"):
        make_loaders("folder", data_dir=tmp_path, batch_size=4, calib_size=1000)


@pytest.mark.parametrize("make,needle", [
    (lambda d: d / "missing", "image folder dataset not found"),
    (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "is not a directory"),
    (lambda d: d, "has no class subfolders"),
    (lambda d: (d / "a").mkdir() or (d / "a" / "n.txt").write_text("x") and d, "holds no images"),
    (lambda d: _folder(d) and (d / "b_dog" / "3.png").write_bytes(b"\x89PNG broken") and d, "cannot read image"),
    (lambda d: _folder(d / "train") and d, "no test/ or val/ folder"),
    (lambda d: _folder(d / "train", classes=("a",)) and _folder(d / "test", classes=("z",)) and d,
     "class folder 'z'"),
    (lambda d: _folder(d, per_class=1) and d, "too few images for a test split"),
])
def test_bad_folder_is_a_one_line_data_error_naming_the_path(tmp_path, make, needle):
    root = tmp_path / "data"
    root.mkdir()
    path = make(root)
    with pytest.raises(DataError, match=needle) as e:
        make_loaders("folder", data_dir=path, batch_size=2, calib_size=1)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(root) in msg


def test_folder_needs_a_directory_and_has_no_fallback(tmp_path):
    with pytest.raises(ConfigError, match="needs data_dir"):
        resolve_dataset("folder", None)
    with pytest.raises(DataError, match="not found"):
        resolve_dataset("folder", tmp_path / "nope", fallback=True)
    _folder(tmp_path)
    assert resolve_dataset("folder", tmp_path) == ("folder", None)


def test_default_calibration_and_split_record_rebuild_the_same_split(tmp_path):
    """The calibration defaults per dataset, and a checkpoint's ``data`` record that rebuilds the same split."""
    from hwquant.data import default_calibration, split_record

    assert default_calibration("digits", None) == (200, None)
    assert default_calibration("Fashion-MNIST", None) == (1000, None)
    assert default_calibration("folder", None) == (1000, 0.1)
    assert default_calibration("folder", 7) == (7, None)  # asked for: no cap
    _folder(tmp_path, per_class=10, size=(8, 8))
    size, frac = default_calibration("folder", None)
    a = make_loaders("folder", data_dir=tmp_path, batch_size=4, calib_size=size, max_calib_fraction=frac, seed=3)
    rec = split_record(a.info, None, a.calib_size, 3)
    assert rec["data_dir"] == a.info.source and rec["image_size"] == [8, 8] and rec["calib_size"] == 2
    b = make_loaders(rec["dataset"], data_dir=rec["data_dir"], batch_size=4, calib_size=rec["calib_size"],
                     seed=rec["seed"], image_size=rec["image_size"])
    assert torch.equal(a.calib.data.images, b.calib.data.images)
    assert torch.equal(a.train.data.images, b.train.data.images)
