"""Helpers shared by the benchmark scripts: ports, a real `graft serve` over a fresh data directory, dataset
zips and slices, and what is recorded about the machine. Torch-free (the scripts that need torch import it
themselves)."""
from __future__ import annotations

import io
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
GRAFT = Path(sys.executable).with_name("graft")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def command_line(argv: list[str] | None = None) -> str:
    """This process's command as typed from the repository root (.venv/bin/python bench/x.py ARGS), with
    paths inside the repository or beside it shown relative to the root."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    py = Path(sys.executable)
    shown_py = os.path.relpath(py, ROOT) if py.is_relative_to(ROOT) else str(py)
    return " ".join([shown_py] + [shlex.quote(_rel(x)) for x in argv])


def _rel(x: str) -> str:
    try:
        p = Path(x)
        if p.is_absolute() and (p.is_relative_to(ROOT) or p.is_relative_to(ROOT.parent)):
            return os.path.relpath(p, ROOT)
    except (ValueError, OSError):
        pass
    return x


def gpu_note(device: str) -> str:
    return "no GPU" if not str(device).startswith("cuda") else f"GPU used ({device})"


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before {url} came up")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


def dataset_zip(data: Path) -> bytes:
    """The folder as a zip (stored, not deflated: JPEGs do not compress), with the folder's name on top."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(data.rglob("*")):
            if f.is_file():
                zf.write(f, f"{data.name}/{f.relative_to(data)}")
    return buf.getvalue()


# ---------------------------------------------------------------- dataset slices


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def _place(src: Path, dst: Path) -> str:
    """A copy (times kept), so that nothing done to the slice can touch the shared originals. Not a symbolic
    link: Graft's folder discovery skips symlinked files on purpose (an uploaded link must not reach outside
    the dataset), so a folder of links would look empty to it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return "copies"


def make_slice(src: Path, dst: Path, train_per_class: int | None, val_per_class: int | None, seed: int = 0) -> dict:
    """A seeded, stratified train/ + val/ folder for both programs (ref_train.py needs train/ and val/
    ImageFolders). A source with train/ and val/ keeps its split (each split sliced to at most that many per
    class, or whole when None); a source of class folders only is split per class: `train_per_class` then
    `val_per_class` images drawn without overlap. Returns what was made (counts per split and class)."""
    rng = random.Random(seed)
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    how = set()
    if (src / "train").is_dir() and (src / "val").is_dir():
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for c in sorted(p for p in (src / split).iterdir() if p.is_dir()):
                imgs = _images(c)
                pick = imgs if n is None or n >= len(imgs) else sorted(rng.sample(imgs, n))
                for p in pick:
                    how.add(_place(p, dst / split / c.name / p.name))
                counts[split][c.name] = len(pick)
    else:
        if train_per_class is None or val_per_class is None:
            raise ValueError(f"{src} has no train/ and val/: give train and val images per class")
        for c in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
            imgs = _images(c)
            if len(imgs) < train_per_class + val_per_class:
                raise ValueError(f"{c} has {len(imgs)} images, fewer than {train_per_class} + {val_per_class}")
            pick = rng.sample(imgs, train_per_class + val_per_class)
            for split, part in (("train", pick[:train_per_class]), ("val", pick[train_per_class:])):
                for p in sorted(part):
                    how.add(_place(p, dst / split / c.name / p.name))
                counts[split][c.name] = len(part)
    return {"path": str(dst), "source": str(src), "seed": seed, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "counts": counts, "files_as": " and ".join(sorted(how)),
            "train_images": sum(counts["train"].values()), "val_images": sum(counts["val"].values())}


def count_split(src: Path) -> dict:
    """The same description as make_slice's, of a train/ + val/ folder used as it is."""
    counts = {split: {c.name: len(_images(c)) for c in sorted(p for p in (src / split).iterdir() if p.is_dir())}
              for split in ("train", "val")}
    return {"path": str(src), "source": str(src), "seed": None, "train_per_class": None, "val_per_class": None,
            "counts": counts, "files_as": "the folder itself", "train_images": sum(counts["train"].values()),
            "val_images": sum(counts["val"].values())}


# ---------------------------------------------------------------- the machine


def python_speed() -> float:
    """Seconds for a fixed pure-Python loop: this (virtual) machine's speed varies from hour to hour, and the
    figures with it."""
    t = time.perf_counter()
    s = 0
    for i in range(5_000_000):
        s += i
    return time.perf_counter() - t


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- graft serve


def descendants(pid: int) -> list[tuple[int, str]]:
    rows = [line.split(None, 2) for line in subprocess.run(["ps", "-eo", "pid,ppid,args", "--no-headers"],
                                                            capture_output=True, text=True).stdout.splitlines()]
    children: dict[int, list[tuple[int, str]]] = {}
    for r in rows:
        if len(r) == 3:
            children.setdefault(int(r[1]), []).append((int(r[0]), r[2]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def exit_on_sigterm() -> None:
    """SIGTERM (bench/run.py's timeout) as SystemExit, so that `with Serve(...)` still stops its server."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class Serve:
    """`graft serve` as a person runs it (embedded defaults: SQLite, filesystem queue, the local worker and the
    inference service as its children) on a free loopback port over a fresh data directory, with an API token
    from `graft token create` on the same directory.

        with Serve("name") as srv:
            srv.http.post(...)
        srv.stopped  # how it stopped
    """

    def __init__(self, name: str, keep: bool = False):
        self.name, self.keep = name, keep
        self.work = Path(tempfile.mkdtemp(prefix=f"graft-{name}-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
        self.env.update(GRAFT_DATA_DIR=str(self.work / "data"), GRAFT_OFFLINE="1")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.stopped: dict = {}
        self.failed = False

    def start(self) -> Serve:
        t = time.perf_counter()
        self.token = subprocess.run([str(GRAFT), "token", "create", "--name", self.name], env=self.env, check=True,
                                    capture_output=True, text=True, cwd=self.work).stdout.strip().splitlines()[-1]
        self.token_seconds = time.perf_counter() - t
        self.log = open(self.work / "serve.log", "w")
        t = time.perf_counter()
        self.proc = subprocess.Popen([str(GRAFT), "serve", "--port", str(self.port)], env=self.env, cwd=self.work,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.base}/healthz", self.proc)
        self.startup_seconds = time.perf_counter() - t
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=300)
        return self

    def stop(self) -> dict:
        """SIGTERM, as Ctrl-C or `docker stop` would; how long it took, its exit status and whether every child
        (worker, inference service) had gone by then."""
        if self.proc is None or self.stopped:
            return self.stopped
        self.http.close()
        kids = [pid for pid, _ in descendants(self.proc.pid)]
        t = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        killed = False
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc, killed = self.proc.wait(), True
        secs = time.perf_counter() - t
        time.sleep(0.2)
        left = [pid for pid in kids if Path(f"/proc/{pid}").exists()
                and "zombie" not in _proc_state(pid)]
        self.log.close()
        said = (self.work / "serve.log").read_text(errors="replace")
        self.stopped = {"rc": rc, "seconds": round(secs, 2), "killed": killed, "children": len(kids),
                        "children_left": left, "said_stopped": "Graft stopped." in said,
                        "clean": not killed and not left and "Graft stopped." in said}
        return self.stopped

    def __enter__(self) -> Serve:
        try:
            return self.start()
        except BaseException:
            self.failed = True
            self.stop()
            raise

    def __exit__(self, et, ev, tb) -> None:
        self.failed = self.failed or et is not None
        self.stop()
        if et is None and not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        elif et is not None:
            print(f"{self.name}: the server log and data are kept in {self.work}", file=sys.stderr)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "gone"
