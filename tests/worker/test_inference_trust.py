"""The inference service's answers you can trust, in-process: `explain` adds a heatmap at each image's size,
`confidence_threshold` moves the operating point, every result says whether Graft abstains."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from support.heads import features, inputs, model_with_head, pick
from support.paths import HYMENOPTERA

from worker.engine.modelfile import save_model_file
from worker.engine.trust import fit_trust
from worker.inference import create_inference_app

CLASSES = ["ants", "bees"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data = tmp_path_factory.mktemp("inference-data")
    model, pre = model_with_head(2, 64)
    train, _ = pick(HYMENOPTERA / "train", CLASSES, 4)
    val, val_labels = pick(HYMENOPTERA / "val", CLASSES, 4)
    fv = features(model, inputs(val, pre))
    with torch.no_grad():
        logits = model.head(fv)
    fit = fit_trust(logits, val_labels, features(model, inputs(train, pre)), fv, CLASSES)
    save_model_file(data / "model.pt", model, CLASSES, pre, {}, {}, "packaged", trust=fit.state)
    with TestClient(create_inference_app(data)) as client:
        yield client, val, fit.state["ood"]["threshold"]


def _post(client, paths, **fields):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return client.post("/predict", data={"model": "model.pt", **fields}, files=files)


def test_results_carry_abstained_and_the_ood_score(service):
    client, val, ood_threshold = service
    r = _post(client, val[:2])
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        assert isinstance(res["abstained"], bool) and res["ood_score"] >= 0 and "heatmap_png" not in res
    every = _post(client, val[:2], confidence_threshold="1").json()["results"]
    assert all(x["abstained"] for x in every if x["top"][0]["probability"] < 1)
    assert all("below the threshold" in x["abstain_reason"] for x in every if x["ood_score"] <= ood_threshold)
    assert _post(client, val[:1], confidence_threshold="high").status_code == 400
    assert _post(client, val[:1], confidence_threshold="1.5").status_code == 400


def test_explain_adds_a_heatmap_at_the_uploaded_size(service):
    client, val, ood_threshold = service
    r = _post(client, val[:2], explain="true")
    assert r.status_code == 200, r.text
    for path, res in zip(val[:2], r.json()["results"]):
        heat = Image.open(io.BytesIO(base64.b64decode(res["heatmap_png"])))
        assert heat.mode == "L" and heat.size == Image.open(path).size
