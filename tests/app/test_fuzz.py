"""The OpenAPI schema fuzzed with Schemathesis, in-process (ASGI), over SQLite.

Two passes over every operation of the schema: authenticated as a user who owns real objects (a dataset,
a queued job, a succeeded job with its files and evaluation), and anonymous. Checks: no 5xx, the status
code is one the schema documents, the content type is the documented one, and the body matches the
documented schema. Half the generated ids are swapped for the ids of the user's real objects, so the
fuzzer reaches real rows, not only 404s; objects a DELETE removed are recreated before the next case.

Bounded: a fixed number of examples per operation, derandomized (the same cases every run), no deadline.
Not fuzzed: POST /api/v1/datasets and POST /api/v1/jobs/{job_id}/predict (multipart uploads: the
generated form bodies test the multipart parser, not the API; both are covered by tests/test_api.py and
tests/test_inference.py) and GET /api/v1/jobs/{job_id}/events (a stream that lasts while the job runs;
tests/test_api.py reads it for finished jobs).
"""
from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode  # noqa: E402
from sqlalchemy import select, update  # noqa: E402
from support.paths import HYMENOPTERA
from support.web import dataset_zip

from app.core.settings import Settings  # noqa: E402
from app.db.migrate import run_migrations  # noqa: E402
from app.db.models import Artifact, Dataset, Job, JobEvent  # noqa: E402
from app.main import create_app  # noqa: E402
from app.services import auth  # noqa: E402
from app.services import datasets as dataset_service  # noqa: E402
from app.services import jobs as job_service  # noqa: E402
from domain.spec import RunSpec  # noqa: E402

EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
NOT_FUZZED = {("POST", "/api/v1/datasets"), ("POST", "/api/v1/jobs/{job_id}/predict"),
              ("GET", "/api/v1/jobs/{job_id}/events")}
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))


@dataclass
class FuzzEnv:
    settings: Settings
    app: object
    headers: dict[str, str]
    ids: dict[str, int] = field(default_factory=dict)

    def sessions(self):
        return self.app.state.sessions()

    def ensure(self) -> dict[str, int]:
        """Alice's real objects (a dataset, a queued job, a succeeded job), recreated when a fuzzed DELETE
        or cancel changed them."""
        with self.sessions() as s:
            user = auth.get_user(s, "alice")
            ds = s.get(Dataset, self.ids["dataset"]) if self.ids else None
            if ds is None:
                ds = _make_dataset(s, self.settings, user)
            queued = s.get(Job, self.ids["queued"]) if self.ids else None
            if queued is None or queued.status != "queued":
                queued = _make_job(s, self.settings, user, ds.id, "queued")
            done = s.get(Job, self.ids["succeeded"]) if self.ids else None
            if done is None:
                done = _make_job(s, self.settings, user, ds.id, "succeeded")
            self.ids = {"dataset": ds.id, "queued": queued.id, "succeeded": done.id}
        return self.ids


def _make_dataset(s, settings: Settings, user) -> Dataset:
    zipped = dataset_zip({"train": 3, "val": 2}, top="hymen")
    return dataset_service.create_from_zip(s, settings, user, "fuzz", io.BytesIO(zipped))


def _make_job(s, settings: Settings, user, dataset_id: int, status: str) -> Job:
    job = job_service.create(s, settings, user, dataset_id, RunSpec(epochs=2))
    if status == "queued":
        return job
    ds = s.get(Dataset, dataset_id)
    val_file = next(p for p in (settings.data_dir / ds.path).rglob("*.jpg") if "val" in p.parts)
    rel_val = str(val_file.relative_to(settings.data_dir / ds.path))
    run = settings.runs_dir / str(job.id)
    run.mkdir(parents=True, exist_ok=True)
    arts = []
    for kind, name in (("model", "model.pt"), ("torchscript", "model.torchscript.pt"), ("onnx", "model.onnx"),
                       ("model_card", "model_card.json"), ("confusion_matrix", "confusion_matrix.png")):
        data = os.urandom(256) if kind != "confusion_matrix" else _png()
        (run / name).write_bytes(data)
        arts.append(Artifact(job_id=job.id, kind=kind, path=str((run / name).relative_to(settings.data_dir)),
                             size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    s.add_all(arts)
    report = {"accuracy": 0.75, "classes": ["ants", "bees"], "confusion_matrix": [[2, 0], [1, 1]], "images": 4,
              "per_class": [], "top_k": {},
              "mistakes": [{"file": rel_val, "true": "bees", "predicted": "ants", "confidence": 0.9,
                            "true_class_probability": 0.1}]}
    exports = [{"format": f, "ok": True, "error": None} for f in ("pytorch", "torchscript", "onnx", "model_card")]
    s.execute(update(Job).where(Job.id == job.id).values(
        status="succeeded", progress=1.0, current_epoch=2, best_val_acc=0.75,
        result={"report": report, "exports": exports}))
    s.add(JobEvent(job_id=job.id, kind="status", data={"status": "succeeded", "error": None}))
    s.commit()
    s.refresh(job)
    return job


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory) -> FuzzEnv:
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"the shared dataset {HYMENOPTERA} is missing")
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = Settings(data_dir=tmp / "data", database_url=f"sqlite:///{tmp / 'fuzz.db'}")
    run_migrations(cfg.db_url)
    app = create_app(cfg)
    with app.state.sessions() as s:
        user = auth.create_user(s, "alice")
        token = auth.create_token(s, user, "fuzz")
        # another user's objects: the fuzzer must never reach them
        bob = auth.create_user(s, "bob")
        bob_ds = _make_dataset(s, cfg, bob)
        _make_job(s, cfg, bob, bob_ds.id, "succeeded")
    env = FuzzEnv(cfg, app, {"Authorization": f"Bearer {token}"})
    env.ensure()
    return env


ID_PARAMS = ("dataset_id", "job_id", "n")


def _real_ids(case, env: FuzzEnv) -> None:
    """Every other generated id (decided by the id itself, so runs stay reproducible) becomes a real one."""
    ids = env.ensure()
    params = case.path_parameters or {}
    for name, value in list(params.items()):
        if name not in ID_PARAMS or not isinstance(value, int) or value % 2:
            continue
        if name == "n":  # the succeeded job's one misclassified image
            params[name] = 0
        elif name == "dataset_id":
            params[name] = ids["dataset"]
        else:
            params[name] = ids["succeeded" if value % 4 == 0 else "queued"]
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("dataset_id"), int) and body["dataset_id"] % 2 == 0:
        body["dataset_id"] = ids["dataset"]


def _strategy(op):
    modes = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            modes.append(op.as_strategy(generation_mode=mode))
        except Exception:  # noqa: BLE001 - an operation with nothing to make invalid has no negative cases
            pass
    return st.one_of(*modes)


def fuzz(env: FuzzEnv, headers: dict[str, str], extra=None) -> tuple[list[str], dict[str, Counter]]:
    """Runs every fuzzed operation; returns the failures (one per operation, the first found) and the
    statuses each operation answered."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", env.app)
    failures, seen, statuses = [], [], {}
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in NOT_FUZZED:
            continue
        label = f"{op.method.upper()} {op.path}"
        seen.append(label)
        statuses[label] = Counter()

        @FUZZ_SETTINGS
        @given(case=_strategy(op))
        def run(case):
            _real_ids(case, env)
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            statuses[label][response.status_code] += 1  # noqa: B023
            if extra:
                extra(case, response)

        try:
            run()
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - every operation's failure, reported together
            failures.append(f"{label}: {type(e).__name__}: {e}")
    assert len(seen) >= 12, seen  # the schema was read and the operations found
    return failures, statuses


def test_fuzz_authenticated(fuzz_env):
    failures, statuses = fuzz(fuzz_env, fuzz_env.headers)
    assert not failures, "\n\n".join(failures)
    # the fuzzer reached the user's real objects, not only 404s (random generation does not reach every one
    # of them on every run; most of them it must)
    labels = ("GET /api/v1/datasets/{dataset_id}", "GET /api/v1/jobs/{job_id}", "GET /api/v1/jobs/{job_id}/metrics",
              "GET /api/v1/jobs/{job_id}/model", "GET /api/v1/jobs/{job_id}/evaluation",
              "GET /api/v1/jobs/{job_id}/confusion_matrix.png", "POST /api/v1/jobs/{job_id}/cancel",
              "GET /api/v1/jobs/{job_id}/mistakes/{n}.jpg", "DELETE /api/v1/jobs/{job_id}", "POST /api/v1/jobs")
    reached = [label for label in labels if any(200 <= code < 300 for code in statuses.get(label, ()))]
    assert len(reached) >= 6, (reached, statuses)


def test_fuzz_anonymous(fuzz_env):
    def refused(case, response):
        if case.operation.path == "/healthz":
            return
        # 401; or 400/422 for a body that is not JSON at all (FastAPI parses it before the dependencies run):
        # an error either way, never data
        assert response.status_code in (400, 401, 422), (response.status_code, response.text)
        if response.status_code != 401:
            assert case.operation.method.upper() in ("POST", "PUT") and response.json()["error"]["code"] != "unauthorized"
        assert set(response.json()) == {"error"}, response.text

    failures, _ = fuzz(fuzz_env, {}, refused)
    assert not failures, "\n\n".join(failures)


def test_fuzz_never_touched_another_users_objects(fuzz_env):
    with fuzz_env.sessions() as s:
        bob = auth.get_user(s, "bob")
        assert s.scalars(select(Dataset).where(Dataset.owner_id == bob.id)).all()
        jobs = s.scalars(select(Job).where(Job.owner_id == bob.id)).all()
        assert [j.status for j in jobs] == ["succeeded"] and not jobs[0].cancel_requested
