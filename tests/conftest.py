from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support.paths import HYMENOPTERA

# tests never download weights
os.environ.setdefault("GRAFT_OFFLINE", "1")
# torch's OpenMP threads (libgomp) sleep while they wait instead of spinning. `make test` runs two test processes
# on two cores, each with 2-thread torch and real worker processes: spinning threads take the cores from each other
# (measured, a 3-epoch two_stage run: 9-10 s instead of 3.6-4 s with two at once, 23-34 s instead of 3.5 s beside
# other tests; alone it costs about 1 s). Set before anything imports torch; the processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _copy_slice(dst: Path, per_class: dict[str, int], offset: int = 0) -> Path:
    for split, n in per_class.items():
        for cls in ("ants", "bees"):
            src = sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[offset:offset + n]
            assert len(src) == n, f"hymenoptera is missing images under {split}/{cls}"
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in src:
                shutil.copy2(f, dst / split / cls / f.name)
    return dst


@pytest.fixture(scope="session")
def hymenoptera_slice(tmp_path_factory) -> Path:
    """A small real slice: 16 train and 10 val images per class (ants, bees)."""
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"the shared dataset {HYMENOPTERA} is missing")
    return _copy_slice(tmp_path_factory.mktemp("hymenoptera"), {"train": 16, "val": 10})


@pytest.fixture(scope="session")
def tiny_slice(tmp_path_factory) -> Path:
    """An even smaller slice for runs that train the whole network: 6 train, 3 val per class."""
    return _copy_slice(tmp_path_factory.mktemp("tiny"), {"train": 6, "val": 3}, offset=20)


# one S3 server (SeaweedFS) for the whole session, whichever modules use it
from support.s3 import s3_bucket, s3_server  # noqa: E402,F401

# `make test` runs the modules on two processes (pytest-xdist --dist loadfile), handed out in collection order: the
# longest first, so that no long module starts last while the other process idles. The rest keep their order.
LONGEST_FIRST = [
    "tests/worker/test_faults.py", "tests/e2e/test_browser.py", "tests/engine/test_probe.py",
    "tests/worker/test_queue.py", "tests/worker/test_inference.py", "tests/e2e/test_cluster.py",
    "tests/engine/test_training.py", "tests/engine/test_export.py", "tests/worker/test_jobs_per_gpu.py",
    "tests/app/test_fuzz.py", "tests/engine/test_search.py", "tests/e2e/test_serve.py", "tests/engine/test_labels.py",
    "tests/e2e/test_client.py", "tests/e2e/test_supervise.py", "tests/engine/test_distributed.py",
    "tests/worker/test_batch_predict.py", "tests/engine/test_until_plateau.py", "tests/engine/test_run_trust.py",
    "tests/engine/test_lite_backbones.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {m: i for i, m in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable
