"""The dataset doctor's checks of a multi-label upload: a `labels.csv` manifest (domain.manifest) at the top of
the upload or inside its one wrapping folder.

Refused (with app.services.doctor's decompression bombs): every error of the manifest (missing files, rows that
name no image, paths that escape the dataset or are absolute, bad headers, bad split values, conflicting
duplicate rows, misspelled near-duplicate labels, labels with too few images, not UTF-8), each with its fix.
Tolerated and reported as warnings: the manifest's own warnings (images not in it, repeated rows, labels with
few images, labels without val images), unreadable images (removed, and their rows left out of the stored
labels.csv), exact duplicates (noted when their labels differ), the same image in train and val, a tiny val
split, odd colour modes and very small images.

Its problems are domain.manifest's ManifestProblem (the doctor turns them into its own Problems): this module
does not import the doctor, which calls it.
"""
from __future__ import annotations

import csv
import io
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from domain.errors import DataError
from domain.layout import IMAGE_EXTS, JUNK_NAMES, DataSplit
from domain.manifest import MANIFEST, MAX_FILE_BYTES, ManifestProblem, read_manifest

SHOWN = 5
TINY_VAL = 10  # val images in all below which the val split is called tiny...
MIN_VAL_PER_LABEL = 2  # ...or per label
MAX_MATRIX_LABELS = 200  # co-occurrence kept for the most frequent labels only, beyond that


class Checked(Protocol):
    """What the doctor learnt of one image (app.services.doctor.ImageCheck)."""

    path: str
    sha256: str
    mode: str
    size: tuple[int, int]
    error: str | None


def _examples(names: Iterable[str], n: int = SHOWN) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def find(folder: Path) -> Path | None:
    """`labels.csv` at the top of the upload, or inside its one wrapping folder: what remains beside that folder
    after the doctor's sweep (system files, other files than images) does not count."""
    def plain(p: Path) -> bool:
        return p.is_file() and not p.is_symlink()

    if plain(folder / MANIFEST):
        return folder / MANIFEST
    entries = [p for p in folder.iterdir() if p.name not in JUNK_NAMES and not p.name.startswith(".")
               and not p.is_symlink() and (p.is_dir() or p.suffix.lower() in IMAGE_EXTS)]
    if len(entries) == 1 and entries[0].is_dir() and plain(entries[0] / MANIFEST):
        return entries[0] / MANIFEST
    return None


# ---------------------------------------------------------------- the stored labels.csv


def _norm(name: str) -> str:
    """A `file` field as domain.manifest reads it."""
    return PurePosixPath(name.strip().replace("\\", "/")).as_posix()


def _records(path: Path) -> list[list[str]] | None:
    if path.stat().st_size > MAX_FILE_BYTES:
        return None
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return list(csv.reader(io.StringIO(text)))


def _write(path: Path, records: list[list[str]]) -> None:
    """Atomically: a reader sees the old manifest or the new one, never half of one."""
    tmp = path.with_name(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(records)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _blank_rows(path: Path, gone: set[str]) -> list[str]:
    """Empties the rows of the files in `gone` (blank rows keep the line numbers of the problems the user's
    own); returns their files. A manifest that cannot be read is left as it is: read_manifest says why."""
    records = _records(path) if gone else None
    if not records:
        return []
    dropped = [_norm(r[0]) for r in records[1:] if r and _norm(r[0]) in gone]
    if dropped:
        _write(path, [records[0]] + [[] if r and _norm(r[0]) in gone else r for r in records[1:]])
    return sorted(set(dropped))


def compact(path: Path) -> None:
    """The stored manifest without blank rows (once the unreadable images' rows are blanked)."""
    records = _records(path)
    if records:
        _write(path, [r for r in records if any(f.strip() for f in r)])


# ---------------------------------------------------------------- checks


def check(manifest: Path, unreadable: Sequence[Checked]) -> tuple[list[ManifestProblem], list[str]]:
    """The manifest's errors, once the rows of the unreadable images (already removed) are left out; and those
    rows' files."""
    root = manifest.parent
    gone = {Path(c.path).relative_to(root).as_posix() for c in unreadable if Path(c.path).is_relative_to(root)}
    dropped = _blank_rows(manifest, gone)
    try:
        errors = list(read_manifest(manifest, IMAGE_EXTS).errors)
    except DataError as e:  # too large: said as a problem with its fix
        what, _, fix = str(e).partition(": ")
        errors = [ManifestProblem(what, fix or f"fix {MANIFEST} and upload again")]
    if errors and dropped:
        errors.append(ManifestProblem(
            f"{_plural(len(dropped), 'image')} listed in {MANIFEST} {'is' if len(dropped) == 1 else 'are'} "
            f"unreadable (corrupt, truncated or empty), so {'its row was' if len(dropped) == 1 else 'their rows were'} "
            f"left out: {_examples(dropped)}", "re-export or re-download them, or remove their rows", dropped))
    return errors, dropped


def warnings(split: DataSplit, good: Sequence[Checked], unreadable: Sequence[Checked], dropped: list[str],
             min_side: int) -> list[str]:
    """The doctor's warnings on a multi-label split (after the manifest's own, which `split` holds)."""
    w: list[ManifestProblem] = []
    root = split.root

    def rel(p: Path | str) -> str:
        return Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else Path(p).name

    if unreadable:
        w.append(ManifestProblem(
            f"skipped {_plural(len(unreadable), 'unreadable image')} (removed from the dataset"
            + (f"; {_plural(len(dropped), 'row')} left out of {MANIFEST}" if dropped else "") + "): "
            + _examples((f"{rel(c.path)} ({c.error})" for c in unreadable), 10),
            "re-export or re-download them (they are corrupt, truncated or empty) and upload again if you need "
            "them"))
    by_path = {c.path: c for c in good}
    items = [(p, split.label_sets[lbl], by_path[str(p)]) for p, lbl in split.train + split.val if str(p) in by_path]
    names = split.classes

    groups: dict[str, list[tuple[Path, tuple[int, ...]]]] = defaultdict(list)
    for p, labels, c in items:
        groups[c.sha256].append((p, labels))
    dups = [g for g in groups.values() if len(g) > 1]
    if dups:
        mixed = [g for g in dups if len({labels for _, labels in g}) > 1]

        def said(g: list[tuple[Path, tuple[int, ...]]]) -> str:
            return " = ".join(f"{rel(p)} ({';'.join(names[i] for i in labels) or 'no label'})" for p, labels in g)
        w.append(ManifestProblem(
            f"{_plural(sum(len(g) - 1 for g in dups), 'exact duplicate image')} (the same content in another row): "
            + _examples(said(g) for g in mixed + [g for g in dups if g not in mixed])
            + (f"; {_plural(len(mixed), 'of them has', 'of them have')} different labels (a labelling mistake?)"
               if mixed else ""),
            "delete the copies and their rows so that each image counts once"
            + (", with all its right labels in its one row" if mixed else "")))
    val_paths = {str(p) for p, _ in split.val}
    train_sha: dict[str, Path] = {}
    for p, _, c in items:
        if str(p) not in val_paths:
            train_sha.setdefault(c.sha256, p)
    leaked = [(p, train_sha[c.sha256]) for p, _, c in items if str(p) in val_paths and c.sha256 in train_sha]
    if leaked:
        w.append(ManifestProblem(
            f"{_plural(len(leaked), 'val image')} {'is' if len(leaked) == 1 else 'are'} also in train (the same "
            f"content): {_examples(f'{rel(v)} = {rel(t)}' for v, t in leaked)}",
            "this inflates the val F1 and AP: delete the copies (or give them the same split)"))

    val_n = split.counts()["val"]
    thin = [c for c in names if 0 < val_n[c] < MIN_VAL_PER_LABEL]  # none at all: discover_manifest says so
    if len(split.val) < TINY_VAL or thin:
        w.append(ManifestProblem(
            f"tiny val split: {_plural(len(split.val), 'image')} in all"
            + (f"; {_plural(len(thin), 'label')} with a single val image: {_examples(thin)}" if thin else ""),
            f"the measured F1 and AP are noisy: give val at least {TINY_VAL} images, {MIN_VAL_PER_LABEL} or more "
            "per label"))

    checks = sorted((c for _, _, c in items), key=lambda c: c.path.split(os.sep))
    odd = [c for c in checks if c.mode != "RGB"]
    if odd:
        modes = ", ".join(f"{m}: {n}" for m, n in sorted(Counter(c.mode for c in odd).items()))
        w.append(ManifestProblem(
            f"{_plural(len(odd), 'image')} not in RGB ({modes}; e.g. {_examples((rel(c.path) for c in odd), 3)}) "
            "will be converted to RGB",
            "nothing to fix unless colours matter: transparency becomes white, grey stays grey, CMYK and 16-bit "
            "images are converted approximately; save them as RGB to control it"))
    tiny = [c for c in checks if min(c.size) < min_side]
    if tiny:
        w.append(ManifestProblem(
            f"{_plural(len(tiny), 'very small image')} (under {min_side} px on a side): "
            + _examples(f"{rel(c.path)} ({c.size[0]}x{c.size[1]})" for c in tiny),
            "they are upscaled to the model's input size, which blurs them: use larger images if you have them"))
    return list(split.warnings) + [p.text for p in w]


def label_stats(split: DataSplit) -> dict[str, Any]:
    """What a multi-label dataset records of its labels: the mean number per image, the images with none, the
    images of each split, and
    how often each pair of labels is on the same image (the diagonal: images with the label); past
    MAX_MATRIX_LABELS labels, the matrix keeps the most frequent ones."""
    sets = [split.label_sets[lbl] for _, lbl in split.train + split.val]
    per = Counter(i for s in sets for i in s)
    keep = sorted(sorted(range(len(split.classes)), key=lambda i: -per[i])[:MAX_MATRIX_LABELS])
    at = {i: k for k, i in enumerate(keep)}
    matrix = [[0] * len(keep) for _ in keep]
    for s in sets:
        ks = [at[i] for i in s if i in at]
        for a in ks:
            for b in ks:
                matrix[a][b] += 1
    return {"labels_per_image": round(sum(len(s) for s in sets) / max(1, len(sets)), 4),
            "no_label": sum(1 for s in sets if not s),
            "images": {"train": len(split.train), "val": len(split.val)},  # counts are per label: these are not
            "cooccurrence": {"labels": [split.classes[i] for i in keep], "matrix": matrix}}
