"""A real OpenID Connect provider for the single sign-on tests: tests/support/oidc/provider.js (the npm
package oidc-provider), started once per test session on a free port, and a helper that signs in on its
pages (the development login and consent forms) with an HTTP client, as a browser would.

Its node modules are installed on first use (`npm ci`; `make test` does it beforehand). Without node or
npm the tests are skipped, and fail on CI (CI=true)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from support.procs import free_port

HERE = Path(__file__).resolve().parent / "oidc"
CLIENT_ID = "graft-test"
CLIENT_SECRET = "graft-test-secret-not-a-real-one"
GRAFT_URL = "http://testserver"  # the TestClient's origin: public_url of the app under test
REDIRECT_URI = f"{GRAFT_URL}/login/oidc/callback"


@dataclass(frozen=True)
class OidcProvider:
    issuer: str
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET

    def settings(self, **overrides) -> dict:
        """The Graft settings that use this provider."""
        return {"oidc_issuer": self.issuer, "oidc_client_id": self.client_id,
                "oidc_client_secret": self.client_secret, "public_url": GRAFT_URL, **overrides}


def _missing(what: str) -> None:
    msg = f"{what}: the single sign-on tests need Node.js 20+ and npm (they start a real OpenID provider)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _install() -> None:
    if (HERE / "node_modules" / "oidc-provider" / "package.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        _missing("npm is not installed")
    assert npm is not None
    cmd = [npm, "ci" if (HERE / "package-lock.json").is_file() else "install", "--no-audit", "--no-fund"]
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        _missing(f"`{' '.join(cmd[1:])}` failed in {HERE}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory) -> Iterator[OidcProvider]:
    """The running provider (one client: CLIENT_ID, CLIENT_SECRET, REDIRECT_URI; accounts bob-sub, eve-sub,
    carol-sub, robert-sub, see provider.js)."""
    node = shutil.which("node")
    if node is None:
        _missing("node is not installed")
    assert node is not None
    _install()
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("oidc-provider") / "provider.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([node, "provider.js", str(port), CLIENT_ID, CLIENT_SECRET, REDIRECT_URI], cwd=HERE,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the OpenID provider exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}",
                            pytrace=False)
            if "listening" in log_path.read_text():
                try:
                    if httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                pytest.fail(f"the OpenID provider did not start in 30 s:\n{log_path.read_text()[-3000:]}",
                            pytrace=False)
            time.sleep(0.1)
        yield OidcProvider(issuer)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _form(html: str, base: str) -> tuple[str, dict[str, str]]:
    """The page's form: its absolute action and its hidden fields."""
    m = re.search(r'<form[^>]*action="([^"]*)"', html)
    assert m, f"no form on the provider's page:\n{html[:2000]}"
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html))
    return urljoin(base, m.group(1)), fields


def provider_sign_in(browser: httpx.Client, authorize_url: str, login: str, max_steps: int = 12) -> str:
    """Follow the provider's pages from the authorization URL, as `login` (an account's sub), submitting the
    login and consent forms when asked; returns the URL it redirects back to (Graft's callback)."""
    url = authorize_url
    for _ in range(max_steps):
        r = browser.get(url)
        while r.status_code in (302, 303):
            location = urljoin(str(r.url), r.headers["location"])
            if location.startswith(GRAFT_URL):
                return location
            r = browser.get(location)
        assert r.status_code == 200, f"{r.status_code} from the provider at {r.url}:\n{r.text[:2000]}"
        action, fields = _form(r.text, str(r.url))
        if fields.get("prompt") == "login":
            fields.update(login=login, password="any")
        r = browser.post(action, data=fields)
        assert r.status_code in (302, 303), f"{r.status_code} from the provider at {action}:\n{r.text[:2000]}"
        url = urljoin(str(r.url), r.headers["location"])
        if url.startswith(GRAFT_URL):
            return url
    raise AssertionError(f"the provider did not redirect back to Graft in {max_steps} steps")
