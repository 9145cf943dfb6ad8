"""Tests for worker/engine/data.py: dataset layouts, safe image loading, the image store, transforms."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domain.errors import DataError, ImageError
from domain.images import DRAFT_MARGIN
from worker.engine.backbones import Preprocessing
from worker.engine.data import (
    ImageDataset,
    ImageStore,
    decode_for,
    discover,
    eval_transform,
    load_image,
    normalize,
    preprocess_image,
    stratified_split,
    subsample,
    to_tensor_u8,
    train_transform,
)

PRE = Preprocessing(image_size=24, resize_size=28)


# ---------------------------------------------------------------- helpers


def _img(path: Path, size=(40, 30), color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def _noise_jpeg(path: Path, size=(200, 150), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _class_dir(d: Path, n: int, ext=".jpg") -> list[Path]:
    return [_img(d / f"img{i:02d}{ext}", color=(i * 10 % 256, 50, 90)) for i in range(n)]


def _names(items) -> list[tuple[str, int]]:
    return [(p.name, lbl) for p, lbl in items]


# ---------------------------------------------------------------- discover: layouts


def test_discover_train_and_val(tmp_path):
    _class_dir(tmp_path / "train" / "cats", 3)
    _class_dir(tmp_path / "train" / "dogs", 4)
    _class_dir(tmp_path / "val" / "cats", 2)
    _class_dir(tmp_path / "val" / "dogs", 1)
    s = discover(tmp_path)
    assert s.classes == ["cats", "dogs"]
    assert s.root == tmp_path
    assert "train/" in s.layout and "val/" in s.layout
    assert s.counts() == {"train": {"cats": 3, "dogs": 4}, "val": {"cats": 2, "dogs": 1}}
    assert all(p.parent.parent.name == "train" for p, _ in s.train)
    assert all(p.parent.parent.name == "val" for p, _ in s.val)
    # labels index the sorted class list and follow the folder
    assert all(s.classes[lbl] == p.parent.name for p, lbl in s.train + s.val)
    assert s.warnings == []
    assert s.rel(s.val[0][0]) == str(Path("val") / "cats" / "img00.jpg")


def test_discover_follows_links_to_images_for_local_runs_only(tmp_path):
    """A dataset of symbolic links (a common way to build splits) trains from the command line; the web
    tier's checks of uploads (follow_links=False) never follow one, and their error says why."""
    store = tmp_path / "store"
    originals = _class_dir(store / "cats", 2) + _class_dir(store / "dogs", 2, ext=".png")
    data = tmp_path / "data"
    for split in ("train", "val"):
        for src in originals:
            dst = data / split / src.parent.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    s = discover(data)
    assert s.counts() == {"train": {"cats": 2, "dogs": 2}, "val": {"cats": 2, "dogs": 2}}
    assert not any("link" in w for w in s.warnings)
    with pytest.raises(DataError, match=r"no training images: cats, dogs \(8 symbolic link\(s\) were not followed"):
        discover(data, follow_links=False)
    # a link to something that is not an image file is never taken
    (data / "train" / "cats" / "dir-link.jpg").symlink_to(store)
    assert discover(data).counts()["train"]["cats"] == 2


def test_discover_accepts_other_split_names_and_warns_on_extra_val(tmp_path):
    _class_dir(tmp_path / "Training" / "a", 2)
    _class_dir(tmp_path / "Training" / "b", 2)
    _class_dir(tmp_path / "validation" / "a", 1)
    _class_dir(tmp_path / "validation" / "b", 1)
    _class_dir(tmp_path / "test" / "a", 5)
    _class_dir(tmp_path / "test" / "b", 5)
    s = discover(tmp_path)
    assert s.counts() == {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}
    assert any("ignored test/" in w for w in s.warnings)


def test_discover_train_only_is_split_stratified_and_seeded(tmp_path):
    _class_dir(tmp_path / "train" / "a", 20)
    _class_dir(tmp_path / "train" / "b", 10)
    _class_dir(tmp_path / "train" / "c", 2)
    s1 = discover(tmp_path, val_fraction=0.2, seed=7)
    s2 = discover(tmp_path, val_fraction=0.2, seed=7)
    assert "only" in s1.layout
    assert s1.train == s2.train and s1.val == s2.val
    counts = s1.counts()
    # fraction respected per class; the 2-image class still gets one image on each side
    assert counts["val"] == {"a": 4, "b": 2, "c": 1}
    assert counts["train"] == {"a": 16, "b": 8, "c": 1}
    # train and val are disjoint and together are every image
    tr, va = {p for p, _ in s1.train}, {p for p, _ in s1.val}
    assert not tr & va
    assert len(tr | va) == 32
    # another seed picks other val images (with 20 choose 4 the chance of the same pick is tiny)
    s3 = discover(tmp_path, val_fraction=0.2, seed=8)
    assert s3.counts() == counts
    assert {p for p, _ in s3.val} != va


def test_discover_train_only_other_fraction(tmp_path):
    _class_dir(tmp_path / "train" / "a", 10)
    _class_dir(tmp_path / "train" / "b", 10)
    s = discover(tmp_path, val_fraction=0.5, seed=0)
    assert s.counts()["val"] == {"a": 5, "b": 5}
    assert s.counts()["train"] == {"a": 5, "b": 5}


def test_stratified_split_single_image_class_stays_in_train():
    per = {"a": [Path(f"a{i}") for i in range(5)], "b": [Path("b0")]}
    train, val = stratified_split(per, 0.2, seed=0)
    assert train["b"] == [Path("b0")] and val["b"] == []
    assert len(val["a"]) == 1 and len(train["a"]) == 4


def test_discover_class_folders_only(tmp_path):
    _class_dir(tmp_path / "ants", 5)
    _class_dir(tmp_path / "bees", 5)
    _img(tmp_path / "loose.jpg")
    s = discover(tmp_path, val_fraction=0.2, seed=1)
    assert s.classes == ["ants", "bees"]
    assert "class folders only" in s.layout
    assert s.counts() == {"train": {"ants": 4, "bees": 4}, "val": {"ants": 1, "bees": 1}}
    assert any("outside class folders" in w and "loose.jpg" in w for w in s.warnings)
    assert all(p.name != "loose.jpg" for p, _ in s.train + s.val)


def test_discover_single_wrapping_folder(tmp_path):
    root = tmp_path / "mydata"
    _class_dir(root / "train" / "x", 2)
    _class_dir(root / "train" / "y", 2)
    _class_dir(root / "val" / "x", 1)
    _class_dir(root / "val" / "y", 1)
    (tmp_path / "__MACOSX" / "mydata").mkdir(parents=True)  # zip junk next to the wrapper
    (tmp_path / "__MACOSX" / "mydata" / "._img00.jpg").write_bytes(b"\x00\x05\x16\x07")
    s = discover(tmp_path)
    assert s.root == root
    assert s.classes == ["x", "y"]
    assert s.counts()["val"] == {"x": 1, "y": 1}
    assert any("mydata/" in w for w in s.warnings)


def test_discover_nested_wrapping_folders_with_class_only_layout(tmp_path):
    root = tmp_path / "outer" / "inner"
    _class_dir(root / "red", 3)
    _class_dir(root / "blue", 3)
    s = discover(tmp_path)
    assert s.root == root
    assert s.classes == ["blue", "red"]
    assert len(s.train) + len(s.val) == 6


def test_discover_ignores_junk_and_reports_non_images(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        for c in ("a", "b"):
            _class_dir(tmp_path / split / c, n)
    a = tmp_path / "train" / "a"
    (a / ".DS_Store").write_bytes(b"junk")
    (a / "Thumbs.db").write_bytes(b"junk")
    (a / "._img00.jpg").write_bytes(b"junk")  # macOS resource fork
    (a / ".ipynb_checkpoints").mkdir()
    _img(a / ".ipynb_checkpoints" / "img00-checkpoint.jpg")
    (tmp_path / "train" / "__MACOSX").mkdir()  # junk folder must not become a class
    _img(tmp_path / "train" / "__MACOSX" / "x.jpg")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (a / "notes.txt").write_text("hello")
    (tmp_path / "val" / "b" / "labels.csv").write_text("a,b")
    _img(a / "nested" / "deep.png", fmt="PNG")  # nested folders inside a class count
    s = discover(tmp_path)
    assert s.classes == ["a", "b"]
    assert sorted(p.name for p, lbl in s.train if lbl == 0) == ["deep.png", "img00.jpg", "img01.jpg"]
    assert s.counts()["val"] == {"a": 1, "b": 1}
    w = [x for x in s.warnings if "non-image" in x]
    assert len(w) == 1 and "2 non-image" in w[0] and "notes.txt" in w[0] and "labels.csv" in w[0]
    assert not any("Thumbs.db" in x or "DS_Store" in x for x in s.warnings)


def test_discover_warns_about_class_without_val_images(tmp_path):
    _class_dir(tmp_path / "train" / "a", 2)
    _class_dir(tmp_path / "train" / "b", 2)
    _class_dir(tmp_path / "val" / "a", 1)
    s = discover(tmp_path)
    assert s.counts()["val"] == {"a": 1, "b": 0}
    assert any("no val images" in w and "b" in w for w in s.warnings)


def test_discover_extensions_case_insensitive(tmp_path):
    _img(tmp_path / "train" / "a" / "one.JPG", fmt="JPEG")
    _img(tmp_path / "train" / "a" / "two.Png", fmt="PNG")
    _img(tmp_path / "train" / "b" / "three.jpeg", fmt="JPEG")
    _img(tmp_path / "val" / "a" / "four.bmp", fmt="BMP")
    _img(tmp_path / "val" / "b" / "five.webp", fmt="WEBP")
    s = discover(tmp_path)
    assert s.counts() == {"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}}


# ---------------------------------------------------------------- discover: errors


def test_discover_not_a_folder(tmp_path):
    f = _img(tmp_path / "x.jpg")
    with pytest.raises(DataError, match="is not a folder"):
        discover(f)
    with pytest.raises(DataError, match="is not a folder"):
        discover(tmp_path / "missing")


def test_discover_one_class(tmp_path):
    _class_dir(tmp_path / "train" / "only", 3)
    _class_dir(tmp_path / "val" / "only", 1)
    with pytest.raises(DataError, match=r"found 1 class folder.*only.*at least 2"):
        discover(tmp_path)


def test_discover_no_class_at_all(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.jpg")
    with pytest.raises(DataError, match=r"found 0 class folder.*at least 2"):
        discover(tmp_path)


def test_discover_class_folder_without_images(tmp_path):
    _class_dir(tmp_path / "train" / "full", 3)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.txt").write_text("nothing")
    _class_dir(tmp_path / "val" / "full", 1)
    with pytest.raises(DataError, match=r"no training images: empty"):
        discover(tmp_path)


def test_discover_class_only_layout_with_empty_class(tmp_path):
    _class_dir(tmp_path / "cats", 3)
    (tmp_path / "dogs").mkdir()
    with pytest.raises(DataError, match=r"no training images: dogs"):
        discover(tmp_path)


def test_discover_val_class_not_in_train(tmp_path):
    _class_dir(tmp_path / "train" / "a", 2)
    _class_dir(tmp_path / "train" / "b", 2)
    _class_dir(tmp_path / "val" / "a", 1)
    _class_dir(tmp_path / "val" / "zebra", 1)
    with pytest.raises(DataError, match=r"val split has classes that train does not: zebra"):
        discover(tmp_path)


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_discover_val_without_train(tmp_path, val_name):
    _class_dir(tmp_path / val_name / "a", 2)
    _class_dir(tmp_path / val_name / "b", 2)
    _class_dir(tmp_path / "other" / "a", 2)  # a second folder, so no wrapper is descended into
    with pytest.raises(DataError, match=rf"found {val_name}/ but no train/ folder"):
        discover(tmp_path)


def test_discover_val_without_train_alone(tmp_path):
    _class_dir(tmp_path / "val" / "a", 2)
    _class_dir(tmp_path / "val" / "b", 2)
    with pytest.raises(DataError, match=r"found val/ but no train/ folder"):
        discover(tmp_path)


def test_discover_no_validation_images_at_all(tmp_path):
    _class_dir(tmp_path / "a", 1)
    _class_dir(tmp_path / "b", 1)
    with pytest.raises(DataError, match="no validation images"):
        discover(tmp_path)


# ---------------------------------------------------------------- subsample


def _items(sizes):
    return [(Path(f"c{c}-{i:03d}.jpg"), c) for c, k in enumerate(sizes) for i in range(k)]


def test_subsample_returns_everything_when_n_is_large():
    items = _items((3, 4))
    assert subsample(items, 7, 0) == items
    assert subsample(items, 100, 0) == items


@pytest.mark.parametrize("sizes,n", [((10, 10, 10), 5), ((10, 10, 10, 10), 6), ((30, 10), 8),
                                     ((50, 5, 1), 10), ((7, 7), 3)])
def test_subsample_bounded_stratified_seeded(sizes, n):
    items = _items(sizes)
    out = subsample(items, n, seed=3)
    assert len(out) == n  # at most n, and no fewer when each class fits
    assert len(set(out)) == len(out) and set(out) <= set(items)
    c = Counter(lbl for _, lbl in out)
    assert set(c) == set(range(len(sizes)))  # every class kept
    for lbl, k in enumerate(sizes):  # proportional to within one item (each class has at least one)
        assert abs(c[lbl] - max(1, n * k / len(items))) < 1 + 1e-9
    assert out == subsample(items, n, seed=3)
    assert out == sorted(out)


def test_subsample_other_seed_other_items():
    items = _items((50, 50))
    assert subsample(items, 10, 1) != subsample(items, 10, 2)


# ---------------------------------------------------------------- load_image


def test_load_image_plain_rgb(tmp_path):
    p = _img(tmp_path / "a.jpg", size=(40, 30))
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert abs(r - 200) < 8 and abs(g - 30) < 8 and abs(b - 30) < 8


def test_load_image_applies_exif_orientation(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.new("RGB", (20, 10), (10, 200, 10)).save(p, exif=exif)
    with Image.open(p) as raw:
        assert raw.size == (20, 10)
    img = load_image(p)
    assert img.size == (10, 20)
    assert img.mode == "RGB"


def test_load_image_palette_with_transparency(tmp_path):
    p = tmp_path / "pal.png"
    img = Image.new("P", (20, 10), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    for x in range(10, 20):
        for y in range(10):
            img.putpixel((x, y), 1)
    img.info["transparency"] = 0  # index 0 (red) is transparent
    img.save(p, transparency=0)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert out.getpixel((2, 2)) == (255, 255, 255)  # transparent -> white background, not red
    assert out.getpixel((15, 5)) == (0, 0, 255)


def test_load_image_rgba_and_la_composited_on_white(tmp_path):
    a = np.zeros((10, 20, 4), np.uint8)
    a[..., 0] = 255
    a[:, 10:, 3] = 255  # left half fully transparent, right half opaque red
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((15, 2)) == (255, 0, 0)

    la = np.zeros((10, 20, 2), np.uint8)
    la[:, 10:, 1] = 255  # black, left half transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((15, 2)) == (0, 0, 0)


def test_load_image_grayscale(tmp_path):
    Image.new("L", (20, 10), 77).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (77, 77, 77)


def test_load_image_16bit_png_stretched_to_8bit(tmp_path):
    a = np.arange(0, 4000, 10, dtype=np.uint16).reshape(20, 20) + 1000  # 1000..4990
    Image.fromarray(a).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as raw:
        assert raw.mode.startswith("I")
    out = load_image(tmp_path / "d.png")
    assert out.mode == "RGB" and out.size == (20, 20)
    arr = np.asarray(out)
    assert arr[0, 0].tolist() == [0, 0, 0]  # the minimum maps to 0
    assert arr[-1, -1].tolist() == [255, 255, 255]  # the maximum maps to 255 (not clipped)
    assert 100 < arr[10, 0, 0] < 155  # mid value lands mid range


def test_load_image_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    assert out.mode == "RGB" and out.size == (20, 10)
    r, g, b = out.getpixel((10, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red


def test_load_image_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg.*empty file"):
        load_image(p)


def test_load_image_text_named_jpg(tmp_path):
    p = tmp_path / "fake.jpg"
    p.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageError, match=r"fake\.jpg.*not an image"):
        load_image(p)


def test_load_image_truncated_jpeg(tmp_path):
    good = _noise_jpeg(tmp_path / "good.jpg")
    data = good.read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"half\.jpg.*truncated"):
        load_image(p)
    assert load_image(good).size == (200, 150)


def test_load_image_decompression_bomb_refused(tmp_path):
    p = _img(tmp_path / "big.png", size=(20, 20), fmt="PNG")
    with pytest.raises(ImageError, match=r"big\.png.*20x20.*over the limit of 100"):
        load_image(p, max_pixels=100)
    assert load_image(p, max_pixels=400).size == (20, 20)  # the limit itself is allowed


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"gone\.jpg"):
        load_image(tmp_path / "gone.jpg")


@pytest.mark.parametrize("min_short", [20, 37, 70, 150])
def test_load_image_jpeg_draft_keeps_short_side(tmp_path, min_short):
    p = _noise_jpeg(tmp_path / "n.jpg", size=(400, 300))
    img = load_image(p, min_short_side=min_short)
    assert img.mode == "RGB"
    assert min(img.size) >= min_short * DRAFT_MARGIN or img.size == (400, 300)  # the resize does the rest
    if min_short * DRAFT_MARGIN * 2 <= 300:  # twice that margin or more smaller: decoded at a reduced scale
        assert img.size[0] < 400
        assert abs(img.size[0] / img.size[1] - 4 / 3) < 0.05  # aspect kept
    else:
        assert img.size == (400, 300)
    assert load_image(p).size == (400, 300)  # without a size asked for: every pixel


def test_load_image_draft_with_exif_rotation(tmp_path):
    p = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (400, 200), (1, 2, 3)).save(p, exif=exif)
    img = load_image(p, min_short_side=30)
    w, h = img.size
    assert h > w and w >= 30 * DRAFT_MARGIN and h < 400


# ---------------------------------------------------------------- ImageStore


def test_image_store_decodes_and_records_errors(tmp_path):
    good1 = _img(tmp_path / "g1.jpg", size=(40, 30))
    good2 = _img(tmp_path / "g2.png", size=(30, 60), fmt="PNG")
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    seen = []
    store = ImageStore([good1, bad, good2, empty], PRE, threads=2, progress=lambda d, n: seen.append((d, n)))
    assert len(store) == 4
    assert set(store.errors) == {1, 3}
    assert "bad.jpg" in store.errors[1] and "empty.png" in store.errors[3]
    assert seen[-1] == (4, 4) and len(seen) == 4
    t0, t2 = store.get(0), store.get(2)
    assert t0.dtype == torch.uint8 and t2.dtype == torch.uint8
    assert t0.shape == (3, 28, 37)  # 40x30 -> short side 28
    assert t2.shape == (3, 56, 28)  # 30x60 -> short side 28
    assert store.cache[0] is not None and store.cache[1] is None
    assert store.bytes == t0.numel() + t2.numel()
    # colour survived: the red image is red
    assert t0[0].float().mean() > 150 and t0[1].float().mean() < 80


def test_image_store_over_budget_decodes_on_access(tmp_path):
    paths = [_img(tmp_path / f"i{k}.jpg", size=(40 + k, 30), color=(k * 40, 100, 200 - k * 30)) for k in range(4)]
    cached = ImageStore(paths, PRE, threads=2)
    uncached = ImageStore(paths, PRE, budget_bytes=1, threads=2)
    assert uncached.bytes == 0 and all(t is None for t in uncached.cache)
    assert all(t is not None for t in cached.cache)
    for i in range(len(paths)):
        assert torch.equal(uncached.get(i), cached.get(i))
        assert torch.equal(cached.get(i), decode_for(paths[i], PRE))


def test_image_store_partial_budget(tmp_path):
    paths = [_img(tmp_path / f"i{k}.jpg", size=(40, 30)) for k in range(3)]
    one = 3 * 28 * 37
    store = ImageStore(paths, PRE, budget_bytes=one * 2, threads=1)
    assert sum(t is not None for t in store.cache) == 2
    assert store.bytes == 2 * one
    assert store.get(2).shape == (3, 28, 37)


def test_image_store_max_pixels(tmp_path):
    small = _img(tmp_path / "s.jpg", size=(10, 10))
    big = _img(tmp_path / "b.jpg", size=(40, 30))
    store = ImageStore([small, big], PRE, max_pixels=200, threads=1)
    assert list(store.errors) == [1] and "over the limit" in store.errors[1]


def test_image_dataset_applies_transform(tmp_path):
    paths = [_img(tmp_path / f"i{k}.jpg", size=(40, 30)) for k in range(2)]
    store = ImageStore(paths, PRE, threads=1)
    ds = ImageDataset(store, [1, 0], [5, 6], eval_transform(24))
    assert len(ds) == 2
    x, y = ds[0]
    assert x.shape == (3, 24, 24) and y == 5
    assert torch.equal(x, eval_transform(24)(store.get(1)))


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("preset", ["none", "light", "standard"])
def test_train_transform_presets(preset):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 28, 44), dtype=torch.uint8)
    before = x.clone()
    tf = train_transform(preset, 24)
    for _ in range(3):
        y = tf(x)
        assert y.shape == (3, 24, 24) and y.dtype == torch.uint8
    assert torch.equal(x, before)  # input not modified in place


def test_train_transform_none_is_center_crop():
    x = torch.randint(0, 256, (3, 28, 44), dtype=torch.uint8)
    assert torch.equal(train_transform("none", 24)(x), x[:, 2:26, 10:34])


def test_train_transform_augments():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 28, 44), dtype=torch.uint8)
    tf = train_transform("standard", 24)
    outs = [tf(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_train_transform_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown augmentation preset 'heavy'"):
        train_transform("heavy", 24)


def test_eval_transform_center_crops():
    x = torch.arange(3 * 30 * 48, dtype=torch.int64).reshape(3, 30, 48).to(torch.uint8)
    y = eval_transform(24)(x)
    assert y.shape == (3, 24, 24)
    assert torch.equal(y, x[:, 3:27, 12:36])


def test_normalize_values_dtype_and_layout():
    pre = Preprocessing(image_size=4, resize_size=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    b = torch.zeros((2, 3, 4, 4), dtype=torch.uint8)
    b[1] = 255
    x = normalize(b, pre, channels_last=False)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4)
    assert x.is_contiguous()
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.allclose(x[1, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    assert b.dtype == torch.uint8 and int(b[1].min()) == 255  # input untouched
    cl = normalize(b, pre, channels_last=True)
    assert cl.dtype == torch.float32
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    assert torch.equal(cl, x)


def test_to_tensor_and_preprocess_image_match_validation_path(tmp_path):
    p = _noise_jpeg(tmp_path / "n.jpg", size=(60, 45))
    img = load_image(p)
    t = to_tensor_u8(img)
    assert t.shape == (3, 45, 60) and t.dtype == torch.uint8
    assert int(t[0, 3, 7]) == img.getpixel((7, 3))[0]
    x = preprocess_image(img, PRE)
    assert x.shape == (1, 3, 24, 24) and x.dtype == torch.float32
    expected = normalize(eval_transform(24)(decode_for(p, PRE)).unsqueeze(0), PRE, channels_last=False)
    assert torch.allclose(x, expected)
    # any mode works, e.g. a grayscale PIL image
    g = preprocess_image(Image.new("L", (30, 40), 128), PRE)
    assert g.shape == (1, 3, 24, 24)


def _private_bytes() -> int:
    """This process's private (copied or its own) memory, from /proc/self/smaps_rollup."""
    out = 0
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            out += int(line.split()[1]) * 1024
    return out


def test_the_image_store_is_shared_with_loader_workers_not_copied(tmp_path):
    """Decoded images live in shared-memory blocks: a forked loader worker reading all of them gains almost
    no private memory (before: every image a separate tensor whose pages a fork could end up copying)."""
    import multiprocessing as mp

    from worker.engine.backbones import Preprocessing

    pre = Preprocessing(224, 256)
    paths = [_img(tmp_path / f"big{k}.jpg", size=(400, 300), color=(k * 3, 100, 50)) for k in range(80)]
    store = ImageStore(paths, pre, threads=2)
    assert all(store.cached(i) for i in range(len(paths))) and store.bytes > 20_000_000
    assert all(store.get(i).untyped_storage().is_shared() for i in range(len(paths)))

    def child(q):  # as a DataLoader worker does: one thread, then read every image
        torch.set_num_threads(1)
        before = _private_bytes()
        total = sum(int(store.get(i).numpy().sum(dtype=np.int64)) for i in range(len(paths)))
        q.put((total, _private_bytes() - before))

    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=child, args=(q,))
    p.start()
    total, grew = q.get(timeout=60)
    p.join(30)
    assert total == sum(int(store.get(i).numpy().sum(dtype=np.int64)) for i in range(len(paths)))
    # the child's own memory grows by its interpreter's bookkeeping (measured: about 1.7 MB), not by the images
    assert grew < store.bytes / 4, (grew, store.bytes)
