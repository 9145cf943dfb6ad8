"""Versions of multi-label datasets (a labels.csv manifest, issue 16): an image's labels are a row of the
manifest, not its folder, so a version relabels by rewriting rows and removes by dropping rows and files;
every image stays where it was (shared with the parent, as in app.services.versions) and only the new
labels.csv is the version's own file. `relabel` maps a file (as the manifest names it) to its new labels
joined by ';' (an empty string: no label). Adding images to a multi-label version is not supported yet."""
from __future__ import annotations

import csv
from pathlib import Path

from app.core.errors import BadRequest
from app.db.models import Dataset
from app.services.doctor import Problem, examples, plural, refuse
from domain.layout import IMAGE_EXTS
from domain.manifest import SEPARATOR, Row, find_manifest, read_manifest


def labels_of(text: str) -> tuple[str, ...]:
    return tuple(sorted({lbl.strip() for lbl in text.split(SEPARATOR) if lbl.strip()}))


def plan(parent: Dataset, parent_dir: Path, root: Path, relabel: dict[str, str], remove: list[str],
         upload_ids: list[str], not_copied: tuple[str, ...]) -> tuple[dict[str, str], list[dict], list[Row], Path]:
    """(moves {old: new} relative to parent_dir, as app.services.versions.Plan.moves, the manifest left out;
    the relabelled rows as {file, from, to}; the version's manifest rows; the manifest's path relative to
    parent_dir). A 400 naming every problem before anything is written."""
    if upload_ids:
        refuse([Problem(f"dataset {parent.id} is multi-label (a labels.csv manifest): adding images in a version "
                        "is not supported yet", "make the version without 'uploads', or upload the whole "
                        "corrected dataset (its images and its labels.csv) as a new dataset")], BadRequest)
    found = find_manifest(root)
    if found is None:
        raise BadRequest(f"dataset {parent.id} is multi-label but its labels.csv is missing from the storage: "
                         "upload the dataset again")
    manifest = read_manifest(found, IMAGE_EXTS)
    rows = {f: (labels, split) for f, labels, split in manifest.rows}
    known = set(manifest.labels)
    problems: list[Problem] = []
    unknown = sorted({f for f in [*relabel, *remove] if f not in rows})
    if unknown:
        problems.append(Problem(
            f"{plural(len(unknown), 'file')} not in dataset {parent.id}'s labels.csv: {examples(unknown)}",
            "name each image as its row in labels.csv does (its path relative to the CSV)", unknown))
    both = sorted(set(relabel) & set(remove))
    if both:
        problems.append(Problem(f"{plural(len(both), 'file')} both relabelled and removed: {examples(both)}",
                                "either give each image new labels or remove it, not both", both))
    new_labels = {f: labels_of(v) for f, v in relabel.items()}
    bad = sorted({lbl for labels in new_labels.values() for lbl in labels} - known)
    if bad:
        problems.append(Problem(
            f"{'an unknown label' if len(bad) == 1 else f'{len(bad)} unknown labels'} in relabel: "
            f"{', '.join(map(repr, bad[:10]))}",
            f"use the dataset's labels ({', '.join(sorted(known))}), joined by {SEPARATOR!r}; to add a label, "
            "upload the corrected dataset as a new dataset", bad))
    if problems:
        refuse(problems, BadRequest)
    gone = set(remove)
    relabelled = [{"file": f, "from": SEPARATOR.join(rows[f][0]), "to": SEPARATOR.join(new_labels[f])}
                  for f in sorted(relabel) if new_labels[f] != rows[f][0]]
    out_rows: list[Row] = [(f, new_labels.get(f, labels), split) for f, (labels, split) in rows.items()
                           if f not in gone]
    csv_rel = found.relative_to(parent_dir).as_posix()
    base = found.parent
    moves: dict[str, str] = {}
    for p in sorted(parent_dir.rglob("*")):
        if not p.is_file() or p.is_symlink() or p.name in not_copied or p == found:
            continue
        if p.is_relative_to(base) and p.relative_to(base).as_posix() in gone:
            continue
        rel = p.relative_to(parent_dir).as_posix()
        moves[rel] = rel
    return moves, relabelled, out_rows, Path(csv_rel)


def write_manifest(path: Path, rows: list[Row]) -> None:
    """labels.csv with the rows (the split column when any row has one)."""
    with_split = any(split for _, _, split in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "labels", "split"] if with_split else ["file", "labels"])
        for file, labels, split in rows:
            w.writerow([file, SEPARATOR.join(labels), *([split or ""] if with_split else [])])
