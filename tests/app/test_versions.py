"""Dataset versions through the API, on real files: relabel, remove and add (a resumable upload) make a new
dataset whose unchanged images are shared with the parent (hard links on a local disk; in a real S3 server,
the keys of the parent's objects, not new objects), the parent stays as it was, and bad changes are refused
with 400s that name the files, before anything is written."""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from support.paths import HYMENOPTERA
from support.web import dataset_zip, make_app, tus_send

from app.db.models import Dataset
from app.services import auth, storage


def _site(tmp_path: Path, **kw):
    app, settings = make_app(tmp_path / "data", f"sqlite:///{tmp_path / 'g.db'}", **kw)
    with app.state.sessions() as s:
        alice = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "alice"), "t")}
    return TestClient(app), app, settings, alice


def _upload(c: TestClient, h: dict) -> dict:
    r = c.post("/api/v1/datasets", headers=h, data={"name": "bugs"},
               files={"file": ("bugs.zip", dataset_zip({"train": 6, "val": 3}), "application/zip")})
    assert r.status_code == 201, r.text
    return r.json()


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _row(app, ds_id: int) -> Dataset:
    with app.state.sessions() as s:
        ds = s.get(Dataset, ds_id)
        s.expunge(ds)
        return ds


def _extra_zip() -> bytes:
    """Two new bee photos laid out like the dataset (train/bees/...)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))[20:22]:
            zf.write(f, f"more/train/bees/new_{f.name}")
    return buf.getvalue()


def _stored(s3_bucket, app, ds_id: int) -> tuple[str, tuple[str, ...], list[str]]:
    """(the dataset's key, its root inside it, the keys of the objects stored under it) in the test's bucket."""
    key, inner = storage.dataset_key(_row(app, ds_id).path)
    client, prefix = s3_bucket["client"], s3_bucket["prefix"]
    stored = sorted(o["Key"][len(prefix) + 1:] for o in client.list_objects_v2(
        Bucket=s3_bucket["bucket"], Prefix=f"{prefix}/{key}/").get("Contents", []))
    return key, inner, stored


def _names(counts: dict) -> int:
    return sum(n for per in counts.values() for n in per.values())


def test_a_version_relabels_removes_and_adds_and_shares_the_rest(tmp_path):
    c, app, settings, h = _site(tmp_path)
    parent = _upload(c, h)
    root = settings.data_dir / _row(app, parent["id"]).path
    before = _tree(root)
    files = sorted(before)
    ant, bee, gone = files[0], [f for f in files if f.startswith("train/bees/")][0], files[1]
    assert ant.startswith("train/ants/") and gone.startswith("train/ants/")
    uid = tus_send(c, h, _extra_zip())
    r = c.post(f"/api/v1/datasets/{parent['id']}/versions", headers=h,
               json={"relabel": {ant: "bees", bee: "bees"}, "remove": [gone], "uploads": [uid]})
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["parent_id"] == parent["id"] and v["version"] == 2 and v["name"] == "bugs"
    assert v["counts"]["train"] == {"ants": 4, "bees": 6 + 1 + 2} and v["counts"]["val"] == parent["counts"]["val"]
    assert v["num_images"] == parent["num_images"] - 1 + 2
    ch = v["changes"]
    assert ch["n_relabelled"] == 1 and ch["n_removed"] == 1 and ch["n_added"] == 2  # bee -> bees is no change
    moved = ch["relabelled"][0]
    assert moved["file"] == ant and moved["from"] == "ants" and moved["to"] == "bees"
    assert moved["new_file"] == "train/bees/" + ant.rsplit("/", 1)[1]
    assert ch["removed"] == [gone] and sorted(ch["added"]) == sorted(
        f"train/bees/new_{f.name}" for f in sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))[20:22])

    vroot = settings.data_dir / _row(app, v["id"]).path
    after = _tree(vroot)
    assert _tree(root) == before, "the parent changed"
    assert gone not in after and ant not in after and after[moved["new_file"]] == before[ant]
    for f in files:
        if f not in (ant, gone):
            assert after[f] == before[f]
            assert (vroot / f).stat().st_ino == (root / f).stat().st_ino, f"{f} was copied, not shared"
    assert (vroot / moved["new_file"]).stat().st_ino == (root / ant).stat().st_ino

    # a version of the version: number 3 of the family; the uploads were used up
    r = c.post(f"/api/v1/datasets/{v['id']}/versions", headers=h, json={"remove": [moved["new_file"]]})
    assert r.status_code == 201 and r.json()["version"] == 3 and r.json()["parent_id"] == v["id"], r.text
    assert c.head(f"/api/v1/uploads/{uid}", headers={**h, "Tus-Resumable": "1.0.0"}).status_code == 404
    # the parent cannot go while versions share its images; the newest first, then the rest
    r = c.delete(f"/api/v1/datasets/{parent['id']}", headers=h)
    assert r.status_code == 409 and f"dataset {v['id']}" in r.json()["error"]["message"], r.text
    for ds_id in (v["id"] + 1, v["id"], parent["id"]):
        assert c.delete(f"/api/v1/datasets/{ds_id}", headers=h).status_code == 204
    assert not root.exists() and not vroot.exists()


def test_bad_changes_are_refused_naming_them_and_nothing_is_written(tmp_path):
    c, app, settings, h = _site(tmp_path)
    parent = _upload(c, h)
    root = settings.data_dir / _row(app, parent["id"]).path
    files = sorted(_tree(root))
    folders = sorted(settings.datasets_dir.iterdir())

    def refused(body: dict, *words: str) -> dict:
        r = c.post(f"/api/v1/datasets/{parent['id']}/versions", headers=h, json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        err = r.json()["error"]
        for w in words:
            assert w in err["message"], (w, err["message"])
        assert sorted(settings.datasets_dir.iterdir()) == folders
        with app.state.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Dataset)) == 1
        return err

    err = refused({"relabel": {"train/ants/nope.jpg": "bees"}, "remove": ["val/wasps/x.jpg", files[0]]},
                  "2 files not in dataset", "train/ants/nope.jpg", "val/wasps/x.jpg", "train/<class>/<file>")
    assert sorted(err["details"][0]["files"]) == ["train/ants/nope.jpg", "val/wasps/x.jpg"]
    refused({"relabel": {files[0]: "wasps"}}, "an unknown class in relabel: 'wasps'", "ants, bees", "uploads")
    refused({"relabel": {files[0]: "bees"}, "remove": [files[0]]}, "both relabelled and removed", files[0])
    refused({}, "no changes")
    # an upload laid out otherwise (class folders only, while the dataset has train/ and val/)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("bees/x.jpg", (HYMENOPTERA / "val" / "bees").glob("*.jpg").__next__().read_bytes())
        zf.writestr("ants/y.jpg", (HYMENOPTERA / "val" / "ants").glob("*.jpg").__next__().read_bytes())
    refused({"uploads": [tus_send(c, h, buf.getvalue())]}, "class folders only", "train/<class>/ and val/<class>/")
    # an added file the dataset already holds
    clash = io.BytesIO()
    with zipfile.ZipFile(clash, "w") as zf:
        zf.writestr(files[0], (root / files[0]).read_bytes())
    refused({"uploads": [tus_send(c, h, clash.getvalue())]}, "already holds", files[0], "rename the new images")
    # the doctor judges the version whole: removing every ant of train leaves one class there
    ants = [f for f in files if f.startswith("train/ants/")]
    r = c.post(f"/api/v1/datasets/{parent['id']}/versions", headers=h, json={"remove": ants})
    msg = r.json()["error"]["message"]
    assert r.status_code == 422 and msg.startswith("these changes would leave no usable dataset: it is refused")
    assert "at least 2 classes" in msg and "only in hymenoptera/val/: ants" in msg, msg
    assert sorted(settings.datasets_dir.iterdir()) == folders
    # a viewer of the workspace may not; another user does not even see it
    with app.state.sessions() as s:
        bob = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "bob"), "t")}
    r = c.post(f"/api/v1/datasets/{parent['id']}/versions", headers=bob, json={"remove": [files[0]]})
    assert r.status_code == 404


def test_in_object_storage_a_version_stores_only_what_changed(s3_bucket, tmp_path):  # noqa: F811
    c, app, settings, h = _site(tmp_path / "web", storage_url=s3_bucket["url"])
    parent = _upload(c, h)
    pkey, inner = storage.dataset_key(_row(app, parent["id"]).path)
    uid = tus_send(c, h, _extra_zip())
    files = sorted(_tree(storage.materialize_tree(storage.for_settings(settings), pkey, settings).joinpath(*inner)))
    r = c.post(f"/api/v1/datasets/{parent['id']}/versions", headers=h,
               json={"relabel": {files[0]: "bees"}, "uploads": [uid]})
    assert r.status_code == 201, r.text
    v = r.json()
    vkey, vinner, stored = _stored(s3_bucket, app, v["id"])
    inside = "/".join(vinner)
    assert stored == sorted([f"{vkey}/{storage.SHARED}"] + [f"{vkey}/{inside}/{a}" for a in v["changes"]["added"]])
    # another host (an empty data directory) gets the whole version: shared files from the parent's keys
    other = settings.model_copy(update={"data_dir": tmp_path / "worker"})
    got = storage.materialize_tree(storage.for_settings(other), vkey, other).joinpath(*vinner)
    web = storage.materialize_tree(storage.for_settings(settings), vkey, settings).joinpath(*vinner)
    assert _tree(got) == _tree(web) and len(_tree(got)) == v["num_images"]
    assert v["changes"]["relabelled"][0]["new_file"] in _tree(got)


def test_a_versions_unchanged_images_are_hashed_not_decoded_again_and_new_ones_are(tmp_path, monkeypatch):
    """The doctor decodes only what a version adds; the images it shares with its parent (which the doctor
    passed there) are hashed and their headers read: a version of 200,000 images costs seconds, not minutes."""
    from app.services import doctor

    c, app, settings, h = _site(tmp_path)
    parent = _upload(c, h)
    files = sorted(_tree(settings.data_dir / _row(app, parent["id"]).path))
    decoded: dict[str, bool] = {}
    real = doctor.check_image

    def spy(path: str, max_pixels: int, decode: bool = True):
        decoded[Path(path).name] = decode
        return real(path, max_pixels, decode)

    monkeypatch.setattr(doctor, "check_image", spy)
    uid = tus_send(c, h, _extra_zip())
    r = c.post(f"/api/v1/datasets/{parent['id']}/versions", headers=h,
               json={"relabel": {files[0]: "bees"}, "remove": [files[1]], "uploads": [uid]})
    assert r.status_code == 201, r.text
    new = {n for n, d in decoded.items() if d}
    assert new == {f"new_{f.name}" for f in sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))[20:22]}
    assert len(decoded) == len(files) - 1 + 2 and Path(files[0]).name in decoded  # the relabelled one too
    assert r.json()["num_images"] == len(files) - 1 + 2


def test_a_header_only_check_still_hashes_and_finds_bombs_and_sizes(tmp_path):
    from PIL import Image

    from app.services import doctor

    p = tmp_path / "a.jpg"
    Image.effect_noise((40, 30), 64).save(p)
    full, quick = doctor.check_image(str(p), 10**6), doctor.check_image(str(p), 10**6, decode=False)
    assert (quick.sha256, quick.mode, quick.size, quick.error) == (full.sha256, "L", (40, 30), None)
    assert doctor.check_image(str(p), 1000, decode=False).bomb == "40x30 pixels"
    p.write_bytes(p.read_bytes()[:-300])  # the header survives, the pixels do not
    assert doctor.check_image(str(p), 10**6).error and not doctor.check_image(str(p), 10**6, decode=False).error


def test_in_object_storage_a_multilabel_version_stores_only_its_labels_csv(s3_bucket, tmp_path):  # noqa: F811
    """A labels.csv dataset's version in a real S3 server: its only own object is the rewritten labels.csv (and
    the list of what it shares); another host gets the images from the parent's keys, less the removed one."""
    import csv as csv_module

    from support import multilabel
    from support.web import folder_zip

    c, app, settings, h = _site(tmp_path / "web", storage_url=s3_bucket["url"])
    built = multilabel.build(tmp_path / "ml", n_images=30, tile=16)
    r = c.post("/api/v1/datasets", headers=h, data={"name": "tags"},
               files={"file": ("tags.zip", folder_zip(built), "application/zip")})
    assert r.status_code == 201, r.text
    parent = r.json()
    with open(built / "labels.csv", newline="") as f:
        rows = list(csv_module.reader(f))[1:]
    (f0, _), (f1, _) = rows[0], rows[1]
    r = c.post(f"/api/v1/datasets/{parent['id']}/versions", headers=h,
               json={"relabel": {f0: "hand"}, "remove": [f1]})
    assert r.status_code == 201, r.text
    v = r.json()
    vkey, vinner, stored = _stored(s3_bucket, app, v["id"])
    inside = "/".join(vinner)
    assert stored == sorted([f"{vkey}/{storage.SHARED}", f"{vkey}/{inside}/labels.csv".replace("//", "/")])
    other = settings.model_copy(update={"data_dir": tmp_path / "worker"})
    got = storage.materialize_tree(storage.for_settings(other), vkey, other).joinpath(*vinner)
    tree = _tree(got)
    assert f1 not in tree and f0 in tree and len([k for k in tree if k != "labels.csv"]) == v["num_images"] == 29
    with open(got / "labels.csv", newline="") as f:
        labels = {row[0]: row[1] for row in list(csv_module.reader(f))[1:]}
    assert labels[f0] == "hand" and f1 not in labels and len(labels) == 29
