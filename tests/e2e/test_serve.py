"""`graft serve` as a person runs it: one command, a sign-in link, a web app and a worker; a signal stops both."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.procs import alive, children, free_port

pytestmark = pytest.mark.e2e  # starts real servers

GRAFT = Path(sys.executable).with_name("graft")


def _start(tmp_path, port: int):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(tmp_path / "data"), GRAFT_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    log.write_bytes(b"")
    with open(log, "ab") as f:
        proc = subprocess.Popen([str(GRAFT), "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def _link(proc, log: Path, kind: str, port: int) -> str:
    """The link serve printed (invite or login), once the web app answers."""
    url = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and url is None:
        m = re.search(rf"(http://127\.0\.0\.1:\d+/{kind}\?token=\S+)", log.read_text())
        if m:
            url = m.group(1)
        elif proc.poll() is not None:
            pytest.fail("graft serve exited early:\n" + log.read_text())
        time.sleep(0.2)
    assert url, log.read_text()
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return url


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_prints_a_sign_in_link_and_stops_cleanly(tmp_path, sig):
    """The first start prints the admin's invite link (it sets the password and signs in, once); a later start
    prints a one-time sign-in link; a signal stops serve and its children, status 0."""
    from support.web import field_of

    port = free_port()
    proc, log = _start(tmp_path, port)
    base = f"http://127.0.0.1:{port}"
    try:
        url = _link(proc, log, "invite", port)
        with httpx.Client(base_url=base, timeout=30) as c:
            page = c.get(url.replace(base, ""))
            assert page.status_code == 200 and 'name="password_confirm"' in page.text
            token = url.split("token=", 1)[1]
            r = c.post("/invite", data={"token": token, "password": "a long admin passphrase",
                                        "password_confirm": "a long admin passphrase",
                                        "form_token": field_of(page.text, "form_token")})
            assert r.status_code == 303 and "graft_session" in c.cookies
            assert c.get("/").status_code == 200  # signed in: the dashboard
            assert httpx.get(url, timeout=10).status_code == 401  # the link works once
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        # the second start: the admin has a password, so a one-time sign-in link
        proc, log = _start(tmp_path, port)
        url = _link(proc, log, "login", port)
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.get(url.replace(base, ""))
            assert r.status_code == 303 and "graft_session" in r.cookies
            assert c.get("/").status_code == 200
            assert c.get(url.replace(base, "")).status_code == 401  # the link works once
        assert (tmp_path / "data" / "graft.db").is_file()
        workers = children(proc.pid)
        assert workers, "no worker child process"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, log.read_text()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "the worker outlived graft serve"
        assert "Graft stopped." in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in children(proc.pid):
            os.kill(w, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_starts_quietly_and_a_signal_stops_it_with_status_0(tmp_path, sig):
    """The start-up output: the link block, one line per process, where the logs are; no Celery banner nor
    warnings (they go to <data_dir>/logs/worker.log). SIGINT (Ctrl-C) or SIGTERM: every child stops, status 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(tmp_path / "data"), GRAFT_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    logs = tmp_path / "data" / "logs"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(GRAFT), "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        while not re.search(r"graft-\d+@", (logs / "worker.log").read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)  # the worker has printed its banner (into its log)
        time.sleep(1)  # and what it prints after it (warnings), were it to print them here
        out = log.read_text()
        assert "celery@" not in out and " -------------- " not in out and "Warning" not in out, out
        lines = out.splitlines()
        assert lines.count(f"web  http://127.0.0.1:{port}") == 1, out
        assert len([ln for ln in lines if re.fullmatch(r"worker  pid \d+", ln)]) == 1, out
        assert len([ln for ln in lines if re.fullmatch(r"inference  pid \d+ on 127\.0\.0\.1:\d+", ln)]) == 1, out
        assert f"logs  {logs} (worker.log, inference.log)" in lines, out
        pids = {int(m) for m in re.findall(r"^(?:worker|inference)  pid (\d+)", out, re.M)}
        kids = children(proc.pid)
        assert pids == set(kids), (pids, kids)
        assert re.search(r"graft-\d+@", (logs / "worker.log").read_text())  # the banner went there
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, log.read_text()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.2)
        assert not any(alive(k) for k in kids), "a child outlived graft serve"
        out = log.read_text()
        assert out.rstrip().endswith("Graft stopped.") and "Traceback" not in out and "Aborted" not in out, out
        assert "exited" not in out, out  # stopping is not a crash: nothing was started again
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in children(proc.pid):
            os.kill(k, signal.SIGKILL)


def test_web_runs_the_web_app_alone_in_several_processes(tmp_path):
    """`graft web` (production, next to `graft worker` and `graft inference`): after `graft migrate`, the web
    app in N processes on one port; SIGTERM stops them all, status 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(tmp_path / "data"), GRAFT_OFFLINE="1", PYTHONUNBUFFERED="1")
    subprocess.run([str(GRAFT), "migrate"], env=env, cwd=tmp_path, check=True, capture_output=True)
    log = tmp_path / "web.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(GRAFT), "web", "--port", str(port), "--workers", "2"], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/login", timeout=5).status_code == 200
        kids = children(proc.pid)
        assert len([k for k in kids if alive(k)]) >= 2, kids  # the web processes (and uvicorn's helpers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.2)
        assert not any(alive(k) for k in kids), "a web process outlived graft web"
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in children(proc.pid):
            os.kill(k, signal.SIGKILL)
