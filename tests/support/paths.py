"""Where things are: the repository root and the shared datasets (../shared/datasets beside the repo)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "datasets"
HYMENOPTERA = SHARED / "hymenoptera"
