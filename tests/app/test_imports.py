"""Datasets imported without uploading: from a bucket on a real S3 server (SeaweedFS) and from a server
folder under GRAFT_IMPORT_ROOTS (admins only); bad sources answer 400/403 naming what is wrong, and leave
nothing behind."""
from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from support.paths import HYMENOPTERA
from support.web import make_app

from app.db.models import Dataset
from app.services import auth

pytestmark = pytest.mark.e2e


def _slice(dst, n_train=3, n_val=2):
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("ants", "bees"):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                shutil.copy2(f, dst / split / cls / f.name)
    return dst


def _site(tmp_path, **kw):
    app, settings = make_app(tmp_path / "data", f"sqlite:///{tmp_path / 'g.db'}", **kw)
    with app.state.sessions() as s:
        admin = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "root", admin=True), "t")}
        user = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "bob"), "t")}
    return TestClient(app), app, settings, admin, user


def _count(app) -> int:
    with app.state.sessions() as s:
        return s.scalar(select(func.count()).select_from(Dataset))


def test_import_from_a_bucket(s3_bucket, tmp_path):  # noqa: F811
    src = _slice(tmp_path / "src")
    client, b, prefix = s3_bucket["client"], s3_bucket["bucket"], s3_bucket["prefix"]
    for p in src.rglob("*.jpg"):
        client.upload_file(str(p), b, f"{prefix}/bees-set/{p.relative_to(src).as_posix()}")
    c, app, settings, admin, user = _site(tmp_path)
    r = c.post("/api/v1/datasets", headers=user, json={"source": f"s3://{b}/{prefix}/bees-set/"})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == "bees-set" and ds["classes"] == ["ants", "bees"]
    assert ds["counts"] == {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 2}}
    # a bucket that does not exist, an empty prefix: 400 naming the bucket and the reason, nothing kept
    r = c.post("/api/v1/datasets", headers=user, json={"source": "s3://no-such-bucket-here/x/"})
    assert r.status_code == 400 and "no-such-bucket-here" in r.json()["error"]["message"], r.text
    r = c.post("/api/v1/datasets", headers=user, json={"source": f"s3://{b}/{prefix}/nothing/"})
    assert r.status_code == 400 and "no objects" in r.json()["error"]["message"]
    assert _count(app) == 1 and len(list(settings.datasets_dir.iterdir())) == 1
    # both uploads and a source, or neither: refused with what to send
    r = c.post("/api/v1/datasets", headers=user, json={"source": "s3://x/", "uploads": ["a"]})
    assert r.status_code == 422
    r = c.post("/api/v1/datasets", headers=user, json={"name": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_import_from_a_server_folder_is_for_admins_and_stays_inside_the_roots(tmp_path):
    allowed = tmp_path / "srv"
    src = _slice(allowed / "bees")
    elsewhere = _slice(tmp_path / "private")
    c, app, settings, admin, user = _site(tmp_path, import_roots=[allowed])
    r = c.post("/api/v1/datasets", headers=user, json={"source": str(src)})
    assert r.status_code == 403 and "only admins" in r.json()["error"]["message"]
    r = c.post("/api/v1/datasets", headers=admin, json={"source": str(src), "name": "server bees"})
    assert r.status_code == 201 and r.json()["num_images"] == 10, r.text
    for bad, said in ((str(elsewhere), "outside the folders"), (f"{src}/../../private", "'..'"),
                      (str(allowed / "missing"), "not a folder")):
        r = c.post("/api/v1/datasets", headers=admin, json={"source": bad})
        assert r.status_code == 400 and said in r.json()["error"]["message"], (bad, r.text)
    (src / "train" / "ants" / "link.jpg").symlink_to(elsewhere / "train" / "ants" / sorted(
        p.name for p in (elsewhere / "train" / "ants").iterdir())[0])
    r = c.post("/api/v1/datasets", headers=admin, json={"source": str(src)})
    assert r.status_code == 400 and "symbolic link" in r.json()["error"]["message"]
    assert _count(app) == 1 and len(list(settings.datasets_dir.iterdir())) == 1
    # with no roots configured, nothing can be imported
    c2, app2, _, admin2, _ = _site(tmp_path / "other")
    r = c2.post("/api/v1/datasets", headers=admin2, json={"source": str(src)})
    assert r.status_code == 400 and "GRAFT_IMPORT_ROOTS" in r.json()["error"]["message"]
