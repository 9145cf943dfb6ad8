"""The dataset doctor: every upload check, sent for real through the API (SQLite), with real images.

Refusals: a 4xx JSON error that names every problem and its fix (in the message and item by item in
`details`) and leaves no folder, no temporary upload and no row. Tolerated problems: the dataset is
created, its `warnings` say what and how to fix, and stray or unreadable files are not kept.
"""
from __future__ import annotations

import io
import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from support.paths import HYMENOPTERA

from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import Dataset
from app.db.session import engine_for
from app.main import create_app
from app.services import auth

# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("GRAFT_") and k not in ("GRAFT_OFFLINE",):
            monkeypatch.delenv(k)


@pytest.fixture(scope="session")
def jpegs() -> dict[str, list[bytes]]:
    """Real photos: 24 ants and 24 bees (all different)."""
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"the shared dataset {HYMENOPTERA} is missing")
    return {cls: [f.read_bytes() for f in sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[:24]]
            for cls in ("ants", "bees")}


def png(seed: int, size=(64, 64), mode="RGB", fmt="PNG") -> bytes:
    """A distinct noise image in any mode."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def bomb_png(w: int = 20_000, h: int = 20_000) -> bytes:
    """A valid PNG header that declares w x h 1-bit pixels: a few hundred bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\0" * (1 + (w + 7) // 8) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def mark_encrypted(data: bytes, name: str) -> bytes:
    """Sets the 'encrypted' flag of one entry, in its local header and in the central directory
    (Python's zipfile cannot write encrypted entries)."""
    out, raw = bytearray(data), name.encode()
    for sig, flags_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        pos = out.find(sig)
        while pos >= 0:
            if out[pos + name_at:pos + name_at + len(raw)] == raw:
                out[pos + flags_at] |= 0x1
            pos = out.find(sig, pos + 1)
    return bytes(out)


def make_zip(entries, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def layout(jpegs, train=(12, 12), val=(5, 5), top="ds", offset=0) -> list[tuple[str, bytes]]:
    """train/ + val/ of real ant and bee photos, all different."""
    out = []
    for cls, n_train, n_val in (("ants", train[0], val[0]), ("bees", train[1], val[1])):
        imgs = jpegs[cls][offset:]
        out += [(f"{top}/train/{cls}/{cls}{i:02d}.jpg", imgs[i]) for i in range(n_train)]
        out += [(f"{top}/val/{cls}/{cls}{i:02d}.jpg", imgs[n_train + i]) for i in range(n_val)]
    return out


@dataclass
class Api:
    settings: Settings
    client: TestClient
    headers: dict
    sessions: object

    def zip(self, entries, **kw):
        data = entries if isinstance(entries, bytes) else make_zip(entries, **kw)
        return self.client.post("/api/v1/datasets", headers=self.headers,
                                files={"file": ("up.zip", data, "application/zip")})

    def files(self, entries):
        return self.client.post("/api/v1/datasets", headers=self.headers,
                                files=[("files", (n, d, "application/octet-stream")) for n, d in entries])

    def rows(self) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(Dataset))


def build(tmp_path: Path, **overrides) -> Api:
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'graft.db'}", **overrides)
    run_migrations(settings.db_url)
    app = create_app(settings)
    with app.state.sessions() as s:
        token = auth.create_token(s, auth.create_user(s, "alice"), "tests")
    return Api(settings, TestClient(app), {"Authorization": f"Bearer {token}"}, app.state.sessions)


@pytest.fixture
def api(tmp_path):
    a = build(tmp_path)
    yield a
    engine_for(a.settings.db_url).dispose()


def files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if not p.is_dir()) if d.exists() else []


def refused(api: Api, r, status: int, *words: str) -> dict:
    """A JSON refusal naming every word; every problem has a fix; nothing is left behind."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    msg = err["message"]
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert str(api.settings.data_dir) not in msg  # the server's paths stay private
    assert isinstance(err["details"], list) and err["details"], err
    for p in err["details"]:
        assert p["problem"] and p["fix"] and isinstance(p["files"], list), p
        assert p["problem"] in msg and p["fix"] in msg
    assert list(api.settings.datasets_dir.iterdir()) == []
    assert files_under(api.settings.uploads_dir) == []
    assert api.rows() == 0
    return err


def created(r) -> dict:
    assert r.status_code == 201, r.text
    return r.json()


def warning(ds: dict, *words: str) -> str:
    """The one warning that contains every word."""
    hits = [w for w in ds["warnings"] if all(x in w for x in words)]
    assert len(hits) == 1, (words, ds["warnings"])
    return hits[0]


def stored(api: Api) -> set[str]:
    (folder,) = api.settings.datasets_dir.iterdir()
    return {p.relative_to(folder).as_posix() for p in files_under(folder)}


# ---------------------------------------------------------------- a clean dataset


def test_a_clean_dataset_has_no_warnings(api, jpegs):
    entries = [(n.removeprefix("ds/"), d) for n, d in layout(jpegs)]
    ds = created(api.zip(entries))
    assert ds["warnings"] == []
    assert ds["counts"] == {"train": {"ants": 12, "bees": 12}, "val": {"ants": 5, "bees": 5}}
    assert stored(api) == {n for n, _ in entries}


def test_a_junk_folder_is_kept_as_images_of_no_class(api, jpegs):
    """`_junk/` (or `junk/` beside train/ and val/) holds images of no class: kept, said, not a class; one that
    is also a train image is named."""
    entries = layout(jpegs)
    entries += [(f"ds/junk/other{i}.png", png(i)) for i in range(3)] + [("ds/junk/same.jpg", entries[0][1])]
    ds = created(api.zip(entries))
    assert ds["classes"] == ["ants", "bees"]
    assert ds["counts"]["train"] == {"ants": 12, "bees": 12}
    note = warning(ds, "junk/", "never trained on")
    assert "4 images" in note and "false-accept" in note
    clash = warning(ds, "also in train")
    assert "junk/same.jpg" in clash and "remove it from one of them" in clash
    assert not [w for w in ds["warnings"] if "not used" in w], ds["warnings"]
    assert {"ds/junk/other0.png", "ds/junk/same.jpg"} <= stored(api)


def test_in_class_folders_only_junk_is_a_class_but_underscore_junk_is_not(tmp_path, jpegs):
    flat = [(f"{c}/{c}{i}.jpg", jpegs[c][i]) for c in ("ants", "bees") for i in range(10)]
    a = build(tmp_path / "a")
    ds = created(a.zip(flat + [(f"junk/j{i}.png", png(i)) for i in range(10)]))
    assert ds["classes"] == ["ants", "bees", "junk"]
    b = build(tmp_path / "b")
    ds = created(b.zip(flat + [(f"_junk/j{i}.png", png(i)) for i in range(3)]))
    assert ds["classes"] == ["ants", "bees"]
    assert "3 images" in warning(ds, "_junk/", "never trained on")
    for x in (a, b):
        engine_for(x.settings.db_url).dispose()


# ---------------------------------------------------------------- refusals


def test_not_a_zip_and_corrupt_zips(api, jpegs):
    refused(api, api.zip(b"PK\x03\x04 but not really a zip" * 20), 400, "not a zip", "zip the dataset folder")
    good = make_zip(layout(jpegs), compression=zipfile.ZIP_DEFLATED)
    refused(api, api.zip(good[: len(good) // 2]), 400, "not a zip")  # the directory at the end is cut off
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        data = bytearray(make_zip(layout(jpegs), compression=compression))
        for i in range(2000, 6000):  # damage the first entry's data, not the directory
            data[i] ^= 0x5A
        refused(api, api.zip(bytes(data)), 400, "corrupt", "create it again")
    data = mark_encrypted(make_zip(layout(jpegs) + [("ds/train/ants/secret.jpg", b"x" * 100)]),
                          "ds/train/ants/secret.jpg")
    refused(api, api.zip(data), 400, "1 encrypted entry",
            "'ds/train/ants/secret.jpg'", "without a password")


def test_zip_slip_and_links_are_all_reported_in_one_error(api, jpegs, tmp_path):
    link = zipfile.ZipInfo("ds/train/ants/link.jpg")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    err = refused(api, api.zip(layout(jpegs) + [("/etc/evil.jpg", b"x"), ("ds/../../evil.jpg", b"x"),
                                                ("../evil2.jpg", b"x"), (link, b"/etc/passwd")]),
                  400, "3 problems", "absolute path", "'/etc/evil.jpg'", "'..'", "zip slip", "'ds/../../evil.jpg'",
                  "'../evil2.jpg'", "symbolic link", "link.jpg", "re-create the archive")
    assert [len(p["files"]) for p in err["details"]] == [1, 2, 1]
    assert not list(tmp_path.rglob("evil*"))
    # a folder upload's relative paths too
    refused(api, api.files(layout(jpegs) + [("ds/../../evil.jpg", b"x"), ("/abs/evil.jpg", b"x")]), 400,
            "2 problems", "'..'", "absolute path")
    assert not list(tmp_path.rglob("evil*"))


def test_zip_bombs_entries_size_and_ratio(tmp_path, jpegs):
    api = build(tmp_path, max_zip_entries=30)
    zeros = b"\0" * (4 << 20)  # 4 MiB of zeros compress about 1000:1
    err = refused(api, api.zip(layout(jpegs) + [("ds/train/ants/zeros.jpg", zeros)]), 400,
                  "2 problems", "entries, more than the limit of 30", "GRAFT_MAX_ZIP_ENTRIES",
                  "ds/train/ants/zeros.jpg", "zip bomb", "GRAFT_MAX_ZIP_RATIO")
    assert len(err["details"]) == 2
    api2 = build(tmp_path / "2", max_extracted_bytes=100_000)
    refused(api2, api2.zip(layout(jpegs)), 400, "expands to", "more than the limit of 100000",
            "GRAFT_MAX_EXTRACTED_BYTES")


def test_upload_size_limit(tmp_path, jpegs):
    api = build(tmp_path, max_upload_bytes=50_000)  # small enough for the body to reach the service
    entries = layout(jpegs, train=(2, 2), val=(1, 1))
    refused(api, api.files(entries), 413, "larger than the limit of 50000", "GRAFT_MAX_UPLOAD_BYTES")
    refused(api, api.zip(entries), 413, "larger than the limit of 50000", "GRAFT_MAX_UPLOAD_BYTES")


def test_one_class_is_refused(api, jpegs):
    entries = [(n, d) for n, d in layout(jpegs) if "/ants/" in n]
    refused(api, api.zip(entries), 422, "1 class folder (ants) in ds/train/", "at least 2 classes")
    # class folders only, and only one of them, with loose images next to it
    entries = [("solo/a.jpg", jpegs["ants"][0]), ("loose.jpg", jpegs["bees"][0])]
    refused(api, api.files(entries), 422, "1 class folder (solo)", "1 image lie outside any class folder",
            "sub-folder named after the class")


def test_val_without_train_is_refused(api, jpegs):
    entries = [(n.replace("/train/", "/val/"), d) for n, d in layout(jpegs, val=(0, 0))]
    refused(api, api.zip(entries), 422, "found ds/val/ but no train/ folder", "rename the folder")


def test_no_images_at_all(api, jpegs):
    refused(api, api.zip([("ds/README.txt", b"hello"), ("ds/train/ants/notes.csv", b"a,b")]), 422,
            "no images found", "only 2 other files", "one sub-folder per class")
    refused(api, api.zip([]), 422, "no images found", "it is empty")
    refused(api, api.zip([("ds/train/ants/a.jpg", b""), ("ds/train/bees/b.jpg", b"not a jpeg at all")]), 422,
            "no images found", "ds/train/ants/a.jpg: empty file", "ds/train/bees/b.jpg: not an image")


def test_a_class_with_no_images(api, jpegs):
    base = layout(jpegs)
    # an empty folder, a folder of non-images, a folder whose only images are all corrupt
    empty = zipfile.ZipInfo("ds/train/cats/")
    entries = base + [(empty, b""), ("ds/val/cats/x.jpg", jpegs["ants"][20]),
                      ("ds/train/dogs/notes.txt", b"x"), ("ds/val/dogs/y.jpg", jpegs["ants"][21]),
                      ("ds/train/owls/a.jpg", jpegs["ants"][22][:3000]), ("ds/train/owls/b.png", b""),
                      ("ds/val/owls/z.jpg", jpegs["ants"][23])]
    err = refused(api, api.zip(entries), 422, "3 class folders with no usable images", "ds/train/cats/",
                  "ds/train/dogs/ (it holds only non-image files: notes.txt)",
                  "ds/train/owls/ (its 2 images were all unreadable", "truncated", "empty file",
                  "add images")
    assert err["details"][0]["files"] == ["ds/train/cats/", "ds/train/dogs/", "ds/train/owls/"]
    # an empty val class is refused too
    refused(api, api.zip(base + [("ds/train/cats/c.jpg", jpegs["ants"][20]), (zipfile.ZipInfo("ds/val/cats/"), b"")]),
            422, "ds/val/cats/")


def test_train_and_val_class_names_must_match(api, jpegs):
    base = layout(jpegs)
    err = refused(api, api.zip(base + [("ds/train/cats/c.jpg", jpegs["ants"][20]),
                                       ("ds/val/dogs/d.jpg", jpegs["ants"][21])]),
                  422, "different class folders", "only in ds/train/: cats", "only in ds/val/: dogs",
                  "same class folder names")
    assert err["details"][0]["files"] == ["ds/train/cats/", "ds/val/dogs/"]
    # the lenient engine would accept a train class missing from val: an upload does not
    refused(api, api.zip(base + [("ds/train/cats/c.jpg", jpegs["ants"][20])]), 422, "only in ds/train/: cats")
    refused(api, api.zip([(n.replace("val/bees", "val/Bees"), d) for n, d in base]), 422,
            "bees and Bees differ only in upper/lower case")


def test_decompression_bombs_are_refused(api, jpegs):
    refused(api, api.zip(layout(jpegs) + [("ds/train/ants/huge.png", bomb_png())]), 422,
            "ds/train/ants/huge.png", "400000000 pixels", "decompression bomb", "GRAFT_MAX_IMAGE_PIXELS")
    # reported together with the other problems
    err = refused(api, api.files(layout(jpegs) + [("ds/val/ants/huge.png", bomb_png()),
                                                 ("ds/val/cats/c.jpg", jpegs["ants"][20])]),
                  422, "2 problems", "ds/val/ants/huge.png", "only in ds/val/: cats")
    assert err["details"][0]["files"] == ["ds/val/ants/huge.png"]


def test_the_image_size_limit_is_a_setting(tmp_path, jpegs):
    api = build(tmp_path, max_image_pixels=100_000)
    err = refused(api, api.zip(layout(jpegs)), 422, "too large to decode safely", "below 100000 pixels",
                  "GRAFT_MAX_IMAGE_PIXELS")
    assert len(err["details"][0]["files"]) > 5  # every file, not just the first
    assert re.search(r"ds/train/ants/ants00.jpg \(\d+x\d+ pixels\)", err["message"]), err["message"]


# ---------------------------------------------------------------- tolerated: warnings


def test_stray_files_are_removed_and_reported(api, jpegs):
    base = layout(jpegs)
    junk = [("__MACOSX/ds/train/ants/._ants00.jpg", b"\0\5\26\7"), ("ds/.DS_Store", b"x"),
            ("ds/train/Thumbs.db", b"x"), ("ds/train/ants/.ipynb_checkpoints/x.jpg", jpegs["ants"][20]),
            ("ds/val/bees/notes.txt", b"x"), ("ds/train/bees/labels.csv", b"a,b")]
    ds = created(api.zip(base + junk))
    w = warning(ds, "removed 2 stray folders and 4 stray files")
    for name in ("__MACOSX/", "ds/.DS_Store", "ds/train/Thumbs.db", "ds/train/ants/.ipynb_checkpoints/",
                 "ds/val/bees/notes.txt"):
        assert name in w, w
    assert "leave such files out" in w
    assert stored(api) == {n for n, _ in base}
    assert ds["counts"]["train"] == {"ants": 12, "bees": 12}


def test_unreadable_images_are_removed_from_the_dataset(api, jpegs):
    base = layout(jpegs)
    bad = [("ds/train/ants/truncated.jpg", jpegs["ants"][20][:4000]), ("ds/train/bees/empty.jpg", b""),
           ("ds/val/bees/garbage.png", os.urandom(3000)), ("ds/train/bees/text.gif", b"GIF89a but not")]
    ds = created(api.files(base + bad))
    w = warning(ds, "skipped 4 unreadable images (removed from the dataset)")
    for text in ("ds/train/ants/truncated.jpg (truncated file)", "ds/train/bees/empty.jpg (empty file, 0 bytes)",
                 "ds/val/bees/garbage.png (not an image, or corrupt)", "ds/train/bees/text.gif", "re-export"):
        assert text in w, w
    assert stored(api) == {n for n, _ in base}  # training never sees them
    assert ds["counts"] == {"train": {"ants": 12, "bees": 12}, "val": {"ants": 5, "bees": 5}}
    assert ds["num_images"] == 34


def test_odd_modes_and_small_images(api, jpegs):
    base = layout(jpegs)
    odd = [("ds/train/ants/p.png", png(1, mode="P")), ("ds/train/ants/rgba.png", png(2, mode="RGBA")),
           ("ds/train/ants/la.png", png(3, mode="LA")), ("ds/train/bees/l.jpg", png(4, mode="L", fmt="JPEG")),
           ("ds/train/bees/i16.png", png(5, mode="I;16")), ("ds/train/bees/cmyk.jpg", png(6, mode="CMYK", fmt="JPEG")),
           ("ds/train/bees/tiny.png", png(7, size=(16, 20)))]
    ds = created(api.zip(base + odd))
    w = warning(ds, "6 images not in RGB")
    for text in ("CMYK: 1", "I;16: 1", "L: 1", "LA: 1", "P: 1", "RGBA: 1", "converted to RGB", "transparency"):
        assert text in w, w
    w = warning(ds, "1 very small image (under 32 px on a side)")
    assert "ds/train/bees/tiny.png (16x20)" in w and "larger images" in w
    assert len(stored(api)) == len(base) + len(odd)  # kept: the engine converts them


def test_few_images_imbalance_and_tiny_val(api, jpegs):
    ds = created(api.zip(layout(jpegs, train=(2, 13), val=(1, 3))))
    w = warning(ds, "1 class with very few training images")
    assert "ants (2)" in w and "bees" not in w and "at least 10" in w
    w = warning(ds, "strong class imbalance")
    assert "bees has 13 training images, ants 2 (6:1)" in w and "add images to the small classes" in w
    assert "training balances it by default (class_weighting auto" in w
    w = warning(ds, "tiny val split")
    assert "4 images in all (ants 1, bees 3)" in w and "at least 10" in w


def test_duplicates_and_leakage(api, jpegs):
    base = layout(jpegs)
    a0, a1, b0 = jpegs["ants"][0], jpegs["ants"][1], jpegs["bees"][0]
    extra = [("ds/train/ants/copy_of_a0.jpg", a0),      # a duplicate within train
             ("ds/train/bees/mislabelled.jpg", a1),     # a duplicate across classes
             ("ds/val/bees/leak.jpg", b0),              # the same image in train and val
             ("ds/val/ants/leak2.jpg", a0)]
    ds = created(api.zip(base + extra))
    w = warning(ds, "exact duplicate image", "in train")
    assert "2 exact duplicate images in train" in w, w
    assert "ds/train/ants/ants00.jpg = ds/train/ants/copy_of_a0.jpg" in w
    assert "ds/train/ants/ants01.jpg = ds/train/bees/mislabelled.jpg" in w
    assert "1 of them is in different classes" in w and "delete the copies" in w
    w = warning(ds, "also in train")
    assert w.startswith("2 val images are also in train")
    assert "ds/val/bees/leak.jpg = ds/train/bees/bees00.jpg" in w
    assert "ds/val/ants/leak2.jpg = ds/train/ants/ants00.jpg" in w
    assert "inflates the val accuracy" in w and "remove them from ds/val/" in w


def test_auto_split_layout_and_loose_images(api, jpegs):
    entries = [(f"{cls}/{i}.jpg", jpegs[cls][i]) for cls in ("ants", "bees") for i in range(12)]
    ds = created(api.files(entries + [("stray.jpg", jpegs["ants"][20]), ("ants/dup.jpg", jpegs["ants"][0])]))
    assert "class folders only" in ds["layout"]
    warning(ds, "1 image outside the class folders is not used: stray.jpg", "move each image")
    # a duplicate within train, or a leak into val, wherever the seeded split puts the copies
    hits = [w for w in ds["warnings"] if "ants/0.jpg" in w and "ants/dup.jpg" in w]
    assert len(hits) == 1 and ("exact duplicate" in hits[0] or "also in train" in hits[0]), ds["warnings"]
    # train/ only: the val split is drawn from it
    entries = [(f"d/train/{cls}/{i}.jpg", jpegs[cls][i]) for cls in ("ants", "bees") for i in range(6)]
    ds = created(api.zip(entries))
    assert "train/ only" in ds["layout"] and ds["counts"]["val"] == {"ants": 1, "bees": 1}
    warning(ds, "tiny val split: 2 images in all")


def test_large_uploads_are_checked_in_a_child_process(tmp_path, jpegs, monkeypatch):
    """At doctor_process_min_files or more files the checks run in a spawned child (so their per-image
    bookkeeping never stays in the web process): the same warnings, and refusals keep their class, message
    and details. The child is proven by its pid: the check it ran did not run here."""
    from app.services import doctor

    pids: list[int] = []
    real = doctor.examine

    def spy(folder, settings, trusted=frozenset()):
        pids.append(os.getpid())
        return real(folder, settings, trusted)

    monkeypatch.setattr(doctor, "examine", spy)  # only this process sees the spy
    api = build(tmp_path, doctor_process_min_files=0)
    inline = build(tmp_path / "inline")
    entries = layout(jpegs, train=(2, 13), val=(1, 3))
    ds = created(api.zip(entries))
    assert pids == [], "the doctor ran in the web process"
    same = created(inline.zip(entries))
    assert pids == [os.getpid()]  # below the default threshold: inline
    assert ds["warnings"] == same["warnings"] and ds["counts"] == same["counts"]
    assert ds["num_images"] == same["num_images"] == 19 and ds["size_bytes"] == same["size_bytes"] > 0
    fresh = build(tmp_path / "fresh", doctor_process_min_files=0)
    err = refused(fresh, fresh.zip([(n, d) for n, d in entries if "/ants/" in n]), 422, "1 class folder (ants)",
                  "at least 2 classes")
    assert err["details"] and err["details"][0]["fix"]
    assert pids == [os.getpid()]
