"""The server-rendered pages: each renders for a signed-in browser, none 500s for a stranger, other users'
objects are 404, thumbnails are JPEGs, every internal link resolves, CSRF guards cookie-authenticated
writes, and the strategy advice follows the dataset's size."""
from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.paths import HYMENOPTERA, ROOT
from support.web import csrf_of, dataset_zip

from app.core.settings import Settings
from app.db.migrate import run_migrations
from app.db.models import Artifact, EpochMetric, Job
from app.main import create_app
from app.services import auth
from domain.advice import recommend_strategy

# ---------------------------------------------------------------- helpers


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src", "action") and v and v.startswith("/") and not v.startswith("//"):
                self.urls.add(v)


def internal_links(html: str) -> set[str]:
    p = Links()
    p.feed(html)
    return p.urls


def sign_in(app, client: TestClient, name: str) -> None:
    with app.state.sessions() as s:
        user = auth.ensure_user(s, name)
        token = auth.create_token(s, user, "x", kind="login")
    r = client.get(f"/login?token={token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "graft_session" in client.cookies


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"the shared dataset {HYMENOPTERA} is missing")
    settings = Settings(data_dir=tmp_path_factory.mktemp("pages"))
    settings.ensure_dirs()
    run_migrations(settings.db_url)
    app = create_app(settings)
    alice, bob, stranger = TestClient(app), TestClient(app), TestClient(app)
    sign_in(app, alice, "alice")
    sign_in(app, bob, "bob")
    csrf = csrf_of(alice.get("/").text)
    r = alice.post("/api/v1/datasets", files={"file": ("hym.zip", dataset_zip({"train": 4, "val": 4}), "application/zip")},
                   data={"name": "ants & bees <b>"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    ds = r.json()
    r = alice.post("/api/v1/jobs", json={"dataset_id": ds["id"], "epochs": 3}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    queued = r.json()
    r = alice.post("/api/v1/jobs", json={"dataset_id": ds["id"], "epochs": 3, "strategy": "two_stage"},
                   headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    done = r.json()
    _finish_job(app, settings, done["id"], ds["classes"])
    r = alice.post("/api/v1/jobs", json={"dataset_id": ds["id"], "epochs": 3}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    old = r.json()
    _finish_job(app, settings, old["id"], ds["classes"], legacy=True)
    yield {"app": app, "settings": settings, "alice": alice, "bob": bob, "stranger": stranger, "csrf": csrf,
           "ds": ds, "queued": queued, "done": done, "old": old}
    for c in (alice, bob, stranger):
        c.close()


def _val_file(cls: str, n: int) -> str:
    """The n-th val image of a class as the fixture's dataset holds it, relative to the dataset's root."""
    return f"val/{cls}/{sorted((HYMENOPTERA / 'val' / cls).glob('*.jpg'))[n].name}"


# the most confident mistake first, as the worker stores them
MISTAKES = [{"file": _val_file("bees", 1), "true": "bees", "predicted": "ants", "confidence": 0.9312,
             "true_class_probability": 0.0688},
            {"file": _val_file("ants", 2), "true": "ants", "predicted": "bees", "confidence": 0.6121,
             "true_class_probability": 0.3879}]
TORCHSCRIPT_ERROR = "TorchScript export failed: could not trace the model <scripted>"


def _finish_job(app, settings: Settings, job_id: int, classes: list[str], legacy: bool = False) -> None:
    """Make a job look trained: epoch rows, a result with a report, a model file. The full job also has
    what newer workers record: top-k and mistakes in the report, exports (an ONNX file that passed its
    parity check, a TorchScript export that failed), the model card and a confusion matrix picture.
    A legacy job has the model file and the older report only."""
    out = settings.runs_dir / str(job_id)
    out.mkdir(parents=True, exist_ok=True)
    files = {"model": ("model.pt", b"not really a model")}
    if not legacy:
        buf = io.BytesIO()
        Image.new("RGB", (120, 100), (30, 160, 60)).save(buf, "PNG")
        files.update(onnx=("model.onnx", b"not really onnx"),
                     model_card=("model_card.json", b'{"format": "graft.model_card/1", "classes": ["ants", "bees"]}'),
                     confusion_matrix=("confusion_matrix.png", buf.getvalue()))
    with app.state.sessions() as s:
        for e in range(1, 4):
            s.add(EpochMetric(job_id=job_id, epoch=e, phase="head" if e == 1 else "full", train_loss=1.0 / e,
                              train_acc=0.5 + 0.1 * e, val_loss=1.1 / e, val_acc=0.45 + 0.1 * e, lr=3e-3,
                              images_per_s=120.0, seconds=2.5, elapsed=2.5 * e, eta=2.5 * (3 - e), is_best=e == 3))
        for kind, (name, data) in files.items():
            (out / name).write_bytes(data)
            s.add(Artifact(job_id=job_id, kind=kind, path=str((out / name).relative_to(settings.data_dir)),
                           size=len(data), sha256="0" * 64))
        job = s.get(Job, job_id)
        job.status, job.progress, job.current_epoch, job.best_val_acc = "succeeded", 1.0, 3, 0.75
        report = {"accuracy": 0.75, "macro_f1": 0.733, "classes": classes, "confusion_matrix": [[3, 1], [1, 3]],
                  "per_class": {classes[0]: {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4},
                                classes[1]: {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}}}
        job.result = {"status": "completed", "val_acc": 0.75, "best_epoch": 3, "epochs_run": 3, "seconds": 7.5,
                      "device": "cpu", "report": report}
        if not legacy:
            report.update(top_k={"top3": 0.875, "top5": 0.9375}, images=8, mistakes=MISTAKES)
            job.result["exports"] = [
                {"format": "pytorch", "ok": True, "error": None, "parity": None},
                {"format": "model_card", "ok": True, "error": None, "parity": None},
                {"format": "torchscript", "ok": False, "error": TORCHSCRIPT_ERROR, "parity": None},
                {"format": "onnx", "ok": True, "error": None,
                 "parity": {"images": 8, "max_abs_prob_diff": 2.384e-07, "top1_agreement": 1.0}}]
        s.commit()


# ---------------------------------------------------------------- pages render


def test_dashboard(env):
    r = env["alice"].get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "Dashboard" in html and 'name="csrf-token"' in html
    assert "ants &amp; bees &lt;b&gt;" in html and "bees <b>" not in html  # names are escaped
    assert f'href="/jobs/{env["queued"]["id"]}"' in html and f'href="/jobs/{env["done"]["id"]}"' in html
    assert "badge-queued" in html and "badge-succeeded" in html
    assert 'action="/logout"' in html and 'name="csrf_token"' in html
    assert 'href="/docs"' in html and 'href="/datasets/new"' in html


def test_empty_states(env):
    html = env["bob"].get("/").text
    assert "No datasets yet" in html and "No jobs yet" in html
    html = env["bob"].get("/jobs/new").text
    assert "No datasets yet" in html


def test_upload_page(env):
    r = env["alice"].get("/datasets/new")
    assert r.status_code == 200
    assert 'id="dropzone"' in r.text and "webkitdirectory" in r.text and "/static/upload.js" in r.text


def test_dataset_page(env):
    ds = env["ds"]
    r = env["alice"].get(f"/datasets/{ds['id']}")
    assert r.status_code == 200
    html = r.text
    for cls in ds["classes"]:
        assert cls in html
    assert f'/datasets/{ds["id"]}/samples/0/0.jpg' in html and f'/datasets/{ds["id"]}/samples/1/3.jpg' in html
    assert f'/datasets/{ds["id"]}/samples/0/4.jpg' not in html  # 4 train images per class: 0..3
    assert f'href="/jobs/new?dataset_id={ds["id"]}"' in html
    assert "features" in html  # 4 per class: the advice is a frozen backbone


def test_thumbnails(env):
    ds, settings = env["ds"], env["settings"]
    r = env["alice"].get(f"/datasets/{ds['id']}/samples/1/2.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content[:3] == b"\xff\xd8\xff"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) <= 160
    cached = list((settings.data_dir / "thumbs").rglob("c1_2.jpg"))
    assert len(cached) == 1
    assert env["alice"].get(f"/datasets/{ds['id']}/samples/1/2.jpg").content == r.content  # from the cache
    for bad in ("2/0.jpg", "0/4.jpg", "0/99.jpg", "x/0.jpg", "0/-1.jpg", "0/..%2F..%2Fgraft.db.jpg"):
        r = env["alice"].get(f"/datasets/{ds['id']}/samples/{bad}")
        assert r.status_code == 404, bad
        assert r.headers["content-type"].startswith("application/json"), bad
        assert r.json()["error"]["code"] == "not_found"
    assert env["bob"].get(f"/datasets/{ds['id']}/samples/0/0.jpg").status_code == 404
    assert env["stranger"].get(f"/datasets/{ds['id']}/samples/0/0.jpg").status_code == 401


def test_job_new_page(env):
    ds = env["ds"]
    r = env["alice"].get(f"/jobs/new?dataset_id={ds['id']}")
    assert r.status_code == 200
    html = r.text
    assert 'value="features" checked' in html and "recommended" in html.lower()
    assert "two_stage" in html and "finetune_last" in html and 'value="full"' in html
    assert 'value="efficientnet_lite0"' in html
    assert "weights not on this server" in html and "graft weights import" in html
    assert 'name="epochs"' in html and "/static/job_new.js" in html
    # an unknown or foreign dataset id: the 404 page, not a 500
    assert env["alice"].get("/jobs/new?dataset_id=9999").status_code == 404
    assert env["alice"].get("/jobs/new?dataset_id=abc").status_code == 404
    assert env["bob"].get(f"/jobs/new?dataset_id={ds['id']}").status_code == 404
    # no dataset id: a picker
    html = env["alice"].get("/jobs/new").text
    assert f'href="/jobs/new?dataset_id={ds["id"]}"' in html


def test_job_page_queued(env):
    job = env["queued"]
    r = env["alice"].get(f"/jobs/{job['id']}")
    assert r.status_code == 200
    html = r.text
    assert "badge-queued" in html and 'id="cancel-btn"' in html and "Download model" not in html
    assert "/static/vendor/chart.umd.min.js" in html and 'id="loss-chart"' in html and 'id="acc-chart"' in html
    assert "No epoch has finished yet" in html
    assert "efficientnet_lite0" in html  # the parameters


def test_job_page_finished(env):
    job = env["done"]
    r = env["alice"].get(f"/jobs/{job['id']}")
    assert r.status_code == 200
    html = r.text
    assert "badge-succeeded" in html and 'id="cancel-btn"' not in html
    assert f'href="/api/v1/jobs/{job["id"]}/model"' in html
    assert html.count('data-epoch="') == 3 and "★" in html
    assert "Confusion matrix" in html and "Precision" in html and "75.0%" in html
    assert '"metrics": [{' in html or '"metrics":[{' in html  # the charts' initial data
    d = env["alice"].get(f"/api/v1/jobs/{job['id']}/model")  # cookie auth works for the download
    assert d.status_code == 200 and d.content == b"not really a model"


def _section(html: str, section_id: str) -> str:
    start = html.index(f'<section class="card" id="{section_id}">')
    return html[start:html.index("</section>", start)]


def test_job_page_evaluation(env):
    jid = env["done"]["id"]
    html = env["alice"].get(f"/jobs/{jid}").text
    ev = _section(html, "evaluation")
    assert f'src="/api/v1/jobs/{jid}/confusion_matrix.png"' in ev
    assert "<details" in ev and 'class="table table-tight confusion"' in ev  # the table, folded below
    assert "87.5%" in ev and "top-3 accuracy" in ev and "93.8%" in ev and "top-5 accuracy" in ev
    # the gallery: most confident mistake first, each with its labels and confidence
    gallery = _section(html, "mistakes")
    items = re.findall(r'<li class="mistake" data-rank="(\d+)".*?</li>', gallery, re.S)
    assert items == ["0", "1"]
    srcs = re.findall(r'<img src="([^"]+)"', gallery)
    assert srcs == [f"/api/v1/jobs/{jid}/mistakes/0.jpg", f"/api/v1/jobs/{jid}/mistakes/1.jpg"]
    first, second = gallery.index("93.1%"), gallery.index("61.2%")
    assert first < second
    assert re.findall(r'class="m-true">(\w+)<', gallery) == ["bees", "ants"]
    assert re.findall(r'class="m-pred">(\w+)<', gallery) == ["ants", "bees"]
    assert "2 mistakes on 8 val images, the most confident first" in " ".join(gallery.split())
    r = env["alice"].get(srcs[0])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff"
    assert env["alice"].get(f"/api/v1/jobs/{jid}/mistakes/2.jpg").status_code == 404
    assert env["bob"].get(srcs[0]).status_code == 404
    png = env["alice"].get(f"/api/v1/jobs/{jid}/confusion_matrix.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_job_page_exports(env):
    c, jid = env["alice"], env["done"]["id"]
    html = c.get(f"/jobs/{jid}").text
    ex = _section(html, "exports")
    links = set(re.findall(r'href="(/api/v1/jobs/\d+/model\?format=\w+)"', ex))
    assert links == {f"/api/v1/jobs/{jid}/model?format={f}" for f in ("pytorch", "onnx", "model_card")}
    # ONNX: its parity figures; TorchScript failed: its error, a failed mark, no download
    onnx = re.search(r'<tr data-format="onnx" data-state="ok">.*?</tr>', ex, re.S).group(0)
    assert "100.00%" in onnx and "2.38e-7" in onnx and "8 val images" in onnx
    ts = re.search(r'<tr data-format="torchscript" data-state="failed">.*?</tr>', ex, re.S).group(0)
    assert "could not trace the model &lt;scripted&gt;" in ts and "badge-failed" in ts and "href=" not in ts
    r = c.get(f"/api/v1/jobs/{jid}/model?format=torchscript")
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/json")
    assert TORCHSCRIPT_ERROR in r.json()["error"]["message"]
    assert c.get(f"/api/v1/jobs/{jid}/model?format=onnx").content == b"not really onnx"
    card = c.get(f"/api/v1/jobs/{jid}/model?format=model_card")
    assert card.status_code == 200 and card.json()["format"] == "graft.model_card/1"


def test_job_page_failed_onnx_export(env):
    """An ONNX export that drifts: marked failed with its figures, never offered for download."""
    app, c, jid = env["app"], env["alice"], env["done"]["id"]
    drift = {"images": 8, "max_abs_prob_diff": 0.0213, "top1_agreement": 0.875}
    error = "the ONNX model drifts from PyTorch: top-1 agreement 0.8750 (needs >= 0.995)"
    with app.state.sessions() as s:
        job = s.get(Job, jid)
        before = job.result
        job.result = {**before, "exports": [e if e["format"] != "onnx" else
                                            {"format": "onnx", "ok": False, "error": error, "parity": drift}
                                            for e in before["exports"]]}
        s.commit()
    try:
        ex = _section(c.get(f"/jobs/{jid}").text, "exports")
        onnx = re.search(r'<tr data-format="onnx" data-state="failed">.*?</tr>', ex, re.S).group(0)
        assert "drifts from PyTorch" in onnx and "87.50%" in onnx and "2.13e-2" in onnx
        assert "href=" not in onnx and "badge-failed" in onnx
        assert "format=onnx" not in ex
        r = c.get(f"/api/v1/jobs/{jid}/model?format=onnx")
        assert r.status_code == 409 and "drifts" in r.json()["error"]["message"]
    finally:
        with app.state.sessions() as s:
            s.get(Job, jid).result = before
            s.commit()


def test_job_page_no_mistakes(env):
    app, jid = env["app"], env["done"]["id"]
    with app.state.sessions() as s:
        job = s.get(Job, jid)
        before = job.result
        job.result = {**before, "report": {**before["report"], "mistakes": [], "accuracy": 1.0,
                                           "confusion_matrix": [[4, 0], [0, 4]]}}
        s.commit()
    try:
        gallery = _section(env["alice"].get(f"/jobs/{jid}").text, "mistakes")
        assert "No mistakes on the 8 val images" in gallery and "<img" not in gallery
    finally:
        with app.state.sessions() as s:
            s.get(Job, jid).result = before
            s.commit()


def test_job_page_legacy_result(env):
    """A job from before the exports: the PyTorch download alone, the matrix as a table, no gallery."""
    jid = env["old"]["id"]
    html = env["alice"].get(f"/jobs/{jid}").text
    ex = _section(html, "exports")
    assert re.findall(r'href="(/api/v1/jobs/\d+/model\?format=\w+)"', ex) == [f"/api/v1/jobs/{jid}/model?format=pytorch"]
    assert 'data-format="onnx"' not in ex and 'data-format="torchscript"' not in ex
    assert "confusion_matrix.png" not in html and 'class="table table-tight confusion"' in html
    assert 'id="mistakes"' not in html
    assert 'id="try-drop"' in html  # the PyTorch model can be tried


def test_try_it_panel(env):
    c, jid = env["alice"], env["done"]["id"]
    html = c.get(f"/jobs/{jid}").text
    panel = _section(html, "try-it")
    assert 'id="try-drop"' in panel and 'type="file"' in panel and "multiple" in panel and 'accept="image/*' in panel
    assert 'id="try-results"' in panel and 'id="try-error"' in panel
    assert '"max_predict_images": 64' in html or '"max_predict_images":64' in html
    js = c.get("/static/job.js").text
    assert "/api/v1/jobs/${data.id}/predict" in js and 'form.append("files"' in js
    assert "FormData" in c.get("/static/app.js").text
    # the panel's request: CSRF-guarded; with no inference service, a 503 whose message the panel shows
    img = (HYMENOPTERA / "val" / "ants").glob("*.jpg").__next__().read_bytes()
    files = [("files", ("a.jpg", img, "image/jpeg"))]
    assert c.post(f"/api/v1/jobs/{jid}/predict", files=files).status_code == 401
    r = c.post(f"/api/v1/jobs/{jid}/predict", files=files, headers={"X-CSRF-Token": env["csrf"]})
    assert r.status_code == 503 and "inference service" in r.json()["error"]["message"]
    # no panel, no exports before success
    html = c.get(f"/jobs/{env['queued']['id']}").text
    assert 'id="try-drop"' not in html and 'id="exports"' not in html


def test_failed_job_shows_error(env):
    app, job_id = env["app"], env["queued"]["id"]
    with app.state.sessions() as s:
        j = s.get(Job, job_id)
        before = (j.status, j.error)
        j.status, j.error = "failed", "out of memory: lower the batch size"
        s.commit()
    try:
        html = env["alice"].get(f"/jobs/{job_id}").text
        assert "badge-failed" in html and "out of memory: lower the batch size" in html
    finally:
        with app.state.sessions() as s:
            j = s.get(Job, job_id)
            j.status, j.error = before
            s.commit()


# ---------------------------------------------------------------- access


@pytest.mark.parametrize("path", ["/", "/datasets/new", "/datasets/1", "/jobs/new", "/jobs/new?dataset_id=1",
                                  "/jobs/1", "/datasets/zzz", "/jobs/zzz"])
def test_signed_out_pages_explain_sign_in(env, path):
    r = env["stranger"].get(path)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("text/html")
    assert "graft serve" in r.text and "graft token create" in r.text


def test_login_page(env):
    c = env["stranger"]
    r = c.get("/login")
    assert r.status_code == 200 and "graft serve" in r.text
    r = c.get("/login?token=graft_nope")
    assert r.status_code == 401 and "does not work" in r.text
    assert env["alice"].get("/login", follow_redirects=False).status_code == 303  # already signed in


def test_other_users_objects_are_404(env):
    ds, job = env["ds"], env["done"]
    for path in (f"/datasets/{ds['id']}", f"/jobs/{job['id']}", f"/jobs/new?dataset_id={ds['id']}"):
        r = env["bob"].get(path)
        assert r.status_code == 404, path
        assert "Not found" in r.text and ds["name"] not in r.text
    for path in ("/datasets/424242", "/jobs/424242", "/datasets/-1", "/jobs/1.5"):
        assert env["alice"].get(path).status_code == 404, path


def test_unknown_page_404(env):
    r = env["alice"].get("/no/such/page", headers={"Accept": "text/html"})
    assert r.status_code == 404 and "text/html" in r.headers["content-type"] and "Page not found" in r.text
    r = env["alice"].get("/no/such/page")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = env["alice"].get("/api/v1/nope", headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")


# ---------------------------------------------------------------- no dead links


def test_no_dead_links(env):
    c = env["alice"]
    ds, queued, done = env["ds"], env["queued"], env["done"]
    pages = ["/", "/datasets/new", f"/datasets/{ds['id']}", "/jobs/new", f"/jobs/new?dataset_id={ds['id']}",
             f"/jobs/{queued['id']}", f"/jobs/{done['id']}", f"/jobs/{env['old']['id']}", "/login?token=bad",
             "/no-such-page", "/docs"]
    checked: dict[str, int] = {}
    for page in pages:
        r = c.get(page, headers={"Accept": "text/html"})
        assert r.status_code < 500, page
        links = internal_links(r.text)
        assert links, page
        for url in links:
            if url in checked:
                continue
            if url == "/logout":  # a form (POST), checked in test_logout
                continue
            resp = c.get(url, follow_redirects=False)
            checked[url] = resp.status_code
            assert resp.status_code not in (404, 405) and resp.status_code < 500, f"{page} links to {url}: {resp.status_code}"
    assert "/static/app.css" in checked and "/static/vendor/chart.umd.min.js" in checked
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in checked
    assert any(u.endswith(".jpg") for u in checked)
    jid = done["id"]
    for url in (f"/api/v1/jobs/{jid}/confusion_matrix.png", f"/api/v1/jobs/{jid}/mistakes/1.jpg",
                f"/api/v1/jobs/{jid}/model?format=onnx", f"/api/v1/jobs/{jid}/model?format=model_card"):
        assert checked.get(url) == 200, url


def test_static_assets_are_local(env):
    root = ROOT
    for p in list((root / "templates").glob("*.html")) + list((root / "static").glob("*.js")):
        text = p.read_text()
        assert not re.search(r"""(src|href)=["']https?://""", text), p
        assert "cdn" not in text.lower(), p
    js = (root / "static" / "vendor" / "chart.umd.min.js").read_text()
    assert "Chart.js v4" in js[:200]
    assert (root / "static" / "vendor" / "chart.js.LICENSE.md").is_file()


def test_api_docs_are_local(env):
    r = env["stranger"].get("/docs")
    assert r.status_code == 200 and "/static/vendor/swagger-ui/swagger-ui-bundle.js" in r.text
    assert not re.search(r"""(src|href)=["']https?://""", r.text) and "cdn" not in r.text.lower()
    assert '"validatorUrl": null' in r.text  # no call to the online validator
    assert env["stranger"].get("/openapi.json").status_code == 200


# ---------------------------------------------------------------- CSRF and writes from the pages


def test_csrf_required_for_cookie_writes(env):
    c, ds = env["alice"], env["ds"]
    body = {"dataset_id": ds["id"], "epochs": 2}
    r = c.post("/api/v1/jobs", json=body)
    assert r.status_code == 401 and "CSRF" in r.json()["error"]["message"]
    r = c.post("/api/v1/jobs", json=body, headers={"X-CSRF-Token": "0" * 40})
    assert r.status_code == 401
    r = c.post("/api/v1/jobs", json=body, headers={"X-CSRF-Token": env["csrf"]})
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    assert c.post(f"/api/v1/jobs/{jid}/cancel").status_code == 401
    r = c.post(f"/api/v1/jobs/{jid}/cancel", headers={"X-CSRF-Token": env["csrf"]})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    html = c.get(f"/jobs/{jid}").text
    assert "badge-cancelled" in html and 'id="cancel-btn"' not in html and 'id="delete-job"' in html
    assert c.delete(f"/api/v1/jobs/{jid}", headers={"X-CSRF-Token": env["csrf"]}).status_code == 204


def test_api_error_message_for_the_form(env):
    r = env["alice"].post("/api/v1/jobs", json={"dataset_id": env["ds"]["id"], "backbone": "resnet50"},
                          headers={"X-CSRF-Token": env["csrf"]})
    assert r.status_code == 422
    assert "graft weights import" in r.json()["error"]["message"]


def test_folder_upload_as_the_page_sends_it(env):
    c = env["alice"]
    files = []
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("ants", "bees"):
            for f in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                files.append(("files", (f"picked/{split}/{cls}/{f.name}", f.read_bytes(), "image/jpeg")))
    r = c.post("/api/v1/datasets", files=files, headers={"X-CSRF-Token": env["csrf"]})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == "picked" and ds["counts"]["train"] == {"ants": 3, "bees": 3}
    assert c.get(f"/datasets/{ds['id']}").status_code == 200
    thumbs = env["settings"].data_dir / "thumbs"
    before = {p.name for p in thumbs.iterdir()} if thumbs.is_dir() else set()
    assert c.get(f"/datasets/{ds['id']}/samples/1/2.jpg").status_code == 200
    assert len({p.name for p in thumbs.iterdir()} - before) == 1
    assert c.delete(f"/api/v1/datasets/{ds['id']}", headers={"X-CSRF-Token": env["csrf"]}).status_code == 204
    assert {p.name for p in thumbs.iterdir()} == before  # deleting the dataset removes its thumbnails


def test_logout(env):
    app = env["app"]
    c = TestClient(app)
    sign_in(app, c, "carol")
    csrf = csrf_of(c.get("/").text)
    r = c.post("/logout", data={"csrf_token": "wrong"}, follow_redirects=False)
    assert r.status_code == 401
    assert c.get("/").status_code == 200  # still signed in
    r = c.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    c.cookies.clear()
    assert c.get("/").status_code == 401
    c.close()


# ---------------------------------------------------------------- advice


def test_recommend_strategy():
    small = recommend_strategy({"train": {"a": 40, "b": 60}, "val": {"a": 10, "b": 10}})
    assert small.strategy == "features" and "50" in small.reason
    assert recommend_strategy({"train": {"a": 150, "b": 150}}).strategy == "features"
    assert recommend_strategy({"train": {"a": 400, "b": 600}}).strategy == "two_stage"
    assert recommend_strategy({"train": {"a": 5000, "b": 3000}}).strategy == "full"
    tiny = recommend_strategy({"train": {"a": 3, "b": 30}})
    assert tiny.strategy == "features" and "smallest class" in tiny.reason
    assert recommend_strategy({}).strategy == "features"  # never raises


SEARCH = {"trials_asked": 3, "best_trial": 1, "best_val_loss": 0.4123, "best_val_acc": 0.8, "seconds": 0.9,
          "timed_out": False, "best_params": {"lr": 2.1e-3, "weight_decay": 3.4e-4, "dropout": 0.11,
                                              "label_smoothing": 0.05},
          "space": {"lr": [1e-5, 0.1, "log"], "weight_decay": [1e-6, 0.1, "log"], "dropout": [0.0, 0.5, "linear"],
                    "label_smoothing": [0.0, 0.2, "linear"]},
          "trials": [
              {"number": 0, "state": "complete", "spec_values": True, "val_loss": 0.5, "val_acc": 0.75, "epochs": 20,
               "best_epoch": 10, "seconds": 0.2,
               "params": {"lr": 3e-3, "weight_decay": 1e-4, "dropout": 0.2, "label_smoothing": 0.0}},
              {"number": 1, "state": "complete", "val_loss": 0.4123, "val_acc": 0.8, "epochs": 25, "best_epoch": 15,
               "seconds": 0.3, "params": {"lr": 2.1e-3, "weight_decay": 3.4e-4, "dropout": 0.11,
                                          "label_smoothing": 0.05}},
              {"number": 2, "state": "pruned", "val_loss": 2.3, "val_acc": 0.1, "epochs": 5, "best_epoch": 5,
               "seconds": 0.1, "params": {"lr": 1.2e-5, "weight_decay": 1e-2, "dropout": 0.4,
                                          "label_smoothing": 0.1}}],
          "lr_find": [{"phase": "unfreeze", "lrs": [1e-7, 1e-5, 1e-3, 1e-1], "losses": [0.7, 0.69, 0.5, 3.0],
                       "lr": 1e-4, "lr_min_loss": 1e-3, "lr_steepest": 2e-4, "rule": "min_loss/10",
                       "diverged": True, "steps": 4, "seconds": 1.5}]}


def test_job_page_shows_the_parameter_search(env):
    app, jid = env["app"], env["done"]["id"]
    assert 'id="search"' not in env["alice"].get(f"/jobs/{jid}").text  # a run without one
    with app.state.sessions() as s:
        job = s.get(Job, jid)
        before = job.result
        job.result = {**before, "search": SEARCH}
        s.commit()
    try:
        html = env["alice"].get(f"/jobs/{jid}").text
        sec = " ".join(_section(html, "search").split())
        assert re.findall(r'<tr data-trial="(\d+)" data-state="(\w+)"', sec) == [
            ("0", "complete"), ("1", "complete"), ("2", "pruned")]
        assert '<tr data-trial="1" data-state="complete" class="best">' in sec and "1 ★" in sec
        assert "3 trials on the cached features (1 pruned)" in sec and "trial <strong>1</strong>'s parameters" in sec
        assert "<code>lr 0.0021</code>" in sec and "(the spec's values)" in sec
        assert 'id="search-lr-chart"' in sec and 'id="search-trial-chart"' in sec
        assert 'id="lr-find-chart-0"' in sec and "phase unfreeze" in sec and "<strong>1.00e-4</strong>" in sec
        assert '"search": {' in html or '"search":{' in html  # the charts' data
    finally:
        with app.state.sessions() as s:
            s.get(Job, jid).result = before
            s.commit()
