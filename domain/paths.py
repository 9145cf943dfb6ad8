"""Default locations shared by the `graft` command and the server, so that both read and write one feature
cache: features computed by `graft probe` are found by a server's train job on the same data, and back."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = "graft-data"


def default_cache_dir(data_dir: str | Path | None = None) -> Path:
    """The feature cache: $GRAFT_CACHE_DIR, else `<data dir>/cache` with the data dir `data_dir` (the server's
    setting), else $GRAFT_DATA_DIR, else ./graft-data; always an absolute path."""
    env = os.environ.get("GRAFT_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    base = data_dir or os.environ.get("GRAFT_DATA_DIR") or DEFAULT_DATA_DIR
    return (Path(base).expanduser() / "cache").resolve()
