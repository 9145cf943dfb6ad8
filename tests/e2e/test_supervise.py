"""`graft serve` keeps its workers alive: the worker child is SIGKILLed in the middle of a job; serve starts
another, says so, the job shows that its worker stopped responding, serve's reconciler re-queues it, and the
new worker resumes it from its last checkpoint to success (two attempts), with nothing but `graft serve`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.paths import HYMENOPTERA
from support.procs import alive, descendants, free_port
from support.web import dataset_zip

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GRAFT = Path(sys.executable).with_name("graft")
FAST = {"GRAFT_HEARTBEAT_TIMEOUT_S": "6", "GRAFT_RECONCILE_INTERVAL_S": "5", "GRAFT_PROGRESS_INTERVAL_S": "0.5"}
RUN = {"strategy": "full", "epochs": 3, "image_size": 64, "batch_size": 2, "patience": None}  # killed in epoch 2
NOTE = "its worker stopped responding; it will resume when a worker takes it"


def test_a_killed_worker_is_started_again_and_its_job_resumes(tmp_path: Path):
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"the shared dataset {HYMENOPTERA} is missing")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(tmp_path / "data"), GRAFT_OFFLINE="1", GRAFT_EXPORT_FORMATS="torchscript", PYTHONUNBUFFERED="1", **FAST)
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(GRAFT), "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    worker_log = tmp_path / "data" / "logs" / "worker.log"

    def dump() -> str:
        text = log.read_text(errors="replace")
        wl = worker_log.read_text(errors="replace")[-6000:] if worker_log.is_file() else ""
        return f"\n----- graft serve -----\n{text}\n----- worker.log -----\n{wl}"

    try:
        deadline = time.monotonic() + 60
        while not re.search(r"^worker  pid \d+$", log.read_text(), re.M):
            assert proc.poll() is None and time.monotonic() < deadline, "graft serve did not start" + dump()
            time.sleep(0.2)
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the web app did not answer" + dump()
            time.sleep(0.2)
        token = subprocess.run([str(GRAFT), "token", "create", "--name", "t"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]

        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {token}"}) as c:
            r = c.post("/api/v1/datasets", data={"name": "tiny"},
                       files={"file": ("tiny.zip", dataset_zip({"train": 8, "val": 3}, top=""), "application/zip")})
            assert r.status_code == 201, r.text
            r = c.post("/api/v1/jobs", json={"dataset_id": r.json()["id"], **RUN})
            assert r.status_code == 201, r.text
            jid = r.json()["id"]

            def job() -> dict:
                r = c.get(f"/api/v1/jobs/{jid}")
                assert r.status_code == 200, r.text
                return r.json()

            # running, with a checkpoint (one epoch done) and epochs still to go
            deadline = time.monotonic() + 120
            while True:
                j = job()
                if j["status"] == "running" and j["current_epoch"] >= 1 and j["stage"] == "train":
                    break
                assert j["status"] in ("queued", "running") and time.monotonic() < deadline, f"{j}" + dump()
                time.sleep(0.1)
            assert j["current_epoch"] < RUN["epochs"] and j["attempts"] == 1 and j["stale"] is False, j
            worker_pid = int(re.findall(r"^worker  pid (\d+)", log.read_text(), re.M)[-1])
            assert worker_pid in descendants(proc.pid)
            for pid in [worker_pid, *descendants(worker_pid)]:  # no handler, no clean-up, no last write
                os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()

            # serve says so and starts another worker
            deadline = killed_at + 30
            while "worker exited (killed by SIGKILL); starting it again in 1 s" not in log.read_text():
                assert time.monotonic() < deadline, "no restart line" + dump()
                time.sleep(0.1)
            while not re.search(r"^worker  pid \d+ \(started again\)$", log.read_text(), re.M):
                assert time.monotonic() < deadline, "no second worker" + dump()
                time.sleep(0.1)
            new_pid = int(re.findall(r"^worker  pid (\d+) \(started again\)$", log.read_text(), re.M)[-1])
            assert new_pid != worker_pid and alive(new_pid) and new_pid in descendants(proc.pid)

            # still running, but its heartbeat is late: stale, with the note, until the reconciler re-queues it
            seen_stale = None
            deadline = killed_at + 40
            while seen_stale is None:
                j = job()
                if j["stale"]:
                    seen_stale = j
                    break
                assert j["status"] == "running" and j["attempts"] == 1, \
                    f"re-queued before it was ever shown stale: {j}" + dump()
                assert j["status_note"] is None, j
                assert time.monotonic() < deadline, f"never stale: {j}" + dump()
                time.sleep(0.02)
            assert seen_stale["status"] == "running" and seen_stale["status_note"] == NOTE, seen_stale

            # re-queued, taken by the new worker, resumed from its checkpoint, finished
            deadline = killed_at + 240
            while True:
                j = job()
                if j["status"] == "succeeded":
                    break
                assert j["status"] in ("queued", "running") and time.monotonic() < deadline, f"{j}" + dump()
                time.sleep(0.25)
            assert j["attempts"] == 2 and j["current_epoch"] == RUN["epochs"], j
            assert j["stale"] is False and j["status_note"] is None, j
            with c.stream("GET", f"/api/v1/jobs/{jid}/events") as r:
                text = "".join(r.iter_text())
            assert "resumed after epoch" in text and "stopped responding" in text, text
            # re-queued once, though two reconcilers (serve's and the new worker's) were looking
            statuses = [json.loads(block.split("data: ", 1)[1])["status"] for block in text.split("\n\n")
                        if block.startswith("id: ") and "\nevent: status\n" in block]
            assert statuses == ["queued", "running", "queued", "running", "succeeded"], statuses

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, dump()
        assert not alive(new_pid), "the worker outlived graft serve"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
