"""The inference service: a small HTTP app on the torch side that the web tier forwards predictions to
(the web tier never imports torch). It keeps the most recently used models loaded.

    graft inference --host 127.0.0.1 --port 8001      # GRAFT_INFERENCE_URL=http://127.0.0.1:8001 for the web
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.services import storage

log = logging.getLogger(__name__)


class ModelCache:
    """Loaded Predictors keyed by (path, mtime), least recently used evicted first."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path):
        from worker.engine.predict import Predictor

        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        predictor = Predictor(path)
        predictor.lock = threading.Lock()  # type: ignore[attr-defined]
        with self._lock:
            self._items[key] = predictor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return predictor


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": "inference", "message": message}}, status_code=status)


def create_inference_app(data_dir: Path, cache_size: int = 4, settings: Any = None) -> FastAPI:
    """`model` in a request is the model's storage key (Artifact.path): a file under `data_dir`, or, with
    `settings` naming object storage, fetched once into this process's scratch copies."""
    data_dir = Path(data_dir).resolve()
    st = storage.for_settings(settings) if settings is not None else None
    cache = ModelCache(cache_size)
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

            def work():
                from domain.errors import GraftError

                try:
                    predictor = cache.get(path)
                except GraftError as e:
                    return None, str(e)
                t = time.perf_counter()
                with predictor.lock:
                    try:
                        res = predictor.predict_sources(files, top_k=top_k, explain=explain,
                                                        confidence_threshold=threshold,
                                                        label_thresholds=label_thresholds)
                    except ValueError as e:  # thresholds that do not fit the model's labels
                        return None, str(e)
                return (res, time.perf_counter() - t), None

            out, err = await run_in_threadpool(work)
            if err:
                return _error(422, err)
            res, secs = out
            return {"results": res, "seconds": round(secs, 4)}
        finally:
            await form.close()

    return app
