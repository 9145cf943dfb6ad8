"""The production shape cannot run here (no Docker engine): check the files by parsing them, and check the
CLI commands that operators run (migrate, user create, token create) against a real database."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from support.paths import ROOT

from app.core.settings import Settings
from app.main import create_app

GRAFT = Path(sys.executable).with_name("graft")


def test_compose_describes_postgres_redis_migration_web_and_gpu_worker():
    c = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    s = c["services"]
    assert set(s) == {"postgres", "redis", "s3", "migrate", "web", "worker", "inference"}
    assert s["s3"]["command"][0] == "server" and "-s3" in s["s3"]["command"]
    assert s["migrate"]["depends_on"]["s3"]["condition"] == "service_healthy"
    assert s["web"]["environment"]["GRAFT_INFERENCE_URL"] == "http://inference:8001"
    assert s["inference"]["command"][:2] == ["graft", "inference"]
    assert s["migrate"]["command"] == ["graft", "migrate"]
    for name in ("web", "worker"):
        assert s[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        env = s[name]["environment"]
        assert env["GRAFT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["GRAFT_BROKER_URL"].startswith("redis://redis:")
        # no shared disk: datasets, checkpoints and models live in the bucket; /data is scratch
        assert env["GRAFT_STORAGE_URL"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://s3:8333"
        assert not any(v.endswith(":/data") for v in s[name]["volumes"]) and "weights:/weights" in s[name]["volumes"]
        assert (ROOT / s[name]["build"]["dockerfile"]).is_file()
    gpu = s["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert {"objects", "weights", "pgdata"} <= set(c["volumes"]) and "data" not in c["volumes"]
    # the settings the compose file sets are real settings
    fields = {f"GRAFT_{k.upper()}" for k in Settings.model_fields}
    assert {k for k in s["web"]["environment"] if k.startswith("GRAFT_")} <= fields


def test_dockerfiles_copy_what_exists_and_keep_torch_out_of_the_web_image():
    for name in ("Dockerfile.web", "Dockerfile.worker"):
        text = (ROOT / name).read_text()
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            for src in line.split()[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
        assert re.search(r"^CMD \[", text, re.M)
        # every package `pip install .` installs is in the image (pyproject's packages.find)
        copied = {line.split()[0] for line in re.findall(r"^COPY (.+)$", text, re.M)}
        assert {"domain", "app", "worker", "cli"} <= copied, (name, copied)
    web = (ROOT / "Dockerfile.web").read_text()
    assert "pip install ." in web and "[worker]" not in web  # no torch in the web image
    assert 'pip install ".[worker]"' in (ROOT / "Dockerfile.worker").read_text()


def _graft(*args: str, data: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env["GRAFT_DATA_DIR"] = str(data)
    return subprocess.run([str(GRAFT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_token_and_user_commands_use_the_serve_settings(tmp_path):
    data = tmp_path / "data"
    assert _graft("migrate", data=data).returncode == 0
    p = _graft("token", "create", "--name", "laptop", data=data)
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip().splitlines()[-1]
    assert token.startswith("graft_") and " " not in token
    assert _graft("user", "create", "bob", data=data).returncode == 0
    dup = _graft("user", "create", "bob", data=data)
    assert dup.returncode == 2 and "already exists" in dup.stderr
    bob = _graft("token", "create", "--name", "ci", "--user", "bob", data=data).stdout.strip().splitlines()[-1]
    missing = _graft("token", "create", "--name", "x", "--user", "carol", data=data)
    assert missing.returncode == 2 and "graft user create carol" in missing.stderr

    app = create_app(Settings(_env_file=None, data_dir=data))
    with TestClient(app) as c:
        assert c.get("/api/v1/datasets", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/api/v1/datasets", headers={"Authorization": f"Bearer {bob}"}).status_code == 200
        assert c.get("/api/v1/datasets", headers={"Authorization": "Bearer graft_nope"}).status_code == 401
    # stored hashed: the token itself is nowhere in the database file
    assert token.encode() not in (data / "graft.db").read_bytes()
