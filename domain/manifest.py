"""The multi-label layout: a `labels.csv` manifest at the dataset's root (alone or inside one wrapping folder).

Header `file,labels[,split]`: `file` is the image's path relative to the CSV, `labels` its labels joined by `;`
(an empty field: a valid image with no label), `split` optionally `train` or `val` (otherwise a seeded split
that keeps every label in both parts where it can). Reading it checks everything a user can get wrong and
says each problem with its fix (`ManifestProblem`): missing files, images not in the manifest, misspelled
labels (near-duplicate names), labels with too few examples, duplicated rows.

Torch-free and Pillow-free: the web tier reads uploads with it. Labels become a DataSplit (domain.layout) whose
`task` is "multilabel": its `classes` are the label names, and each image's label is the index of its label
set in `label_sets` (so that every int-labelled part of the engine, the caches and the stratified subsample
work unchanged; the loss and the metrics turn the index into the image's multi-hot target).
"""
from __future__ import annotations

import csv
import difflib
import io
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import DataError

MANIFEST = "labels.csv"
SEPARATOR = ";"
HEADER = ("file", "labels")  # then optionally "split"
SPLITS = ("train", "val")
MIN_PER_LABEL = 2  # fewer: the label cannot be in both train and val (an error)
FEW_PER_LABEL = 10  # fewer: a warning (its F1 and AP will be noisy)
MAX_ROWS = 2_000_000
MAX_FILE_BYTES = 256 << 20
Row = tuple[str, tuple[str, ...], str | None]  # file, labels, split (None: seeded)


@dataclass
class ManifestProblem:
    """One thing wrong with a manifest, said with its fix and the files (or labels) it concerns."""

    problem: str
    fix: str
    files: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return f"{self.problem}: {self.fix}"


@dataclass
class Manifest:
    """A read manifest: its rows (relative path, labels, split or None) and what is wrong with it."""

    path: Path
    rows: list[Row]
    errors: list[ManifestProblem]
    warnings: list[ManifestProblem]

    @property
    def labels(self) -> list[str]:
        return sorted({lbl for _, labels, _ in self.rows for lbl in labels})

    def label_counts(self) -> Counter[str]:
        return Counter(lbl for _, labels, _ in self.rows for lbl in labels)


def find_manifest(data_dir: str | Path) -> Path | None:
    """`labels.csv` at the root or inside one wrapping folder (the only visible entry of the root)."""
    root = Path(data_dir)
    if (root / MANIFEST).is_file():
        return root / MANIFEST
    try:
        entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    except OSError:
        return None
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST).is_file():
        return entries[0] / MANIFEST
    return None


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _examples(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _safe_rel(name: str) -> str | None:
    """The normalised relative path of a `file` field, None when it escapes the dataset or is absolute."""
    name = name.strip().replace("\\", "/")
    p = PurePosixPath(name)
    if not name or not p.parts or p.is_absolute() or ".." in p.parts or ":" in p.parts[0]:
        return None
    return p.as_posix()


def read_manifest(path: str | Path, image_exts: set[str] | frozenset[str]) -> Manifest:
    """Read and check a manifest against the images beside it (any extension in `image_exts`)."""
    path = Path(path)
    root = path.parent
    errors: list[ManifestProblem] = []
    warnings: list[ManifestProblem] = []
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{MANIFEST} is larger than {MAX_FILE_BYTES >> 20} MB: split the dataset")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return Manifest(path, [], [ManifestProblem(f"{MANIFEST} is not UTF-8 text (byte {e.start})",
                                                   "save it as UTF-8 CSV")], [])
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader, [])]
    if header[:2] != list(HEADER) or len(header) > 3 or (len(header) == 3 and header[2] != "split"):
        return Manifest(path, [], [ManifestProblem(
            f"{MANIFEST} starts with {','.join(header) or 'nothing'!r}, not the header file,labels[,split]",
            "make its first line `file,labels` (or `file,labels,split`): file is the image's path relative to "
            f"the CSV, labels its labels joined by {SEPARATOR!r}, split train or val")], [])
    with_split = len(header) == 3

    rows: list[Row] = []
    seen: dict[str, int] = {}
    bad_paths: list[str] = []
    bad_splits: list[str] = []
    bad_width: list[str] = []
    conflicting: list[str] = []
    repeated: list[str] = []
    for n, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue
        if len(rows) >= MAX_ROWS:
            raise DataError(f"{MANIFEST} has more than {MAX_ROWS} rows: split the dataset")
        if len(fields) not in (2, 3) or (len(fields) == 3 and not with_split and fields[2].strip()):
            bad_width.append(f"line {n}")
            continue
        rel = _safe_rel(fields[0])
        if rel is None:
            bad_paths.append(f"line {n} ({fields[0].strip() or 'empty'})")
            continue
        labels = tuple(sorted({lbl.strip() for lbl in fields[1].split(SEPARATOR) if lbl.strip()}))
        split = fields[2].strip().lower() if with_split and len(fields) == 3 and fields[2].strip() else None
        if split is not None and split not in SPLITS:
            bad_splits.append(f"line {n} ({fields[2].strip()})")
            continue
        if rel in seen:
            first = rows[seen[rel]]
            (repeated if first[1] == labels and first[2] == split else conflicting).append(f"{rel} (line {n})")
            continue
        seen[rel] = len(rows)
        rows.append((rel, labels, split))

    if bad_width:
        errors.append(ManifestProblem(f"{_plural(len(bad_width), 'row')} of {MANIFEST} without the right number of "
                                      f"fields: {_examples(bad_width)}",
                                      f"give each row file,labels{',split' if with_split else ''}; quote a field "
                                      "that contains a comma"))
    if bad_paths:
        errors.append(ManifestProblem(f"{_plural(len(bad_paths), 'row')} of {MANIFEST} whose file is empty, absolute "
                                      f"or outside the dataset: {_examples(bad_paths)}",
                                      "give each image's path relative to the CSV, e.g. images/0001.jpg"))
    if bad_splits:
        errors.append(ManifestProblem(f"{_plural(len(bad_splits), 'row')} with a split other than train or val: "
                                      f"{_examples(bad_splits)}", "write train, val, or leave the split empty"))
    if conflicting:
        errors.append(ManifestProblem(f"{_plural(len(conflicting), 'image')} listed twice with different labels "
                                      f"or splits: {_examples(conflicting)}",
                                      "keep one row per image, with all its labels joined by ';'", conflicting))
    if repeated:
        warnings.append(ManifestProblem(f"{_plural(len(repeated), 'duplicated row')} (the same image, labels and "
                                        f"split again): {_examples(repeated)}",
                                        "nothing to fix, each image counts once; remove the repeated rows",
                                        repeated))

    # the files: every row's image exists and is an image; every image beside the CSV has a row
    # by name first: a row that names a non-image (which an upload's sweep removes) is not an image, not missing
    not_images = [rel for rel, _, _ in rows if Path(rel).suffix.lower() not in image_exts]
    named_odd = set(not_images)
    missing = [rel for rel, _, _ in rows if rel not in named_odd
               and (not (root / rel).is_file() or (root / rel).is_symlink())]
    if missing:
        errors.append(ManifestProblem(f"{_plural(len(missing), 'file')} listed in {MANIFEST} but not in the dataset: "
                                      f"{_examples(missing)}",
                                      "add the images, fix their paths (relative to the CSV, case matters) or "
                                      "remove their rows", missing))
    if not_images:
        errors.append(ManifestProblem(f"{_plural(len(not_images), 'row')} naming a file that is not an image: "
                                      f"{_examples(not_images)}",
                                      f"list only images ({', '.join(sorted(image_exts))})", not_images))
    listed = set(seen)
    unlisted = sorted(p.relative_to(root).as_posix() for p in _image_files(root, image_exts)
                      if p.relative_to(root).as_posix() not in listed)
    if unlisted:
        warnings.append(ManifestProblem(f"{_plural(len(unlisted), 'image')} in the dataset but not in {MANIFEST} "
                                        f"{'is' if len(unlisted) == 1 else 'are'} not used: {_examples(unlisted)}",
                                        "add a row for each (an empty labels field for an image with no label) "
                                        "or leave them out", unlisted))
    dropped = set(missing) | named_odd
    rows = [r for r in rows if r[0] not in dropped]

    errors += _label_problems(rows, warnings)
    return Manifest(path, rows, errors, warnings)


def _image_files(root: Path, image_exts: set[str] | frozenset[str]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX")))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in image_exts]
    return out


def _label_problems(rows: list[Row], warnings: list[ManifestProblem]) -> list[ManifestProblem]:
    counts = Counter(lbl for _, labels, _ in rows for lbl in labels)
    errors: list[ManifestProblem] = []
    if not rows:
        errors.append(ManifestProblem(f"{MANIFEST} lists no image", "add one row per image: file,labels"))
        return errors
    if len(counts) < 2:
        errors.append(ManifestProblem(f"{MANIFEST} uses {_plural(len(counts), 'label')}"
                                      + (f" ({', '.join(counts)})" if counts else ""),
                                      "a multi-label classifier needs at least 2 labels"))
        return errors
    # near-duplicate names: a rare label that differs from a frequent one only by case, spacing or a typo
    names = sorted(counts, key=lambda lbl: (-counts[lbl], lbl))
    odd = []
    for i, rare in enumerate(names):
        for common in names[:i]:
            same = rare.casefold().replace(" ", "").replace("_", "").replace("-", "") == \
                common.casefold().replace(" ", "").replace("_", "").replace("-", "")
            close = difflib.SequenceMatcher(None, rare.casefold(), common.casefold()).ratio() >= 0.85
            if same or (close and counts[rare] * 5 <= counts[common]):
                odd.append((rare, common))
                break
    if odd:
        errors.append(ManifestProblem(
            f"{_plural(len(odd), 'label')} that "
            + ("looks like a misspelling" if len(odd) == 1 else "look like misspellings") + " of another: "
            + _examples([f"{r!r} ({counts[r]}) beside {c!r} ({counts[c]})" for r, c in odd]),
            "use one spelling per label (fix the rows, or rename the label on purpose so it differs clearly)",
            [r for r, _ in odd]))
    too_few = sorted(lbl for lbl, n in counts.items() if n < MIN_PER_LABEL)
    if too_few:
        errors.append(ManifestProblem(f"{_plural(len(too_few), 'label')} with fewer than {MIN_PER_LABEL} images: "
                                      + _examples([f"{lbl} ({counts[lbl]})" for lbl in too_few]),
                                      f"give each label at least {MIN_PER_LABEL} images (ideally 20 or more) or "
                                      "remove it", too_few))
    few = sorted(lbl for lbl, n in counts.items() if MIN_PER_LABEL <= n < FEW_PER_LABEL)
    if few:
        warnings.append(ManifestProblem(f"{_plural(len(few), 'label')} with very few images: "
                                        + _examples([f"{lbl} ({counts[lbl]})" for lbl in few]),
                                        f"add images: at least {FEW_PER_LABEL} per label for reliable thresholds"))
    return errors


def split_rows(rows: Sequence[Row], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indexes of the train and val rows: the manifest's own split where given; the others split seeded, label
    by label from the rarest (each label's images go to val until it has its share), so that every label with
    2+ images is in both parts where it can be."""
    train = [i for i, r in enumerate(rows) if r[2] == "train"]
    val = [i for i, r in enumerate(rows) if r[2] == "val"]
    free = [i for i, r in enumerate(rows) if r[2] is None]
    if not free:
        return train, val
    rng = random.Random(seed)
    rng.shuffle(free)
    counts = Counter(lbl for i in free for lbl in rows[i][1])
    want = {lbl: 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction))) for lbl, n in counts.items()}
    in_val: Counter[str] = Counter()
    chosen: set[int] = set()
    for lbl in sorted(counts, key=lambda lbl: (counts[lbl], lbl)):
        for i in free:
            if in_val[lbl] >= want[lbl]:
                break
            if i in chosen or lbl not in rows[i][1]:
                continue
            chosen.add(i)
            in_val.update(rows[i][1])
    unlabelled = [i for i in free if not rows[i][1]]
    n_none = round(len(unlabelled) * val_fraction)
    chosen.update(unlabelled[:n_none])
    val += [i for i in free if i in chosen]
    train += [i for i in free if i not in chosen]
    return sorted(train), sorted(val)
