"""A folder of images packed into zip parts of about ``part_size`` bytes each, written one at a time to a
temporary file (never the whole folder in memory, nor more than one part on disk)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

# already compressed: stored as they are (deflating them costs time and saves nothing)
_STORED = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".heic", ".avif"}
_ZIP_OVERHEAD = 128  # a generous estimate of an entry's headers, besides its name


def _skipped(rel: Path) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.parts)


def folder_files(folder: Path) -> list[tuple[Path, str, int]]:
    """Every file under ``folder`` (hidden files and folders left out), sorted: (path, name in the zip, size)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(folder)
            if _skipped(rel) or not path.is_file():
                continue
            out.append((path, rel.as_posix(), path.stat().st_size))
    return out


def plan_parts(files: list[tuple[Path, str, int]], part_size: int) -> list[list[tuple[Path, str, int]]]:
    """The files split into consecutive groups of at most about ``part_size`` bytes (a file larger than that
    gets a part of its own)."""
    parts: list[list[tuple[Path, str, int]]] = []
    current: list[tuple[Path, str, int]] = []
    used = 0
    for f in files:
        cost = f[2] + len(f[1].encode()) * 2 + _ZIP_OVERHEAD
        if current and used + cost > part_size:
            parts.append(current)
            current, used = [], 0
        current.append(f)
        used += cost
    if current:
        parts.append(current)
    return parts


def write_part(files: list[tuple[Path, str, int]], dest: Path) -> Path:
    """One part: the files written into the zip ``dest`` (streamed from disk, file by file)."""
    with zipfile.ZipFile(dest, "w", allowZip64=True) as zf:
        for path, name, _ in files:
            method = zipfile.ZIP_STORED if path.suffix.lower() in _STORED else zipfile.ZIP_DEFLATED
            zf.write(path, name, compress_type=method)
    return dest
