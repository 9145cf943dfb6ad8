#!/usr/bin/env python3
"""Time from upload to the first finished epoch in embedded mode, as a person meets it.

    .venv/bin/python bench/upload.py [--data DIR] [--epochs N] [--json]

1. `graft serve` with its embedded defaults (SQLite, the filesystem queue, its own worker and inference
   service) on a free loopback port over a fresh data directory (so a cold feature cache), and a token from
   `graft token create` on the same directory; started before the clock;
2. the clock starts; DATA, zipped beforehand, is POSTed to /api/v1/datasets (upload, extraction and the dataset
   doctor's checks, all inside the request);
3. a job with the recommended settings (the strategy and epochs that the new-job page proposes for this
   dataset, domain.advice.recommend_strategy; every other field at its default) is POSTed to
   /api/v1/jobs;
4. the job's server-sent events (/api/v1/jobs/{id}/events, what the job page shows) are read from before
   the job is queued to the stream's end: the arrival of the `running` status, of each stage, of the first
   `epoch` event, and of the end;
5. `graft serve` gets SIGTERM and must stop cleanly (exit, its worker and inference service gone).

The events stream polls the database every 0.5 s, so each time is what a watcher sees, up to 0.5 s late.
Prints a markdown table and, with --json, one JSON line last.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path

import httpx
from _common import DATASETS, ROOT, Serve, command_line, cpu_name, dataset_zip, exit_on_sigterm, loadavg

sys.path.insert(0, str(ROOT))


class Watcher(threading.Thread):
    """Reads a job's SSE stream; records when (perf_counter) each thing was first seen."""

    def __init__(self, base: str, token: str, job_id: int):
        super().__init__(daemon=True)
        self.url, self.token = f"{base}/api/v1/jobs/{job_id}/events", token
        self.seen: dict[str, float] = {}
        self.stages: list[tuple[str, float]] = []
        self.epochs: list[tuple[int, float, dict]] = []
        self.error: str | None = None
        self.connected = threading.Event()
        self.final: str | None = None

    def mark(self, key: str) -> None:
        self.seen.setdefault(key, time.perf_counter())

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers={"Authorization": f"Bearer {self.token}"},
                              timeout=httpx.Timeout(None, connect=30)) as r:
                r.raise_for_status()
                self.connected.set()
                event: dict[str, str] = {}
                for line in r.iter_lines():
                    if line:
                        if not line.startswith(":"):
                            k, _, v = line.partition(":")
                            event[k] = v.lstrip(" ")
                        continue
                    kind, data = event.get("event"), json.loads(event.get("data") or "{}")
                    event = {}
                    now = time.perf_counter()
                    if kind == "status":
                        self.mark(f"status:{data.get('status')}")
                    elif kind == "progress":
                        self.mark(f"status:{data.get('status')}")
                        st = data.get("stage")
                        if st and (not self.stages or self.stages[-1][0] != st):
                            self.stages.append((st, now))
                    elif kind == "epoch":
                        self.epochs.append((int(data.get("epoch", len(self.epochs) + 1)), now, data))
                        self.mark("epoch")
                    elif kind == "end":
                        self.mark("end")
                        return
        except Exception as e:  # noqa: BLE001 - reported
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.connected.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATASETS / "hymenoptera")
    ap.add_argument("--epochs", type=int, default=None, help="override the recommended epochs (quick checks)")
    ap.add_argument("--timeout", type=float, default=1800, help="give up on the job after this many seconds")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line, last on stdout")
    a = ap.parse_args()
    exit_on_sigterm()
    from domain.advice import recommend_strategy

    blob = dataset_zip(a.data)
    load_before = loadavg()
    srv = Serve("upload")
    with srv:
        http = srv.http
        t0 = time.perf_counter()
        r = http.post("/api/v1/datasets", files={"file": (f"{a.data.name}.zip", blob, "application/zip")})
        r.raise_for_status()
        t_upload = time.perf_counter()
        ds = r.json()
        advice = recommend_strategy(ds["counts"])
        spec = {"dataset_id": ds["id"], "strategy": advice.strategy, "epochs": a.epochs or advice.epochs}
        r = http.post("/api/v1/jobs", json=spec)
        r.raise_for_status()
        t_created = time.perf_counter()
        job = r.json()
        w = Watcher(srv.base, srv.token, job["id"])
        w.start()
        w.connected.wait(30)
        w.join(a.timeout)
        if w.is_alive():
            raise SystemExit(f"the job did not end in {a.timeout:.0f} s")
        if w.error:
            raise SystemExit(f"the events stream failed: {w.error}")
        job = http.get(f"/api/v1/jobs/{job['id']}").json()
        metrics = http.get(f"/api/v1/jobs/{job['id']}/metrics").json()
    if job["status"] != "succeeded":
        raise SystemExit(f"the job {job['status']}: {job['error']}")

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 2)

    def ts(s: str | None) -> float | None:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None

    first_epoch = w.epochs[0][1] if w.epochs else None
    running = w.seen.get("status:running")
    stages = [(s, since(t)) for s, t in w.stages]
    server = {"queued_to_running_s": round(ts(job["started_at"]) - ts(job["created_at"]), 2)
              if job["started_at"] else None,
              "running_to_finished_s": round(ts(job["finished_at"]) - ts(job["started_at"]), 2)
              if job["finished_at"] and job["started_at"] else None}
    m0 = metrics[0] if metrics else {}
    out = {
        "when": dt.datetime.now().isoformat(timespec="seconds"), "command": command_line(),
        "data": str(a.data), "zip_bytes": len(blob), "images": ds["num_images"], "classes": ds["classes"],
        "dataset_warnings": len(ds["warnings"]), "strategy": spec["strategy"], "epochs": spec["epochs"],
        "recommended": {"strategy": advice.strategy, "epochs": advice.epochs},
        "server_start_s": round(srv.startup_seconds, 2), "token_create_s": round(srv.token_seconds, 2),
        "upload_response_s": since(t_upload), "job_created_s": since(t_created),
        "running_seen_s": since(running), "first_epoch_s": since(first_epoch), "end_s": since(w.seen.get("end")),
        "queued_to_running_s": round(running - t_created, 2) if running else None,
        "running_to_first_epoch_s": round(first_epoch - running, 2) if first_epoch and running else None,
        "stages": stages, "server_timestamps": server,
        "first_epoch_metric": {k: m0.get(k) for k in ("seconds", "elapsed", "val_acc", "images_per_s")},
        "epochs_run": len(metrics), "val_acc": job["best_val_acc"], "device": (job.get("result") or {}).get("device"),
        "job_seconds": (job.get("result") or {}).get("seconds"), "stopped": srv.stopped,
        "loadavg_before": load_before, "cores": len(__import__("os").sched_getaffinity(0)), "cpu": cpu_name(),
    }
    print(report(out))
    if a.json:
        print(json.dumps(out))
    if not srv.stopped.get("clean"):
        print(f"graft serve did not stop cleanly: {srv.stopped}", file=sys.stderr)
        sys.exit(1)


def report(o: dict) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.1f}"

    stage_rows = "".join(f"| &nbsp;&nbsp;stage `{s}` first seen | {f(t)} |\n" for s, t in o["stages"])
    st = o["stopped"]
    return f"""| upload to first finished epoch, {o['data'].rsplit('/', 1)[-1]} ({o['images']} images, {o['zip_bytes'] / 2**20:.1f} MiB zip), strategy `{o['strategy']}` x {o['epochs']} epochs (recommended: `{o['recommended']['strategy']}` x {o['recommended']['epochs']}), on {o['device']} | seconds from the upload's start |
| --- | --- |
| POST /api/v1/datasets answered (upload, extraction, dataset doctor) | {f(o['upload_response_s'])} |
| POST /api/v1/jobs answered (queued) | {f(o['job_created_s'])} |
| `running` seen on the job's events stream | {f(o['running_seen_s'])} |
{stage_rows}| **first `epoch` event seen (first finished epoch)** | **{f(o['first_epoch_s'])}** |
| job ended (`succeeded`, {o['epochs_run']} epochs, val_acc {o['val_acc']:.4f}) | {f(o['end_s'])} |

| breakdown | seconds |
| --- | --- |
| upload response | {f(o['upload_response_s'])} |
| queued -> running (seen on the stream; server timestamps: {f(o['server_timestamps']['queued_to_running_s'])}) | {f(o['queued_to_running_s'])} |
| running -> first epoch | {f(o['running_to_first_epoch_s'])} |
| **total, upload to first epoch** | **{f(o['first_epoch_s'])}** |
| whole job (running -> finished, server timestamps; the run's own timer: {f(o['job_seconds'])}) | {f(o['server_timestamps']['running_to_finished_s'])} |
| not counted: `graft serve` start to /healthz answering | {f(o['server_start_s'])} |
| not counted: `graft serve` stop on SIGTERM ({'clean' if st.get('clean') else 'NOT clean'}: exit {st.get('rc')}, {st.get('children')} children, {len(st.get('children_left') or [])} left) | {f(st.get('seconds'))} |
"""


if __name__ == "__main__":
    main()
