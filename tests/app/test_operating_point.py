"""Calibration and abstention in the web app: the evaluation gives the temperature, the ECE before and after and
the operating point with its coverage-accuracy curve, the reliability diagram is served, an editor moves the
operating point (stored with the job, written into its model card) and nobody else can, and the job page shows it."""
from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

from fastapi.testclient import TestClient
from support.web import dataset_zip, make_app

from app.db.models import Artifact, Dataset, Job
from app.services import auth
from domain.evaluate import classification_report


def _png() -> bytes:
    raw = b"\x00\xff\x00\x00"
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


CURVE = [{"threshold": t / 10, "answered": 40 - 3 * t, "coverage": (40 - 3 * t) / 40,
          "accuracy_when_answered": min(1.0, 0.7 + 0.03 * t)} for t in range(11)]
TRUST = {"calibration": {"temperature": 1.8, "ece_before": 0.21, "ece_after": 0.06, "cross_fitted": True,
                         "bins_before": [{"lo": 0.0, "hi": 1.0, "count": 40, "confidence": 0.9, "accuracy": 0.7}],
                         "bins_after": [{"lo": 0.0, "hi": 1.0, "count": 40, "confidence": 0.72, "accuracy": 0.7}]},
         "abstain": {"threshold": 0.3, "coverage": 31 / 40, "accuracy_when_answered": 0.79, "min_coverage": 0.75,
                     "curve": CURVE},
         "ood": {"method": "knn_cosine", "k": 10, "threshold": 0.4, "val_flagged": 0.05,
                 # 10 images of no class: 6 flagged, 4 answered at confidences below
                 "junk": {"images": 10, "flagged": 0.6, "abstained": 0.7, "false_accept_rate": 0.3,
                          "accepted_confidences": [0.2, 0.5, 0.7, 0.9]}}}


def _site(tmp_path: Path):
    app, settings = make_app(tmp_path / "data", f"sqlite:///{tmp_path / 'g.db'}")
    with app.state.sessions() as s:
        alice = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "alice"), "t")}
        bob = {"Authorization": "Bearer " + auth.create_token(s, auth.create_user(s, "bob"), "t")}
    c = TestClient(app)
    r = c.post("/api/v1/datasets", headers=alice, data={"name": "bugs"},
               files={"file": ("bugs.zip", dataset_zip({"train": 6, "val": 3}), "application/zip")})
    assert r.status_code == 201, r.text
    return c, app, settings, alice, bob, r.json()["id"]


def _job(app, settings, ds_id: int, trust: dict | None) -> int:
    y_true = [0] * 20 + [1] * 20
    report = classification_report(y_true, [0] * 14 + [1] * 6 + [1] * 14 + [0] * 6, ["ants", "bees"])
    report.update(top_k={}, mistakes=[], images=40)
    with app.state.sessions() as s:
        ds = s.get(Dataset, ds_id)
        j = Job(owner_id=ds.owner_id, workspace_id=ds.workspace_id, dataset_id=ds_id, status="succeeded",
                spec={"backbone": "efficientnet_lite0", "strategy": "features"}, total_epochs=3,
                result={"status": "completed", "val_acc": 0.7, "report": report,
                        "exports": [{"format": "model_card", "ok": True, "error": None}],
                        **({"trust": trust} if trust else {})})
        s.add(j)
        s.flush()
        run = settings.runs_dir / str(j.id)
        run.mkdir(parents=True, exist_ok=True)
        card = {"backbone": "efficientnet_lite0", "trust": {"temperature": 1.8, "confidence_threshold": 0.3}}
        for kind, name, data in (("model_card", "model_card.json", json.dumps(card).encode()),
                                 ("reliability", "reliability.png", _png())):
            (run / name).write_bytes(data)
            s.add(Artifact(job_id=j.id, kind=kind, path=str((run / name).relative_to(settings.data_dir)),
                           size=len(data), sha256=hashlib.sha256(data).hexdigest()))
        s.commit()
        return j.id


def test_evaluation_operating_point_and_page(tmp_path):
    c, app, settings, alice, bob, ds = _site(tmp_path)
    jid, old = _job(app, settings, ds, TRUST), _job(app, settings, ds, None)
    ev = c.get(f"/api/v1/jobs/{jid}/evaluation", headers=alice).json()
    assert ev["calibration"]["temperature"] == 1.8 and ev["calibration"]["ece_after"] == 0.06
    assert (ev["abstain"]["threshold"], ev["abstain"]["coverage"]) == (0.3, 31 / 40) and len(ev["abstain"]["curve"]) == 11
    assert ev["ood"]["method"] == "knn_cosine" and ev["reliability_png"] == f"/api/v1/jobs/{jid}/reliability.png"
    png = c.get(ev["reliability_png"], headers=alice)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content == _png()
    assert c.get(ev["reliability_png"], headers=bob).status_code == 404
    # a job from before calibration: no such fields, and no operating point to move
    ev_old = c.get(f"/api/v1/jobs/{old}/evaluation", headers=alice).json()
    assert "calibration" not in ev_old and "abstain" not in ev_old and "reliability_png" not in ev_old
    r = c.put(f"/api/v1/jobs/{old}/operating-point", headers=alice, json={"confidence_threshold": 0.5})
    assert r.status_code == 409 and "train it again" in r.json()["error"]["message"]

    # bad input is refused and changes nothing; other users see nothing
    for body in ({"confidence_threshold": 1.5}, {"confidence_threshold": -0.1}, {}, {"confidence_threshold": "x"},
                 {"confidence_threshold": 0.5, "more": 1}):
        r = c.put(f"/api/v1/jobs/{jid}/operating-point", headers=alice, json=body)
        assert r.status_code == 422, (body, r.text)
    assert c.put(f"/api/v1/jobs/{jid}/operating-point", headers=bob, json={"confidence_threshold": 0.5}).status_code == 404
    assert c.put("/api/v1/jobs/424242/operating-point", headers=alice, json={"confidence_threshold": 0.5}).status_code == 404
    assert c.get(f"/api/v1/jobs/{jid}/evaluation", headers=alice).json()["abstain"]["threshold"] == 0.3

    # the editor moves it: the curve's point is stored, the evaluation and the model card follow
    r = c.put(f"/api/v1/jobs/{jid}/operating-point", headers=alice, json={"confidence_threshold": 0.65})
    assert r.status_code == 200, r.text
    op = r.json()
    point = CURVE[6]  # the nearest threshold at or below 0.65
    assert (op["threshold"], op["coverage"], op["accuracy_when_answered"]) == (
        0.65, point["coverage"], point["accuracy_when_answered"])
    assert op["default_threshold"] == 0.3 and op["set_by"] == "alice"
    assert op["false_accept_rate"] == 0.2  # of the 4 unflagged images of no class, 2 are still answered at 0.65
    ab = c.get(f"/api/v1/jobs/{jid}/evaluation", headers=alice).json()["abstain"]
    assert (ab["threshold"], ab["coverage"], ab["default_threshold"]) == (0.65, point["coverage"], 0.3)
    assert ab["false_accept_rate"] == 0.2
    with app.state.sessions() as s:
        art = s.query(Artifact).filter_by(job_id=jid, kind="model_card").one()
        data = (settings.data_dir / art.path).read_bytes()
        assert art.sha256 == hashlib.sha256(data).hexdigest() and art.size == len(data)
    card = json.loads(data)
    assert card["trust"]["confidence_threshold"] == 0.65 and card["trust"]["temperature"] == 1.8
    assert card["trust"]["default_confidence_threshold"] == 0.3 and card["backbone"] == "efficientnet_lite0"
    got = c.get(f"/api/v1/jobs/{jid}/model", params={"format": "model_card"}, headers=alice)
    assert got.status_code == 200 and json.loads(got.content) == card  # what a download gives

    # the job page (signed in with a cookie)
    with app.state.sessions() as s:
        token = auth.create_token(s, auth.ensure_user(s, "alice"), "pages", kind="login")
    assert c.get(f"/login?token={token}", follow_redirects=False).status_code == 303
    html = c.get(f"/jobs/{jid}", headers={}).text
    assert 'id="trust"' in html and 'id="reliability-png"' in html and "/static/trust.js" in html
    assert 'id="threshold-save"' in html and "1.80" in html and "0.210 → 0.060" in html
    assert "Set by alice" in html
    assert 'id="trust-false-accept">20.0%' in html and "of 10 images of no class answered" in html
    assert 'id="trust"' not in c.get(f"/jobs/{old}", headers={}).text
