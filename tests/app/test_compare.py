"""Run comparison: the bootstrap intervals against known cases, the per-image predictions the engine stores,
GET /api/v1/jobs/compare over real databases (SQLite and PostgreSQL) with its errors, the /compare page and
the dashboard's picker, and a comparison of two jobs trained for real by the worker's code."""
from __future__ import annotations

import io
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support.db import db_url  # noqa: F401  (the parametrized sqlite/postgres fixture)

from app.core.errors import BadRequest
from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import Dataset, EpochMetric, Job
from app.main import create_app
from app.services import auth
from app.services import compare as cmp
from domain.evaluate import evaluation, predictions, val_set_id

Z95 = 1.959963984540054


# ---------------------------------------------------------------- the statistics, against known cases


def binomial_quantile(n: int, p: float, q: float) -> float:
    """The exact q-quantile of Binomial(n, p) / n: what a percentile bootstrap of an accuracy converges to."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if cdf >= q - 1e-12:
            return k / n
    return 1.0


@pytest.mark.parametrize("k,n", [(135, 150), (143, 153), (60, 100), (900, 1000), (41, 50)])
def test_accuracy_interval_matches_the_exact_bootstrap_and_the_normal_approximation(k, n):
    p = k / n
    lo, hi = cmp.accuracy_interval(k, n)
    # the percentile bootstrap of an accuracy is the quantiles of Binomial(n, p) / n; 10,000 resamples land
    # within one image of the exact ones
    assert lo == pytest.approx(binomial_quantile(n, p, 0.025), abs=1 / n + 1e-9)
    assert hi == pytest.approx(binomial_quantile(n, p, 0.975), abs=1 / n + 1e-9)
    # and, away from 0% and 100%, match the normal approximation p ± 1.96 sqrt(p(1-p)/n) to about an image
    half = Z95 * math.sqrt(p * (1 - p) / n)
    assert lo == pytest.approx(p - half, abs=1.5 / n + 0.002)
    assert hi == pytest.approx(p + half, abs=1.5 / n + 0.002)
    assert lo < p < hi


def test_intervals_are_deterministic_with_the_seed():
    assert cmp.accuracy_interval(143, 153) == cmp.accuracy_interval(143, 153)
    a, b = np.arange(150) % 7 != 0, np.arange(150) % 5 != 0
    assert cmp.paired_difference(a, b) == cmp.paired_difference(a, b)
    assert cmp.independent_difference(120, 150, 130, 150) == cmp.independent_difference(120, 150, 130, 150)
    # another seed moves the bounds by an image at most
    lo, hi = cmp.accuracy_interval(143, 153, seed=1)
    lo0, hi0 = cmp.accuracy_interval(143, 153)
    assert abs(lo - lo0) <= 1 / 153 + 1e-9 and abs(hi - hi0) <= 1 / 153 + 1e-9


def test_accuracy_interval_edges():
    assert cmp.accuracy_interval(0, 0) == (0.0, 0.0)
    assert cmp.accuracy_interval(20, 20) == (1.0, 1.0)  # never wrong in any resample
    assert cmp.accuracy_interval(0, 20) == (0.0, 0.0)


def test_paired_bootstrap_equals_resampling_the_images():
    """Drawing the four kinds of image (both right, only A, only B, both wrong) from a multinomial is the
    bootstrap that resamples image indices: checked against the direct implementation."""
    rng = np.random.default_rng(3)
    n = 150
    a = rng.random(n) < 0.85
    b = a.copy()
    flip = rng.choice(n, 14, replace=False)
    b[flip] = ~b[flip]
    d = cmp.paired_difference(a, b)
    idx = np.random.default_rng(11).integers(0, n, size=(10_000, n))
    direct = (b[idx].mean(1) - a[idx].mean(1))
    lo, hi = np.quantile(direct, [0.025, 0.975])
    assert d["difference"] == pytest.approx(b.mean() - a.mean())
    assert d["low"] == pytest.approx(lo, abs=1 / n + 1e-9) and d["high"] == pytest.approx(hi, abs=1 / n + 1e-9)
    assert d["only_baseline_right"] == int((a & ~b).sum()) and d["only_other_right"] == int((~a & b).sum())
    # the paired interval follows the normal approximation of the paired difference
    p10, p01 = (a & ~b).mean(), (~a & b).mean()
    se = math.sqrt((p10 + p01 - (p01 - p10) ** 2) / n)
    assert d["low"] == pytest.approx(d["difference"] - Z95 * se, abs=1.5 / n)
    assert d["high"] == pytest.approx(d["difference"] + Z95 * se, abs=1.5 / n)


def _outcomes(n: int, wrong: range) -> np.ndarray:
    right = np.ones(n, dtype=bool)
    right[list(wrong)] = False
    return right


def test_935_vs_948_on_153_images_is_noise():
    """The issue's example: 93.5% vs 94.8% on ~150 val images cannot be told apart."""
    a = _outcomes(153, range(0, 10))   # 143 right: 93.5%
    b = _outcomes(153, range(5, 13))   # 145 right: 94.8%; disagree on 8 images (5 only A wrong, 3 only B)
    assert round(100 * a.mean(), 1) == 93.5 and round(100 * b.mean(), 1) == 94.8
    d = cmp.paired_difference(a, b)
    assert d["low"] < 0 < d["high"]
    real, sentence = cmp.verdict(d, 3, 5, a.mean(), b.mean())
    assert not real
    assert sentence == (
        "Job 5 scores 94.8% and job 3 93.5% on the same 153 val images. The difference (+1.3 points) is "
        f"within noise: the 95% interval of the difference, {cmp.points(d['low'])} to {cmp.points(d['high'])} "
        "points, includes zero. With 153 val images, differences this small cannot be told apart.")
    # without per-image predictions, from the counts alone: wider, and still noise
    ind = cmp.independent_difference(143, 153, 145, 153)
    assert ind["low"] < d["low"] and ind["high"] > d["high"]
    real, sentence = cmp.verdict(ind, 3, 5, 143 / 153, 145 / 153)
    assert not real and "within noise" in sentence and "includes zero" in sentence
    assert "on 153 val images" in sentence


def test_a_difference_on_many_images_is_real():
    a = _outcomes(150, range(0, 30))    # 80.0%
    b = _outcomes(150, range(28, 38))   # 93.3%: right on 28 images A got wrong, wrong on 8 it got right
    d = cmp.paired_difference(a, b)
    assert d["low"] > 0
    real, sentence = cmp.verdict(d, 3, 5, a.mean(), b.mean())
    assert real
    assert sentence.startswith("Job 5 scores 93.3% and job 3 80.0% on the same 150 val images. "
                               "The difference (+13.3 points) is real: the 95% interval of the difference, +")
    assert sentence.endswith("points, excludes zero, so job 5 is better on images like these.")
    # the other way round: the baseline is the better one
    d = cmp.paired_difference(b, a)
    real, sentence = cmp.verdict(d, 5, 3, b.mean(), a.mean())
    assert real and d["high"] < 0 and "(-13.3 points) is real" in sentence and "so job 5 is better" in sentence
    # from counts alone, 120 vs 140 of 150 is real as well
    assert cmp.independent_difference(120, 150, 140, 150)["low"] > 0


def test_the_same_right_images_is_no_difference():
    a = _outcomes(40, range(0, 4))
    d = cmp.paired_difference(a, a.copy())
    assert (d["difference"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
    real, sentence = cmp.verdict(d, 1, 2, a.mean(), a.mean())
    assert not real and "exactly the same val images right" in sentence


def test_points_formatting():
    assert [cmp.points(x) for x in (0.013, -0.026, 0.0, -0.0001, 0.1334)] == ["+1.3", "-2.6", "0.0", "0.0", "+13.3"]


@pytest.mark.parametrize("raw,expected", [("3,5", [3, 5]), (["3", "5,7"], [3, 5, 7]), (" 3 , 5 ,", [3, 5]),
                                          ("5,3,5", [5, 3]), (",".join(map(str, range(1, 9))), list(range(1, 9)))])
def test_parse_ids(raw, expected):
    assert cmp.parse_ids(raw) == expected


@pytest.mark.parametrize("raw,words", [(None, "no jobs to compare"), ("", "no jobs to compare"),
                                       ("3", "at least 2"), ("3,3", "at least 2"), ("3,x", "'x' is not a job id"),
                                       ("-1,2", "not a job id"), ("1.5,2", "not a job id"), ("١,٢", "not job ids"),
                                       (",".join(map(str, range(1, 10))), "at most 8")])
def test_parse_ids_refuses(raw, words):
    with pytest.raises(BadRequest) as e:
        cmp.parse_ids(raw)
    assert words in e.value.message
    assert "ids=3,5" in e.value.message or "drop some ids" in e.value.message  # how to fix it


# ---------------------------------------------------------------- what the engine stores


def test_predictions_are_in_sorted_file_order_whatever_order_the_run_saw():
    files = ["val/bees/b.jpg", "val/ants/a.jpg", "val/bees/a.jpg", "val/ants/b.jpg"]
    y_true, y_pred = [1, 0, 1, 0], [1, 1, 0, 0]
    p = predictions(y_true, y_pred, files)
    assert p == {"val_set": val_set_id(files), "y_true": [0, 0, 1, 1], "y_pred": [1, 0, 0, 1]}
    perm = [2, 0, 3, 1]
    q = predictions([y_true[i] for i in perm], [y_pred[i] for i in perm], [files[i] for i in perm])
    assert q == p
    assert val_set_id(files) != val_set_id(files[:3]) and len(val_set_id(files)) == 16
    assert all(type(v) is int for v in p["y_true"] + p["y_pred"])


def test_evaluation_report_carries_the_predictions_and_keeps_its_keys():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    rep = evaluation(probs, [0, 0, 1, 1], ["d.jpg", "c.jpg", "b.jpg", "a.jpg"], ["x", "y"])
    assert {"accuracy", "macro_f1", "confusion_matrix", "classes", "per_class", "top_k", "mistakes",
            "images"} <= set(rep)
    assert rep["y_true"] == [1, 1, 0, 0] and rep["y_pred"] == [0, 1, 1, 0]  # a, b, c, d
    assert rep["val_set"] == val_set_id(["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert np.mean(np.array(rep["y_true"]) == np.array(rep["y_pred"])) == rep["accuracy"]
    empty = evaluation(np.zeros((0, 2)), [], [], ["x", "y"])
    assert empty["y_true"] == [] and empty["y_pred"] == []


# ---------------------------------------------------------------- the API over real databases


def report_for(right: np.ndarray, classes=("ants", "bees"), val_set="v1", per_image=True) -> dict:
    """A report as the engine writes it for len(right) val images, half of each class, right where `right`."""
    n = len(right)
    y_true = [0] * (n // 2) + [1] * (n - n // 2)
    y_pred = [t if r else 1 - t for t, r in zip(y_true, right)]
    rep = cmp_report(y_true, y_pred, list(classes))
    if per_image:
        rep.update(val_set=val_set, y_true=y_true, y_pred=y_pred)
    return rep


def cmp_report(y_true, y_pred, classes) -> dict:
    from domain.evaluate import classification_report

    rep = classification_report(y_true, y_pred, classes)
    rep.update(top_k={}, mistakes=[], images=len(y_true))
    return rep


class World:
    def __init__(self, db_url: str, tmp_path: Path):  # noqa: F811
        self.settings = Settings(data_dir=tmp_path / "data", database_url=db_url)
        self.settings.ensure_dirs()
        run_migrations(self.settings.db_url)
        self.app = create_app(self.settings)
        self.client = TestClient(self.app)
        with self.app.state.sessions() as s:
            alice, bob = auth.create_user(s, "alice"), auth.create_user(s, "bob")
            self.alice = {"Authorization": f"Bearer {auth.create_token(s, alice, 't')}"}
            self.bob = {"Authorization": f"Bearer {auth.create_token(s, bob, 't')}"}
            self.alice_id, self.bob_id = alice.id, bob.id
        self.ds = self.dataset(self.alice_id, "ants & bees")
        self.other_ds = self.dataset(self.alice_id, "other")

    def dataset(self, owner: int, name: str) -> int:
        with self.app.state.sessions() as s:
            d = Dataset(owner_id=owner, name=name, path=f"datasets/{name}", classes=["ants", "bees"],
                        counts={"train": {"ants": 10, "bees": 10}, "val": {"ants": 77, "bees": 76}})
            s.add(d)
            s.commit()
            return d.id

    def job(self, report: dict | None, status="succeeded", owner=None, ds=None, epochs=3, **spec) -> int:
        with self.app.state.sessions() as s:
            j = Job(owner_id=owner or self.alice_id, dataset_id=ds or self.ds, status=status,
                    spec={"backbone": "efficientnet_lite0", "strategy": "features", "epochs": epochs, **spec},
                    total_epochs=epochs)
            if report is not None:
                j.result = {"status": "completed", "val_acc": report["accuracy"], "val_loss": 0.3,
                            "best_epoch": epochs, "epochs_run": epochs, "seconds": 12.5, "device": "cpu",
                            "report": report}
                j.best_val_acc = report["accuracy"]
            s.add(j)
            s.flush()
            for e in range(1, epochs + 1 if report is not None else 1):
                s.add(EpochMetric(job_id=j.id, epoch=e, phase="head", train_loss=1 / e, train_acc=0.5 + 0.1 * e,
                                  val_loss=1.2 / e, val_acc=0.6 + 0.1 * e, lr=3e-3, images_per_s=100.0,
                                  seconds=4.0, elapsed=4.0 * e, eta=0.0, is_best=e == epochs))
            s.commit()
            return j.id

    def get(self, ids: str, headers=None):
        return self.client.get(f"/api/v1/jobs/compare?ids={ids}", headers=self.alice if headers is None else headers)


@pytest.fixture
def world(db_url, tmp_path) -> World:  # noqa: F811
    w = World(db_url, tmp_path)
    yield w
    w.client.close()


A = _outcomes(153, range(0, 10))   # 93.5%
B = _outcomes(153, range(5, 13))   # 94.8%


def error_of(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert len(body["error"]["message"]) > 20
    return body["error"]


def test_compare_api(world):
    a = world.job(report_for(A), lr=None)
    b = world.job(report_for(B), lr=1e-3, epochs=4)
    r = world.get(f"{a},{b}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["baseline_id"] == a and [j["id"] for j in body["jobs"]] == [a, b]
    assert body["dataset"] == {"id": world.ds, "name": "ants & bees"}
    ja, jb = body["jobs"]
    assert ja["metrics"]["val_acc"] == pytest.approx(143 / 153) and ja["metrics"]["val_images"] == 153
    assert ja["metrics"]["val_acc_low"] < 143 / 153 < ja["metrics"]["val_acc_high"]
    assert (ja["metrics"]["val_acc_low"], ja["metrics"]["val_acc_high"]) == cmp.accuracy_interval(143, 153)
    assert ja["spec"]["strategy"] == "features" and jb["spec"]["lr"] == 1e-3
    assert ja["per_image"] and jb["per_image"] and ja["val_set"] == "v1"
    assert [m["epoch"] for m in ja["curves"]] == [1, 2, 3] and [m["epoch"] for m in jb["curves"]] == [1, 2, 3, 4]
    assert {"val_acc", "val_loss", "train_acc", "train_loss"} <= set(jb["curves"][0])
    # the parameters that differ
    assert body["differing_parameters"] == ["epochs", "lr"]
    lr = next(p for p in body["parameters"] if p["name"] == "lr")
    assert lr["text"] == ["0.003 (default)", "0.001"] and lr["differs"]
    assert not next(p for p in body["parameters"] if p["name"] == "strategy")["differs"]
    # per-class F1 and its difference from the baseline
    rows = {row["class"]: row for row in body["per_class"]}
    assert set(rows) == {"ants", "bees"}
    for c in rows:
        fa, fb = rows[c]["f1"]
        assert fa == pytest.approx(report_for(A)["per_class"][c]["f1"])
        assert rows[c]["diff"] == [None, pytest.approx(fb - fa)]
    # the verdict: paired on the same 153 images, within noise
    (c,) = body["comparisons"]
    assert c["job_id"] == b and c["baseline_id"] == a and c["method"] == "paired" and c["images"] == 153
    assert (c["only_baseline_right"], c["only_other_right"]) == (3, 5)
    assert c["difference"] == pytest.approx(2 / 153) and c["low"] < 0 < c["high"] and c["real"] is False
    assert "The difference (+1.3 points) is within noise" in c["sentence"]
    assert body["bootstrap"] == {"resamples": 10_000, "seed": cmp.SEED, "level": 0.95, "kind": "percentile"}
    # the same again: deterministic
    assert world.get(f"{a},{b}").json() == body
    # the order picks the baseline; repeated ids work too
    r = world.client.get(f"/api/v1/jobs/compare?ids={b}&ids={a}", headers=world.alice)
    assert r.json()["baseline_id"] == b and r.json()["comparisons"][0]["difference"] == pytest.approx(-2 / 153)
    # the job routes are not shadowed
    assert world.client.get(f"/api/v1/jobs/{a}", headers=world.alice).json()["id"] == a


def test_compare_api_several_jobs_real_difference_and_fallbacks(world):
    base = world.job(report_for(_outcomes(150, range(0, 30))))           # 80.0%
    better = world.job(report_for(_outcomes(150, range(28, 38))))        # 93.3%, same images
    legacy = world.job(report_for(_outcomes(150, range(0, 12)), per_image=False))  # an older job: counts only
    other_split = world.job(report_for(_outcomes(150, range(0, 29)), val_set="v2"))
    r = world.get(f"{base},{better},{legacy},{other_split}")
    assert r.status_code == 200, r.text
    comps = {c["job_id"]: c for c in r.json()["comparisons"]}
    assert comps[better]["method"] == "paired" and comps[better]["real"] and comps[better]["low"] > 0
    assert "is real" in comps[better]["sentence"] and f"so job {better} is better" in comps[better]["sentence"]
    assert comps[legacy]["method"] == "independent" and "per-image predictions" in comps[legacy]["reason"]
    assert (comps[legacy]["low"], comps[legacy]["high"]) == pytest.approx(
        (cmp.independent_difference(120, 150, 138, 150)["low"], cmp.independent_difference(120, 150, 138, 150)["high"]))
    assert comps[other_split]["method"] == "independent" and "different images" in comps[other_split]["reason"]
    assert not comps[other_split]["real"] and "within noise" in comps[other_split]["sentence"]
    jobs = {j["id"]: j for j in r.json()["jobs"]}
    assert jobs[legacy]["per_image"] is False and jobs[legacy]["val_set"] is None


def test_compare_api_errors(world):
    a, b = world.job(report_for(A)), world.job(report_for(B))
    queued = world.job(None, status="queued")
    failed = world.job(None, status="failed")
    elsewhere = world.job(report_for(B), ds=world.other_ds)
    bobs_ds = world.dataset(world.bob_id, "bob's")
    bobs = world.job(report_for(B), owner=world.bob_id, ds=bobs_ds)
    for ids, words in [("", "no jobs to compare"), (str(a), "at least 2"), (f"{a},{a}", "at least 2"),
                       ("a,b", "not job ids"), (f"{a},{b},x", "'x' is not a job id"),
                       (",".join(str(i) for i in range(1, 10)), "at most 8")]:
        e = error_of(world.get(ids), 400)
        assert e["code"] == "bad_request" and words in e["message"], (ids, e)
    e = error_of(world.client.get("/api/v1/jobs/compare", headers=world.alice), 400)
    assert "ids=3,5" in e["message"]
    for ids, missing in [(f"{a},424242", 424242), (f"{a},{bobs}", bobs), (f"{a},99999999999", 99999999999)]:
        e = error_of(world.get(ids), 404)
        assert e["code"] == "not_found" and f"job {missing} not found" in e["message"]
        assert "bob" not in e["message"]
    e = error_of(world.get(f"{a},{queued},{failed}"), 409)
    assert f"job {queued} is queued" in e["message"] and f"job {failed} is failed" in e["message"]
    assert "wait for them to finish or leave them out" in e["message"]
    assert e["details"]["not_succeeded"] == [{"job_id": queued, "status": "queued"},
                                             {"job_id": failed, "status": "failed"}]
    e = error_of(world.get(f"{a},{elsewhere}"), 422)
    assert "different datasets" in e["message"] and "compare jobs of one dataset" in e["message"]
    # bob sees none of alice's jobs; nobody without a token sees anything
    e = error_of(world.get(f"{a},{b}", headers=world.bob), 404)
    assert e["code"] == "not_found"
    e = error_of(world.get(f"{a},{b}", headers={}), 401)
    assert e["code"] == "unauthorized"
    assert world.client.get("/api/v1/jobs/compare", headers={}).status_code == 401


def test_compare_is_described_in_the_openapi_schema(world):
    op = world.app.openapi()["paths"]["/api/v1/jobs/compare"]["get"]
    assert {"200", "400", "401", "404", "409", "422"} <= set(op["responses"])
    assert op["parameters"][0]["name"] == "ids"


# ---------------------------------------------------------------- the pages


def browser(world: World, name: str) -> TestClient:
    c = TestClient(world.app)
    with world.app.state.sessions() as s:
        token = auth.create_token(s, auth.ensure_user(s, name), "x", kind="login")
    assert c.get(f"/login?token={token}", follow_redirects=False).status_code == 303
    return c


def test_compare_page(world):
    a = world.job(report_for(A))
    b = world.job(report_for(B), lr=1e-3)
    c = world.job(report_for(_outcomes(153, range(0, 40))), strategy="full")
    alice = browser(world, "alice")
    r = alice.get(f"/compare?ids={a},{b},{c}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    sentence = world.get(f"{a},{b},{c}").json()["comparisons"][0]["sentence"]
    assert sentence in html and "within noise" in html and "is real" in html
    assert "ants &amp; bees" in html  # escaped
    assert 'id="compare-data"' in html and "/static/compare.js" in html and "/static/vendor/chart.umd.min.js" in html
    assert 'id="cmp-acc-chart"' in html and 'id="cmp-loss-chart"' in html
    assert re.search(r'<tr class="param differs" data-param="lr">', html)
    assert re.search(r'<tr class="param differs" data-param="strategy">', html)
    assert '<tr class="param" data-param="backbone">' in html
    assert 'data-class="ants"' in html and 'data-class="bees"' in html
    assert "<script>" not in html  # no inline scripts: data in a JSON block, code in static files
    # every link on it resolves
    for url in set(re.findall(r'(?:href|src)="(/[^"]*)"', html)):
        assert alice.get(url, follow_redirects=False).status_code < 400, url
    # repeated ids, as the dashboard's form sends them without JavaScript
    assert alice.get(f"/compare?ids={a}&ids={b}").status_code == 200
    # without ids: how to pick jobs
    r = alice.get("/compare")
    assert r.status_code == 200 and "Pick the jobs to compare" in r.text
    # errors as pages that say what to do
    r = alice.get(f"/compare?ids={a}")
    assert r.status_code == 400 and "Comparing needs at least 2 different jobs" in r.text
    r = alice.get(f"/compare?ids={a},{world.job(None, status='running')}")
    assert r.status_code == 409 and "is running" in r.text
    r = alice.get(f"/compare?ids={a},424242")
    assert r.status_code == 404 and "job 424242" in r.text
    # someone else's jobs are not found; signed out, the sign-in page
    bob = browser(world, "bob")
    r = bob.get(f"/compare?ids={a},{b}")
    assert r.status_code == 404 and "ants &amp; bees" not in r.text and sentence not in r.text
    stranger = TestClient(world.app)
    r = stranger.get(f"/compare?ids={a},{b}")
    assert r.status_code == 401 and "graft serve" in r.text and sentence not in r.text
    for client in (alice, bob, stranger):
        client.close()


def test_dashboard_offers_comparison(world):
    a = world.job(report_for(A))
    alice = browser(world, "alice")
    html = alice.get("/").text
    assert 'id="compare-form"' in html and 'action="/compare"' in html and "/static/compare_pick.js" in html
    assert re.search(r'<button type="submit" class="button button-small" id="compare-btn" disabled>', html)
    assert f'<input type="checkbox" name="ids" value="{a}" form="compare-form" data-dataset="{world.ds}"' in html
    assert alice.get("/static/compare_pick.js").status_code == 200
    alice.close()


# ---------------------------------------------------------------- two jobs trained for real


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*.jpg")):
            zf.write(f, f.relative_to(folder).as_posix())
    return buf.getvalue()


@pytest.mark.slow
def test_compare_two_jobs_trained_by_the_worker(tmp_path: Path, tiny_slice: Path):
    """Two tiny real runs on one uploaded dataset, executed by the worker's code in this process: their
    reports carry per-image predictions on the same val images, so the API pairs them image by image."""
    from worker.runjob import execute

    w = World(f"sqlite:///{tmp_path / 'real.db'}", tmp_path)
    try:
        r = w.client.post("/api/v1/datasets", headers=w.alice, data={"name": "tiny"},
                          files={"file": ("tiny.zip", _zip(tiny_slice), "application/zip")})
        assert r.status_code == 201, r.text
        ds = r.json()["id"]
        ids = []
        for params in ({"epochs": 2}, {"epochs": 1, "lr": 0.01}):
            r = w.client.post("/api/v1/jobs", headers=w.alice, json={
                "dataset_id": ds, "strategy": "features", "image_size": 64, "batch_size": 8, **params})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            assert execute(ids[-1], w.settings) == "succeeded"
        reports = [w.client.get(f"/api/v1/jobs/{i}/evaluation", headers=w.alice).json() for i in ids]
        for rep in reports:
            assert len(rep["y_true"]) == len(rep["y_pred"]) == rep["images"] == 6  # tiny_slice: 3 val per class
            assert sorted(rep["y_true"]) == [0, 0, 0, 1, 1, 1]
            right = np.mean(np.array(rep["y_true"]) == np.array(rep["y_pred"]))
            assert right == pytest.approx(rep["accuracy"])
        assert reports[0]["val_set"] == reports[1]["val_set"] and reports[0]["y_true"] == reports[1]["y_true"]

        r = w.get(",".join(map(str, ids)))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["differing_parameters"] == ["epochs", "lr"]
        (c,) = body["comparisons"]
        assert c["method"] == "paired" and c["images"] == 6
        assert c["low"] <= c["difference"] <= c["high"]
        assert c["difference"] == pytest.approx(reports[1]["accuracy"] - reports[0]["accuracy"])
        assert ("is real" in c["sentence"]) == c["real"] and c["sentence"].startswith(f"Job {ids[1]} scores ")
        assert [len(j["curves"]) for j in body["jobs"]] == [2, 1]
        alice = browser(w, "alice")
        page = alice.get(f"/compare?ids={ids[0]},{ids[1]}")
        assert page.status_code == 200 and c["sentence"].replace("'", "&#39;") in page.text
        alice.close()
    finally:
        w.client.close()


def test_multilabel_jobs_get_micro_f1_and_map_intervals_and_paired_differences():
    """Two multi-label reports on the same 200 val images: one whose scores follow the labels, one noisier."""
    from app.services.compare import _outcomes, multilabel_figures
    from domain import multilabel as ml

    rng = np.random.default_rng(3)
    t = rng.random((200, 3)) < 0.4
    files = [f"images/{i:04d}.jpg" for i in range(200)]
    good = np.clip(t * 0.4 + rng.random((200, 3)) * 0.6, 0, 1)
    bad = np.clip(t * 0.15 + rng.random((200, 3)) * 0.85, 0, 1)
    a, b = (ml.evaluation(p, t, files, ["x", "y", "z"]) for p in (good, bad))
    jobs, diffs = multilabel_figures([a, b], resamples=500)
    for rep, row in zip((a, b), jobs):
        assert row["micro_f1"] == rep["metrics"]["micro_f1"] and row["mAP"] == rep["metrics"]["mAP"]
        assert row["micro_f1_low"] <= row["micro_f1"] <= row["micro_f1_high"] < 1.0
        assert row["mAP_low"] <= row["mAP"] <= row["mAP_high"]
    (d,) = diffs
    assert d["mAP"]["diff"] < 0 and d["mAP"]["high"] < 0 and d["mAP"]["real"], d  # clearly worse, and said so
    assert d["micro_f1"]["low"] <= d["micro_f1"]["diff"] <= d["micro_f1"]["high"]
    same, _ = multilabel_figures([a, a], resamples=200)[1][0]["micro_f1"], None
    assert same["diff"] == 0 and same["low"] == same["high"] == 0 and not same["real"]
    k, n, right = _outcomes(a)  # accuracy: every label of an image right
    assert n == 200 and k / n == pytest.approx(a["metrics"]["subset_accuracy"]) and right is not None
    other = dict(b, val_set="another")
    assert "different images" in multilabel_figures([a, other], resamples=100)[1][0]["reason"]
