"""Dataset versions: changes to a dataset (relabelled images, removed images, images added from resumable
uploads) make a new dataset, never an edit in place. The parent stays exactly as it was; the version's
unchanged images are shared, not copied: hard links on a local disk, and in object storage a list of the
keys that already hold them (storage.SHARED), so nothing is sent again. The doctor checks the new version
whole, like an upload. Files are named as uploaded, relative to the dataset's root (e.g. `train/8/00007.png`).
A multi-label dataset's versions rewrite its labels.csv instead (versions_multilabel).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import AppError, BadRequest
from app.core.settings import Settings
from app.db.models import Dataset, User
from app.services import access, datasets, storage, uploads, versions_multilabel
from app.services.archives import extract_part
from app.services.doctor import Problem, examples, plural, refuse
from domain.errors import DataError
from domain.layout import Folders, read_folders

log = logging.getLogger(__name__)
LISTED = 1000  # changed files recorded by name in Dataset.changes (all of them are counted)
NOT_COPIED = (storage.DONE, storage.SHARED)


@dataclass
class Image:
    cls: str
    class_dir: Path  # the class folder it lies in (train/<cls>, val/<cls> or <cls>)


@dataclass
class Plan:
    """Where each of the parent's files goes in the version: {old relative path: new relative path}, both
    relative to the upload folder (datasets/<id>/); removed files are left out."""

    moves: dict[str, str] = field(default_factory=dict)
    relabelled: list[dict[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def create_version(session: Session, settings: Settings, user: User, dataset_id: int, relabel: dict[str, str],
                   remove: list[str], upload_ids: list[str], name: str | None = None) -> Dataset:
    """A new dataset from `dataset_id` with the changes applied (editors of its workspace). Files that are not
    in the dataset, classes that are not its own and contradictory changes are refused (400, naming them)
    before anything is written; a version the doctor refuses leaves no folder and no row."""
    parent = datasets.get_owned(session, user, dataset_id, access.EDIT, "making a version of a dataset")
    if name is not None:
        datasets.check_name(name)
    if not (relabel or remove or upload_ids):
        raise BadRequest("no changes: give relabel ({file: class}), remove ([files]) or uploads ([upload ids]) "
                         "to make a new version")
    if len(set(upload_ids)) != len(upload_ids):
        raise BadRequest("an upload is listed twice in 'uploads': list each part once")
    st = storage.for_settings(settings)
    key, inner = storage.dataset_key(parent.path)
    parent_dir = storage.materialize_tree(st, key, settings)
    root = parent_dir.joinpath(*inner)
    manifest = None  # a multi-label dataset's new labels.csv: (its path relative to the folder, its rows)
    if parent.task == "multilabel":  # its labels live in labels.csv, not in class folders
        plan = Plan(removed=sorted(remove))
        plan.moves, plan.relabelled, rows, csv_rel = versions_multilabel.plan(
            parent, parent_dir, root, relabel, remove, upload_ids, NOT_COPIED)
        manifest = csv_rel, rows
    else:
        found = read_folders(root, follow_links=False)
        plan = _plan(parent, _images(found, parent_dir), found, parent_dir, relabel, remove)
    parts = [uploads.finished_part(settings, user.id, uid) for uid in upload_ids]  # 404/409 before any write

    folder = datasets.new_folder(settings)
    try:
        for old, new in plan.moves.items():
            storage.link_or_copy(parent_dir / old, folder / new)
        if manifest is not None:
            versions_multilabel.write_manifest(folder / manifest[0], manifest[1])
            added: list[str] = []
        else:
            added = _add_uploads(settings, parts, upload_ids, folder, found, parent_dir, inner)
        parent_shared = storage.shared_files(st, key)
        shared = {new: parent_shared.get(old, f"{key}/{old}") for old, new in plan.moves.items()}
        version = 1 + (session.scalar(select(func.max(Dataset.version)).where(
            (Dataset.lineage_id == parent.family_id) | (Dataset.id == parent.family_id))) or 1)
        changes = {"relabelled": plan.relabelled[:LISTED], "removed": plan.removed[:LISTED], "added": added[:LISTED],
                   "n_relabelled": len(plan.relabelled), "n_removed": len(plan.removed), "n_added": len(added)}
        try:
            ds = datasets.register(session, settings, user, name or parent.name, folder, parent.workspace_id,
                                   parent=parent, version=version, changes=changes, shared=shared,
                                   trusted=frozenset(plan.moves.values()))
        except AppError as e:  # the doctor's verdict on the result
            e.message = f"these changes would leave no usable dataset: {e.message.replace('the upload was', 'it is')}"
            raise
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        session.rollback()
        if isinstance(e, AppError):
            for uid in upload_ids:
                uploads.remove(settings, user.id, uid)
        raise
    for uid in upload_ids:
        uploads.remove(settings, user.id, uid)
    log.info("dataset %d: version %d of %d (%d relabelled, %d removed, %d added)", ds.id, version,
             parent.family_id, len(plan.relabelled), len(plan.removed), len(added))
    return ds


def _images(found: Folders, parent_dir: Path) -> dict[str, Image]:
    """The images in class folders, by their path relative to the dataset's root."""
    splits: list[tuple[Path, dict[str, list[Path]]]] = [(found.train_dir or found.root, found.train)]
    if found.val is not None and found.val_dirs:
        splits.append((found.val_dirs[0], found.val))
    out: dict[str, Image] = {}
    for base, per_class in splits:
        for cls, paths in per_class.items():
            for p in paths:
                out[p.relative_to(found.root).as_posix()] = Image(cls, base / cls)
    return out


def _plan(parent: Dataset, images: dict[str, Image], found: Folders, parent_dir: Path, relabel: dict[str, str],
          remove: list[str]) -> Plan:
    problems: list[Problem] = []
    unknown = sorted({f for f in [*relabel, *remove] if f not in images})
    if unknown:
        problems.append(Problem(
            f"{plural(len(unknown), 'file')} not in dataset {parent.id}: {examples(unknown)}",
            "name each image by its path inside the dataset as uploaded, e.g. train/<class>/<file> (the label "
            "issues and the dataset page list them that way)", unknown))
    both = sorted(set(relabel) & set(remove))
    if both:
        problems.append(Problem(f"{plural(len(both), 'file')} both relabelled and removed: {examples(both)}",
                                "either give each image a new class or remove it, not both", both))
    classes = set(parent.classes)
    bad = sorted({c for c in relabel.values() if c not in classes})
    if bad:
        problems.append(Problem(
            f"{'an unknown class' if len(bad) == 1 else f'{len(bad)} unknown classes'} in relabel: "
            f"{', '.join(map(repr, bad[:10]))}",
            f"use one of the dataset's classes ({', '.join(parent.classes)}); to add a class, upload its images "
            "in 'uploads'", bad))
    if problems:
        refuse(problems, BadRequest)
    plan = Plan(removed=sorted(remove))
    gone = set(remove)
    taken: set[str] = set()
    moved: dict[str, str] = {}
    for rel, cls in sorted(relabel.items()):
        img = images[rel]
        if cls == img.cls:
            continue
        inside = (found.root / rel).relative_to(img.class_dir)
        target = _free((img.class_dir.parent / cls / inside).relative_to(parent_dir), parent_dir, taken)
        taken.add(target)
        moved[(found.root / rel).relative_to(parent_dir).as_posix()] = target
        plan.relabelled.append({"file": rel, "from": img.cls, "to": cls,
                                "new_file": (parent_dir / target).relative_to(found.root).as_posix()})
    for p in sorted(parent_dir.rglob("*")):
        if not p.is_file() or p.is_symlink() or p.name in NOT_COPIED:
            continue
        rel = p.relative_to(parent_dir).as_posix()
        if p.is_relative_to(found.root) and p.relative_to(found.root).as_posix() in gone:
            continue
        plan.moves[rel] = moved.get(rel, rel)
    return plan


def _free(rel: Path, parent_dir: Path, taken: set[str]) -> str:
    """`rel`, or `name.2.ext`, `name.3.ext`... when another image of the class already has that name."""
    candidate, n = rel, 1
    while (parent_dir / candidate).exists() or candidate.as_posix() in taken:
        n += 1
        candidate = rel.with_name(f"{rel.stem}.{n}{rel.suffix}")
    return candidate.as_posix()


def _add_uploads(settings: Settings, parts: list[Path], upload_ids: list[str], folder: Path, found: Folders,
                 parent_dir: Path, inner: tuple[str, ...]) -> list[str]:
    """Extract each upload (a zip or tar laid out like the dataset: train/<class>/..., val/<class>/... or
    <class>/...) into the version. Returns the added files (relative to the dataset's root)."""
    added: list[str] = []
    root = folder.joinpath(*inner)
    for i, (uid, part) in enumerate(zip(upload_ids, parts), 1):
        tmp = datasets.new_folder(settings)
        try:
            try:
                extract_part(part, tmp, settings)
                got = read_folders(tmp, follow_links=False)
            except AppError as e:
                e.message = f"upload {i} of {len(parts)} ({uid}): {e.message}"
                raise
            except DataError as e:
                raise BadRequest(f"upload {i} of {len(parts)} ({uid}): {e}") from None
            places = _places(got, found, uid)
            clash: list[str] = []
            for src_dir, dest_rel in places:
                for p in sorted(src_dir.rglob("*")):
                    if not p.is_file() or p.is_symlink():
                        continue
                    rel = (PurePosixPath(dest_rel) / p.relative_to(src_dir).as_posix()).as_posix()
                    target = root / rel
                    if target.exists():
                        clash.append(rel)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(p, target)
                    added.append(rel)
            if clash:
                refuse([Problem(f"upload {i} ({uid}) has {plural(len(clash), 'file')} that the dataset already "
                                f"holds: {examples(clash)}", "rename the new images, or remove the old ones in "
                                "the same version ('remove')", clash)], BadRequest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return added


def _places(got: Folders, found: Folders, uid: str) -> list[tuple[Path, str]]:
    """(folder of the upload, where it goes relative to the dataset's root): the upload's train/ into the
    dataset's train folder, its val/ into the dataset's val folder, class folders into the class folders."""
    root = found.root
    ds_train = found.train_dir.relative_to(root).as_posix() if found.train_dir else None
    ds_val = found.val_dirs[0].relative_to(root).as_posix() if found.val_dirs else None
    laid = "train/<class>/ and val/<class>/" if ds_val else "train/<class>/" if ds_train else "<class>/"
    fix = f"lay the new images out as the dataset is: {laid}"
    if got.train_dir is None and not got.val_dirs:
        if ds_train is not None:
            raise BadRequest(f"upload {uid} holds class folders only, but the dataset keeps its images in "
                             f"{ds_train}/: {fix}")
        return [(got.root / cls, cls) for cls in got.train]
    if ds_train is None:
        raise BadRequest(f"upload {uid} has train/ or val/ folders, but the dataset has class folders only: {fix}")
    out = [(got.train_dir, ds_train)] if got.train_dir else []
    if got.val_dirs:
        if ds_val is None:
            raise BadRequest(f"upload {uid} has a val/ folder, but the dataset has none (its val split is drawn "
                             f"from train/): {fix}")
        out.append((got.val_dirs[0], ds_val))
    return out
