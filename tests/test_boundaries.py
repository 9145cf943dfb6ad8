"""Import boundaries: the web tier never imports torch; the training engine never imports the web tier,
the ORM or Celery. Each check runs in a fresh interpreter, so no other test's imports count."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from support.paths import ROOT


def run_python(code: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(GRAFT_DATA_DIR=str(tmp_path / "data"), GRAFT_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def test_web_tier_does_not_import_torch(tmp_path):
    out = run_python("""
        import sys
        from pathlib import Path

        import app.db.migrate
        import cli.main
        import app.main
        from app.core.settings import Settings
        from app.services import auth
        from fastapi.testclient import TestClient

        settings = Settings(data_dir=Path(%r))
        settings.ensure_dirs()
        app.db.migrate.run_migrations(settings.db_url)
        web = app.main.create_app(settings)
        web.openapi()
        with web.state.sessions() as s:
            token = auth.create_token(s, auth.create_user(s, "u"), "t")
        client = TestClient(web)
        assert client.get("/healthz").status_code == 200
        r = client.get("/api/v1/backbones", headers={"Authorization": "Bearer " + token})
        assert r.status_code == 200, r.text
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm"))
        print("BAD", bad[:10])
    """ % str(tmp_path / "data"), tmp_path)  # noqa: UP031
    assert "BAD []" in out, out


def test_engine_does_not_import_the_web_tier(tmp_path):
    out = run_python("""
        import sys

        import worker.engine.backbones
        import worker.engine.runner

        assert "torch" in sys.modules
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("app", "sqlalchemy", "fastapi", "celery"))
        print("BAD", bad[:10])
    """, tmp_path)
    assert "BAD []" in out, out
