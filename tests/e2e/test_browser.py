"""A person's whole path through Graft, in a real browser (Debian's Chromium driven by Playwright),
against a real `graft serve` on a loopback port: sign in with the printed link, upload a dataset by
picking a folder and another by dropping a zip, train with the recommended settings while watching the
progress bar and the charts move, read the evaluation, download the model in every format, classify a
dropped image, cancel a queued and a running job, and read the error of a bad zip.

The steps run in order and share one browser session; each saves a screenshot under
`test-output/browser/` (or `$GRAFT_TEST_OUTPUT/browser/`). Every page is watched for console errors,
uncaught exceptions, failed requests and error responses, and its links and images are followed.

Chromium comes from Debian (`apt-get install -y chromium`; `make test` installs it when missing), never
from `playwright install`.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urljoin, urlparse

import playwright.sync_api as playwright_api
import pytest
from support.paths import HYMENOPTERA, ROOT
from support.procs import free_port

pytestmark = pytest.mark.e2e  # starts real servers

GRAFT = Path(sys.executable).with_name("graft")
CHROMIUM = Path(os.environ.get("GRAFT_CHROMIUM", "/usr/bin/chromium"))
OUT = Path(os.environ.get("GRAFT_TEST_OUTPUT", ROOT / "test-output")) / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


# ------------------------------------------------------------------------------------------ fixtures

def _ensure_chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if CHROMIUM.exists():
        return CHROMIUM
    msg = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def _slice(dst: Path, per_class: dict[str, int], offset: int) -> Path:
    for split, n in per_class.items():
        for cls in ("ants", "bees"):
            src = sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[offset:offset + n]
            assert len(src) == n
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in src:
                shutil.copy2(f, dst / split / cls / f.name)
    return dst


@pytest.fixture(scope="module")
def out_dir() -> Path:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    return OUT


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`graft serve` on embedded defaults (SQLite, files, a local worker and inference service)."""
    home = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    # progress written 4 times a second (default: every 2 s), so that a short job still shows it moving
    env.update(GRAFT_DATA_DIR=str(home / "data"), GRAFT_OFFLINE="1", GRAFT_EXPORT_FORMATS="torchscript,onnx", PYTHONUNBUFFERED="1",
               GRAFT_CACHE_DIR=str(home / "cache"), GRAFT_PROGRESS_INTERVAL_S="0.25")
    log = home / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(GRAFT), "serve", "--port", str(port)], env=env, cwd=home,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = None
    deadline = time.monotonic() + 90
    import httpx
    try:
        while time.monotonic() < deadline:
            if url is None:
                m = re.search(r"(http://127\.0\.0\.1:\d+/(?:invite|login)\?token=\S+)", log.read_text())
                url = m.group(1) if m else None
            if proc.poll() is not None:
                pytest.fail("graft serve exited early:\n" + log.read_text())
            if url:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        else:
            pytest.fail("graft serve did not come up in 90 s:\n" + log.read_text())
        yield {"base": f"http://127.0.0.1:{port}", "sign_in": url, "log": log, "home": home}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Watch:
    """What went wrong in the browser: console errors, page exceptions, failed requests and 4xx/5xx
    responses, minus the few a step expects (it says so with `expect`)."""

    def __init__(self, page):
        self.problems: list[str] = []
        self.expected: list[tuple[str, str]] = []  # (method, url regex) of an expected error response
        page.on("console", lambda m: m.type == "error" and self._console(m))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught exception: {e}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _console(self, m):
        # a 4xx the step expects is also logged by Chromium as "Failed to load resource"
        if "Failed to load resource" in m.text and self.expected:
            return
        self.problems.append(f"console error: {m.text} at {m.location}")

    def _failed(self, req):
        err = req.failure or ""
        # Downloads end the navigation that started them, and Chromium cuts the live event stream
        # when a page is left or reloaded: both are reported as aborted, neither is a failure.
        if "ERR_ABORTED" in err and (req.url.endswith("/events") or "/model" in req.url):
            return
        if "ERR_ABORTED" in err and any(req.method == m and re.search(u, req.url) for m, u in self.expected):
            return  # a request the step cuts on purpose (a reload mid-upload)
        self.problems.append(f"request failed: {req.method} {req.url}: {err}")

    def _response(self, resp):
        if resp.status < 400:
            return
        if any(resp.request.method == m and re.search(u, resp.url) for m, u in self.expected):
            return
        self.problems.append(f"{resp.status} from {resp.request.method} {resp.url}")

    def expect(self, method: str, url_regex: str):
        self.expected.append((method, url_regex))

    def check(self):
        problems, self.problems = self.problems, []
        self.expected = []
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def browser_session(server, out_dir):
    chromium = _ensure_chromium()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True,
                                      base_url=server["base"])
        context.set_default_timeout(20_000)
        page = context.new_page()
        page.on("dialog", lambda d: d.accept())  # "Cancel this job?" -> OK
        watch = Watch(page)
        # Record what the job page shows while it updates: the status, the percentage, the stage and
        # how many epochs the charts hold, each time one of them changes.
        trace: list[dict] = []
        page.expose_function("graftTrace", lambda rec: trace.append(rec))
        page.add_init_script("""
          (() => {
            let last = "";
            setInterval(() => {
              if (!/^\\/jobs\\/\\d+$/.test(location.pathname) || typeof window.graftTrace !== "function") return;
              const txt = (id) => (document.getElementById(id) || {}).textContent || "";
              const badge = document.querySelector("#status-badge .badge");
              const chart = typeof Chart !== "undefined" ? Chart.getChart("acc-chart") : null;
              const rec = { job: location.pathname, status: badge ? badge.textContent.trim() : "",
                            percent: txt("percent-text").trim(), stage: txt("stage-text").trim(),
                            points: chart ? chart.data.labels.length : -1,
                            rows: document.querySelectorAll("#epoch-table tbody tr").length };
              const key = JSON.stringify(rec);
              if (key !== last) { last = key; rec.t = performance.now(); window.graftTrace(rec); }
            }, 50);
          })();
        """)
        state = {"page": page, "watch": watch, "trace": trace, "server": server, "out": out_dir,
                 "context": context, "checked": set()}
        try:
            yield state
        finally:
            context.close()
            browser.close()


def shot(s, name: str) -> Path:
    path = s["out"] / f"{name}.png"
    s["page"].screenshot(path=str(path), full_page=True)
    return path


def check_page(s) -> None:
    """No dead links or broken images on the current page, no horizontal overflow, nothing went wrong."""
    page = s["page"]
    base = s["server"]["base"]
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    images = page.eval_on_selector_all("img[src]", "els => els.map(e => e.getAttribute('src'))")
    for href in links + images:
        if href.startswith(("blob:", "data:")):
            continue  # made in the page itself (a preview of a picked file)
        if href.startswith("#"):
            if href != "#":
                assert page.locator(href).count() == 1, f"link to a missing anchor {href} on {page.url}"
            continue
        url = urljoin(page.url, href)
        if urlparse(url).netloc != urlparse(base).netloc:
            pytest.fail(f"{page.url} links outside the server (closed networks have no internet): {href}")
        path = urlparse(url).path
        if "/login" in path or "/logout" in path or url in s["checked"]:
            continue  # following these would sign the browser out
        r = s["context"].request.get(url, max_redirects=0)
        assert r.status < 400, f"dead link on {page.url}: {href} answered {r.status}"
        s["checked"].add(url)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{page.url} scrolls sideways by {overflow}px at 1280px wide"
    s["watch"].check()


def drop_files(page, selector: str, files: list[tuple[str, bytes, str]]) -> None:
    """Drop files on an element the way a person drags them from their desktop."""
    payload = [{"name": n, "b64": base64.b64encode(b).decode(), "type": t} for n, b, t in files]
    dt = page.evaluate_handle("""(files) => {
        const dt = new DataTransfer();
        for (const f of files) {
          const bin = atob(f.b64); const bytes = new Uint8Array(bin.length);
          for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
          dt.items.add(new File([bytes], f.name, { type: f.type }));
        }
        return dt;
    }""", payload)
    page.dispatch_event(selector, "dragenter", {"dataTransfer": dt})
    page.dispatch_event(selector, "dragover", {"dataTransfer": dt})
    page.dispatch_event(selector, "drop", {"dataTransfer": dt})


def zip_bytes(folder: Path, wrap: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{wrap}/{f.relative_to(folder)}")
    return buf.getvalue()


def wait_for_job_page(page) -> int:
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    return int(page.url.rsplit("/", 1)[1])


def wait_status(page, status: str, timeout_s: float) -> None:
    page.wait_for_function(
        "(s) => { const b = document.querySelector('#status-badge .badge'); return b && b.textContent.trim() === s; }",
        arg=status, timeout=timeout_s * 1000)


# ------------------------------------------------------------------------------------------ the path

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser-data")
    picked = _slice(base / "ants-and-bees", {"train": 12, "val": 6}, offset=0)  # few: 04 and 07 train on them
    dropped = _slice(base / "zip-src", {"train": 10, "val": 6}, offset=30)
    # one val image is also a train image: the doctor warns about it
    leak = sorted((dropped / "train" / "ants").glob("*.jpg"))[0]
    shutil.copy2(leak, dropped / "val" / "ants" / ("copy-of-" + leak.name))
    return {"picked": picked, "dropped": dropped, "leak": leak.name}


PASSWORD = "a quiet meadow at dawn"


def test_01_set_the_password_with_the_printed_invite_and_sign_in(browser_session):
    """The first `graft serve` prints the admin's invite link: set a password, land on the dashboard; sign out
    and in again with that password."""
    s = browser_session
    page = s["page"]
    assert "/invite?token=" in s["server"]["sign_in"], s["server"]["sign_in"]
    page.goto(s["server"]["sign_in"])
    assert page.locator("h1").inner_text().startswith("Welcome to Graft")
    shot(s, "01a-invite")
    page.fill("input[name=password]", "too short")
    page.fill("input[name=password_confirm]", "too short")
    page.evaluate("document.getElementById('invite-form').noValidate = true")  # the server's rules, not the browser's
    s["watch"].expect("POST", r"/invite$")
    page.locator("#invite-form button[type=submit]").click()
    assert "at least 12 characters" in page.locator("#invite-errors").inner_text()
    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=password_confirm]", PASSWORD)
    page.locator("#invite-form button[type=submit]").click()
    page.wait_for_url(s["server"]["base"] + "/")
    assert page.locator("h1").inner_text() == "Dashboard"
    assert "No jobs yet" in page.locator("main").inner_text()
    assert "No datasets yet" in page.locator("main").inner_text()
    shot(s, "01b-dashboard-empty")
    # sign out, then in with the password
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", PASSWORD)
    page.locator("#login-form button[type=submit]").click()
    page.wait_for_url(s["server"]["base"] + "/")
    assert page.locator("h1").inner_text() == "Dashboard"
    check_page(s)


def test_02_upload_a_folder(browser_session, folders):
    s = browser_session
    page = s["page"]
    page.locator("main").get_by_role("link", name="Upload dataset", exact=True).click()
    page.wait_for_url("**/datasets/new")
    shot(s, "02a-upload-page")
    page.set_input_files("#folder-input", str(folders["picked"]))
    picked = page.locator("#picked")
    assert re.search(r"Folder: ants-and-bees/, 36 files", picked.inner_text()), picked.inner_text()
    page.click("#upload-btn")
    page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=60_000)
    assert page.locator("h1").inner_text() == "ants-and-bees"
    rows = {r.locator("td").nth(0).inner_text(): (r.locator("td").nth(1).inner_text(), r.locator("td").nth(2).inner_text())
            for r in page.locator("table.classes tbody tr").all()}
    assert rows == {"ants": ("12", "6"), "bees": ("12", "6")}
    thumbs = page.locator("table.classes img")
    assert thumbs.count() >= 2
    page.wait_for_function("() => [...document.querySelectorAll('table.classes img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    assert "No jobs yet" in page.locator("main").inner_text()
    s["ds_folder"] = page.url
    shot(s, "02b-dataset-from-folder")
    check_page(s)


def test_03_upload_a_dropped_zip_and_see_its_warning(browser_session, folders):
    s = browser_session
    page = s["page"]
    page.goto("/datasets/new")
    drop_files(page, "#dropzone", [("bees-zip.zip", zip_bytes(folders["dropped"], "bees-zip"), "application/zip")])
    assert page.locator("#picked").inner_text().startswith("Zip file: bees-zip.zip")
    page.fill("#ds-name", "dropped zip")
    page.click("#upload-btn")
    page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=60_000)
    assert page.locator("h1").inner_text() == "dropped zip"
    warn = page.locator(".alert-warn")
    assert warn.count() == 1 and folders["leak"] in warn.inner_text(), page.locator("main").inner_text()
    counts = page.locator(".stats").inner_text()
    assert "20" in counts and "13" in counts, counts  # 20 train, 12 + 1 val images
    shot(s, "03-dataset-from-zip-with-warning")
    check_page(s)


def test_04_train_with_the_recommended_settings_and_watch_it(browser_session):
    s = browser_session
    page = s["page"]
    page.goto(s["ds_folder"])
    page.get_by_role("link", name="Train a model").first.click()
    page.wait_for_url(re.compile(r"/jobs/new\?dataset_id=\d+"))
    recommended = page.locator("input[name=strategy]:checked")
    assert recommended.get_attribute("value") == "features"
    assert page.locator("input[name=backbone]:checked").get_attribute("value") == "efficientnet_lite0"
    shot(s, "04a-new-job-recommended")
    check_page(s)
    s["trace"].clear()
    page.click("#job-submit")
    job_id = wait_for_job_page(page)
    s["job1"] = job_id
    shot(s, "04b-job-just-started")
    wait_status(page, "succeeded", 180)
    page.wait_for_selector("#evaluation", timeout=20_000)  # the page reloads itself when the job ends
    trace = [t for t in s["trace"] if t["job"] == f"/jobs/{job_id}"]
    live = [t for t in trace if t["status"] == "running"]
    assert live, f"the page never showed the job running: {trace}"
    percents = [int(t["percent"].rstrip("%")) for t in live]
    assert len(set(percents)) >= 3 and percents == sorted(percents), f"progress did not move: {percents}"
    assert any(0 < t["points"] for t in trace if t["status"] in ("running", "succeeded")), \
        f"the charts did not fill in while the page was live: {trace}"
    assert {"Computing features", "Training"} & {t["stage"] for t in live}, {t["stage"] for t in live}
    (s["out"] / "04-trace.json").write_text(json.dumps(trace, indent=1))


def test_05_evaluation_and_downloads(browser_session):
    s = browser_session
    page = s["page"]
    assert "Final results on the validation images" in page.locator("#evaluation").inner_text()
    page.wait_for_function("() => { const i = document.getElementById('cm-png'); return i && i.complete && i.naturalWidth > 200; }")
    mistakes = page.locator("#mistakes")
    assert mistakes.count() == 1
    if page.locator("#mistakes-gallery li").count():
        page.locator("#mistakes").scroll_into_view_if_needed()
        page.wait_for_function("() => [...document.querySelectorAll('#mistakes-gallery img')].every(i => i.complete && i.naturalWidth > 0)")
        # where the model looked, over each mistake
        n = page.locator("#mistakes-gallery li").count()
        page.locator("#mistakes-explain").click()
        page.wait_for_function(f"() => document.querySelectorAll('#mistakes-gallery .try-heat').length === {n}",
                               timeout=60_000)
        assert page.locator("#mistakes-gallery .try-heat").first.evaluate("i => i.complete && i.naturalWidth > 0")
    else:
        assert "No mistakes" in mistakes.inner_text()
    assert page.locator("#loss-chart").bounding_box()["height"] > 100
    assert page.locator("#epoch-table tbody tr").count() >= 1
    shot(s, "05a-job-succeeded-evaluation")
    check_page(s)
    rows = page.locator("#exports tr[data-state=ok]")
    formats = [r.get_attribute("data-format") for r in rows.all()]
    assert {"pytorch", "torchscript", "onnx", "model_card"} <= set(formats), formats
    got = {}
    for fmt in formats:
        with page.expect_download() as dl:
            page.locator(f"#exports tr[data-format={fmt}] a").click()
        d = dl.value
        path = s["out"] / "downloads" / d.suggested_filename
        d.save_as(path)
        got[fmt] = path
    assert got["pytorch"].read_bytes()[:2] == b"PK" and got["torchscript"].read_bytes()[:2] == b"PK"
    import onnx
    onnx.checker.check_model(onnx.load(str(got["onnx"])))
    card = json.loads(got["model_card"].read_text())
    assert card["classes"] == ["ants", "bees"]
    assert card["trust"]["temperature"] == card["temperature"] > 0
    s["watch"].check()


def test_05b_calibration_and_the_operating_point(browser_session):
    s = browser_session
    page = s["page"]
    trust = page.locator("#trust")
    trust.scroll_into_view_if_needed()
    assert "temperature" in trust.inner_text() and "→" in page.locator("#trust-ece").inner_text()
    page.wait_for_function("() => { const i = document.getElementById('reliability-png'); "
                           "return i && i.complete && i.naturalWidth > 200; }")
    assert page.locator("#coverage-chart").bounding_box()["height"] > 100
    # moving the slider reads the curve; saving stores the point with the job
    page.locator("#threshold-range").fill("0.99")
    assert page.locator("#threshold-text").inner_text() == "0.99"
    effect = page.locator("#threshold-effect").inner_text()
    assert effect.startswith("At 0.99: answers ") and "of the val images" in effect
    with page.expect_response(lambda r: r.url.endswith("/operating-point") and r.request.method == "PUT") as resp:
        page.locator("#threshold-save").click()
    assert resp.value.status == 200
    page.wait_for_function("() => document.getElementById('threshold-note').textContent.startsWith('Set by')")
    jid = page.url.rstrip("/").split("/")[-1]
    ev = page.evaluate(f"fetch('/api/v1/jobs/{jid}/evaluation').then(r => r.json())")
    assert ev["abstain"]["threshold"] == 0.99 and ev["abstain"]["operating_point"]["set_by"]
    shot(s, "05b-calibration")
    check_page(s)
    s["watch"].check()


def test_06_classify_a_dropped_image(browser_session):
    s = browser_session
    page = s["page"]
    img = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[-1]
    drop_files(page, "#try-drop", [(img.name, img.read_bytes(), "image/jpeg")])
    page.wait_for_selector("#try-results .prob-top", timeout=60_000)
    top = page.locator("#try-results .prob-top .prob-class").inner_text()
    assert top in ("ants", "bees")
    assert page.locator("#try-results .prob-row").count() == 2
    assert page.locator("#try-results img").first.evaluate("i => i.complete && i.naturalWidth > 0")
    # at the operating point set above (0.99) a two-class model is rarely that sure: "none of these"
    abstained = page.locator("#try-results .try-abstained").count()
    # where the model looked: the heatmap over the image
    page.locator("#try-explain").check()
    drop_files(page, "#try-drop", [(img.name, img.read_bytes(), "image/jpeg")])
    page.wait_for_selector("#try-results .try-heat", timeout=60_000)
    assert page.locator("#try-results .try-heat").evaluate("i => i.complete && i.naturalWidth > 0")
    assert page.locator("#try-results .try-abstained").count() == abstained  # the same answer, explained
    page.locator("#try-it").scroll_into_view_if_needed()
    shot(s, "06-try-it-prediction")
    check_page(s)


def test_07_cancel_a_queued_and_a_running_job(browser_session):
    s = browser_session
    page = s["page"]
    new_job = s["ds_folder"].replace("/datasets/", "/jobs/new?dataset_id=")
    # a job that takes a while: the whole network, many epochs
    page.goto(new_job)
    page.check("input[name=strategy][value=full]")
    page.fill("input[name=epochs]", "50")
    s["trace"].clear()
    page.click("#job-submit")
    running = wait_for_job_page(page)
    wait_status(page, "running", 120)
    # the charts move while it trains: the first epochs arrive live
    page.wait_for_function("() => Chart.getChart('acc-chart').data.labels.length >= 1", timeout=180_000)
    assert page.locator("#no-epochs").is_hidden()
    shot(s, "07a-running-job-with-first-epoch")
    # a second job waits: the one worker is busy
    page.goto(new_job)
    page.click("#job-submit")
    queued = wait_for_job_page(page)  # noqa: F841
    assert page.locator("#status-badge .badge").inner_text() == "queued"
    assert page.locator("#stage-text").inner_text().startswith("Waiting for a worker")
    assert page.locator("#queued-hint").is_visible()
    shot(s, "07b-queued-job")
    check_page(s)
    page.click("#cancel-btn")
    wait_status(page, "cancelled", 30)
    page.wait_for_selector("text=This job was cancelled", timeout=20_000)
    shot(s, "07c-queued-job-cancelled")
    # back to the running one: cancel it too
    page.goto(f"/jobs/{running}")
    assert page.locator("#status-badge .badge").inner_text() == "running"
    page.wait_for_function("() => Chart.getChart('acc-chart').data.labels.length >= 1")
    page.click("#cancel-btn")
    wait_status(page, "cancelled", 120)
    page.wait_for_selector("text=This job was cancelled", timeout=20_000)
    assert page.locator("#cancel-btn").count() == 0
    shot(s, "07d-running-job-cancelled")
    check_page(s)
    trace = [t for t in s["trace"] if t["job"] == f"/jobs/{running}"]
    points = [t["points"] for t in trace if t["status"] == "running"]
    assert points and max(points) >= 1, trace


def test_08_a_bad_zip_gets_a_clear_error(browser_session):
    s = browser_session
    page = s["page"]
    page.goto("/datasets/new")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes/readme.txt", "no images here")
    s["watch"].expect("POST", r"/api/v1/datasets$")
    drop_files(page, "#dropzone", [("notes.zip", buf.getvalue(), "application/zip")])
    page.click("#upload-btn")
    err = page.locator("#upload-error")
    err.wait_for(state="visible", timeout=30_000)
    text = err.inner_text()
    assert "image" in text.lower() and len(text) > 30, text
    shot(s, "08a-bad-zip-error")
    # not a zip at all
    drop_files(page, "#dropzone", [("broken.zip", b"PK\x03\x04 this is not really a zip", "application/zip")])
    page.click("#upload-btn")
    page.wait_for_function("(t) => document.getElementById('upload-error').textContent !== t", arg=text)
    assert "zip" in err.inner_text().lower(), err.inner_text()
    shot(s, "08b-broken-zip-error")
    s["watch"].check()
    page.goto("/")
    body = page.locator("main").inner_text()
    assert "notes" not in body and "broken" not in body  # nothing half-written
    assert page.locator("text=ants-and-bees").count() >= 1
    shot(s, "08c-dashboard-with-jobs")
    check_page(s)


def test_09_an_api_token_made_in_the_browser_works_until_revoked(browser_session):
    import httpx

    s = browser_session
    page = s["page"]
    base = s["server"]["base"]
    page.goto("/")
    page.locator(".signout a[href=\"/settings/tokens\"]").click()  # the user name in the top bar: tokens page
    page.wait_for_url("**/settings/tokens")
    assert "this browser" in page.locator("#sessions").inner_text()
    page.fill("#token-form input[name=name]", "nightly script")
    page.locator("#token-form button[type=submit]").click()
    token = page.locator("#token-value").inner_text().strip()
    assert token.startswith("graft_")
    shot(s, "09a-token-created")
    api = {"Authorization": f"Bearer {token}"}
    r = httpx.get(f"{base}/api/v1/datasets", headers=api, timeout=10)
    assert r.status_code == 200 and any(d["name"] == "ants-and-bees" for d in r.json())
    page.goto("/settings/tokens")
    assert token not in page.content()  # shown once
    page.locator('tr[data-token="nightly script"] button', has_text="Revoke").click()
    page.wait_for_url("**/settings/tokens")
    assert page.locator('tr[data-token="nightly script"]').count() == 0
    assert httpx.get(f"{base}/api/v1/datasets", headers=api, timeout=10).status_code == 401
    check_page(s)


def test_10_the_admin_invites_a_viewer_who_reads_but_cannot_delete(browser_session):
    """Users page -> invite link -> a second browser sets its password; the admin shares a workspace with
    the new user as a viewer, who sees its dataset and gets a clear refusal when deleting it."""
    import httpx

    s = browser_session
    page = s["page"]
    base = s["server"]["base"]
    page.goto("/admin/users")
    page.fill("#invite-form input[name=name]", "vera")
    page.locator("#invite-form button[type=submit]").click()
    link = page.locator("#invite-url").inner_text().strip()
    assert "/invite?token=" in link
    shot(s, "10a-invited")
    page.goto("/workspaces")
    page.fill("#workspace-form input[name=name]", "lab")
    page.locator("#workspace-form button[type=submit]").click()
    page.wait_for_url("**/workspaces/*")
    page.select_option("#member-form select[name=username]", "vera")
    page.select_option("#member-form select[name=role]", "viewer")
    page.locator("#member-form button[type=submit]").click()
    assert page.locator('#members tr[data-user="vera"]').count() == 1
    wid = page.url.rstrip("/").rsplit("/", 1)[1]
    # the admin's dataset goes into the shared workspace through the API (a token of the admin's)
    page.goto("/settings/tokens")
    page.fill("#token-form input[name=name]", "setup")
    page.locator("#token-form button[type=submit]").click()
    admin = {"Authorization": f"Bearer {page.locator('#token-value').inner_text().strip()}"}
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for split, n in (("train", 3), ("val", 2)):
            for cls in ("ants", "bees"):
                for f in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                    z.write(f, f"lab/{split}/{cls}/{f.name}")
    r = httpx.post(f"{base}/api/v1/datasets", headers=admin, data={"name": "lab images", "workspace_id": wid},
                   files={"file": ("lab.zip", zbuf.getvalue(), "application/zip")}, timeout=120)
    assert r.status_code == 201, r.text
    did = r.json()["id"]
    # vera, in her own browser
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 900}, base_url=base)
    try:
        vera = context.new_page()
        vera.goto(link)
        vera.fill("input[name=password]", "vera's own long passphrase")
        vera.fill("input[name=password_confirm]", "vera's own long passphrase")
        vera.locator("#invite-form button[type=submit]").click()
        vera.wait_for_url(base + "/")
        with vera.expect_navigation():  # the switcher submits itself
            vera.select_option("#ws-select", wid)
        assert "lab images" in vera.locator("main").inner_text()
        vera.goto(f"/datasets/{did}")
        assert vera.locator("h1").inner_text().startswith("lab images")
        assert vera.locator("#delete-dataset").count() == 0 and vera.locator("#viewer-note").count() == 1
        csrf = vera.locator('meta[name="csrf-token"]').get_attribute("content")
        r = vera.request.delete(f"{base}/api/v1/datasets/{did}", headers={"X-CSRF-Token": csrf})
        assert r.status == 403 and "viewer" in r.json()["error"]["message"]
        vera.screenshot(path=str(s["out"] / "10b-viewer-dataset.png"))
    finally:
        context.close()
    check_page(s)


def test_11_a_folder_upload_in_resumable_parts(browser_session, tmp_path):
    """A picked folder is packed into zip parts in the browser, each sent as a resumable (tus) upload, then
    made into one dataset; the part size is lowered here so that this small folder makes several parts."""
    s = browser_session
    page = s["page"]
    folder = _slice(tmp_path / "in-parts", {"train": 12, "val": 6}, offset=40)
    total = sum(f.stat().st_size for f in folder.rglob("*.jpg"))
    assert total > 3 << 20  # several parts of 1 MiB
    page.goto("/datasets/new")
    assert int(page.get_attribute("#upload-form", "data-part-bytes")) == 100 << 20  # the setting's default
    page.evaluate("() => { document.getElementById('upload-form').dataset.partBytes = String(1 << 20); }")
    texts: list[str] = []
    page.expose_function("recordUploadText", lambda t: texts.append(t))
    page.evaluate("""() => { const el = document.getElementById('upload-text');
        new MutationObserver(() => window.recordUploadText(el.textContent))
            .observe(el, {childList: true, characterData: true, subtree: true}); }""")
    creations: list[str] = []
    page.on("request", lambda r: creations.append(r.url)
            if r.method == "POST" and r.url.endswith("/api/v1/uploads") else None)
    page.set_input_files("#folder-input", str(folder))
    assert re.search(r"Folder: in-parts/, 36 files", page.locator("#picked").inner_text())
    page.click("#upload-btn")
    page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=60_000)
    assert page.locator("h1").inner_text() == "in-parts"
    rows = {r.locator("td").nth(0).inner_text(): (r.locator("td").nth(1).inner_text(), r.locator("td").nth(2).inner_text())
            for r in page.locator("table.classes tbody tr").all()}
    assert rows == {"ants": ("12", "6"), "bees": ("12", "6")}
    assert len(creations) >= 3, creations  # one tus upload per part
    progress = [t for t in texts if t.startswith("Uploading part")]
    assert any(t.startswith("Uploading part 2 of ") for t in progress), texts
    assert any("of 36 files" in t for t in progress) and any(" MB of " in t for t in progress), texts
    assert any(t.startswith("Uploaded 36 files in ") for t in texts), texts
    # nothing left to resume: the parts were made into the dataset and forgotten
    assert page.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith('graft-parts:') "
                         "|| k.startsWith('tus::')).length") == 0
    shot(s, "11-dataset-from-resumable-parts")
    check_page(s)


def test_12_an_upload_interrupted_by_a_reload_resumes_and_skips_the_parts_already_sent(browser_session, tmp_path):
    """The upload is slowed (Chromium's network emulation), the page reloaded once the first part is sent, and
    the same folder picked again: the finished parts are not sent again, the unfinished one resumes."""
    s = browser_session
    page = s["page"]
    folder = _slice(tmp_path / "resumed", {"train": 12, "val": 6}, offset=60)
    cdp = page.context.new_cdp_session(page)
    creations: list[str] = []
    page.on("request", lambda r: creations.append(r.url)
            if r.method == "POST" and r.url.endswith("/api/v1/uploads") else None)

    def start():
        page.goto("/datasets/new")
        page.evaluate("() => { document.getElementById('upload-form').dataset.partBytes = String(1 << 20); }")
        page.set_input_files("#folder-input", str(folder))
        page.click("#upload-btn")

    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 600 * 1024})
    start()
    page.wait_for_function("() => /^Uploading part [2-9] of /.test(document.getElementById('upload-text')"
                           ".textContent)", timeout=60_000)
    first = len(creations)
    s["watch"].expect("PATCH", r"/api/v1/uploads/")  # the reload cuts the part being sent
    s["watch"].expect("HEAD", r"/api/v1/uploads/")
    page.reload()
    assert page.evaluate("() => Object.keys(localStorage).some(k => k.startsWith('graft-parts:'))")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    creations.clear()
    start()
    page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=60_000)
    assert page.locator("h1").inner_text() == "resumed"
    rows = {r.locator("td").nth(0).inner_text(): (r.locator("td").nth(1).inner_text(), r.locator("td").nth(2).inner_text())
            for r in page.locator("table.classes tbody tr").all()}
    assert rows == {"ants": ("12", "6"), "bees": ("12", "6")}
    parts = math.ceil(sum(f.stat().st_size for f in folder.rglob("*.jpg")) / (1 << 20))
    # the first attempt created at least 2 uploads; the second did not create the finished ones again
    assert first >= 2 and len(creations) < parts, (first, creations, parts)
    shot(s, "12-resumed-after-a-reload")
    check_page(s)


def test_13_a_multilabel_dataset_trains_and_its_thresholds_move(browser_session, tmp_path):
    """A labels.csv dataset dropped as a zip: the dataset page shows each label's images and the labels'
    co-occurrence; the recommended job trains one sigmoid per label; on the job page a label's threshold slider
    recomputes its figures, and saving stores the threshold with the job (the API's predictions use it)."""
    from support import multilabel

    s = browser_session
    page = s["page"]
    built = multilabel.build(tmp_path / "ml", n_images=40, with_split=True, tile=24)
    page.goto("/datasets/new")
    drop_files(page, "#dropzone", [("tags.zip", zip_bytes(built, "tags"), "application/zip")])
    page.fill("#ds-name", "tags")
    page.click("#upload-btn")
    page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=60_000)
    main = page.locator("main").inner_text()
    assert "multi-label" in main and page.locator("#cooccurrence").count() == 1, main
    assert page.locator("#label-frequencies").inner_text().count("\n") >= len(multilabel.LABELS)
    shot(s, "13a-multilabel-dataset")
    check_page(s)
    page.get_by_role("link", name="Train a model").first.click()
    page.wait_for_url(re.compile(r"/jobs/new\?dataset_id=\d+"))
    page.click("#job-submit")
    job_id = wait_for_job_page(page)
    wait_status(page, "succeeded", 180)
    page.wait_for_selector("#evaluation", timeout=20_000)
    assert "multi-label" in page.locator("#evaluation h2").inner_text()
    assert "Best val share with every label right" in page.locator(".progress-foot").inner_text()
    row = page.locator("#label-table tbody tr").first
    label = row.get_attribute("data-label")
    before = row.locator(".ml-f1").inner_text()
    row.locator(".ml-threshold").fill("0.99")
    assert row.locator(".ml-threshold-text").inner_text() == "0.99"
    after = row.locator(".ml-f1").inner_text()
    assert before != after or row.locator(".ml-counts").inner_text().split(" / ")[0] == "0", (before, after)
    with page.expect_response(lambda r: r.url.endswith("/thresholds") and r.request.method == "PUT") as resp:
        page.locator("#ml-thresholds-save").click()
    assert resp.value.status == 200
    page.wait_for_function("() => document.getElementById('ml-thresholds-note').textContent.startsWith('Set by')")
    job = page.evaluate(f"fetch('/api/v1/jobs/{job_id}').then(r => r.json())")
    assert job["result"]["label_thresholds"]["thresholds"][label] == 0.99, job["result"].get("label_thresholds")
    shot(s, "13b-multilabel-thresholds")
    check_page(s)
    s["watch"].check()
