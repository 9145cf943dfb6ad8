#!/usr/bin/env python3
"""The web tier under load while a training job runs on the same machine.

    .venv/bin/python bench/load.py [--epochs 10] [--image-size 128] [--wrk-seconds 20] [--connections 16]
                                   [--sse-clients 100] [--append-docs] [--json]

(bench/run.py runs it as its `load` part, with --json; the server helpers are in bench/_common.py.)

1. `graft serve` (web app + worker + inference service) on a loopback port over a fresh data directory,
   a token from `graft token create` on the same directory;
2. the hymenoptera set uploaded as a zip through the API, and a training job started (strategy `full`,
   every epoch run: early stopping off);
3. at once, 100 SSE clients on /api/v1/jobs/{id}/events (httpx, asyncio), each kept until the stream ends;
4. once the job is training, `wrk` (Debian's; max rate, --latency) on GET /api/v1/jobs/{id}, 3 runs of
   20 s back to back, while the SSE clients stay connected;
5. when the job has ended: every client must have received every epoch event (the ids the stream replays
   afterwards), and the job must still have been training when each wrk run finished.

Prints a markdown table; --append-docs appends it, with the command, to docs/benchmarks.md.
Needs `wrk` on the PATH (apt-get install wrk).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from _common import (  # noqa: E402
    DATASETS,
    ROOT,
    Serve,
    command_line,
    cpu_name,
    dataset_zip,
    descendants,
    exit_on_sigterm,
    gpu_note,
    loadavg,
    python_speed,
)

# ---------------------------------------------------------------- SSE clients


class SseClient:
    def __init__(self):
        self.epoch_ids: list[int] = []
        self.epoch_times: dict[int, float] = {}
        self.ended = False
        self.error: str | None = None
        self.connected_at: float | None = None


async def sse_client(http: httpx.AsyncClient, url: str, out: SseClient) -> None:
    try:
        async with http.stream("GET", url) as r:
            if r.status_code != 200:
                out.error = f"status {r.status_code}"
                return
            out.connected_at = time.monotonic()
            event: dict[str, str] = {}
            async for line in r.aiter_lines():
                if line == "":
                    if event.get("event") == "epoch" and "id" in event:
                        eid = int(event["id"])
                        out.epoch_ids.append(eid)
                        out.epoch_times[eid] = time.monotonic()
                    if event.get("event") == "end":
                        out.ended = True
                        return
                    event = {}
                elif not line.startswith(":"):
                    key, _, value = line.partition(":")
                    event[key] = value.lstrip(" ")
    except Exception as e:  # noqa: BLE001 - recorded and reported
        out.error = f"{type(e).__name__}: {e}"


def run_sse_clients(base: str, token: str, job_id: int, n: int, clients: list[SseClient], ready: threading.Event):
    async def main():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"},
                                     timeout=httpx.Timeout(None, connect=30), limits=limits) as http:
            tasks = [asyncio.create_task(sse_client(http, f"/api/v1/jobs/{job_id}/events", c)) for c in clients]
            while sum(c.connected_at is not None or c.error is not None for c in clients) < n:
                await asyncio.sleep(0.05)
            ready.set()
            await asyncio.gather(*tasks)

    asyncio.run(main())


# ---------------------------------------------------------------- wrk


def parse_wrk(text: str) -> dict:
    def ms(v: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
        if not m:
            raise ValueError(v)
        x, unit = float(m.group(1)), m.group(2)
        return {"us": x / 1000, "ms": x, "s": x * 1000, "m": x * 60_000}[unit]

    out = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
           "requests": int(re.search(r"(\d+) requests in", text).group(1)),
           "non_2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", text)) else 0,
           "errors": re.search(r"Socket errors:.*", text).group(0) if "Socket errors" in text else ""}
    for p in ("50", "75", "90", "99"):
        out[f"p{p}"] = ms(re.search(rf"^\s+{p}(?:\.000)?%\s+(\S+)", text, re.M).group(1))
    return out


def nice_of_worker(serve_pid: int) -> int | None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = [p for p, args in descendants(serve_pid) if "cli worker" in args]
        if workers:
            return int(Path(f"/proc/{workers[0]}/stat").read_text().rsplit(")", 1)[1].split()[16])
        time.sleep(0.5)
    return None


def renice_worker(serve_pid: int, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = [p for p, args in descendants(serve_pid) if "cli worker" in args]
        if workers:
            tree = workers + [p for w in workers for p, _ in descendants(w)]
            for pid in tree:
                os.setpriority(os.PRIO_PROCESS, pid, n)
            return
        time.sleep(0.5)
    raise SystemExit("no worker process found under graft serve")


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATASETS / "hymenoptera")
    ap.add_argument("--strategy", default="full")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--wrk-seconds", type=int, default=20)
    ap.add_argument("--wrk-runs", type=int, default=3, help="wrk runs, back to back, while the job trains")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections")
    ap.add_argument("--sse-clients", type=int, default=100)
    ap.add_argument("--worker-nice", type=int, default=0,
                    help="experiment: set the nice value of the worker process tree (training) after start")
    ap.add_argument("--append-docs", action="store_true", help="append the results to docs/benchmarks.md")
    ap.add_argument("--json", action="store_true",
                    help="also print the results as one JSON line, last on stdout (bench/run.py reads it)")
    a = ap.parse_args()
    exit_on_sigterm()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    if not a.data.is_dir():
        raise SystemExit(f"no data at {a.data}")

    load_before = loadavg()
    speed_before = python_speed()
    srv = Serve("load", keep=True)
    with srv:
        serve, base, token, http = srv.proc, srv.base, srv.token, srv.http
        if a.worker_nice:
            renice_worker(serve.pid, a.worker_nice)
        worker_nice = nice_of_worker(serve.pid)
        r = http.post("/api/v1/datasets", files={"file": (f"{a.data.name}.zip", dataset_zip(a.data),
                                                          "application/zip")})
        r.raise_for_status()
        ds = r.json()
        spec = {"dataset_id": ds["id"], "strategy": a.strategy, "epochs": a.epochs, "image_size": a.image_size,
                "patience": None}
        r = http.post("/api/v1/jobs", json=spec)
        r.raise_for_status()
        job_id = r.json()["id"]
        t_job = time.monotonic()

        # 100 SSE clients, connected while the job is still queued
        clients = [SseClient() for _ in range(a.sse_clients)]
        ready = threading.Event()
        sse_thread = threading.Thread(target=run_sse_clients, args=(base, token, job_id, a.sse_clients, clients,
                                                                    ready), daemon=True)
        sse_thread.start()
        if not ready.wait(120):
            raise SystemExit("the SSE clients did not all connect in 120 s")
        connect_s = time.monotonic() - t_job

        # wrk once the job is training (its first epoch under way)
        while True:
            job = http.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                raise SystemExit(f"the job ended ({job['status']}: {job['error']}) before the load started")
            if job["status"] == "running" and job["stage"] in ("train", "val"):
                break
            time.sleep(0.5)
        wrk_cmd = ["wrk", f"-t{a.threads}", f"-c{a.connections}", f"-d{a.wrk_seconds}s", "--latency",
                   "-H", f"Authorization: Bearer {token}", f"{base}/api/v1/jobs/{job_id}"]
        windows = []  # one wrk run per window, back to back, while the job trains
        for _ in range(a.wrk_runs):
            epoch_before = job["current_epoch"]
            wrk = subprocess.run(wrk_cmd, capture_output=True, text=True, check=True)
            job = http.get(f"/api/v1/jobs/{job_id}").json()
            windows.append({**parse_wrk(wrk.stdout), "epochs": f"{epoch_before} -> {job['current_epoch']}",
                            "training": job["status"] == "running"})
            if job["status"] != "running":
                break

        # the job's end, then what every client got against the stored epoch events
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(1)
            job = http.get(f"/api/v1/jobs/{job_id}").json()
        job_s = time.monotonic() - t_job
        sse_thread.join(60)
        replay = http.get(f"/api/v1/jobs/{job_id}/events").text
        stored = [int(m.group(1)) for m in re.finditer(r"^id: (\d+)\nevent: epoch$", replay, re.M)]
        complete = [c for c in clients if c.epoch_ids == stored and c.ended and c.error is None]
        errors = sorted({c.error for c in clients if c.error})
        lags = [max(c.epoch_times[i] for c in complete) - min(c.epoch_times[i] for c in complete)
                for i in stored] if complete and stored else []
        metrics = http.get(f"/api/v1/jobs/{job_id}/metrics").json()
    cores = os.cpu_count()
    speed_after = python_speed()
    ok_rate = all(w["rps"] >= 200 and w["non_2xx"] == 0 and not w["errors"] and w["training"] for w in windows)
    ok_sse = len(complete) == len(clients) and len(stored) == a.epochs
    shown_cmd = " ".join(shlex.quote(x) if "Bearer" not in x else "'Authorization: Bearer <token>'" for x in wrk_cmd)
    shown_cmd = re.sub(r"127\.0\.0\.1:\d+/api/v1/jobs/\d+", "127.0.0.1:PORT/api/v1/jobs/ID", shown_cmd)
    ips = statistics.mean(m["images_per_s"] for m in metrics) if metrics else 0.0
    rows = "\n".join(
        f"| {i + 1} | **{w['rps']:.0f}** | {w['p50']:.1f} | {w['p90']:.1f} | **{w['p99']:.1f}** | {w['requests']} "
        f"| {w['non_2xx']}{'; ' + w['errors'] if w['errors'] else ''} | {w['epochs']}{'' if w['training'] else ' (ended)'} |"
        for i, w in enumerate(windows))
    device = (job.get("result") or {}).get("device", "?")
    body = f"""- Machine: {cores} CPU cores ({cpu_name()}), {gpu_note(device)}, shared with other work (load average
  {load_before} before the run).
- Its speed varies from hour to hour: a fixed pure-Python loop took {speed_before:.2f} s before the run and
  {speed_after:.2f} s after it.
- All on it at once: `graft serve` (one uvicorn web process, one worker, the inference service) over
  SQLite, the training job, wrk and {a.sse_clients} SSE clients.
- The worker ran at nice {worker_nice} ({"set by --worker-nice" if a.worker_nice else "as `graft serve` starts it"}),
  the rest at nice 0.
- The job: {a.data.name} ({ds['num_images']} images), strategy `{a.strategy}`, {a.epochs} epochs at image size
  {a.image_size}, early stopping off, on {device}; it took {job_s:.0f} s ({ips:.1f} train images/s on average
  while loaded) and {job['status']}.
- `graft serve` stopped {"cleanly" if srv.stopped.get("clean") else "NOT cleanly"} on SIGTERM afterwards
  ({srv.stopped.get("seconds")} s, exit status {srv.stopped.get("rc")}).

Command:

    {command_line()}

which, with the SSE clients connected and once the job is training, runs {a.wrk_runs} times back to back:

    {shown_cmd}

| GET /api/v1/jobs/{{id}}, wrk run | requests/s | p50 ms | p90 ms | p99 ms | requests | non-2xx | job epoch during the run |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

| SSE on /api/v1/jobs/{{id}}/events | value |
| --- | --- |
| clients connected (all, while the job was queued) | {a.sse_clients} in {connect_s:.1f} s |
| epoch events stored / expected | {len(stored)} / {a.epochs} |
| clients that received every epoch event, in order, and the end event | **{len(complete)} / {len(clients)}** |
| client errors | {', '.join(errors) or 'none'} |
| spread of one epoch event's arrival over the clients (max) | {max(lags) * 1000 if lags else float('nan'):.0f} ms |

Targets: at least 200 requests/s on the status endpoint while training, p99 reported: **{'met' if ok_rate else 'NOT met'}**
(every wrk run); {a.sse_clients} concurrent SSE clients on one job, all receiving every epoch event:
**{'met' if ok_sse else 'NOT met'}**.
"""
    md = f"\n## Issue 5: load while training, {dt.date.today().isoformat()}\n\n{body}"
    print(md)
    if a.append_docs:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(md)
    ok = ok_rate and ok_sse
    if a.json:
        print(json.dumps({"when": dt.datetime.now().isoformat(timespec="seconds"), "command": command_line(),
                          "md_body": body, "ok_rate": ok_rate, "ok_sse": ok_sse, "windows": windows,
                          "sse": {"clients": len(clients), "complete": len(complete), "stored": len(stored),
                                  "expected": a.epochs, "errors": errors, "connect_s": round(connect_s, 2),
                                  "max_spread_ms": round(max(lags) * 1000, 1) if lags else None},
                          "job": {"status": job["status"], "seconds": round(job_s, 1), "device": device,
                                  "train_images_per_s": round(ips, 2), "strategy": a.strategy,
                                  "epochs": a.epochs, "image_size": a.image_size, "images": ds["num_images"]},
                          "worker_nice": worker_nice, "stopped": srv.stopped, "wrk_command": shown_cmd,
                          "loadavg_before": load_before, "python_speed_before_s": round(speed_before, 3),
                          "python_speed_after_s": round(speed_after, 3)}))
    if not ok:
        print(f"targets not met: the server log and data are kept in {srv.work}", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(srv.work, ignore_errors=True)


if __name__ == "__main__":
    main()
