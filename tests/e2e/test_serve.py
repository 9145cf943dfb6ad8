"""`graft serve` as a person runs it: one command, a sign-in link, a web app and a worker; a signal stops both."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e  # starts real servers

GRAFT = Path(sys.executable).with_name("graft")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_prints_a_sign_in_link_and_stops_cleanly(tmp_path, sig):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(tmp_path / "data"), GRAFT_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(GRAFT), "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and url is None:
            m = re.search(r"(http://127\.0\.0\.1:\d+/login\?token=\S+)", log.read_text())
            if m:
                url = m.group(1)
            elif proc.poll() is not None:
                pytest.fail("graft serve exited early:\n" + log.read_text())
            time.sleep(0.2)
        assert url, log.read_text()
        base = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=10) as c:
            r = c.get(url.replace(base, ""))
            assert r.status_code == 303 and "graft_session" in r.cookies
            assert c.get("/").status_code == 200  # signed in: the dashboard
            assert c.get(url.replace(base, "")).status_code == 401  # the link works once
        assert (tmp_path / "data" / "graft.db").is_file()
        workers = _children(proc.pid)
        assert workers, "no worker child process"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "the worker outlived graft serve"
        assert "Graft stopped." in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)
