"""Settings from GRAFT_* environment variables (and a .env file), with embedded defaults:
SQLite and a serverless Celery transport under the data directory, so nothing has to be installed."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from domain.exports import AFTER_TRAINING, EXPORT_FORMATS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAFT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("graft-data"), description="Datasets, runs, the SQLite file, the embedded broker.")
    database_url: str | None = Field(None, description="Default: sqlite:///<data_dir>/graft.db")
    broker_url: str | None = Field(None, description="Default: a filesystem transport under <data_dir>/broker")
    weights_dir: Path | None = Field(None, description="Pretrained weights cache (TORCH_HOME); default torch's")
    cache_dir: Path | None = Field(None, description="Feature cache; default <data_dir>/cache")
    storage_url: str | None = Field(None, description="Where datasets, checkpoints and models live: file:///path "
                                    "or s3://bucket/prefix (credentials, endpoint and region from the AWS_* "
                                    "variables); default: the data directory itself")
    import_roots: list[Path] = Field(default_factory=list, description="Server folders admins may import datasets "
                                     "from (a JSON list, e.g. [\"/srv/images\"])")
    storage_presign: bool = Field(False, description="Downloads from S3 storage redirect to a presigned URL "
                                  "instead of streaming through the web app")
    image_store_bytes: int = Field(3 << 30, ge=0, description="Decoded training images a worker keeps in (shared) "
                                   "memory; beyond it, images are decoded again at each epoch")
    scratch_max_bytes: int = Field(50 << 30, ge=0, description="Local copies of datasets and models fetched from "
                                   "object storage, per process: past this, the least recently used go (0: no "
                                   "limit)")
    max_upload_bytes: int = Field(2 << 30, ge=1, description="Largest accepted upload")
    max_batch_images: int = Field(100_000, ge=1, description="Most images one batch prediction takes "
                                                             "(POST /api/v1/jobs/{id}/batch-predict)")
    max_extracted_bytes: int = Field(8 << 30, ge=1, description="Largest total size of an extracted zip")
    max_zip_entries: int = Field(200_000, ge=1)
    max_user_upload_bytes: int = Field(20 << 30, ge=1, description="Largest total size of the resumable uploads "
                                       "(/api/v1/uploads) one user holds at once: unfinished ones and finished "
                                       "ones not yet made into a dataset (each one is at most max_upload_bytes)")
    upload_expiry_s: int = Field(24 * 3600, ge=1, description="A resumable upload not written to for this long is "
                                 "abandoned: its Upload-Expires passes and it is deleted")
    upload_part_bytes: int = Field(100 << 20, ge=1 << 20, description="The upload page packs a picked folder "
                                   "into zip parts of about this size, each sent as one resumable upload")
    max_zip_ratio: float = Field(200.0, gt=1, description="Largest compression ratio of a zip entry")
    max_image_pixels: int = Field(89_478_485, ge=1, description="Largest image (width x height) of an upload; "
                                  "a larger one refuses the upload as a decompression bomb (Pillow's default)")
    upload_check_threads: int = Field(min(8, os.cpu_count() or 1), ge=1,
                                      description="Threads that decode an upload's images to check them")
    doctor_process_min_files: int = Field(5000, ge=0, description="An upload of at least this many files is "
                                          "checked by the doctor in a child process, so that its per-image "
                                          "bookkeeping never stays in the web process (0: always)")
    inference_url: str | None = Field(None, description="The inference service (`graft inference`); `graft serve` "
                                      "starts one and sets this")
    max_predict_images: int = Field(64, ge=1, description="Images per prediction request")
    inference_batch_window_ms: float = Field(5.0, ge=0, description="The inference service merges prediction "
                                             "requests for one model that come within this long of each other "
                                             "(or while a forward pass runs) into shared forward passes")
    inference_max_batch: int = Field(64, ge=1, description="Most images in one merged forward pass of the "
                                     "inference service (1: no merging, each request its own)")
    progress_interval_s: float = Field(2.0, gt=0, description="How often a worker writes batch progress")
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="A running job whose worker has not written a "
                                       "heartbeat for this long is taken as lost: re-queued or failed")
    heartbeat_interval_s: float = Field(10.0, gt=0, description="How often a worker writes a running job's "
                                        "heartbeat (at most a quarter of heartbeat_timeout_s)")
    max_attempts: int = Field(3, ge=1, description="Times a job may be started: after this many lost workers "
                              "it is marked failed instead of re-queued")
    reconcile_interval_s: float = Field(30.0, gt=0, description="How often each worker looks for lost jobs and "
                                        "for queued jobs the broker does not have")
    jobs_per_gpu: int = Field(1, description="Jobs that share one GPU: `graft worker` without --concurrency runs "
                              "this many times the host's GPUs at once (1 on a CPU-only host), each pool child "
                              "on one GPU with at most 0.95/jobs_per_gpu of its memory")
    gpu_job_min_free_mb: int = Field(2048, description="Free memory (MiB) a worker's GPU must have before the "
                                     "worker takes a training job; with less, the job stays queued for another "
                                     "worker or a later delivery (0: no check)")
    default_user: str = Field("admin", description="The first admin, whose invite link `graft serve` prints")
    session_max_age_s: int = 14 * 24 * 3600
    public_url: str = Field("http://127.0.0.1:8000", description="The address users open Graft at: the origin of "
                            "invite links and of the single sign-on redirect")
    oidc_issuer: str | None = Field(None, description="Single sign-on: the OpenID Connect provider's issuer URL "
                                    "(with the two below, adds a 'Sign in with ...' button)")
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_auto_create: bool = Field(False, description="Create an account on a first single sign-on whose "
                                   "verified e-mail matches no user")
    metrics_token: str | None = Field(None, description="A bearer token for Prometheus to read /metrics (admins' "
                                      "tokens work too)")
    oidc_name: str = Field("single sign-on", description="The provider's name on the button")
    export_formats: str = Field(",".join(AFTER_TRAINING), description="The formats a worker exports (and checks) "
                                "after each training run, comma-separated (GRAFT_EXPORT_FORMATS); the others "
                                "are not offered for that job")

    @field_validator("export_formats", mode="after")
    @classmethod
    def _known_formats(cls, v: str) -> str:
        names = [f.strip() for f in v.split(",") if f.strip()]
        unknown = [f for f in names if f not in EXPORT_FORMATS or f in ("pytorch", "model_card")]
        if unknown:
            raise ValueError(f"unknown export format(s) {', '.join(unknown)} in GRAFT_EXPORT_FORMATS: choose from "
                             f"{', '.join(AFTER_TRAINING)}")
        return ",".join(names)

    @field_validator("jobs_per_gpu", mode="after")
    @classmethod
    def _at_least_one_job(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"GRAFT_JOBS_PER_GPU must be 1 or more (got {v}): it is how many jobs share one GPU")
        return v

    @field_validator("gpu_job_min_free_mb", mode="after")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"GRAFT_GPU_JOB_MIN_FREE_MB must be 0 or more (got {v}): the free GPU memory, in MiB, "
                             "a job needs before a worker takes it (0: no check)")
        return v

    @property
    def export_list(self) -> list[str]:
        return [f for f in self.export_formats.split(",") if f]

    @field_validator("public_url", mode="after")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer and self.oidc_client_id)

    @property
    def heartbeat_every_s(self) -> float:
        """The heartbeat period actually used: never so long that one late write looks like a dead worker."""
        return min(self.heartbeat_interval_s, self.heartbeat_timeout_s / 4)

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'graft.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def tus_dir(self) -> Path:
        """Resumable uploads (tus): <uploads_dir>/tus/<user id>/<upload id>.{bin,json}."""
        return self.uploads_dir / "tus"

    @property
    def thumbs_dir(self) -> Path:
        return self.data_dir / "thumbs"

    @property
    def features_cache_dir(self) -> Path:
        from domain.paths import default_cache_dir

        return self.cache_dir or default_cache_dir(self.data_dir)

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.datasets_dir, self.runs_dir, self.uploads_dir, self.broker_dir / "queue",
                  self.broker_dir / "processed"):
            d.mkdir(parents=True, exist_ok=True)

    def use_weights_dir(self) -> None:
        """Point TORCH_HOME at `weights_dir` when set: where the catalog looks for pretrained weights and
        torch keeps them (the server and every `graft` command call this once at start)."""
        if self.weights_dir:
            os.environ["TORCH_HOME"] = str(self.weights_dir)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
