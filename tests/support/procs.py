"""Processes and ports for the tests that start real servers: a free loopback port, a process's children and
descendants (from /proc), and whether a process is still alive (not a zombie)."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def redis_test_url(slot: int) -> str:
    """A Redis database of its own for each pytest-xdist process (`make test` runs two): slot 0 is the queue
    and cluster tests' database, slot 1 the fault tests'; nothing else uses databases 4-11."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    if index > 3:
        raise RuntimeError(f"at most 4 pytest-xdist processes share one Redis (this is {worker})")
    return f"redis://127.0.0.1:6379/{4 + slot * 4 + index}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    return [p for p, parent in _parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    below: dict[int, list[int]] = {}
    for p, parent in _parents().items():
        below.setdefault(parent, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in below.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
