"""Evaluation, downloads in each format and predictions through the API, with a real worker and a real
inference service (`graft inference`) in their own processes."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.stack import GRAFT, TINY_RUN, build_stack, close_stack

from app.main import create_app
from app.services import auth
from worker.engine.predict import Predictor

pytestmark = pytest.mark.e2e  # starts real servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_slice):
    root = tmp_path_factory.mktemp("inference")
    stack = build_stack("inference", root, None, None, export_formats=None)  # every format
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(stack.settings.data_dir))
    log = open(root / "inference.log", "wb")
    proc = subprocess.Popen([str(GRAFT), "inference", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        pytest.fail("graft inference did not start:\n" + (root / "inference.log").read_text())
    settings = stack.settings.model_copy(update={"inference_url": url})
    client = TestClient(create_app(settings), headers=dict(stack.client.headers))
    with stack.log_on_failure():
        ds = stack.upload(tiny_slice)
        job = stack.submit(ds["id"], **TINY_RUN)
        stack.wait(job["id"], "succeeded")
    yield stack, client, job["id"], tiny_slice
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    client.close()
    close_stack(stack)


def test_evaluation_and_confusion_picture(served):
    stack, client, jid, _ = served
    ev = client.get(f"/api/v1/jobs/{jid}/evaluation").json()
    assert ev["classes"] == ["ants", "bees"] and ev["images"] == 6
    cm = np.array(ev["confusion_matrix"])
    assert cm.sum() == 6 and cm.trace() / 6 == pytest.approx(ev["accuracy"])
    assert set(ev["per_class"]) == {"ants", "bees"} and ev["top_k"] == {}
    assert len(ev["mistakes"]) == 6 - cm.trace()
    confidences = [m["confidence"] for m in ev["mistakes"]]
    assert confidences == sorted(confidences, reverse=True)
    for m in ev["mistakes"]:
        r = client.get(m["image_url"])
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "JPEG"
    png = client.get(ev["confusion_matrix_png"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    formats = {e["format"]: e for e in ev["exports"]}
    assert set(formats) >= {"pytorch", "model_card", "torchscript", "onnx", "onnx_fp16", "onnx_int8", "openvino"}
    for name in ("onnx", "torchscript", "openvino", "onnx_fp16"):  # the fp32 ones and fp16 pass their checks here
        e = formats[name]
        assert e["ok"], e
        assert e["parity"]["pixels_max_abs_prob_diff"] <= e["tolerance"]["max_pixels_prob_diff"], e
        assert e["size_bytes"] > 0 and e["latency_ms"] > 0, e


def test_downloads_in_every_format_agree(served, tmp_path):
    """Each offered export, downloaded, runs in its own runtime on raw uint8 images (of their own sizes, not the
    training size) and gives the API's probabilities within the tolerance its check allowed."""
    from worker.engine.export_formats import runner

    stack, client, jid, data = served
    checks = {e["format"]: e for e in client.get(f"/api/v1/jobs/{jid}/evaluation").json()["exports"]}
    card = json.loads(client.get(f"/api/v1/jobs/{jid}/model", params={"format": "model_card"}).content)
    assert card["classes"] == ["ants", "bees"] and card["preprocessing"]["image_size"] == 64
    assert card["input"]["dtype"] == "uint8" and card["input"]["layout"].startswith("NHWC")
    imgs = sorted((data / "val").glob("*/*.jpg"))
    sent = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in imgs]
    api = client.post(f"/api/v1/jobs/{jid}/predict", files=sent, data={"top_k": "2"}).json()["results"]
    want = np.array([[next(t["probability"] for t in r["top"] if t["class"] == c) for c in card["classes"]]
                     for r in api])
    raws = [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in imgs]
    assert len({r.shape for r in raws}) > 1 and all(r.shape[:2] != (64, 64) for r in raws)
    tried = []
    for fmt, e in checks.items():
        if fmt in ("pytorch", "model_card"):
            continue
        r = client.get(f"/api/v1/jobs/{jid}/model", params={"format": fmt})
        if not e["ok"]:
            assert r.status_code == 409, (fmt, r.status_code)
            continue
        assert r.status_code == 200, (fmt, r.text)
        path = tmp_path / f"model.{fmt}"
        path.write_bytes(r.content)
        run = runner(fmt, path)
        got = np.concatenate([run(x[None])[1] for x in raws])
        assert np.abs(got - want).max() <= e["tolerance"]["max_prob_diff"], (fmt, np.abs(got - want).max())
        tried.append(fmt)
    assert {"onnx", "torchscript", "openvino"} <= set(tried), tried
    assert client.get(f"/api/v1/jobs/{jid}/model", params={"format": "exe"}).status_code == 422


def test_predict_through_the_api_matches_the_model_and_isolates_bad_images(served, tmp_path):
    stack, client, jid, data = served
    imgs = sorted((data / "val").glob("*/*.jpg"))[:3]
    payload = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in imgs]
    payload.insert(1, ("files", ("broken.jpg", imgs[0].read_bytes()[:200], "image/jpeg")))
    payload.append(("files", ("notes.txt", b"hello", "text/plain")))
    r = client.post(f"/api/v1/jobs/{jid}/predict", files=payload, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["file"] for x in res] == [imgs[0].name, "broken.jpg", imgs[1].name, imgs[2].name, "notes.txt"]
    assert "error" in res[1] and "broken.jpg" in res[1]["error"] and "error" in res[4]
    model = stack.settings.data_dir / "runs" / str(jid) / "model.pt"
    local = Predictor(model).predict(imgs, top_k=2)
    for api, mine in zip([res[0], res[2], res[3]], local):
        assert [t["class"] for t in api["top"]] == [t["class"] for t in mine["top"]]
        assert api["top"][0]["probability"] == pytest.approx(mine["top"][0]["probability"], abs=1e-5)
    # a second call is served by the cached model
    assert client.post(f"/api/v1/jobs/{jid}/predict", files=payload[:1]).status_code == 200


def test_calibration_abstention_and_heatmaps_through_the_api(served):
    """The worker's run fitted a temperature and an operating point; predictions say when they abstain, the
    operating point an editor sets is the one they use, and explain=true adds a heatmap at the image's size."""
    stack, client, jid, data = served
    ev = client.get(f"/api/v1/jobs/{jid}/evaluation").json()
    cal, ab = ev["calibration"], ev["abstain"]
    assert 0.05 <= cal["temperature"] <= 20 and 0 <= cal["ece_after"] <= 1 and ab["curve"] and ev["ood"]
    png = client.get(ev["reliability_png"])
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    imgs = sorted((data / "val").glob("*/*.jpg"))[:2]
    payload = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in imgs]
    res = client.post(f"/api/v1/jobs/{jid}/predict", params={"explain": "true"}, files=payload).json()["results"]
    for r, p in zip(res, imgs):
        assert isinstance(r["abstained"], bool) and r["ood_score"] is not None
        heat = Image.open(io.BytesIO(base64.b64decode(r["heatmap_png"])))
        assert heat.size == Image.open(p).size and heat.mode == "L"
    assert all("heatmap_png" not in r for r in client.post(f"/api/v1/jobs/{jid}/predict", files=payload).json()["results"])
    try:
        # at 1.0 every answer abstains (no calibrated probability reaches 1); at 0 only the OOD check could
        assert client.put(f"/api/v1/jobs/{jid}/operating-point", json={"confidence_threshold": 1.0}).status_code == 200
        res = client.post(f"/api/v1/jobs/{jid}/predict", files=payload).json()["results"]
        assert all(r["abstained"] and r["abstain_reason"] for r in res), res
        assert client.put(f"/api/v1/jobs/{jid}/operating-point", json={"confidence_threshold": 0.0}).status_code == 200
        res = client.post(f"/api/v1/jobs/{jid}/predict", files=payload).json()["results"]
        assert all(r["abstained"] == (r.get("abstain_reason") == "unlike the training images") for r in res), res
    finally:
        client.put(f"/api/v1/jobs/{jid}/operating-point", json={"confidence_threshold": ab["threshold"]})


def test_predict_errors_are_clear(served):
    stack, client, jid, data = served
    img = next((data / "val").glob("*/*.jpg"))
    assert client.post(f"/api/v1/jobs/{jid}/predict", data={"x": "1"}).status_code == 400
    with stack.sessions() as s:
        other = auth.create_user(s, "stranger")
        token = auth.create_token(s, other, "t")
    r = client.post(f"/api/v1/jobs/{jid}/predict", headers={"Authorization": f"Bearer {token}"},
                    files=[("files", (img.name, img.read_bytes(), "image/jpeg"))])
    assert r.status_code == 404
    for path in ("evaluation", "confusion_matrix.png", "mistakes/0.jpg", "model?format=onnx"):
        assert client.get(f"/api/v1/jobs/{jid}/{path}", headers={"Authorization": f"Bearer {token}"}).status_code == 404
    no_service = TestClient(create_app(stack.settings), headers=dict(stack.client.headers))
    r = no_service.post(f"/api/v1/jobs/{jid}/predict", files=[("files", (img.name, img.read_bytes(), "image/jpeg"))])
    assert r.status_code == 503 and "graft inference" in r.json()["error"]["message"]


# ---------------------------------------------------------------- a multi-label model (issue 16)


@pytest.fixture(scope="module")
def multilabel_job(served, tmp_path_factory):
    """A labels.csv dataset of 2x2 grids of real photos, uploaded and trained through the same stack."""
    from support import multilabel

    stack, client, _, _ = served
    data = multilabel.build(tmp_path_factory.mktemp("grids"), 60, tile=24, rates={"hand": 0.3})
    from support.web import folder_zip

    r = client.post("/api/v1/datasets", data={"name": "grids"}, files={"file": ("g.zip", folder_zip(data), "application/zip")})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["task"] == "multilabel" and ds["classes"] == ["ant", "bee", "hand"], ds
    with stack.log_on_failure():
        job = stack.submit(ds["id"], strategy="features", epochs=20, image_size=48, batch_size=16)
        stack.wait(job["id"], "succeeded")
    return job["id"], data


def test_a_multilabel_model_through_the_api(served, multilabel_job):
    stack, client, _, _ = served
    jid, data = multilabel_job
    ev = client.get(f"/api/v1/jobs/{jid}/evaluation").json()
    assert ev["task"] == "multilabel" and set(ev["metrics"]) == {"micro_f1", "macro_f1", "mAP", "subset_accuracy"}
    assert set(ev["per_label"]) == set(ev["thresholds"]) == {"ant", "bee", "hand"}
    assert ev["metrics"]["mAP"] > 0.6, ev["metrics"]
    assert len(ev["scores"]) == len(ev["y_true"]) == ev["images"]
    if ev["label_mistakes"]:
        assert client.get(f"/api/v1/jobs/{jid}/mistakes/0.jpg").headers["content-type"] == "image/jpeg"

    files = sorted((data / "images").glob("*.jpg"))[:3]
    sent = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    r = client.post(f"/api/v1/jobs/{jid}/predict", files=sent)
    assert r.status_code == 200, r.text
    want = Predictor(stack.settings.data_dir / f"runs/{jid}/model.pt").predict(files)
    for got, ref in zip(r.json()["results"], want):
        assert set(got["probabilities"]) == {"ant", "bee", "hand"}
        assert [x["class"] for x in got["labels"]] == [x["class"] for x in ref["labels"]]
        for c, p in got["probabilities"].items():
            assert p == pytest.approx(ref["probabilities"][c], abs=1e-5)

    # the exported ONNX model gives the API's sigmoid probabilities, from the raw image
    from worker.engine.export_formats import runner

    onnx_file = stack.settings.data_dir / "onnx-ml.onnx"
    r = client.get(f"/api/v1/jobs/{jid}/model", params={"format": "onnx"})
    assert r.status_code == 200, r.text
    onnx_file.write_bytes(r.content)
    run = runner("onnx", onnx_file)
    for f, res in zip(files, r_results := client.post(f"/api/v1/jobs/{jid}/predict", files=sent).json()["results"]):
        got = run(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8)[None])[1][0]
        assert np.abs(got - np.array([res["probabilities"][c] for c in ("ant", "bee", "hand")])).max() < 0.05
    assert len(r_results) == 3
    card = json.loads(client.get(f"/api/v1/jobs/{jid}/model", params={"format": "model_card"}).content)
    assert card["task"] == "multilabel" and set(card["thresholds"]) == {"ant", "bee", "hand"}

    # an editor moves the thresholds: every label given, then predictions follow; a bad label is refused
    r = client.put(f"/api/v1/jobs/{jid}/thresholds", json={"thresholds": {"ant": 0.0, "bee": 0.0, "hand": 0.0}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["thresholds"] == {"ant": 0.0, "bee": 0.0, "hand": 0.0} and out["set_by"]
    assert out["metrics"]["micro_f1"] < ev["metrics_at_half"]["micro_f1"] + 0.5  # (every label given: a real figure)
    got = client.post(f"/api/v1/jobs/{jid}/predict", files=sent).json()["results"]
    assert all(len(g["labels"]) == 3 for g in got)
    assert client.get(f"/api/v1/jobs/{jid}/evaluation").json()["label_thresholds"]["thresholds"]["hand"] == 0.0
    multiclass = served[2]
    r = client.put(f"/api/v1/jobs/{multiclass}/thresholds", json={"thresholds": {"ants": 0.3}})
    assert r.status_code == 409 and "operating-point" in r.text
    bad = client.put(f"/api/v1/jobs/{jid}/thresholds", json={"thresholds": {"cat": 0.3}})
    assert bad.status_code == 422 and "cat" in bad.text and "ant" in bad.text
    assert client.put(f"/api/v1/jobs/{jid}/thresholds", json={"thresholds": {"ant": 1.5}}).status_code == 422
    card = json.loads(client.get(f"/api/v1/jobs/{jid}/model", params={"format": "model_card"}).content)
    assert card["thresholds"] == {"ant": 0.0, "bee": 0.0, "hand": 0.0}
    r = client.put(f"/api/v1/jobs/{jid}/thresholds", json={"thresholds": ev["thresholds"]})
    assert r.status_code == 200

    # the job page: figures, a threshold slider per label, the gallery of missed and false labels
    with stack.sessions() as s:
        login = auth.create_token(s, auth.ensure_user(s, "queue-inference"), "pages", kind="login")
    page = TestClient(create_app(stack.settings))
    assert page.get(f"/login?token={login}", follow_redirects=False).status_code == 303
    html = page.get(f"/jobs/{jid}").text
    assert 'id="label-table"' in html and html.count('class="ml-threshold"') == 3 and "/static/multilabel.js" in html
    assert 'id="ml-thresholds-save"' in html and "Set by queue-inference" in html and 'id="ml-map"' in html
    assert ('id="label-mistakes-gallery"' in html) == bool(ev["label_mistakes"])
    page.close()
