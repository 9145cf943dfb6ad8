"""The review of label issues in a real browser (Debian's Chromium driven by Playwright): on the suspects of a
finished search, the keys accept one suggestion and remove another image, "Apply 2 changes" makes a new
version of the dataset with exactly those changes, and the browser lands on its page.

The web app runs in this process on a loopback port (uvicorn in a thread); the search's result is stored
directly in the database, naming real images of the uploaded dataset (the worker's side of a search is
tested in tests/app/test_label_issues.py). Screenshots go to `test-output/browser/label-review-*.png`."""
from __future__ import annotations

import os
import re
from pathlib import Path

import playwright.sync_api as playwright_api
import pytest
from fastapi.testclient import TestClient
from support.paths import HYMENOPTERA, ROOT
from support.web import dataset_zip, make_app, served_in_thread

from app.db.models import Job
from app.services import auth
from domain.results import LabelIssue, LabelIssueReport

pytestmark = pytest.mark.e2e  # starts a real server and a browser

CHROMIUM = Path(os.environ.get("GRAFT_CHROMIUM", "/usr/bin/chromium"))
OUT = Path(os.environ.get("GRAFT_TEST_OUTPUT", ROOT / "test-output")) / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _file(split: str, cls: str, n: int) -> str:
    return f"{split}/{cls}/{sorted((HYMENOPTERA / split / cls).glob('*.jpg'))[n].name}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The app on SQLite in a thread, alice's dataset and a finished search of it with three suspects."""

    if not CHROMIUM.exists():
        msg = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
        pytest.fail(msg) if os.environ.get("CI") == "true" else pytest.skip(msg)
    home = tmp_path_factory.mktemp("label-review")
    app, settings = make_app(home / "data", f"sqlite:///{home / 'g.db'}")
    with app.state.sessions() as s:
        alice = auth.create_user(s, "alice")
        headers = {"Authorization": "Bearer " + auth.create_token(s, alice, "t")}
    api = TestClient(app, headers=headers)
    r = api.post("/api/v1/datasets", data={"name": "ants and bees"},
                 files={"file": ("d.zip", dataset_zip({"train": 6, "val": 3}), "application/zip")})
    assert r.status_code == 201, r.text
    ds = r.json()
    issues = [LabelIssue(file=_file("train", "ants", 0), given="ants", suggested="bees", score=0.93,
                         reason="confident_learning", split="train", given_probability=0.07,
                         suggested_probability=0.93),
              LabelIssue(file=_file("val", "bees", 1), given="bees", suggested="ants", score=0.9,
                         reason="exact_duplicate", split="val", given_probability=0.2, suggested_probability=0.8,
                         other_file=_file("val", "ants", 1), similarity=1.0),
              LabelIssue(file=_file("train", "bees", 2), given="bees", suggested="ants", score=0.61,
                         reason="confident_learning", split="train", given_probability=0.39,
                         suggested_probability=0.61)]
    report = LabelIssueReport(status="completed", issues=issues, n_images=18, n_classes=2, n_flagged=3,
                              classes=ds["classes"], method="confident_learning:self_confidence", folds=5,
                              oof_acc=0.83, backbone="efficientnet_lite0", image_size=224, seconds=4.0)
    with app.state.sessions() as s:
        job = Job(owner_id=alice.id, workspace_id=ds["workspace_id"], dataset_id=ds["id"], kind="label_issues",
                  spec={"backbone": "efficientnet_lite0"}, status="succeeded", progress=1.0, total_epochs=0,
                  result=report.to_json(), finished_at=auth.utcnow())
        s.add(job)
        s.commit()
        login = auth.create_token(s, alice, "browser", kind="login")
    try:
        with served_in_thread(app) as base:
            yield {"base": base, "login": login, "api": api, "ds": ds, "issues": issues}
    finally:
        api.close()


def test_keys_accept_one_suggestion_remove_another_image_and_apply_them_as_a_version(site):
    OUT.mkdir(parents=True, exist_ok=True)
    ds, issues, base = site["ds"], site["issues"], site["base"]
    problems: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, base_url=base)
            page.set_default_timeout(20_000)
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
            page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} from {r.url}"))
            page.goto(f"/login?token={site['login']}")
            page.wait_for_url(base + "/")
            page.goto(f"/datasets/{ds['id']}")
            page.get_by_role("link", name="Review 3 suspects").click()
            page.wait_for_url(f"**/datasets/{ds['id']}/label-issues")
            cards = page.locator("article.issue")
            assert cards.count() == 3
            assert [cards.nth(i).get_attribute("data-file") for i in range(3)] == [i.file for i in issues]
            assert "a accept the suggestion" in page.locator("#keys-help").inner_text()
            # the thumbnails loaded (the duplicate shows its twin too)
            loaded = page.eval_on_selector_all("article.issue img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
            assert loaded == [True] * 4, loaded
            apply = page.locator("#apply-btn")
            assert apply.inner_text() == "Apply 0 changes" and apply.is_disabled()
            page.screenshot(path=str(OUT / "label-review-1-suspects.png"), full_page=True)

            cards.nth(0).focus()
            page.keyboard.press("a")  # the first: accept "bees"
            assert cards.nth(0).get_attribute("data-choice") == "relabel"
            assert "ants → bees" in cards.nth(0).locator('[data-role="choice"]').inner_text()
            page.keyboard.press("j")  # the second: remove
            assert page.evaluate("document.activeElement.dataset.index") == "1"
            page.keyboard.press("x")
            assert cards.nth(1).get_attribute("data-choice") == "remove"
            page.keyboard.press("ArrowRight")  # the third: pick class 2 (bees, as filed), then 1, then keep it
            page.keyboard.press("1")
            assert cards.nth(2).locator("select").input_value() == "ants"
            page.keyboard.press("0")
            assert cards.nth(2).get_attribute("data-choice") == "keep"
            assert cards.nth(2).locator("select").input_value() == "bees"
            assert apply.inner_text() == "Apply 2 changes" and apply.is_enabled()
            assert "1 relabelled, 1 removed" in page.locator("#apply-summary").inner_text()
            page.screenshot(path=str(OUT / "label-review-2-decided.png"), full_page=True)

            apply.click()
            page.wait_for_url(re.compile(r"/datasets/\d+$"))
            new_id = int(page.url.rsplit("/", 1)[1])
            assert new_id != ds["id"]
            page.screenshot(path=str(OUT / "label-review-3-new-version.png"), full_page=True)

            # a new search from the dataset page: the review page follows it (no worker here: it waits), and
            # its Cancel button ends it; the page then shows the last finished search's suspects again
            page.goto(f"/datasets/{ds['id']}")
            page.locator("#label-start").click()
            page.wait_for_url(f"**/datasets/{ds['id']}/label-issues")
            assert page.locator("#stage-text").inner_text() == "Waiting for a worker"
            assert page.locator("#label-start").is_disabled() and page.locator("article.issue").count() == 3
            page.locator("#cancel-btn").click()
            page.wait_for_selector("p.alert-info")  # after the reload the end of the job caused
            assert "was cancelled" in page.locator("p.alert-info").inner_text()
            assert page.locator("#status-badge .badge").inner_text() == "cancelled"
            assert page.locator("#label-start").is_enabled()
        finally:
            browser.close()
    assert not problems, problems
    version = site["api"].get(f"/api/v1/datasets/{new_id}").json()
    assert version["parent_id"] == ds["id"] and version["version"] == 2
    ch = version["changes"]
    assert [(r["file"], r["from"], r["to"]) for r in ch["relabelled"]] == [(issues[0].file, "ants", "bees")]
    assert ch["removed"] == [issues[1].file] and (ch["n_relabelled"], ch["n_removed"], ch["n_added"]) == (1, 1, 0)
    assert version["counts"]["train"] == {"ants": 5, "bees": 7} and version["counts"]["val"] == {"ants": 3, "bees": 2}
