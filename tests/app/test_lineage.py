"""Dataset versions on the pages and in the comparison: a version's page shows its lineage and what changed,
offers to retrain the parent's jobs with the same settings, a retrained job names its version and links to
the comparison with the job it repeats, and jobs on two versions of one dataset compare class by class
(jobs on unrelated datasets still do not)."""
from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

from fastapi.testclient import TestClient
from support.web import dataset_zip, make_app

from app.db.models import Dataset, Job
from app.services import auth
from domain.evaluate import classification_report


def _site(tmp_path: Path):
    app, settings = make_app(tmp_path / "data", f"sqlite:///{tmp_path / 'g.db'}")
    with app.state.sessions() as s:
        alice = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "alice"), "t")}
    return TestClient(app), app, settings, alice


def _upload(c: TestClient, h: dict, name: str = "bugs") -> dict:
    r = c.post("/api/v1/datasets", headers=h, data={"name": name},
               files={"file": (f"{name}.zip", dataset_zip({"train": 6, "val": 3}), "application/zip")})
    assert r.status_code == 201, r.text
    return r.json()


def _report(y_true: list[int], y_pred: list[int], val_set: str) -> dict:
    rep = classification_report(y_true, y_pred, ["ants", "bees"])
    rep.update(top_k={}, mistakes=[], images=len(y_true), val_set=val_set, y_true=y_true, y_pred=y_pred)
    return rep


def _job(app, owner_id: int, ds_id: int, report: dict, **spec) -> int:
    with app.state.sessions() as s:
        ds = s.get(Dataset, ds_id)
        j = Job(owner_id=owner_id, workspace_id=ds.workspace_id, dataset_id=ds_id, status="succeeded",
                spec={"backbone": "efficientnet_lite0", "strategy": "features", "epochs": 3, **spec}, total_epochs=3,
                best_val_acc=report["accuracy"],
                result={"status": "completed", "val_acc": report["accuracy"], "val_loss": 0.3, "best_epoch": 3,
                        "epochs_run": 3, "seconds": 2.0, "device": "cpu", "report": report})
        s.add(j)
        s.commit()
        return j.id


def _sign_in(app, c: TestClient, name: str) -> None:
    with app.state.sessions() as s:
        token = auth.create_token(s, auth.ensure_user(s, name), "pages", kind="login")
    assert c.get(f"/login?token={token}", follow_redirects=False).status_code == 303


def test_versions_on_the_pages_retrain_and_compare_across_versions(tmp_path):
    c, app, settings, alice = _site(tmp_path)
    parent = _upload(c, alice)
    with app.state.sessions() as s:
        root = settings.data_dir / s.get(Dataset, parent["id"]).path
    bee = sorted(p.relative_to(root).as_posix() for p in (root / "train" / "bees").glob("*.jpg"))[0]
    r = c.post(f"/api/v1/datasets/{parent['id']}/versions", headers=alice, json={"relabel": {bee: "ants"}})
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["parent_id"] == parent["id"] and child["version"] == 2
    with app.state.sessions() as s:
        alice_id = auth.ensure_user(s, "alice").id

    # a model on the upload, and the same settings retrained on version 2
    y = [0] * 20 + [1] * 20
    old = _job(app, alice_id, parent["id"], _report(y, [0] * 20 + [1] * 12 + [0] * 8, "v1-val"))
    new = _job(app, alice_id, child["id"], _report(y, [0] * 20 + [1] * 19 + [0], "v2-val"))
    other = _job(app, alice_id, child["id"], _report(y, y, "v2-val"), strategy="full")
    assert c.get(f"/api/v1/jobs/{new}", headers=alice).json()["dataset_version"] == 2
    assert c.get(f"/api/v1/jobs/{old}", headers=alice).json()["dataset_version"] == 1

    # the comparison of two versions: per class, unpaired (the val labels changed), saying why
    r = c.get(f"/api/v1/jobs/compare?ids={old},{new}", headers=alice)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(j["id"], j["dataset_id"], j["dataset_version"]) for j in body["jobs"]] == [
        (old, parent["id"], 1), (new, child["id"], 2)]
    (cmp,) = body["comparisons"]
    assert cmp["method"] == "independent" and "different versions of the dataset (v1 and v2)" in cmp["reason"]
    bees = next(row for row in body["per_class"] if row["class"] == "bees")
    assert bees["diff"][1] is not None and bees["diff"][1] > 0  # bees got better
    # an unrelated dataset still does not compare
    unrelated = _upload(c, alice, "other")
    elsewhere = _job(app, alice_id, unrelated["id"], _report(y, y, "o"))
    r = c.get(f"/api/v1/jobs/compare?ids={old},{elsewhere}", headers=alice)
    assert r.status_code == 422 and "versions of one dataset" in r.json()["error"]["message"]

    # the pages (signed in with a cookie, as a browser)
    _sign_in(app, c, "alice")
    page = c.get(f"/datasets/{child['id']}", headers={}).text
    assert 'id="lineage"' in page and 'id="version-badge"' in page
    family = re.search(r'<ol class="lineage" id="lineage-family">(.*?)</ol>', page, re.S)
    assert family and f'href="/datasets/{parent["id"]}"' in family.group(1) and "(this one)" in family.group(1)
    changes = re.search(r'<p id="lineage-changes">(.*?)</p>', page, re.S)
    assert changes and re.sub(r"\s+", " ", re.sub("<[^>]+>", "", changes.group(1))).strip().endswith(
        "1 relabelled, 0 removed, 0 added.")
    assert f"<code>{bee}</code>: bees → <strong>ants</strong>" in page
    # the parent's succeeded job can be retrained here with its very settings
    button = re.search(r"data-retrain='([^']*)' data-from-job=\"(\d+)\"", page)
    assert button and int(button.group(2)) == old, page
    spec = json.loads(unescape(button.group(1)))
    assert spec["backbone"] == "efficientnet_lite0" and spec["strategy"] == "features"
    r = c.post("/api/v1/jobs", headers=alice, json={**spec, "dataset_id": child["id"]})  # what lineage.js sends
    assert r.status_code == 201, r.text
    assert r.json()["dataset_version"] == 2 and r.json()["spec"]["epochs"] == 3
    # the parent's page lists its version and will not be deleted before it
    page = c.get(f"/datasets/{parent['id']}", headers={}).text
    assert f'href="/datasets/{child["id"]}"' in page and 'id="delete-versions-first"' in page
    assert 'id="retrain-list"' not in page  # nothing to retrain on the upload itself
    # the retrained job's page names its version and opens the comparison with the job it repeats
    page = c.get(f"/jobs/{new}", headers={}).text
    assert 'id="earlier-run"' in page and f'href="/compare?ids={old},{new}"' in page
    assert "version 2" in page
    assert 'id="earlier-run"' not in c.get(f"/jobs/{old}", headers={}).text
    assert f"/compare?ids={old},{other}" not in c.get(f"/jobs/{other}", headers={}).text  # another strategy
    page = c.get(f"/compare?ids={old},{new}", headers={})
    assert page.status_code == 200 and 'id="row-dataset-version"' in page.text
    # bob sees none of it
    with app.state.sessions() as s:
        bob = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "bob"), "t")}
    assert c.get(f"/api/v1/jobs/compare?ids={old},{new}", headers=bob).status_code == 404
