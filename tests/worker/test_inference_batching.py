"""The inference service merges concurrent requests for one model into shared forward passes (issue 18), with
a real tiny trained model, in-process (httpx over ASGI): each request gets exactly its own results, in its own
order, computed with its own options; a corrupt image or a failed forward touches no other request."""
from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import pytest

from domain.spec import RunSpec
from worker.engine.predict import Predictor
from worker.engine.runner import run
from worker.inference import create_inference_app


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_slice):
    data = tmp_path_factory.mktemp("batching")
    run(RunSpec(image_size=64, epochs=2, strategy="features", batch_size=8), tiny_slice, data / "run", None,
        cache_dir=data / "cache")
    images = sorted(tiny_slice.glob("*/*/*.jpg"))[:16]
    assert len(images) == 16
    return data, Predictor(data / "run" / "model.pt"), images


@pytest.fixture
def forwards(monkeypatch):
    """Every Predictor.forward call's batch size, in order; `hook(n_call)` runs before each (may sleep or raise)."""
    calls: list[int] = []
    hooks: list = []
    original = Predictor.forward

    def counted(self, batch_u8):
        calls.append(len(batch_u8))
        for hook in hooks:
            hook(len(calls))
        return original(self, batch_u8)

    monkeypatch.setattr(Predictor, "forward", counted)
    return calls, hooks


async def _post(client: httpx.AsyncClient, files: list[tuple[str, bytes]], **fields) -> httpx.Response:
    return await client.post("/predict", data={"model": "run/model.pt", **fields},
                             files=[("files", (n, b, "image/jpeg")) for n, b in files])


def _serve(data, coro_fn, **knobs):
    async def main():
        app = create_inference_app(data, **knobs)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inference",
                                     timeout=120) as client:
            return await coro_fn(client)

    return asyncio.run(main())


def _direct(pred: Predictor, paths, **options) -> list[dict]:
    """The Predictor called directly on the same uploads (named as the service names them)."""
    return pred.predict_sources([(p.name, io.BytesIO(p.read_bytes())) for p in paths], **options)


def _probs(result: dict) -> dict[str, float]:
    return {t["class"]: t["probability"] for t in result["top"]}


def _same(got: dict, want: dict) -> None:
    assert got["file"] == want["file"] and got["abstained"] == want["abstained"], (got, want)
    assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]], (got, want)
    for c, p in _probs(want).items():
        assert _probs(got)[c] == pytest.approx(p, abs=1e-5)
    if want["ood_score"] is None:
        assert got["ood_score"] is None
    else:
        assert got["ood_score"] == pytest.approx(want["ood_score"], abs=1e-4)
    assert got.get("abstain_reason", "").split(" ")[0] == want.get("abstain_reason", "").split(" ")[0]


def test_concurrent_one_image_requests_share_forwards_and_get_their_own_answers(trained, forwards):
    data, pred, images = trained
    calls, hooks = forwards
    hooks.append(lambda n: time.sleep(0.3) if n == 1 else None)  # the others come while the first one runs
    want = [_direct(pred, [p], top_k=2)[0] for p in images]
    calls.clear()

    async def go(client):
        return await asyncio.gather(*(_post(client, [(p.name, p.read_bytes())], top_k="2") for p in images))

    rs = _serve(data, go, batch_window_ms=5)
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    for r, w in zip(rs, want):
        (got,) = r.json()["results"]
        _same(got, w)
    assert sum(calls) == 16 and len(calls) < 16, calls  # every image once, in fewer forwards than requests
    assert max(calls) > 1, calls


def test_requests_merged_in_one_batch_keep_their_own_options(trained, forwards):
    data, pred, images = trained
    calls, hooks = forwards
    hooks.append(lambda n: time.sleep(0.3) if n == 1 else None)
    options = [{"top_k": "1"}, {"top_k": "2", "confidence_threshold": "1"}, {"top_k": "2", "confidence_threshold": "0"},
               {}, {"top_k": "1", "confidence_threshold": "0.99"}, {"top_k": "5"}]
    batches = [images[i * 2:i * 2 + 2] for i in range(len(options))]  # two images per request, in order
    want = []
    for opts, imgs in zip(options, batches):
        thr = opts.get("confidence_threshold")
        want.append(_direct(pred, imgs, top_k=int(opts.get("top_k", 3)),
                            confidence_threshold=float(thr) if thr is not None else None))
    calls.clear()

    async def go(client):
        return await asyncio.gather(*(_post(client, [(p.name, p.read_bytes()) for p in imgs], **opts)
                                      for opts, imgs in zip(options, batches)))

    rs = _serve(data, go)
    assert len(calls) < len(options), calls
    for r, opts, w in zip(rs, options, want):
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert len(got) == 2 and [g["file"] for g in got] == [x["file"] for x in w]
        for g, x in zip(got, w):
            assert len(g["top"]) == min(int(opts.get("top_k", 3)), 2)
            _same(g, x)
    every = rs[1].json()["results"]  # at 1 every answer below 1 abstains
    assert all(g["abstained"] and g["abstain_reason"] for g in every if g["top"][0]["probability"] < 1), every
    assert all(g["abstained"] == (g.get("abstain_reason") == "unlike the training images")
               for g in rs[2].json()["results"])


def test_a_corrupt_image_is_that_images_error_alone(trained, forwards):
    data, pred, images = trained
    calls, hooks = forwards
    hooks.append(lambda n: time.sleep(0.2) if n == 1 else None)
    broken = ("broken.jpg", images[0].read_bytes()[:200])
    sends = [[(p.name, p.read_bytes())] for p in images[:6]]
    sends[2] = [(images[2].name, images[2].read_bytes()), broken, (images[3].name, images[3].read_bytes())]
    sends.append([broken])  # nothing to forward at all
    sends.append([("notes.txt", b"hello")])

    async def go(client):
        return await asyncio.gather(*(_post(client, s, top_k="2") for s in sends))

    rs = _serve(data, go)
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    res = [r.json()["results"] for r in rs]
    mixed = res[2]
    assert [x["file"] for x in mixed] == [images[2].name, "broken.jpg", images[3].name]
    assert "error" in mixed[1] and "broken.jpg" in mixed[1]["error"]
    _same(mixed[0], _direct(pred, [images[2]], top_k=2)[0])
    _same(mixed[2], _direct(pred, [images[3]], top_k=2)[0])
    for i in (0, 1, 3, 4, 5):
        _same(res[i][0], _direct(pred, [images[i]], top_k=2)[0])
    assert "error" in res[6][0] and "error" in res[7][0] and "notes.txt" in res[7][0]["file"]
    assert sum(calls) == 7 and len(calls) < 6, calls


def test_a_failed_forward_fails_its_batch_alone_with_a_clear_error(trained, forwards):
    data, pred, images = trained
    calls, hooks = forwards
    running = threading.Event()

    def first_fails(n):
        if n == 1:
            running.set()
            time.sleep(0.3)
            raise RuntimeError("out of memory (simulated)")

    hooks.append(first_fails)

    async def go(client):
        first = asyncio.ensure_future(_post(client, [(images[0].name, images[0].read_bytes())]))
        while not running.is_set():  # the others come while the first one's forward runs (and fails)
            await asyncio.sleep(0.01)
        rest = [_post(client, [(p.name, p.read_bytes())]) for p in images[1:5]]
        explained = _post(client, [(images[5].name, images[5].read_bytes())], explain="true")
        return await first, await asyncio.gather(*rest), await explained

    failed, ok, explained = _serve(data, go, batch_window_ms=1)
    assert failed.status_code == 500
    msg = failed.json()["error"]["message"]
    assert "forward pass failed" in msg and "out of memory (simulated)" in msg, msg
    for r, p in zip(ok, images[1:5]):
        assert r.status_code == 200, r.text
        _same(r.json()["results"][0], _direct(pred, [p])[0])
    assert explained.status_code == 200 and explained.json()["results"][0]["heatmap_png"]
    assert calls[0] == 1 and sum(calls) == 5, calls  # the failed one alone (explain runs on its own)


def test_max_batch_1_turns_merging_off_a_lone_request_waits_no_window_and_the_knobs(trained, forwards, monkeypatch):
    from app.core.settings import Settings
    from worker import inference

    data, pred, images = trained
    calls, _ = forwards

    async def go(client):
        return await asyncio.gather(*(_post(client, [(p.name, p.read_bytes())]) for p in images[:4]))

    rs = _serve(data, go, max_batch=1)
    assert all(r.status_code == 200 for r in rs) and calls == []  # predict_sources, one request at a time
    for r, p in zip(rs, images):
        _same(r.json()["results"][0], _direct(pred, [p])[0])
    async def lone(client):  # the window is only waited for requests being decoded: a lone one goes at once
        t = time.perf_counter()
        r = await _post(client, [(images[0].name, images[0].read_bytes())])
        return r, time.perf_counter() - t

    r, secs = _serve(data, lone, batch_window_ms=5000)
    assert r.status_code == 200 and secs < 4, secs
    monkeypatch.setenv("GRAFT_INFERENCE_BATCH_WINDOW_MS", "7.5")
    monkeypatch.setenv("GRAFT_INFERENCE_MAX_BATCH", "12")
    s = Settings(_env_file=None, data_dir=data)
    assert (s.inference_batch_window_ms, s.inference_max_batch) == (7.5, 12)
    assert inference._knob(None, "inference_max_batch", 64) == 12
    monkeypatch.delenv("GRAFT_INFERENCE_MAX_BATCH")
    assert inference._knob(None, "inference_max_batch", 64) == 64
    assert inference._knob(s, "inference_batch_window_ms", 5.0) == 7.5
