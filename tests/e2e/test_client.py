"""The Python client (clients/python, `graft_client`) against a live server: the web app on a loopback port
(uvicorn in a thread), a real `graft worker` and a real `graft inference`. A folder uploaded in two resumable
parts (the first one's connection dropped halfway, then resumed from the server's offset), a tiny training run
waited for, its ONNX file downloaded, two images predicted, the server's errors raised as the client's
exceptions, a batch prediction; and the package built and installed offline, on its own."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from support.paths import ROOT
from support.procs import free_port
from support.stack import GRAFT, JOB_TIMEOUT_S, TINY_RUN, build_stack, close_stack
from support.web import served_in_thread

CLIENT = ROOT / "clients" / "python"
sys.path.insert(0, str(CLIENT / "src"))  # the client as a user's code sees it (not installed in the venv)
import graft_client  # noqa: E402
from graft_client import BatchJob, Graft  # noqa: E402

pytestmark = pytest.mark.e2e  # starts real servers

CLASSES = ["ants", "bees"]


class DropFirstPatch(httpx.BaseTransport):
    """A real HTTP transport that logs (method, path) of every request and breaks the connection of the first
    PATCH: only the first half of its body reaches the server, then the client sees a write error."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.log: list[tuple[str, str]] = []
        self.dropped_at: int | None = None
        self.patch_offsets: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.log.append((request.method, request.url.path))
        if request.method == "PATCH":
            self.patch_offsets.append(int(request.headers["Upload-Offset"]))
        if request.method == "PATCH" and self.dropped_at is None:
            body = b"".join(request.stream)  # type: ignore[union-attr]
            half = len(body) // 2
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            cut = httpx.Request("PATCH", request.url, headers=headers, content=body[:half])
            r = self.inner.handle_request(cut)
            r.read()
            r.close()
            assert r.status_code == 204, r.status_code
            self.dropped_at = half
            raise httpx.WriteError("the connection broke off (on purpose)", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def _wait_http(url: str, what: str, log: Path | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} did not start" + (":\n" + log.read_text(errors="replace") if log else ""))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """SQLite + the filesystem queue, a real worker and inference service, the app on a loopback port."""
    from app.main import create_app

    root = tmp_path_factory.mktemp("client")
    # the inference service starts while build_stack waits for the worker (both import torch)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(root / "data"), GRAFT_OFFLINE="1", GRAFT_EXPORT_FORMATS="torchscript,onnx")
    inference_port = free_port()
    with open(root / "inference.log", "wb") as log:
        inference = subprocess.Popen([str(GRAFT), "inference", "--port", str(inference_port)], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stack = build_stack("client", root, None, None)
    try:
        inference_url = f"http://127.0.0.1:{inference_port}"
        _wait_http(inference_url + "/healthz", "graft inference", root / "inference.log")
        app = create_app(stack.settings.model_copy(update={"inference_url": inference_url}))
        token = stack.client.headers["authorization"].removeprefix("Bearer ")
        with served_in_thread(app) as url:
            yield {"url": url, "token": token, "stack": stack, "root": root}
    finally:
        inference.send_signal(signal.SIGTERM)
        try:
            inference.wait(timeout=10)
        except subprocess.TimeoutExpired:
            inference.kill()
            inference.wait(timeout=10)
        close_stack(stack)


@pytest.fixture(scope="module")
def trained(served, tiny_slice):
    """The tiny slice uploaded by the client in two parts (the first PATCH broken off halfway) and a tiny
    features run on it, waited for."""
    transport = DropFirstPatch()
    total = sum(f.stat().st_size for f in tiny_slice.rglob("*") if f.is_file())
    with served["stack"].log_on_failure(), \
            Graft(served["url"], served["token"], progress=False, transport=transport) as g:
        ds = g.upload_dataset(tiny_slice, name="tiny", part_size=int(total * 0.6))
        job = g.train(ds.id, **TINY_RUN)
        queued = job.status
        done = job.wait(timeout=JOB_TIMEOUT_S, poll=0.25)
        yield {"ds": ds, "job": job, "done": done, "queued": queued, "log": transport.log,
               "dropped_at": transport.dropped_at,
               "patch_offsets": transport.patch_offsets, **served}


def test_a_folder_is_uploaded_in_resumable_parts(trained):
    ds, log = trained["ds"], trained["log"]
    creations = [p for m, p in log if m == "POST" and p == "/api/v1/uploads"]
    assert len(creations) == 2, log
    # the first PATCH broke off halfway: the client asked the server where it stood and sent the rest from there
    assert trained["dropped_at"]
    first_patch = next(i for i, (m, _) in enumerate(log) if m == "PATCH")
    assert log[first_patch + 1][0] == "HEAD" and log[first_patch + 2][0] == "PATCH", log
    assert trained["patch_offsets"] == [0, trained["dropped_at"], 0]  # part 1, its rest, part 2 (one PATCH each)
    assert log.index(("POST", "/api/v1/datasets")) > max(i for i, (m, _) in enumerate(log) if m == "PATCH")
    # the dataset as the doctor reported it
    assert isinstance(ds, graft_client.Dataset)
    assert ds.name == "tiny" and ds.classes == CLASSES and ds.num_images == 18
    assert ds.counts == {"train": {"ants": 6, "bees": 6}, "val": {"ants": 3, "bees": 3}}
    assert isinstance(ds.warnings, list) and ds.layout and ds.size_bytes > 0
    with Graft(trained["url"], trained["token"], progress=False) as g:
        assert ds.id in [d.id for d in g.datasets()]
        assert g.dataset(ds.id).classes == CLASSES


def test_train_wait_download_and_predict(trained, tiny_slice, tmp_path, capsys):
    job = trained["job"]
    assert trained["queued"] == "queued"
    assert trained["done"] is job and job.succeeded and job.finished and job.progress == 1.0
    assert job.kind == "train" and job.spec["strategy"] == "features" and job.best_val_acc is not None
    with Graft(trained["url"], trained["token"], progress=False) as g:
        listed = {j.id: j for j in g.jobs()}
        assert listed[job.id].status == "succeeded"
        assert [j.id for j in g.jobs(dataset_id=trained["ds"].id)] == [job.id]
        # wait on a finished job returns at once; the stderr line shows its end (no tqdm needed)
        assert g.job(job.id).wait(progress=True).succeeded
        assert f"job {job.id}" in capsys.readouterr().err
        ev = job.evaluation()
        assert ev.job_id == job.id and ev.classes == CLASSES and ev.images == 6 and ev.accuracy is not None
        onnx_check = next((e for e in ev.exports if e.format == "onnx"), None)
        assert onnx_check is not None and onnx_check.ok, ev.exports
        fmt, suffix = "onnx", ".onnx"
        # the model file, streamed into a folder under the server's name for it, and into a named file
        model_path = job.download(tmp_path, format=fmt)
        assert model_path.parent == tmp_path and model_path.name.endswith(suffix), model_path
        named = job.download(tmp_path / "m" / f"model{suffix}", format=fmt)
        assert named.read_bytes() == model_path.read_bytes() and len(named.read_bytes()) > 10_000
        card = job.download(f"{tmp_path}/card/", format="model_card")  # a str ending in /: a folder
        assert card.parent == tmp_path / "card" and json.loads(card.read_text())["classes"] == CLASSES
        assert not list(tmp_path.rglob("*.part"))
        if onnx_check.ok:
            import onnxruntime as ort

            assert ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_inputs()
        assert [m.epoch for m in job.metrics()][:1] == [1]
        # two images: each its class, probability, abstention and OOD score, top-k in order
        images = [sorted((tiny_slice / "val" / c).glob("*.jpg"))[0] for c in CLASSES]
        preds = g.predict(job.id, images)
        assert [p.file for p in preds] == [i.name for i in images]
        for p in preds:
            assert p.ok and p.label in CLASSES and 0.0 <= (p.probability or -1) <= 1.0
            assert p.top is not None and [t.label for t in p.top] == sorted(CLASSES, key=lambda c: c != p.label)
            assert p.top[0].probability >= p.top[1].probability
            assert isinstance(p.abstained, bool) and p.heatmap_png is None
        assert [p.label for p in job.predict(images[0], top_k=1)] == [preds[0].label]


def test_the_servers_errors_are_raised_with_its_message(trained, tmp_path):
    from sqlalchemy.orm.attributes import flag_modified

    from app.db.models import Job as JobRow

    job, ds, stack = trained["job"], trained["ds"], trained["stack"]
    with Graft(trained["url"], trained["token"], progress=False) as g:
        with pytest.raises(graft_client.NotFound) as e:
            g.job(2_000_000)
        assert e.value.status == 404 and "job 2000000 not found" in e.value.detail and e.value.code == "not_found"
        assert isinstance(e.value, graft_client.GraftError) and "(HTTP 404)" in str(e.value)
        with pytest.raises(graft_client.NotFound):
            g.predict(2_000_000, [__file__])
        # a finished job cannot be cancelled
        with pytest.raises(graft_client.Conflict) as e:
            job.cancel()
        assert e.value.status == 409 and f"job {job.id} already succeeded" in e.value.detail
        # an export that failed its check is not offered: 409 with the server's reason and figures
        with stack.sessions() as s:
            row = s.get(JobRow, job.id)
            exports = [x for x in row.result.get("exports", []) if x.get("format") != "torchscript"]
            row.result = {**row.result, "exports": exports + [{"format": "torchscript", "ok": False, "parity": None,
                                                                "error": "tracing failed (on purpose)"}]}
            flag_modified(row, "result")
            s.commit()
        with pytest.raises(graft_client.Conflict) as e:
            job.download(tmp_path, format="torchscript")
        assert "tracing failed (on purpose)" in e.value.detail and e.value.details["format"] == "torchscript"
        assert not list(tmp_path.iterdir())
        # invalid parameters name the field
        with pytest.raises(graft_client.ValidationError) as e:
            g.train(ds.id, strategy="features", epochs=0)
        assert e.value.status == 422 and "epochs" in e.value.detail
        assert e.value.details and e.value.details[0]["field"] == "epochs"
        with pytest.raises(graft_client.ValidationError):
            job.download(tmp_path, format="no-such-format")
        with pytest.raises(graft_client.NotFound):
            g.train(2_000_000)
        # a job cancelled before it ran: wait raises JobFailed with the job as it ended
        queued = g.train(ds.id, **TINY_RUN)
        queued.cancel()
        with pytest.raises(graft_client.JobFailed) as failed:
            queued.wait(timeout=60, poll=0.2)
        assert failed.value.job.status == "cancelled" and failed.value.job is queued
        assert f"job {queued.id} cancelled" in str(failed.value)
    # a bad token, and no token
    for token in ("graft_not-a-token", ""):
        with Graft(trained["url"], token, progress=False) as bad, pytest.raises(graft_client.AuthError) as e:
            bad.datasets()
        assert e.value.status == 401 and e.value.detail
    # nothing listening
    with Graft(f"http://127.0.0.1:{free_port()}", "t", timeout=2) as gone, \
            pytest.raises(graft_client.ConnectionFailed):
        gone.jobs()


def test_batch_predict(trained, tiny_slice, tmp_path):
    job = trained["job"]
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for c in CLASSES:
        for f in sorted((tiny_slice / "val" / c).glob("*.jpg"))[:2]:
            shutil.copy2(f, folder / f"{c}-{f.name}")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    with trained["stack"].log_on_failure(), Graft(trained["url"], trained["token"], progress=False) as g:
        try:
            batch = g.batch_predict(job.id, folder, top_k=2)
        except graft_client.NotFound as e:
            if "no such page or endpoint" in e.detail:
                pytest.skip("the server has no POST /api/v1/jobs/{id}/batch-predict yet")
            raise
        assert isinstance(batch, BatchJob) and batch.kind == "batch_predict"
        try:
            batch.results()
            assert batch.refresh().finished  # only if it was already done
        except graft_client.Conflict as e:
            assert e.status == 409
        assert batch.wait(timeout=JOB_TIMEOUT_S, poll=0.25) is batch and batch.succeeded
        assert isinstance(g.job(batch.id), BatchJob)
        rows = {r.file.rsplit("/", 1)[-1]: r for r in batch.results()}
        assert set(rows) == {p.name for p in folder.iterdir()}, rows
        assert rows["broken.jpg"].error and not rows["broken.jpg"].ok
        for name, r in rows.items():
            if name == "broken.jpg":
                continue
            assert r.ok and r.label in CLASSES and r.probability is not None and isinstance(r.abstained, bool)
            assert [t.label for t in r.top][:1] == [r.label] and len(r.top) == 2
        csv_path = batch.download_results(f"{tmp_path}/out/")
        assert csv_path.parent == tmp_path / "out" and csv_path.suffix == ".csv", csv_path
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f))
        assert header[:4] == ["file", "label", "probability", "abstained"] and "error" in header
        sorted_zip = batch.download_sorted(tmp_path / "out" / "sorted.zip")
        with zipfile.ZipFile(sorted_zip) as zf:
            tops = {n.split("/")[0] for n in zf.namelist() if not n.endswith("/")}
        assert tops and tops <= set(CLASSES) | {"abstained"}, tops
        # a zip sent as a resumable upload (what a large folder takes), its upload id in the JSON body
        packed = tmp_path / "two.zip"
        with zipfile.ZipFile(packed, "w") as zf:
            for p in sorted(folder.glob("ants-*")):
                zf.write(p, p.name)
        again = g.batch_predict(job.id, packed, via="upload").wait(timeout=JOB_TIMEOUT_S, poll=0.25)
        assert len(again.results()) == 2


def test_batch_predict_speaks_the_contract(tmp_path):
    """The batch-predict requests as the server's contract has them, against a stand-in server (the live one
    is test_batch_predict's): a folder packed into a zip in the multipart field `file` with top_k, or a zip
    sent resumably and named by `upload_id`; 409 while unfinished; the CSV parsed, the sorted zip saved."""
    seen: list[tuple[str, str, bytes]] = []
    state = {"polls": 0, "uploaded": b""}
    csv_text = ("file,label,probability,abstained,top1,p1,top2,p2,error\n"
                "a.jpg,ants,0.91,false,ants,0.91,bees,0.09,\nb.jpg,,,,,,,,b.jpg: not an image\n")

    def job(status: str) -> dict:
        return {"id": 8, "workspace_id": 1, "dataset_id": 1, "kind": "batch_predict", "status": status,
                "progress": 1.0 if status == "succeeded" else 0.0, "spec": {"job_id": 7}, "new_field": "kept"}

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        seen.append((request.method, request.url.path, body))
        path = request.url.path
        if path == "/api/v1/jobs/7/batch-predict":
            return httpx.Response(201, json=job("queued"))
        if path == "/api/v1/uploads" and request.method == "POST":
            assert request.headers["Tus-Resumable"] == "1.0.0" and int(request.headers["Upload-Length"]) > 0
            return httpx.Response(201, json={"id": "f" * 32}, headers={"Location": "/api/v1/uploads/" + "f" * 32})
        if path == "/api/v1/uploads/" + "f" * 32:
            assert request.headers["Upload-Offset"] == str(len(state["uploaded"]))
            state["uploaded"] += body
            return httpx.Response(204, headers={"Upload-Offset": str(len(state["uploaded"]))})
        if path == "/api/v1/jobs/8":
            state["polls"] += 1
            return httpx.Response(200, json=job("running" if state["polls"] < 2 else "succeeded"))
        if path == "/api/v1/jobs/8/results.csv":
            if state["polls"] < 2:
                return httpx.Response(409, json={"error": {"code": "conflict", "message": "job 8 is running: its "
                                                           "results come when it has finished", "details": None}})
            return httpx.Response(200, text=csv_text, headers={"Content-Type": "text/csv"})
        if path == "/api/v1/jobs/8/results.zip":
            return httpx.Response(200, content=b"PK-zip", headers={
                "Content-Disposition": 'attachment; filename="graft-batch8-sorted.zip"'})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": f"no {path}", "details": None}})

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"a" * 100)
    (folder / "sub" / "b.jpg").write_bytes(b"b" * 50)
    (folder / ".DS_Store").write_bytes(b"junk")
    with Graft("http://graft.test", "t", progress=False, transport=httpx.MockTransport(handler)) as g:
        batch = g.batch_predict(7, folder, top_k=2)
        method, path, body = seen[-1]
        assert (method, path) == ("POST", "/api/v1/jobs/7/batch-predict")
        assert b'name="file"; filename="imgs.zip"' in body and b'name="top_k"' in body
        packed = body[body.index(b"PK\x03\x04"):]
        assert b"a.jpg" in packed and b"sub/b.jpg" in packed and b".DS_Store" not in packed
        assert isinstance(batch, BatchJob) and batch.model_extra == {"new_field": "kept"}
        with pytest.raises(graft_client.Conflict) as e:
            batch.results()
        assert e.value.status == 409 and "has finished" in e.value.detail
        assert batch.wait(poll=0).succeeded
        rows = batch.results()
        assert [(r.file, r.label, r.probability, r.abstained, r.ok) for r in rows] == [
            ("a.jpg", "ants", 0.91, False, True), ("b.jpg", None, None, None, False)]
        assert [(t.label, t.probability) for t in rows[0].top] == [("ants", 0.91), ("bees", 0.09)]
        assert rows[1].error == "b.jpg: not an image" and rows[1].top == []
        assert batch.download_results(tmp_path).read_text() == csv_text
        assert batch.download_sorted(tmp_path).name == "graft-batch8-sorted.zip"
        # a zip as a resumable upload: the JSON body names it (and carries top_k only when it is not the default)
        zpath = tmp_path / "imgs.zip"
        with zipfile.ZipFile(zpath, "w") as zf:
            zf.writestr("c.jpg", b"c" * 10)
        g.batch_predict(7, zpath, via="upload")
        assert state["uploaded"] == zpath.read_bytes()
        assert seen[-1][:2] == ("POST", "/api/v1/jobs/7/batch-predict")
        assert json.loads(seen[-1][2]) == {"upload_id": "f" * 32}
        g.batch_predict(7, "s3://bucket/new/", top_k=5, confidence_threshold=0.5)
        assert json.loads(seen[-1][2]) == {"source": "s3://bucket/new/", "top_k": 5, "confidence_threshold": 0.5}
        with pytest.raises(graft_client.GraftError):
            g.batch_predict(7, folder / "a.jpg")  # not a zip


@pytest.mark.parametrize("status, cls", [
    (400, graft_client.ValidationError), (422, graft_client.ValidationError), (401, graft_client.AuthError),
    (403, graft_client.Forbidden), (404, graft_client.NotFound), (409, graft_client.Conflict),
    (413, graft_client.TooLarge), (429, graft_client.TooManyRequests), (503, graft_client.Unavailable),
    (500, graft_client.ServerError)])
def test_each_error_status_is_its_exception(status, cls):
    """The server's error body, {"error": {code, message, details}}, for each status the client maps."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"Retry-After": "7"}, json={"error": {
            "code": f"code{status}", "message": f"what went wrong ({status})", "details": [{"field": "x"}]}})

    with Graft("http://graft.test", "t", progress=False, transport=httpx.MockTransport(handler)) as g, \
            pytest.raises(cls) as e:
        g.datasets()
    assert type(e.value) is cls and isinstance(e.value, graft_client.GraftError)
    assert (e.value.status, e.value.code, e.value.detail, e.value.details) == (
        status, f"code{status}", f"what went wrong ({status})", [{"field": "x"}])
    if status == 429:
        assert e.value.retry_after == 7


def test_the_package_builds_and_installs_offline(tmp_path):
    """`pip install ./clients/python` on its own: a wheel built with the venv's setuptools (no index), with
    py.typed, that imports with nothing of the repository on the path."""
    src = tmp_path / "src"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--no-build-isolation", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "graft_client" / "py.typed").is_file()
    assert list(target.glob("graft_client-0.1.0.dist-info"))
    code = ("import graft_client, sys; assert graft_client.__file__.startswith(sys.argv[1]), graft_client.__file__; "
            "assert 'torch' not in sys.modules; print(graft_client.__version__, graft_client.Graft)")
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); " + code,
                        str(target)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("0.1.0"), r.stdout + r.stderr
