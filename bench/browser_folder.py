#!/usr/bin/env python3
"""A big folder picked in a real browser: N files through the upload page (packed into zip parts in the
browser, sent with tus), timed, with the web process's peak memory.

    .venv/bin/python bench/browser_folder.py --files 20000 [--part-mb 100] [--json]

`graft serve` on a fresh data directory; Chromium (Debian's, headless) signs in with the printed invite link,
opens /datasets/new, picks the folder (JPEGs of 96x72 pixels in 10 class folders under train/), and the clock
runs from the pick to the dataset page.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import command_line, cpu_name, free_port, peak_rss_mb, wait_http
from PIL import Image

GRAFT = Path(sys.executable).with_name("graft")


def make_folder(root: Path, n: int) -> int:
    rng = random.Random(0)
    total = 0
    for i in range(n):
        d = root / "train" / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (96, 72), (rng.randrange(256), rng.randrange(256), (i * 37) % 256))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        (d / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--part-mb", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graft-folder-"))
    folder = work / "pick" / "many"
    total = make_folder(folder, args.files)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(work / "data"), GRAFT_OFFLINE="1", PYTHONUNBUFFERED="1",
               GRAFT_UPLOAD_PART_BYTES=str(args.part_mb << 20))
    log = work / "serve.log"
    serve = subprocess.Popen([str(GRAFT), "serve", "--port", str(port), "--no-worker"], env=env, cwd=work,
                             stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    from playwright.sync_api import sync_playwright

    try:
        wait_http(f"{base}/healthz", serve)
        link = None
        while link is None:
            m = re.search(r"(http://127\.0\.0\.1:\d+/invite\?token=\S+)", log.read_text())
            link = m.group(1) if m else None
            time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(base_url=base)
            page.set_default_timeout(600_000)
            page.goto(link)
            page.fill("input[name=password]", "a long benchmark passphrase")
            page.fill("input[name=password_confirm]", "a long benchmark passphrase")
            page.locator("#invite-form button[type=submit]").click()
            page.wait_for_url(base + "/")
            page.goto("/datasets/new")
            t0 = time.perf_counter()
            page.set_input_files("#folder-input", str(folder))
            t_pick = time.perf_counter()
            page.click("#upload-btn")
            page.wait_for_url(re.compile(r".*/datasets/\d+$"))
            t_done = time.perf_counter()
            heading = page.locator("h1").inner_text()
            browser.close()
        peak = peak_rss_mb(serve.pid)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(60)
    out = {"files": args.files, "bytes": total, "pick_s": round(t_pick - t0, 1), "upload_to_page_s":
           round(t_done - t_pick, 1), "dataset": heading, "serve_peak_rss_mb": round(peak, 1), "cpu": cpu_name(),
           "command": command_line()}
    print(f"| {args.files} files ({total / 2**20:.0f} MiB) picked in Chromium | seconds |\n| --- | --- |")
    print(f"| set_input_files (the pick) | {out['pick_s']} |\n| upload -> dataset page | {out['upload_to_page_s']} |")
    print(f"| graft serve (web process) peak RSS | {out['serve_peak_rss_mb']} MB |")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
