"""Multi-label uploads (a labels.csv manifest) through the API, with real images (tests/support/multilabel.py):
each manifest error is a 422 that names it with its fix and keeps nothing; warnings are recorded; the dataset
records its task and label statistics (SQLite and PostgreSQL) and its page shows label frequencies and the
co-occurrence of labels; versions of a multi-label dataset are refused."""
from __future__ import annotations

import csv
import io
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from support import multilabel
from support.db import db_url  # noqa: F401  (the parametrized sqlite/postgres fixture)

from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import Dataset
from app.db.session import engine_for
from app.main import create_app
from app.services import auth

N = 30


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("GRAFT_") and k not in ("GRAFT_OFFLINE", "GRAFT_TEST_PG_URL"):
            monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return multilabel.build(tmp_path_factory.mktemp("ml") / "set", n_images=N, tile=24)


@pytest.fixture(scope="module")
def images(built) -> dict[str, bytes]:
    """images/NNNN.jpg of the real multi-label set, by relative path."""
    return {p.relative_to(built).as_posix(): p.read_bytes() for p in sorted((built / "images").iterdir())}


@pytest.fixture(scope="module")
def rows(built) -> list[list[str]]:
    """[file, labels] as the builder wrote them."""
    with open(built / "labels.csv", newline="") as f:
        return list(csv.reader(f))[1:]


def csv_text(rows: list[list[str]], header: str = "file,labels") -> str:
    buf = io.StringIO()
    buf.write(header + "\n")
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def entries(images: dict[str, bytes], manifest: str | bytes, top: str = "ml/") -> list[tuple[str, bytes]]:
    data = manifest.encode() if isinstance(manifest, str) else manifest
    return [(f"{top}labels.csv", data)] + [(top + n, d) for n, d in images.items()]


def make_zip(items: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return buf.getvalue()


def png(size=(64, 64), mode="RGB", colour=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(w: int = 20_000, h: int = 20_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@dataclass
class Api:
    settings: Settings
    app: object
    client: TestClient
    headers: dict

    def zip(self, items):
        return self.client.post("/api/v1/datasets", headers=self.headers,
                                files={"file": ("up.zip", make_zip(items), "application/zip")})

    def files(self, items):
        return self.client.post("/api/v1/datasets", headers=self.headers,
                                files=[("files", (n, d, "application/octet-stream")) for n, d in items])

    def rows(self) -> int:
        with self.app.state.sessions() as s:
            return s.scalar(select(func.count()).select_from(Dataset))


def build(url: str, tmp_path: Path) -> Api:
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    run_migrations(settings.db_url)
    app = create_app(settings)
    with app.state.sessions() as s:
        token = auth.create_token(s, auth.create_user(s, "alice"), "tests")
    return Api(settings, app, TestClient(app), {"Authorization": f"Bearer {token}"})


@pytest.fixture
def api(tmp_path):
    a = build(f"sqlite:///{tmp_path / 'graft.db'}", tmp_path)
    yield a
    engine_for(a.settings.db_url).dispose()


def refused(api: Api, r, *words: str) -> dict:
    """A 422 naming every word; every problem has its fix; nothing is left behind."""
    assert r.status_code == 422, (r.status_code, r.text)
    err = r.json()["error"]
    msg = err["message"]
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert str(api.settings.data_dir) not in msg
    assert err["details"], err
    for p in err["details"]:
        assert p["problem"] and p["fix"] and isinstance(p["files"], list), p
        assert p["problem"] in msg and p["fix"] in msg
    assert list(api.settings.datasets_dir.iterdir()) == []
    assert not [p for p in api.settings.uploads_dir.rglob("*") if p.is_file()]
    assert api.rows() == 0
    return err


def created(r) -> dict:
    assert r.status_code == 201, r.text
    return r.json()


def warning(ds: dict, *words: str) -> str:
    hits = [w for w in ds["warnings"] if all(x in w for x in words)]
    assert len(hits) == 1, (words, ds["warnings"])
    return hits[0]


def expected_stats(rows: list[list[str]]) -> dict:
    sets = [set(filter(None, lbl.split(";"))) for _, lbl in rows]
    labels = sorted(set().union(*sets))
    return {"labels_per_image": round(sum(map(len, sets)) / len(sets), 4), "no_label": sum(not s for s in sets),
            "cooccurrence": {"labels": labels,
                             "matrix": [[sum(a in s and b in s for s in sets) for b in labels] for a in labels]}}


# ---------------------------------------------------------------- a good upload


def test_task_and_label_stats_are_recorded_and_returned(db_url, tmp_path, images, rows):  # noqa: F811
    api = build(db_url, tmp_path)
    try:
        ds = created(api.zip(entries(images, csv_text(rows))))
        assert ds["task"] == "multilabel" and ds["classes"] == list(multilabel.LABELS)
        images = ds["label_stats"].pop("images")
        assert ds["label_stats"] == expected_stats(rows) and images["train"] + images["val"] == N
        assert images["val"] == 6  # the tiny val split below
        assert ds["num_images"] == N
        # the set's images with no label are all plain grey: exact duplicates, one in val; its val split is small
        assert "images/0009.jpg (no label) = images/0019.jpg (no label)" in warning(ds, "2 exact duplicate images")
        warning(ds, "val image is also in train")
        warning(ds, "tiny val split: 6 images in all")
        assert len(ds["warnings"]) == 3
        for c in multilabel.LABELS:  # images per label, train + val
            assert ds["counts"]["train"][c] + ds["counts"]["val"][c] == sum(c in r[1].split(";") for r in rows)
            assert ds["counts"]["val"][c] > 0
        got = api.client.get(f"/api/v1/datasets/{ds['id']}", headers=api.headers).json()
        assert got["task"] == "multilabel" and got["label_stats"] == {**ds["label_stats"], "images": images}
        # a folder layout stays multiclass, without label statistics
        flat = [(f"{c}/{i}.png", png(colour=(i * 20, 0, 100 if c == "a" else 200))) for c in "ab" for i in range(6)]
        other = created(api.zip(flat))
        assert other["task"] == "multiclass" and other["label_stats"] is None
        listed = {d["id"]: d for d in api.client.get("/api/v1/datasets", headers=api.headers).json()}
        assert listed[ds["id"]]["task"] == "multilabel" and listed[other["id"]]["task"] == "multiclass"
    finally:
        engine_for(api.settings.db_url).dispose()


def test_a_folder_upload_with_a_split_column(api, images, rows):
    split_rows = [[f, lbl, "val" if i % 3 == 0 else "train"] for i, (f, lbl) in enumerate(rows)]
    ds = created(api.files(entries(images, csv_text(split_rows, "file,labels,split"), top="")))
    assert ds["task"] == "multilabel" and "its split column" in ds["layout"]
    assert sum(ds["counts"]["val"].values()) == sum(len(set(filter(None, r[1].split(";")))) for r in split_rows
                                                    if r[2] == "val")


# ---------------------------------------------------------------- each error: refused, with its fix


def test_each_manifest_error_is_refused_with_its_fix(api, images, rows):
    good = csv_text(rows)

    def send(manifest: str | bytes, extra: list[tuple[str, bytes]] = ()):  # type: ignore[assignment]
        return api.zip(entries(images, manifest) + list(extra))

    refused(api, send(good + "images/gone.jpg,ant\n"), "1 file listed in labels.csv but not in the dataset",
            "images/gone.jpg", "add the images, fix their paths")
    refused(api, send(good + "notes.txt,ant\n", [("ml/notes.txt", b"hello")]), "naming a file that is not an image",
            "notes.txt", "list only images")
    typo = [[f, "Ant" if i == 0 else lbl] for i, (f, lbl) in enumerate(rows)]
    err = refused(api, send(csv_text(typo)), "looks like a misspelling", "'Ant' (1) beside 'ant'",
                  "use one spelling per label", "fewer than 2 images", "Ant (1)")
    assert {"Ant"} <= {f for p in err["details"] for f in p["files"]}
    rare = rows + [["images/extra.png", "wasp"]]
    refused(api, api.zip(entries(images, csv_text(rare)) + [("ml/images/extra.png", png())]),
            "1 label with fewer than 2 images: wasp (1)", "give each label at least 2 images")
    refused(api, send(good + f"{rows[0][0]},hand;bee;ant\n"), "1 image listed twice with different labels",
            rows[0][0], "keep one row per image")
    refused(api, send("path,tags\n" + good.split("\n", 1)[1]), "starts with 'path,tags'",
            "make its first line `file,labels`")
    refused(api, send(good + "../outside.jpg,ant\n"), "outside the dataset", "../outside.jpg",
            "relative to the CSV")
    refused(api, send(good + "/etc/abs.jpg,ant\n"), "absolute", "/etc/abs.jpg", "relative to the CSV")
    refused(api, send(csv_text([[f, lbl, "test" if i == 2 else "train"] for i, (f, lbl) in enumerate(rows)],
                               "file,labels,split")), "1 row with a split other than train or val", "line 4 (test)",
            "write train, val, or leave the split empty")
    refused(api, send(good.encode().replace(b"file,labels\n", b"file,labels\nimages/0000.jpg,caf\xe9\n")),
            "labels.csv is not UTF-8 text", "save it as UTF-8 CSV")
    refused(api, send(csv_text([[f, lbl, "train"] for f, lbl in rows], "file,labels,split")),
            "no validation images", "add rows with split val")
    refused(api, send(good.replace(f"{rows[4][0]},{rows[4][1]}", f"{rows[4][0]},beee", 1)
                      .replace(f"{rows[5][0]},{rows[5][1]}", f"{rows[5][0]},beee", 1)),
            "1 label that looks like a misspelling of another: 'beee' (2) beside 'bee'")
    # several at once: one refusal that lists them all
    err = refused(api, send(good + "images/gone.jpg,ant\n/abs.jpg,bee\n", [("ml/images/bomb.png", bomb_png())]),
                  "3 problems", "decompression bomb", "not in the dataset", "absolute")
    assert len(err["details"]) == 3


def test_an_unreadable_image_in_a_refused_manifest_is_said(api, images, rows):
    """Its row is left out before the labels are counted, and the refusal says so."""
    rare = rows + [["images/wasp1.png", "wasp"], ["images/wasp2.png", "wasp"]]
    refused(api, api.zip(entries(images, csv_text(rare)) + [("ml/images/wasp1.png", png()),
                                                             ("ml/images/wasp2.png", b"not a png")]),
            "1 label with fewer than 2 images: wasp (1)", "1 image listed in labels.csv is unreadable",
            "images/wasp2.png", "re-export or re-download them")


# ---------------------------------------------------------------- tolerated: warnings


def test_warnings_unlisted_repeated_unreadable_duplicates_leaks_and_odd_images(api, images, rows):
    imgs = dict(images)
    first, second = rows[0][0], rows[1][0]
    imgs[first] = images[first][:300]  # truncated: removed, and its row left out of labels.csv
    extra = [("ml/images/unlisted.jpg", images[rows[2][0]]),  # not in the manifest
             ("ml/images/copy.jpg", images[rows[3][0]]),  # the same content as row 3, other labels
             ("ml/images/grey.png", png((20, 20), "L", 90)), ("ml/notes.txt", b"x")]
    labels_of_3 = set(filter(None, rows[3][1].split(";")))
    other = "hand" if labels_of_3 != {"hand"} else "ant"
    manifest = csv_text(rows + [[second, rows[1][1]], ["images/copy.jpg", other], ["images/grey.png", ""]])
    ds = created(api.zip(entries(imgs, manifest) + extra))
    assert ds["task"] == "multilabel" and ds["num_images"] == N - 1 + 2
    warning(ds, "skipped 1 unreadable image", first, "1 row left out of labels.csv")
    warning(ds, "not in labels.csv", "images/unlisted.jpg")
    warning(ds, "1 duplicated row", second)
    dup = warning(ds, "exact duplicate images", "images/copy.jpg", "1 of them has different labels (a labelling mistake?)")
    assert rows[3][0] in dup
    warning(ds, "removed 1 stray file", "notes.txt")
    warning(ds, "not in RGB", "L: 1", "images/grey.png")
    warning(ds, "very small image", "images/grey.png (20x20)")
    # the stored labels.csv no longer names the removed image, and is whole (written atomically)
    (folder,) = api.settings.datasets_dir.iterdir()
    stored = (folder / "ml" / "labels.csv").read_text()
    assert first not in stored and "images/copy.jpg" in stored and "\n\n" not in stored
    assert not (folder / "ml" / first).exists() and not (folder / "ml" / "notes.txt").exists()
    assert not [p for p in (folder / "ml").iterdir() if p.name.endswith(".tmp")]
    assert ds["label_stats"]["no_label"] == sum(not r[1] for r in rows[1:]) + 1


def test_val_leak_and_tiny_val(api, images, rows):
    split_rows = [[f, lbl, "val" if i < 4 else "train"] for i, (f, lbl) in enumerate(rows)]
    split_rows.append(["images/again.jpg", rows[0][1], "train"])  # val image 0 again, in train
    ds = created(api.zip(entries(images, csv_text(split_rows, "file,labels,split"))
                         + [("ml/images/again.jpg", images[rows[0][0]])]))
    warning(ds, "1 val image is also in train", f"{rows[0][0]} = images/again.jpg", "inflates the val F1")
    warning(ds, "tiny val split: 4 images in all", "give val at least 10 images")


def test_a_labels_file_deeper_down_is_not_a_manifest(api, images, rows):
    """labels.csv two folders down is a stray file: the upload is read as a folder layout."""
    r = api.zip([("a/b/labels.csv", csv_text(rows).encode())] + [(f"a/b/{n}", d) for n, d in images.items()])
    assert r.status_code == 422 and "class folder" in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------- the page, versions


def test_the_dataset_page_shows_label_frequencies_and_cooccurrence(api, images, rows):
    ds = created(api.zip(entries(images, csv_text(rows))))
    browser = TestClient(api.app)
    with api.app.state.sessions() as s:
        token = auth.create_token(s, auth.ensure_user(s, "alice"), "x", kind="login")
    assert browser.get(f"/login?token={token}", follow_redirects=False).status_code == 303
    html = browser.get(f"/datasets/{ds['id']}").text
    assert "Task: multi-label" in html and "Label frequencies" in html and "Label co-occurrence" in html
    # each label's samples are train images that carry it
    classes = list(multilabel.LABELS)
    assert f"/datasets/{ds['id']}/samples/2/0.jpg" in html
    r = browser.get(f"/datasets/{ds['id']}/samples/{classes.index('hand')}/0.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    stats = expected_stats(rows)
    table = html[html.index('id="cooccurrence"'):]
    cells = [int(v) for v in re.findall(r'<td class="num (?:diag|off)"[^>]*>(\d+)</td>', table)]
    assert cells == [v for row in stats["cooccurrence"]["matrix"] for v in row]
    assert f'<span class="stat-num">{stats["no_label"]}</span><span class="stat-label">images with no label' in html
    for split, n in ds["label_stats"]["images"].items():  # images, not the sum of the per-label counts
        assert f'<span class="stat-num">{n}</span><span class="stat-label">{split} images' in html
    freq = html[html.index('id="label-frequencies"'):html.index('id="cooccurrence"')]
    for c in multilabel.LABELS:
        assert f"<strong>{c}</strong>" in freq
        assert f'<td class="num">{ds["counts"]["train"][c]}</td>' in freq
    # a multiclass page has no such sections
    flat = [(f"{c}/{i}.png", png(colour=(i * 20, 0, 100 if c == "a" else 200))) for c in "ab" for i in range(6)]
    other = created(api.zip(flat))
    page = browser.get(f"/datasets/{other['id']}").text
    assert "co-occurrence" not in page and "Task: multi-label" not in page and "<h2>Classes</h2>" in page
    browser.close()


def test_a_version_of_a_multilabel_dataset_relabels_rows_removes_and_shares_the_images(api, images, rows):
    ds = created(api.zip(entries(images, csv_text(rows))))
    parent_root = api.settings.data_dir / api.app.state.sessions().get(Dataset, ds["id"]).path
    parent_csv = (parent_root / "labels.csv").read_text()
    (f0, old0), (f1, _) = rows[0], rows[1]
    new0 = ";".join(sorted({"ant", "hand"} if set(old0.split(";")) != {"ant", "hand"} else {"bee"}))
    post = lambda body: api.client.post(f"/api/v1/datasets/{ds['id']}/versions", headers=api.headers,  # noqa: E731
                                        json=body)
    # refused before anything is written, each problem named with its fix
    for body, words in [({"relabel": {f0: "ant;unicorn"}}, ["unknown label", "'unicorn'", "ant"]),
                        ({"remove": ["images/nope.jpg"]}, ["not in dataset", "images/nope.jpg"]),
                        ({"relabel": {f0: "ant"}, "remove": [f0]}, ["both relabelled and removed"]),
                        ({"remove": [f1], "uploads": ["0" * 32]}, ["adding images in a version", "new dataset"])]:
        r = post(body)
        assert r.status_code == 400, (body, r.text)
        for w in words:
            assert w.lower() in r.json()["error"]["message"].lower(), (w, r.text)
    assert api.rows() == 1
    r = post({"relabel": {f0: new0.replace(";", " ; ")}, "remove": [f1]})
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["task"] == "multilabel" and v["parent_id"] == ds["id"] and v["num_images"] == ds["num_images"] - 1
    assert v["changes"]["relabelled"] == [{"file": f0, "from": old0, "to": new0}]
    assert v["changes"]["removed"] == [f1] and v["changes"]["n_added"] == 0
    root = api.settings.data_dir / api.app.state.sessions().get(Dataset, v["id"]).path
    got = {r_[0]: r_[1] for r_ in csv.reader(io.StringIO((root / "labels.csv").read_text()))}
    assert got[f0] == new0 and f1 not in got and not (root / f1).exists()
    assert all(got[f] == lbl for f, lbl in rows[2:])
    assert (parent_root / "labels.csv").read_text() == parent_csv and (parent_root / f1).is_file()
    assert (root / f0).stat().st_ino == (parent_root / f0).stat().st_ino  # shared, not copied
    assert api.rows() == 2


