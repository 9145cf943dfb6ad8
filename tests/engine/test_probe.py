"""The backbone leaderboard ("probe") and the strategy advisor's measurement, on small real slices: the ranking
puts the pretrained backbone above a random-init one, the linear probe is deterministic, the feature cache is
shared with `features` runs (a second probe is faster with the same numbers, and a training run afterwards
reads the features instead of computing them), the CLI, and the whole path through the API with a real
worker (queued job, progress, leaderboard, advice on the pages)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.recorder import Recorder  # the engine callbacks a run made, recorded

from domain.advice import recommend_strategy
from domain.errors import UnknownBackbone, WeightsUnavailable
from domain.results import ProbeRow
from domain.spec import ProbeSpec, RunSpec
from worker.engine.probe import fit_linear_probe, measure_domain_gap, probe, rank
from worker.engine.runner import run

SIZE = 96  # small images keep these runs fast on 2 CPU cores
LITE0 = "efficientnet_lite0"
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


# ---------------------------------------------------------------- the linear probe


def test_linear_probe_is_deterministic_and_folds_the_standardization():
    g = torch.Generator().manual_seed(0)
    n, d = 60, 300
    y = torch.arange(n) % 3
    centers = torch.randn(3, d, generator=g) * 2
    x = centers[y] + torch.randn(n, d, generator=g) * 3 + 50  # offset and scale: standardization matters
    groups = torch.arange(n) // 2  # two rows per "image"
    a = fit_linear_probe(x, y, 3, groups, seed=0)
    b = fit_linear_probe(x, y, 3, groups, seed=0)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.l2 == b.l2
    assert a.weight.shape == (3, d) and a.bias.shape == (3,) and a.weight.dtype == torch.float32
    assert (a.logits(x).argmax(1) == y).float().mean() > 0.95
    assert a.cv_acc is not None and 0 <= a.cv_acc <= 1
    # more features than rows (fit in the rows' span) and fewer: the same kind of answer
    wide = fit_linear_probe(x[:, :40], y, 3, seed=0)
    assert (wide.logits(x[:, :40]).argmax(1) == y).float().mean() > 0.8
    # one image per class: nothing to cross-validate, still a classifier
    one = fit_linear_probe(x[:3], y[:3], 3, seed=0)
    assert one.cv_acc is None and one.weight.shape == (3, d)


def test_rank_orders_by_accuracy_then_loss_and_puts_failures_last():
    rows = [{"backbone": "a", "val_acc": 0.8, "val_loss": 0.5, "seconds": 1, "error": None},
            {"backbone": "b", "error": "no weights"},
            {"backbone": "c", "val_acc": 0.9, "val_loss": 0.6, "seconds": 9, "error": None},
            {"backbone": "d", "val_acc": 0.9, "val_loss": 0.4, "seconds": 9, "error": None}]
    ranked = rank([ProbeRow.model_validate(r) for r in rows])
    assert [(r.backbone, r.rank) for r in ranked] == [("d", 1), ("c", 2), ("a", 3), ("b", None)]


# ---------------------------------------------------------------- the leaderboard on real images


def test_pretrained_ranks_above_random_init_and_the_cache_is_reused(hymenoptera_slice, tmp_path):
    cache = tmp_path / "cache"
    spec = ProbeSpec(image_size=SIZE, advise=False)
    targets = [(LITE0, False), (LITE0, True)]
    rec = Recorder()
    first = probe(hymenoptera_slice, spec, cache, rec, targets=targets)
    assert first.status == "completed" and first.classes == ["ants", "bees"]
    assert rec.started["counts"] == {"train": {"ants": 16, "bees": 16}, "val": {"ants": 10, "bees": 10}}
    best, rnd = first.rows
    assert (best.backbone, best.pretrained, best.rank) == (LITE0, True, 1)
    assert (rnd.pretrained, rnd.rank) == (False, 2)
    assert best.val_acc > rnd.val_acc and best.val_acc >= 0.7, first.rows  # 0.80 vs 0.45 here
    for r in first.rows:
        assert not r.cached and r.error is None and r.images_per_s > 0
        assert r.seconds >= r.feature_seconds > 0 and r.params > 3_000_000 and r.size_mb > 10
        assert r.image_size == SIZE and r.train_images == 32 and r.val_images == 20
    assert best.weights.startswith("efficientnet-lite0") and rnd.weights == "random-init-seed0"
    # the progress bar only moves forward and ends at the end
    fractions = [p.fraction for p in rec.progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {p.stage for p in rec.progress} >= {"decode", "features", "probe"}
    files = {f: f.stat().st_mtime_ns for f in (cache / "features").glob("*.pt")}
    assert len(files) == 6  # per backbone: val + 2 augmented train views

    # again: every feature from the cache (nothing decoded), the same numbers, faster
    rec2 = Recorder()
    second = probe(hymenoptera_slice, spec, cache, rec2, targets=targets)
    assert [r.cached for r in second.rows] == [True, True]
    key = ("backbone", "pretrained", "rank", "val_acc", "val_loss", "l2", "cv_acc", "params", "size_mb")
    assert [r.model_dump(include=set(key)) for r in second.rows] == [r.model_dump(include=set(key)) for r in first.rows]
    for a, b in zip(first.rows, second.rows):
        assert b.feature_seconds < a.feature_seconds / 5, (a, b)
    assert second.seconds < first.seconds, (first.seconds, second.seconds)
    assert "decode" not in {p.stage for p in rec2.progress}
    assert {f: f.stat().st_mtime_ns for f in (cache / "features").glob("*.pt")} == files

    # a features run with the same settings reads the probe's features instead of computing them
    rec3 = Recorder()
    res = run(RunSpec(strategy="features", epochs=2, image_size=SIZE, batch_size=8), hymenoptera_slice,
              tmp_path / "run", rec3, cache_dir=cache)
    assert res.status == "completed" and res.val_acc is not None
    assert any("read from the cache" in m for m in rec3.messages), rec3.messages
    assert "decode" not in {p.stage for p in rec3.progress}
    assert {f: f.stat().st_mtime_ns for f in (cache / "features").glob("*.pt")} == files


def test_unknown_or_unavailable_backbones_are_refused_before_any_work(hymenoptera_slice, tmp_path):
    with pytest.raises(UnknownBackbone, match="choose one of"):
        probe(hymenoptera_slice, ProbeSpec(backbones=["nope"]), tmp_path)
    from domain.catalog import CATALOG

    missing = [n for n, e in CATALOG.items() if not e.weights_available()]
    if missing:
        with pytest.raises(WeightsUnavailable, match="graft weights import"):
            probe(hymenoptera_slice, ProbeSpec(backbones=[missing[0]]), tmp_path)


def test_a_probe_stops_when_asked(tiny_slice, tmp_path):
    class StopSoon(Recorder):
        def should_stop(self):
            return len(self.progress) >= 2

    rec = StopSoon()
    res = probe(tiny_slice, ProbeSpec(image_size=64), tmp_path / "cache", rec)
    assert res.status == "stopped" and res.measured is None and len(rec.progress) <= 3


def test_the_domain_gap_measurement_feeds_the_advice(tiny_slice, tmp_path):
    rec = Recorder()
    m = measure_domain_gap(tiny_slice, LITE0, tmp_path / "cache", rec, image_size=64, epochs=1)
    assert m.backbone == LITE0 and m.image_size == 64 and m.epochs == 1
    assert m.train_images == 12 and m.val_images == 6
    assert 0 <= m.probe_acc <= 1 and 0 <= m.finetune_acc <= 1
    assert m.gain == pytest.approx(m.finetune_acc - m.probe_acc, abs=1e-6) and m.stderr >= 0
    assert m.finetuned == "stage7"  # the last layer group of EfficientNet-Lite0
    assert {p.stage for p in rec.progress} >= {"train", "val"}
    a = recommend_strategy({"train": {"ants": 6, "bees": 6}}, m.to_json())
    assert a.source == "measured" and a.strategy in ("features", "finetune_last:2")
    assert f"{100 * m.probe_acc:.0f}%" in a.reason


def test_cli_probe_json_with_advice(tiny_slice, tmp_path):
    graft = Path(sys.executable).with_name("graft")
    cmd = [str(graft), "probe", str(tiny_slice), "--backbones", LITE0, "--image-size", "64", "--advise", "--json",
           "--cache-dir", str(tmp_path / "cache")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "GRAFT_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["status"] == "completed" and [r["backbone"] for r in out["rows"]] == [LITE0]
    assert out["rows"][0]["rank"] == 1 and 0 <= out["rows"][0]["val_acc"] <= 1
    assert out["measured"]["image_size"] == 64
    assert out["advice"]["source"] == "measured" and out["advice"]["strategy"] and out["advice"]["reason"]
    bad = subprocess.run([str(graft), "probe", str(tiny_slice), "--backbones", "nope"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown backbone 'nope'" in bad.stderr


# ---------------------------------------------------------------- through the API, with a real worker


@pytest.fixture(scope="module")
def api_stack(tmp_path_factory):
    """The embedded setup (filesystem transport + SQLite) with a real `graft worker` (tests/test_queue.py)."""
    from support.stack import build_stack, close_stack

    stack = build_stack("probe", tmp_path_factory.mktemp("probe-api"), None, None)
    yield stack
    close_stack(stack)


def _sign_in(stack) -> None:
    from app.services import auth

    with stack.sessions() as s:
        user = auth.ensure_user(s, f"queue-{stack.name}")
        token = auth.create_token(s, user, "pages", kind="login")
    r = stack.client.get(f"/login?token={token}", follow_redirects=False)
    assert r.status_code == 303, r.text


@pytest.mark.slow
def test_probe_through_the_api_with_a_real_worker(api_stack, tiny_slice):
    stack = api_stack
    c = stack.client
    with stack.log_on_failure():
        ds = stack.upload(tiny_slice)
        did = ds["id"]
        # nothing yet: a 404 that says how to start one; the advice rests on the size alone
        r = c.get(f"/api/v1/datasets/{did}/probe")
        assert r.status_code == 404 and f"POST /api/v1/datasets/{did}/probe" in r.json()["error"]["message"]
        adv = c.get(f"/api/v1/datasets/{did}/advice").json()
        assert (adv["strategy"], adv["source"]) == ("features", "size") and "Compare backbones" in adv["hint"]
        # bad requests are refused with a message that says how to fix them
        r = c.post(f"/api/v1/datasets/{did}/probe", json={"backbones": ["nope"]})
        assert r.status_code == 422 and "unknown backbone" in r.json()["error"]["message"]
        r = c.post(f"/api/v1/datasets/{did}/probe", json={"image_size": 5})
        assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "image_size"
        assert c.post("/api/v1/datasets/999999/probe", json={}).status_code == 404

        r = c.post(f"/api/v1/datasets/{did}/probe", json={"image_size": 64})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["kind"] == "probe" and job["status"] == "queued" and r.headers["location"] == f"/api/v1/jobs/{job['id']}"
        # resolved: every backbone whose weights are on the server (the three EfficientNet-Lites ship with Graft)
        assert job["spec"]["backbones"] == LITES and job["spec"]["advise"] is True
        # one at a time per dataset: a second click is a 409 naming the running one
        again = c.post(f"/api/v1/datasets/{did}/probe")
        assert again.status_code == 409 and again.json()["error"]["details"] == {"job_id": job["id"]}
        # while it is under way, the pages follow it
        _sign_in(stack)
        html = c.get(f"/datasets/{did}", headers={"Authorization": ""}).text
        assert f'data-job-id="{job["id"]}"' in html and 'id="probe-start"' in html
        assert re.search(r'id="probe-start"\s+disabled>', html), "the button is off while a comparison runs"
        running_page = c.get(f"/jobs/{job['id']}", headers={"Authorization": ""})
        assert running_page.status_code == 200 and 'id="probe-job-data"' in running_page.text
        assert 'id="cancel-btn"' in running_page.text

        done = stack.wait(job["id"], "succeeded")
        assert done["progress"] == 1.0 and done["best_val_acc"] == done["result"]["rows"][0]["val_acc"]
        events = stack.events(job["id"])
        kinds = [e[1] for e in events]
        assert "progress" in kinds and "message" in kinds
        messages = [e[2]["message"] for e in events if e[1] == "message"]
        for name in LITES:
            assert any(m.startswith(f"{name}: ") and "val accuracy" in m for m in messages), messages
        assert [e[2]["status"] for e in events if e[1] == "status"] == ["queued", "running", "succeeded"]

        r = c.get(f"/api/v1/jobs/{job['id']}/evaluation")
        assert r.status_code == 404 and f"/api/v1/datasets/{did}/probe" in r.json()["error"]["message"]
        v = c.get(f"/api/v1/datasets/{did}/probe").json()
        assert v["job"]["id"] == v["result_job_id"] == job["id"] and v["job"]["status"] == "succeeded"
        rows = v["leaderboard"]
        assert sorted(r["backbone"] for r in rows) == LITES and [r["rank"] for r in rows] == [1, 2, 3]
        for row in rows:
            assert (row["pretrained"], row["error"]) == (True, None)
            assert 0 <= row["val_acc"] <= 1 and row["seconds"] > 0 and row["params"] > 0 and row["size_mb"] > 0
        m = v["measured"]
        assert m["backbone"] in LITES and m["image_size"] == 64 and 0 <= m["probe_acc"] <= 1
        a = v["advice"]
        assert a["source"] == "measured" and a["domain"] in ("near", "distant") and a["hint"] is None
        assert a["strategy"] in ("features", "finetune_last:2")  # 6 images per class: little data
        assert f"{100 * m['probe_acc']:.0f}%" in a["reason"]
        assert c.get(f"/api/v1/datasets/{did}/advice").json() == a
        # listed among the dataset's jobs, with its kind
        listed = c.get("/api/v1/jobs", params={"dataset_id": did}).json()
        assert [(j["id"], j["kind"]) for j in listed] == [(job["id"], "probe")]

        # a features job with the same settings reads the probe's features from the cache
        train = stack.submit(did, strategy="features", epochs=1, image_size=64)
        stack.wait(train["id"], "succeeded")
        msgs = [e[2]["message"] for e in stack.events(train["id"]) if e[1] == "message"]
        assert any("read from the cache" in m for m in msgs), msgs

        # the pages: the dataset page shows the leaderboard, the new-job page the measured advice, preselected
        page = c.get(f"/datasets/{did}", headers={"Authorization": ""})
        assert page.status_code == 200
        html = page.text
        assert 'id="leaderboard"' in html and f'data-backbone="{LITE0}"' in html and "Compare again" in html
        assert a["strategy"] in html and "/static/probe.js" in html
        new = c.get(f"/jobs/new?dataset_id={did}", headers={"Authorization": ""}).text
        assert 'data-source="measured"' in new and "best in the comparison" in new
        kind = a["strategy"].split(":")[0]
        assert f'value="{kind}" checked' in new
        probe_page = c.get(f"/jobs/{job['id']}", headers={"Authorization": ""})
        assert probe_page.status_code == 200 and "Backbone comparison" in probe_page.text
        assert 'id="leaderboard"' in probe_page.text and "graft probe DATA_DIR" in probe_page.text
        dash = c.get("/", headers={"Authorization": ""}).text
        assert "compare backbones" in dash

        # a dataset whose only other jobs are comparisons (no models came from them) can be deleted with them
        assert c.delete(f"/api/v1/datasets/{did}").status_code == 409  # the training job's model came from it
        assert c.delete(f"/api/v1/jobs/{train['id']}").status_code == 204
        assert c.delete(f"/api/v1/datasets/{did}").status_code == 204
        assert c.get(f"/api/v1/jobs/{job['id']}").status_code == 404


def test_a_measured_distant_domain_is_preselected_on_the_new_job_page(tmp_path, tiny_slice):
    """Without a worker: a succeeded comparison recorded as a distant domain drives the advice (API and page)."""
    from sqlalchemy import update
    from support.stack import build_stack, close_stack

    from app.db.models import Job

    stack = build_stack("probe-pages", tmp_path, None, None, with_worker=False)
    try:
        c = stack.client
        did = stack.upload(tiny_slice)["id"]
        job = c.post(f"/api/v1/datasets/{did}/probe", json={"advise": True}).json()
        measured = {"backbone": LITE0, "probe_acc": 0.6, "finetune_acc": 0.9, "stderr": 0.05, "val_images": 6}
        row = {"backbone": LITE0, "pretrained": True, "rank": 1, "val_acc": 0.6, "val_loss": 0.7, "seconds": 3.0,
               "feature_seconds": 2.0, "fit_seconds": 0.5, "params": 3373570, "size_mb": 13.7, "cached": False,
               "error": None}
        with stack.sessions() as s:
            s.execute(update(Job).where(Job.id == job["id"]).values(
                status="succeeded", progress=1.0, result={"rows": [row], "measured": measured, "seconds": 9.0}))
            s.commit()
        adv = c.get(f"/api/v1/datasets/{did}/advice").json()
        assert (adv["strategy"], adv["domain"], adv["source"]) == ("finetune_last:2", "distant", "measured")
        assert "60%" in adv["reason"] and "90%" in adv["reason"] and "+30 points" in adv["reason"]
        _sign_in(stack)
        html = c.get(f"/jobs/new?dataset_id={did}", headers={"Authorization": ""}).text
        assert 'value="finetune_last" checked' in html and 'name="finetune_n" value="2"' in html
        assert "Recommended: finetune_last:2" in html and "best in the comparison" in html
        page = c.get(f"/datasets/{did}", headers={"Authorization": ""}).text
        assert "Compare again" in page and "+30 points" in page
        # the user can always override: any strategy is accepted for this dataset
        assert c.post("/api/v1/jobs", json={"dataset_id": did, "strategy": "features"}).status_code == 201
    finally:
        close_stack(stack)


def test_multilabel_data_is_ranked_by_map_and_the_domain_gap_is_measured(tmp_path):
    """On a real multi-label set (2x2 grids of photos, tests/support/multilabel.py): the probe fits one sigmoid per
    label, pretrained features beat random ones on mAP, and the advisor's fine-tune trains with BCE."""
    from support import multilabel

    data = multilabel.build(tmp_path / "grids", 120, tile=32)
    res = probe(data, ProbeSpec(image_size=64, advise=False), tmp_path / "cache", Recorder(),
                targets=[(LITE0, False), (LITE0, True)])
    best, rnd = res.rows
    assert (best.pretrained, best.rank, rnd.rank) == (True, 1, 2), res.rows
    assert best.mAP is not None and rnd.mAP is not None and best.mAP > rnd.mAP + 0.05, res.rows  # 0.94, 0.82 here
    assert 0 <= best.micro_f1 <= 1 and 0 <= best.val_acc <= 1 and best.val_loss > 0
    m = measure_domain_gap(data, LITE0, tmp_path / "cache", Recorder(), image_size=64, epochs=1)
    assert 0 <= m.probe_acc <= 1 and 0 <= m.finetune_acc <= 1 and m.val_images > 0
