"""The inference service: a small HTTP app on the torch side that the web tier forwards predictions to
(the web tier never imports torch). It keeps the most recently used models loaded, and merges concurrent
requests for one model into shared forward passes (`Batcher`; GRAFT_INFERENCE_BATCH_WINDOW_MS and
GRAFT_INFERENCE_MAX_BATCH), each request's results computed with its own options.

    graft inference --host 127.0.0.1 --port 8001      # GRAFT_INFERENCE_URL=http://127.0.0.1:8001 for the web
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.services import storage

if TYPE_CHECKING:
    from worker.engine.predict import DecodedRequest, Predictor

log = logging.getLogger(__name__)

BATCH_WINDOW_MS, MAX_BATCH = 5.0, 64  # GRAFT_INFERENCE_BATCH_WINDOW_MS, GRAFT_INFERENCE_MAX_BATCH


class ForwardError(RuntimeError):
    """A shared forward pass failed: each request of that batch gets this (and only those)."""


@dataclass
class _Item:
    request: DecodedRequest
    images: int  # decoded ones: what the forward takes
    future: Future = field(default_factory=Future)
    since: float = field(default_factory=time.monotonic)


class Batcher:
    """Concurrent requests for one model share forward passes. Requests (their images already decoded) queue;
    one thread takes the oldest ones, up to `max_batch` images (a larger request alone), once the oldest has
    waited `window_s` or the queue holds `max_batch` images: those that came while a forward ran go at once.
    The window is only waited while other requests are being decoded (`arriving`); a lone request (nothing
    queued, running or being decoded) runs at once on its own thread (`alone`).
    Each request's results are computed with its own options (`Predictor.predict_decoded`); a failed forward
    fails that batch's requests alone. The thread ends after `idle_s` without requests (a model the cache
    evicted leaves nothing behind); the next request starts another."""

    def __init__(self, predictor: Predictor, lock: threading.Lock, window_s: float = BATCH_WINDOW_MS / 1000,
                 max_batch: int = MAX_BATCH, idle_s: float = 30.0):
        self.predictor, self.lock = predictor, lock
        self.window_s, self.max_batch, self.idle_s = window_s, max_batch, idle_s
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._thread: threading.Thread | None = None
        self._coming = 0  # requests being decoded, that will be submitted soon
        self._running = False  # a forward runs (the batcher's, or a lone request's on its own thread)
        self.forwards = 0  # merged batches run (one forward per max_batch images each)

    @contextmanager
    def arriving(self) -> Iterator[Callable[[DecodedRequest], Future]]:
        """Around a request's decoding: while it is being decoded, the batcher waits the window for it. Yields
        its `submit`."""
        with self._cond:
            self._coming += 1
        done = False

        def submit(request: DecodedRequest) -> Future:
            nonlocal done
            future = self.submit(request, arrived=not done)
            done = True
            return future

        try:
            yield submit
        finally:
            if not done:
                with self._cond:
                    self._coming -= 1
                    self._cond.notify()

    def submit(self, request: DecodedRequest, arrived: bool = False) -> Future:
        """A future of (the request's results or the ValueError of its options, the batch's seconds); a failed
        forward sets ForwardError. `arrived`: announced by `arriving` (no longer on its way)."""
        item = _Item(request, sum(not isinstance(c, str) for c in request.crops))
        with self._cond:
            self._coming -= 1 if arrived else 0
            self._queue.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="graft-inference-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()
        return item.future

    def alone(self, request: DecodedRequest) -> tuple[list[dict] | ValueError, float] | None:
        """With nothing else queued, running or being decoded (`arriving`), the request's forward on the calling
        thread, at once (no hop to the batcher's thread); else None (then `submit`). Raises ForwardError."""
        with self._cond:
            if self._queue or self._running or self._coming > 1:
                return None
            self._running = True
        try:
            return self._forward([request])[0]
        finally:
            with self._cond:
                self._running = False
                self._cond.notify()

    def _forward(self, requests: list[DecodedRequest]) -> list[tuple[list[dict] | ValueError, float]]:
        t = time.perf_counter()
        try:
            with self.lock:
                answers = self.predictor.predict_decoded(requests, self.max_batch)
                self.forwards += 1
        except Exception as e:
            log.exception("a forward pass of %d requests failed", len(requests))
            raise ForwardError(f"the model's forward pass failed ({type(e).__name__}: {e}); the {len(requests)} "
                               f"request(s) batched in it failed with it, others are unaffected") from e
        secs = time.perf_counter() - t
        log.debug("one forward for %d requests in %.3f s", len(requests), secs)
        return [(a, secs) for a in answers]

    def _take(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue or self._running:  # (those that come while a forward runs join the next)
                if not self._cond.wait(self.idle_s) and not self._queue and not self._running:
                    self._thread = None
                    return None
            deadline = self._queue[0].since + self.window_s
            while (self._coming > 0 and sum(i.images for i in self._queue) < self.max_batch
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            batch: list[_Item] = []
            total = 0
            while self._queue and (not batch or total + self._queue[0].images <= self.max_batch):
                item = self._queue.popleft()
                if item.future.set_running_or_notify_cancel():  # (else its client went away)
                    batch.append(item)
                    total += item.images
            self._running = bool(batch)
            return batch

    def _loop(self) -> None:
        try:
            while (batch := self._take()) is not None:
                if batch:
                    self._run(batch)
        finally:
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _run(self, batch: list[_Item]) -> None:
        try:
            answers = self._forward([i.request for i in batch])
        except ForwardError as e:
            for i in batch:
                i.future.set_exception(ForwardError(str(e)))
            return
        finally:
            with self._cond:
                self._running = False
        for i, a in zip(batch, answers):
            i.future.set_result(a)


@dataclass
class Loaded:
    predictor: Predictor
    lock: threading.Lock  # one forward at a time per model (the batcher's and explain's)
    batcher: Batcher | None  # None: batching off (max_batch 1)


class ModelCache:
    """Loaded Predictors (with their lock and batcher) keyed by (path, mtime), least recently used evicted
    first."""

    def __init__(self, size: int = 4, window_s: float = BATCH_WINDOW_MS / 1000, max_batch: int = MAX_BATCH):
        self.size, self.window_s, self.max_batch = size, window_s, max_batch
        self._items: OrderedDict[tuple[str, int], Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int], threading.Lock] = {}  # one load per model, however many ask

    def get(self, path: Path) -> Loaded:
        from worker.engine.predict import Predictor

        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._items:  # loaded by the request this one waited for
                    self._items.move_to_end(key)
                    return self._items[key]
            try:
                from worker.engine.device import pick_device

                predictor = Predictor(path, str(pick_device()))  # the GPU where there is one
                lock = threading.Lock()
                batcher = Batcher(predictor, lock, self.window_s, self.max_batch) if self.max_batch > 1 else None
                loaded = Loaded(predictor, lock, batcher)
                with self._lock:
                    self._items[key] = loaded
                    while len(self._items) > self.size:
                        self._items.popitem(last=False)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        return loaded


def _knob(settings: Any, name: str, default: float) -> float:
    """A setting from `settings` (app.core.settings.Settings), else GRAFT_<NAME>, else the default."""
    value = getattr(settings, name, None) if settings is not None else None
    if value is None:
        value = os.environ.get(f"GRAFT_{name.upper()}") or default
    return float(value)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": "inference", "message": message}}, status_code=status)


def create_inference_app(data_dir: Path, cache_size: int = 4, settings: Any = None, *,
                         batch_window_ms: float | None = None, max_batch: int | None = None) -> FastAPI:
    """`model` in a request is the model's storage key (Artifact.path): a file under `data_dir`, or, with
    `settings` naming object storage, fetched once into this process's scratch copies. Concurrent requests
    for one model share forward passes (`Batcher`): those within `batch_window_ms` of each other or that come
    while a forward runs, up to `max_batch` images (default: `settings`' inference_batch_window_ms and
    inference_max_batch, else GRAFT_INFERENCE_BATCH_WINDOW_MS and GRAFT_INFERENCE_MAX_BATCH; max_batch 1:
    each request its own forwards, as before batching). Requests with `explain` run on their own."""
    data_dir = Path(data_dir).resolve()
    st = storage.for_settings(settings) if settings is not None else None
    window_ms = _knob(settings, "inference_batch_window_ms", BATCH_WINDOW_MS) if batch_window_ms is None \
        else batch_window_ms
    most = int(_knob(settings, "inference_max_batch", MAX_BATCH)) if max_batch is None else max_batch
    cache = ModelCache(cache_size, max(0.0, window_ms) / 1000, max(1, most))
    # decoding, on all cores for every request at once (Pillow releases the GIL), outside the model's lock
    decoders = ThreadPoolExecutor(max(1, min(8, len(os.sched_getaffinity(0)))), thread_name_prefix="graft-decode")
    app = FastAPI(title="Graft inference", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request):
        """Form fields: `model`, `files` (repeated), `top_k`, `explain` (true: a heatmap per image),
        `confidence_threshold` (overrides the model file's). Each result: top-k calibrated probabilities,
        `abstained`, `ood_score` (null for a model file without trust data), with `explain` `heatmap_png`."""
        form = await request.form(max_files=1000)
        try:
            model = form.get("model")
            if not isinstance(model, str):
                return _error(400, "field 'model' (the model file's path under the data directory) is missing")
            if st is not None and not st.local:
                try:
                    path = await run_in_threadpool(storage.materialize_file, st, model, settings)
                except (FileNotFoundError, ValueError):
                    return _error(404, f"model file {model} not found in storage")
                except storage.StorageError as e:
                    return _error(503, str(e))
            else:
                try:  # (a key with '..' or an absolute path names no model)
                    found = st.path(model) if st is not None else (data_dir / storage.safe_key(model)).resolve()
                except ValueError:
                    found = None
                if found is None or not found.is_relative_to(getattr(st, "root", data_dir)) or not found.is_file():
                    return _error(404, f"model file {model} not found under the data directory")
                path = found
            try:
                top_k = max(1, min(int(str(form.get("top_k") or 3)), 100))
            except ValueError:
                return _error(400, "top_k must be an integer")
            explain = str(form.get("explain") or "").lower() in {"1", "true", "yes", "on"}
            try:  # the job's operating point when the user moved it; else the model file's (chosen on val)
                raw = form.get("confidence_threshold")
                threshold = float(str(raw)) if raw not in (None, "") else None
            except ValueError:
                return _error(400, "confidence_threshold must be a number from 0 to 1")
            if threshold is not None and not 0.0 <= threshold <= 1.0:
                return _error(400, "confidence_threshold must be a number from 0 to 1")
            try:  # a multi-label job's thresholds when an editor moved them (comma-separated, in label order)
                raw = str(form.get("label_thresholds") or "")
                label_thresholds = [float(x) for x in raw.split(",")] if raw else None
            except ValueError:
                return _error(400, "label_thresholds must be numbers from 0 to 1, comma-separated")
            if label_thresholds is not None and not all(0.0 <= x <= 1.0 for x in label_thresholds):
                return _error(400, "label_thresholds must be numbers from 0 to 1, comma-separated")
            files = [(f.filename or f"image{i}", f.file) for i, f in enumerate(form.getlist("files"))
                     if isinstance(f, UploadFile)]

            def load() -> tuple[Loaded | None, str | None]:
                from domain.errors import GraftError

                try:
                    return cache.get(path), None
                except GraftError as e:
                    return None, str(e)

            loaded, err = await run_in_threadpool(load)
            if loaded is None:
                return _error(422, err or "the model file cannot be loaded")
            t = time.perf_counter()
            if explain or loaded.batcher is None:
                def alone() -> tuple[list[dict] | None, str | None]:
                    with loaded.lock:
                        try:
                            return loaded.predictor.predict_sources(files, top_k=top_k, explain=explain,
                                                                    confidence_threshold=threshold,
                                                                    label_thresholds=label_thresholds), None
                        except ValueError as e:  # thresholds that do not fit the model's labels
                            return None, str(e)

                res, err = await run_in_threadpool(alone)
                if res is None:
                    return _error(422, err or "")
                return {"results": res, "seconds": round(time.perf_counter() - t, 4)}
            from worker.engine.predict import DecodedRequest

            batcher = loaded.batcher

            def decode_then_alone() -> tuple[list[dict] | ValueError | None, Future | None]:
                """Decoded, then answered on this thread when no other request is around, else queued."""
                with batcher.arriving() as submit:
                    crops = loaded.predictor.decode_sources(files, decoders)
                    req = DecodedRequest([n for n, _ in files], crops, top_k, threshold, label_thresholds)
                    if all(isinstance(c, str) for c in crops):  # nothing to forward: every image's error
                        return loaded.predictor.predict_decoded([req])[0], None
                    done = batcher.alone(req)
                    return (done[0], None) if done is not None else (None, submit(req))

            try:
                answer, future = await run_in_threadpool(decode_then_alone)
                if future is not None:
                    answer, _ = await asyncio.wrap_future(future)
            except ForwardError as e:
                return _error(500, str(e))
            if isinstance(answer, ValueError):  # thresholds that do not fit the model's labels
                return _error(422, str(answer))
            return {"results": answer, "seconds": round(time.perf_counter() - t, 4)}
        finally:
            await form.close()

    return app
