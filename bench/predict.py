#!/usr/bin/env python3
"""Prediction throughput through the REST API against the raw model forward, in one run, on the same images.

    .venv/bin/python bench/predict.py [--data DIR] [--batch 32] [--rounds 3] [--single 60]

1. trains a model (features, 3 epochs; cached features make this quick) on DATA;
2. raw forward: the same model (as the inference service loads it) on the val images already decoded,
   resized and normalized in memory, in batches;
3. API: `graft inference` and the web app (uvicorn) in their own processes, over a real database; batches of
   image files POSTed to /api/v1/jobs/{id}/predict (upload, decoding, resizing and the hop to the inference
   service included); then single-image requests for latency percentiles.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GRAFT = Path(sys.executable).with_name("graft")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "hymenoptera")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single", type=int, default=60)
    a = ap.parse_args()
    # bench/run.py's timeout sends SIGTERM: stop the servers below (finally) instead of leaving them behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from app.core.settings import Settings
    from app.db.migrate import run_migrations
    from app.db.models import Artifact, Dataset, Job
    from app.db.session import session_factory
    from app.services import auth
    from domain.files import sha256_file
    from domain.spec import RunSpec
    from worker.engine.data import normalize
    from worker.engine.predict import Predictor
    from worker.engine.runner import run

    work = Path(tempfile.mkdtemp(prefix="graft-predict-bench-"))
    settings = Settings(_env_file=None, data_dir=work / "data")
    settings.ensure_dirs()
    run_dir = settings.runs_dir / "1"
    res = run(RunSpec(strategy="features", epochs=3), a.data, run_dir, None, cache_dir=work / "cache")
    images = [Path(p) for p in res.val_files]

    # raw forward on tensors already in memory
    pred = Predictor(run_dir / "model.pt")
    x = normalize(torch.stack([pred._tensor(p) for p in images]), pred.pre, pred.channels_last)
    with torch.inference_mode():
        pred.model(x[: a.batch])  # warm-up
        t = time.perf_counter()
        for _ in range(a.rounds):
            for s in range(0, len(x), a.batch):
                pred.model(x[s:s + a.batch])
        raw = a.rounds * len(x) / (time.perf_counter() - t)
    del pred

    # the API, in its own processes, over a real database
    run_migrations(settings.db_url)
    S = session_factory(settings.db_url)
    with S() as db:
        user = auth.ensure_user(db, "bench")
        token = auth.create_token(db, user, "bench")
        ds = Dataset(owner_id=user.id, name="bench", path=str(a.data), classes=res.classes, counts={}, warnings=[])
        db.add(ds)
        db.flush()
        job = Job(owner_id=user.id, dataset_id=ds.id, spec={}, status="succeeded", result=res.summary().to_json())
        db.add(job)
        db.flush()
        p = run_dir / "model.pt"
        db.add(Artifact(job_id=job.id, kind="model", path=str(p.relative_to(settings.data_dir)),
                        size=p.stat().st_size, sha256=sha256_file(p)))
        db.commit()
        job_id = job.id
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env["GRAFT_DATA_DIR"] = str(settings.data_dir)
    iport, wport = free_port(), free_port()
    procs = [subprocess.Popen([str(GRAFT), "inference", "--port", str(iport)], env=env)]
    env["GRAFT_INFERENCE_URL"] = f"http://127.0.0.1:{iport}"
    procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app_from_env", "--factory",
                                   "--port", str(wport), "--log-level", "warning"], env=env, cwd=ROOT))
    try:
        wait_http(f"http://127.0.0.1:{iport}/healthz")
        wait_http(f"http://127.0.0.1:{wport}/healthz")
        files = [(p.name, p.read_bytes()) for p in images]
        with httpx.Client(base_url=f"http://127.0.0.1:{wport}", headers={"Authorization": f"Bearer {token}"},
                          timeout=300) as c:
            def post(batch):
                r = c.post(f"/api/v1/jobs/{job_id}/predict",
                           files=[("files", (n, b, "image/jpeg")) for n, b in batch])
                r.raise_for_status()
                assert all("top" in x for x in r.json()["results"]), r.text
            post(files[: a.batch])  # loads the model into the inference service
            t = time.perf_counter()
            for _ in range(a.rounds):
                for s in range(0, len(files), a.batch):
                    post(files[s:s + a.batch])
            api = a.rounds * len(files) / (time.perf_counter() - t)
            lat = []
            for i in range(a.single):
                t = time.perf_counter()
                post([files[i % len(files)]])
                lat.append((time.perf_counter() - t) * 1000)
    finally:
        for pr in procs:
            pr.send_signal(signal.SIGTERM)
        for pr in procs:
            pr.wait(timeout=20)
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    out = {"when": dt.datetime.now().isoformat(timespec="seconds"), "cpus": len(os.sched_getaffinity(0)),
           "images": len(images), "batch": a.batch, "raw_forward_images_per_s": round(raw, 2),
           "api_images_per_s": round(api, 2), "ratio": round(api / raw, 3),
           "single_image_ms": {"p50": round(q[49], 1), "p95": round(q[94], 1), "n": len(lat)}}
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / f"predict-{dt.datetime.now():%Y%m%d-%H%M%S}.json").write_text(json.dumps(out, indent=2))
    print(f"| what | value |\n| --- | --- |\n| raw model forward (batch {a.batch}, tensors in memory) | "
          f"{out['raw_forward_images_per_s']} images/s |\n| through the API (batch {a.batch}, JPEG files) | "
          f"{out['api_images_per_s']} images/s |\n| **ratio API / raw** | **{out['ratio']}** |\n"
          f"| single image through the API, p50 / p95 | {out['single_image_ms']['p50']} / "
          f"{out['single_image_ms']['p95']} ms (n={len(lat)}) |")
    print(json.dumps(out))
    shutil.rmtree(work, ignore_errors=True)  # the trained model and its database


if __name__ == "__main__":
    main()
