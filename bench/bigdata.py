#!/usr/bin/env python3
"""Real-size data through the web tier: N photo-sized JPEGs uploaded as resumable zip parts, the dataset
made from the parts (extraction and the doctor), the dataset page, and the web process's peak memory.

    .venv/bin/python bench/bigdata.py --images 20000 [--part-mb 100] [--json]

1. N JPEGs are made from the real photographs of ../shared/datasets/clothing10 (each one a different crop,
   flip and tint of a source photo, re-encoded at 640 px on the long side, so no two files are equal), in
   class folders train/<class>/ (10 classes), packed into zip parts of about --part-mb MB;
2. `graft web` (one process) runs on a fresh data directory and SQLite; a token from `graft token create`;
3. the clock starts: each part goes through the tus protocol (POST /api/v1/uploads, PATCH in 8 MiB chunks),
   then POST /api/v1/datasets {"uploads": [...]} (extraction, the doctor's checks), then GET /datasets/{id}
   and its first sample thumbnails; the web process's peak resident memory (VmHWM) is read at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
from _common import DATASETS, ROOT, command_line, cpu_name, free_port, peak_rss_mb, wait_http
from PIL import Image, ImageOps

GRAFT = Path(sys.executable).with_name("graft")
CHUNK = 8 << 20


def make_parts(n: int, part_bytes: int, out: Path, seed: int = 0) -> tuple[list[Path], int]:
    """Zip parts holding n distinct JPEGs, written one part at a time."""
    rng = random.Random(seed)
    sources = sorted(p for p in (DATASETS / "clothing10").rglob("*.jpg"))
    classes = sorted({p.parent.name for p in sources})
    parts, total = [], 0
    zf, size, k = None, 0, 0
    for i in range(n):
        src = sources[i % len(sources)]
        img = Image.open(src).convert("RGB")
        w, h = img.size
        s = rng.uniform(0.8, 1.0)
        x, y = rng.randint(0, int(w * (1 - s))), rng.randint(0, int(h * (1 - s)))
        img = img.crop((x, y, x + int(w * s), y + int(h * s)))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img.thumbnail((640, 640))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(80, 92))
        data = buf.getvalue()
        if zf is None or size + len(data) > part_bytes:
            if zf is not None:
                zf.close()
            k += 1
            path = out / f"part{k:03d}.zip"
            parts.append(path)
            zf, size = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED), 0
        cls = classes[i % len(classes)] if src.parent.name not in classes else src.parent.name
        zf.writestr(f"big/train/{cls}/{i:06d}.jpg", data)
        size += len(data)
        total += len(data)
    if zf is not None:
        zf.close()
    return parts, total


def tus_upload(c: httpx.Client, path: Path) -> str:
    length = path.stat().st_size
    r = c.post("/api/v1/uploads", headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(length)})
    r.raise_for_status()
    url = r.headers["Location"]
    offset = 0
    with open(path, "rb") as f:
        while offset < length:
            block = f.read(CHUNK)
            r = c.patch(url, content=block, headers={"Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
                                                      "Content-Type": "application/offset+octet-stream"})
            r.raise_for_status()
            offset = int(r.headers["Upload-Offset"])
    return url.rstrip("/").rsplit("/", 1)[1]


class ChildPeak(threading.Thread):
    """The largest VmHWM of the web process's children (the doctor's child process), read every 0.2 s while
    the dataset is made (a child's VmHWM only grows, so the last read is close to its peak)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for task in Path(f"/proc/{self.pid}/task").glob("*"):
                try:
                    kids = (task / "children").read_text().split()
                except OSError:
                    continue
                for kid in kids:
                    try:
                        self.peak = max(self.peak, peak_rss_mb(int(kid)))
                    except (OSError, ValueError):
                        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--part-mb", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--parts-dir", type=Path, help="reuse the zip parts of an earlier run (its part*.zip)")
    ap.add_argument("--train-image-size", type=int, default=0, help="also time a `features` run's first epoch "
                    "on the dataset at this image size (the engine in this process, as a worker runs it)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graft-bigdata-"))
    t = time.perf_counter()
    if args.parts_dir:
        parts = sorted(args.parts_dir.glob("part*.zip"))
        total = sum(len(zi.filename) * 0 + zi.file_size for p in parts for zi in zipfile.ZipFile(p).infolist())
    else:
        parts, total = make_parts(args.images, args.part_mb << 20, work)
    make_s = time.perf_counter() - t
    data = work / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(data), GRAFT_OFFLINE="1", GRAFT_MAX_UPLOAD_BYTES=str(max(total * 2, 2 << 30)),
               GRAFT_MAX_EXTRACTED_BYTES=str(total * 2), GRAFT_MAX_USER_UPLOAD_BYTES=str(total * 2),
               GRAFT_MAX_ZIP_ENTRIES=str(max(200_000, 2 * args.images)))
    subprocess.run([str(GRAFT), "migrate"], env=env, check=True, capture_output=True)
    token = subprocess.run([str(GRAFT), "token", "create", "--name", "bench"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    link = subprocess.run([sys.executable, "-c", (
        "from app.core.settings import Settings; from app.db.session import session_factory; "
        "from app.services import auth; s = Settings(); S = session_factory(s.db_url); db = S(); "
        "print(auth.create_token(db, auth.ensure_user(db, s.default_user, admin=True), 'b', kind='login'))")],
        env=env, check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
    port = free_port()
    web = subprocess.Popen([str(GRAFT), "web", "--port", str(port), "--workers", "1"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", web)
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=600)
        t0 = time.perf_counter()
        ids = [tus_upload(c, p) for p in parts]
        t_up = time.perf_counter()
        watch = ChildPeak(web.pid)
        watch.start()
        try:
            r = c.post("/api/v1/datasets", json={"name": "big", "uploads": ids})
        finally:
            watch.stop.set()
            watch.join()
        if r.status_code != 201:
            raise SystemExit(f"POST /api/v1/datasets answered {r.status_code}: {r.text[:2000]}")
        ds = r.json()
        t_ds = time.perf_counter()
        browser = httpx.Client(base_url=base, timeout=600)
        browser.get(f"/login?token={link}")
        t_ds = time.perf_counter()
        page = browser.get(f"/datasets/{ds['id']}")
        t_page = time.perf_counter()
        thumbs = [browser.get(f"/datasets/{ds['id']}/samples/0/{n}.jpg") for n in range(4)]
        t_thumbs = time.perf_counter()
        peak = peak_rss_mb(web.pid)
    finally:
        web.terminate()
        web.wait(30)
    first_epoch = None
    if args.train_image_size:
        sys.path.insert(0, str(ROOT))
        from domain.callbacks import Callbacks
        from domain.spec import RunSpec
        from worker.engine.runner import run

        class FirstEpoch(Callbacks):
            def __init__(self):
                self.t0, self.first = time.perf_counter(), None

            def on_epoch_end(self, m):
                self.first = self.first or time.perf_counter() - self.t0

        root = next((data / "datasets").iterdir())
        cb = FirstEpoch()
        res = run(RunSpec(strategy="features", epochs=1, image_size=args.train_image_size, feature_views=1),
                  root, work / "run", cb, cache_dir=work / "cache")
        first_epoch = {"image_size": args.train_image_size, "first_epoch_s": round(cb.first or 0, 1),
                       "run_s": round(res.seconds, 1), "val_acc": res.val_acc}
    out = {"images": args.images, "bytes": total, "parts": len(parts), "make_parts_s": round(make_s, 1),
           "upload_s": round(t_up - t0, 1), "upload_mb_s": round(total / 2**20 / (t_up - t0), 1),
           "dataset_from_parts_s": round(t_ds - t_up, 1), "dataset_page_s": round(t_page - t_ds, 2),
           "dataset_page_status": page.status_code, "first_thumbs_s": round(t_thumbs - t_page, 2),
           "thumb_statuses": [x.status_code for x in thumbs], "web_peak_rss_mb": round(peak, 1),
           "doctor_child_peak_rss_mb": round(watch.peak, 1) if watch.peak else None,
           "num_images": ds["num_images"], "first_epoch": first_epoch, "cpu": cpu_name(),
           "command": command_line()}
    print(f"| {args.images} images, {total / 2**30:.2f} GiB in {len(parts)} parts | seconds |")
    print("| --- | --- |")
    for k in ("upload_s", "dataset_from_parts_s", "dataset_page_s", "first_thumbs_s"):
        print(f"| {k} | {out[k]} |")
    print(f"| web process peak RSS | {out['web_peak_rss_mb']} MB |")
    print(f"| the doctor's child process, peak RSS (sampled) | {out['doctor_child_peak_rss_mb']} MB |")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
