"""graft_client: a light Python client for a Graft server (self-hosted no-code transfer learning on images).

    from graft_client import Graft

    with Graft("http://127.0.0.1:8000", token="...") as g:
        ds = g.upload_dataset("photos/", name="ants and bees")   # resumable, in parts, with a progress bar
        job = g.train(ds.id, strategy="features", epochs=10).wait()
        job.download("model.onnx", format="onnx")
        print(g.predict(job.id, ["ant.jpg"])[0].label)

Every error answer of the server raises a :class:`GraftError` subclass (:class:`NotFound`, :class:`Conflict`,
...) carrying the server's message (``detail``) and the HTTP ``status``."""
from __future__ import annotations

from ._client import DEFAULT_PART_SIZE, Graft
from .errors import (
    AuthError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    GraftError,
    JobFailed,
    NotFound,
    ServerError,
    TooLarge,
    TooManyRequests,
    Unavailable,
    ValidationError,
)
from .models import (
    BatchJob,
    BatchRow,
    ClassProbability,
    Dataset,
    EpochMetric,
    Evaluation,
    ExportCheck,
    Job,
    Prediction,
)

__version__ = "0.1.0"

__all__ = ["DEFAULT_PART_SIZE", "AuthError", "BatchJob", "BatchRow", "ClassProbability", "Conflict",
           "ConnectionFailed", "Dataset", "EpochMetric", "Evaluation", "ExportCheck", "Forbidden", "Graft",
           "GraftError", "Job", "JobFailed", "NotFound", "Prediction", "ServerError", "TooLarge", "TooManyRequests",
           "Unavailable", "ValidationError", "__version__"]
