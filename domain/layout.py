"""Dataset folder layouts: which files are images of which class, and the seeded train/val split.

Torch-free and Pillow-free: the web tier uses it to read uploads.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .manifest import MANIFEST, find_manifest, read_manifest, split_rows

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", ".ipynb_checkpoints", "desktop.ini"}
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation", "test", "testing")
# a folder of images that belong to no class, next to train/ and val/ (or, in the class-folders-only layout,
# `_junk/` beside the class folders): never trained on; it measures how often the model answers on an image it
# should abstain on (the false-accept rate of its "none of these")
NO_CLASS_NAMES = ("_junk", "junk")
MAX_NO_CLASS = 2000  # no-class images measured at most (a seeded sample of a bigger folder)


@dataclass
class DataSplit:
    """Which images train and which validate, with labels as indexes into `classes`."""

    root: Path
    layout: str
    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    warnings: list[str] = field(default_factory=list)
    junk: list[Path] = field(default_factory=list)  # images of no class (NO_CLASS_NAMES), never trained on
    # "multilabel" (a labels.csv manifest, domain.manifest): an item's label is an index into `label_sets`,
    # the tuple of class indexes the image carries (maybe none)
    task: str = "multiclass"
    label_sets: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class of each split (multi-label: images that carry each label)."""
        out = {}
        for split, items in (("train", self.train), ("val", self.val)):
            c = Counter(lbl for _, lbl in items)
            if self.multilabel:
                per: Counter[int] = Counter()
                for s, n in c.items():
                    per.update({k: n for k in self.label_sets[s]})
                c = per
            out[split] = {name: c.get(i, 0) for i, name in enumerate(self.classes)}
        return out

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


# ---------------------------------------------------------------- layouts


def _is_junk(p: Path) -> bool:
    return p.name in JUNK_NAMES or p.name.startswith(".") or p.name.startswith("._")


def _visible(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if not _is_junk(p))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


def _images_in(d: Path, ignored: list[Path], follow_links: bool = False) -> list[Path]:
    """Image files under a class folder (nested folders included), junk skipped. A symbolic link to an
    image file counts only with `follow_links` (a local run; never an upload); otherwise it is ignored and
    listed, so that an error can say why a class looks empty."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
        dirnames[:] = sorted(n for n in dirnames if not _is_junk(Path(n)))
        for n in sorted(filenames):
            p = Path(dirpath) / n
            if _is_junk(p):
                continue
            if p.is_symlink():
                if not (follow_links and p.is_file() and _is_image(p)):
                    ignored.append(p)
                    continue
                out.append(p)
                continue
            (out if _is_image(p) else ignored).append(p)
    return out


def _find_root(root: Path) -> tuple[Path, list[str]]:
    """Descend through single wrapping folders (e.g. a zip that holds `my_data/train/...`)."""
    notes = []
    for _ in range(4):
        entries = _visible(root)
        dirs = [e for e in entries if e.is_dir()]
        files = [e for e in entries if e.is_file() and _is_image(e)]
        if len(dirs) == 1 and not files and any(x.is_dir() for x in _visible(dirs[0])):
            name = dirs[0].name.lower()
            if name in TRAIN_NAMES or name in VAL_NAMES:
                break
            notes.append(f"used the single top folder {dirs[0].name}/")
            root = dirs[0]
        else:
            break
    return root, notes


def _class_dirs(d: Path) -> list[Path]:
    return [p for p in _visible(d) if p.is_dir()]


def _collect(split_dir: Path, ignored: list[Path], follow_links: bool = False,
             skip: Path | None = None) -> dict[str, list[Path]]:
    return {c.name: _images_in(c, ignored, follow_links) for c in _class_dirs(split_dir) if c != skip}


def _no_class_dir(names: dict[str, Path], split_layout: bool) -> Path | None:
    """The folder of images of no class: `_junk/` in any layout, `junk/` too beside train/ (where it cannot be
    a class); in the class-folders-only layout a `junk/` folder stays a class."""
    for n in NO_CLASS_NAMES if split_layout else NO_CLASS_NAMES[:1]:
        if n in names:
            return names[n]
    return None


def stratified_split(per_class: dict[str, list[Path]], fraction: float, seed: int
                     ) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Seeded split of each class on its own, so that every class with 2+ images is in both parts."""
    rng = random.Random(seed)
    train, val = {}, {}
    for name in sorted(per_class):
        items = sorted(per_class[name])
        rng.shuffle(items)
        n_val = 0 if len(items) < 2 else min(len(items) - 1, max(1, round(len(items) * fraction)))
        val[name], train[name] = sorted(items[:n_val]), sorted(items[n_val:])
    return train, val


@dataclass
class Folders:
    """What a dataset folder holds, read but not judged nor split: the upload checks (app.services.doctor)
    and `discover` both start from it."""

    root: Path  # after descending through single wrapping folders
    notes: list[str]  # e.g. "used the single top folder x/"
    train_dir: Path | None
    val_dirs: list[Path]  # the first one validates, the others are ignored
    train: dict[str, list[Path]]  # class -> images: of train/, or of the class folders at the root
    val: dict[str, list[Path]] | None  # of the first val folder; None without one
    loose: list[Path]  # images outside class folders, at the root of a class-folders-only layout
    ignored: list[Path]  # non-image files inside class folders
    junk_dir: Path | None = None  # the folder of images of no class (NO_CLASS_NAMES), if any
    junk: list[Path] = field(default_factory=list)  # its images


def read_folders(data_dir: str | Path, follow_links: bool = False) -> Folders:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a folder: give the folder that holds train/ and val/ "
                        "(or one sub-folder per class)")
    root, notes = _find_root(data_dir)
    ignored: list[Path] = []
    names = {p.name.lower(): p for p in _visible(root) if p.is_dir()}
    train_dir = next((names[n] for n in TRAIN_NAMES if n in names), None)
    val_dirs = [names[n] for n in VAL_NAMES if n in names]
    train_pc: dict[str, list[Path]] = {}
    val_pc = None
    loose: list[Path] = []
    junk_dir = _no_class_dir(names, train_dir is not None or bool(val_dirs))
    if train_dir is not None:
        train_pc = _collect(train_dir, ignored, follow_links)
        if val_dirs:
            val_pc = _collect(val_dirs[0], ignored, follow_links)
    elif not val_dirs:
        train_pc = _collect(root, ignored, follow_links, skip=junk_dir)
        loose = [p for p in _visible(root) if p.is_file() and _is_image(p)]
    junk = _images_in(junk_dir, ignored, follow_links) if junk_dir is not None else []
    return Folders(root, notes, train_dir, val_dirs, train_pc, val_pc, loose, ignored, junk_dir, junk)


def discover(data_dir: str | Path, val_fraction: float = 0.2, seed: int = 0,
             follow_links: bool = True) -> DataSplit:
    """Read a dataset folder: `train/<class>` + `val/<class>`, `train/<class>` only, or `<class>/` only
    (the last two get a stratified, seeded val split), optionally inside one wrapping folder. Symbolic links
    to image files are followed unless `follow_links` is off (the web tier's checks of uploads)."""
    manifest = find_manifest(data_dir)
    if manifest is not None:
        return discover_manifest(manifest, val_fraction, seed)
    f = read_folders(data_dir, follow_links)
    root, warnings, ignored = f.root, list(f.notes), f.ignored
    train_dir, val_dirs = f.train_dir, f.val_dirs

    if train_dir is None and val_dirs:
        raise DataError(
            f"found {', '.join(d.name + '/' for d in val_dirs)} but no train/ folder: "
            "rename the folder that holds the training images to train/"
        )
    if train_dir is not None:
        train_pc = f.train
        if f.val is not None:
            layout = f"{train_dir.name}/ + {val_dirs[0].name}/"
            val_pc = f.val
            for extra in val_dirs[1:]:
                warnings.append(f"ignored {extra.name}/: {val_dirs[0].name}/ is used for validation")
        else:
            layout = f"{train_dir.name}/ only (split {val_fraction:.0%} for val)"
            train_pc, val_pc = stratified_split(train_pc, val_fraction, seed)
    else:
        layout = f"class folders only (split {val_fraction:.0%} for val)"
        train_pc = f.train
        if f.loose:
            warnings.append(f"ignored {len(f.loose)} images outside class folders (e.g. {f.loose[0].name}): "
                            "put every image in the folder named after its class")
        train_pc, val_pc = stratified_split(train_pc, val_fraction, seed)

    classes = sorted(train_pc)
    if len(classes) < 2:
        raise DataError(
            f"found {len(classes)} class folder(s) in {root}{' (' + ', '.join(classes) + ')' if classes else ''}: "
            "a classifier needs at least 2, one sub-folder per class with its images inside"
        )
    links = [p for p in ignored if p.is_symlink()]
    ignored = [p for p in ignored if not p.is_symlink()]
    empty = [c for c in classes if not train_pc[c]]
    if empty:
        why = (f" ({len(links)} symbolic link(s) were not followed, e.g. {links[0].name}: copy the images "
               "themselves, e.g. with cp -rL)") if links else ""
        raise DataError(f"class folder(s) with no training images: {', '.join(empty)}{why}: "
                        "add images (jpg, png, bmp, gif, webp, tif) or remove the folder")
    unknown = sorted(set(val_pc) - set(classes))
    if unknown:
        raise DataError(f"the val split has classes that train does not: {', '.join(unknown)}: "
                        "use the same class folder names in train/ and val/")
    missing_val = [c for c in classes if not val_pc.get(c)]
    if missing_val:
        warnings.append(f"no val images for class(es) {', '.join(missing_val)}: their accuracy cannot be measured")
    if links:
        warnings.append(f"did not follow {len(links)} symbolic link(s), e.g. {links[0].name}: copy the images "
                        "themselves")
    if ignored:
        shown = ", ".join(p.name for p in ignored[:5])
        warnings.append(f"ignored {len(ignored)} non-image file(s): {shown}{'...' if len(ignored) > 5 else ''}")

    idx = {c: i for i, c in enumerate(classes)}
    train = [(p, idx[c]) for c in classes for p in train_pc[c]]
    val = [(p, idx[c]) for c in classes for p in val_pc.get(c, [])]
    if not val:
        raise DataError("no validation images: add a val/ folder or more images per class")
    junk = f.junk
    if len(junk) > MAX_NO_CLASS:
        junk = sorted(random.Random(seed).sample(junk, MAX_NO_CLASS))
    return DataSplit(root, layout, classes, train, val, warnings, junk)


def discover_manifest(path: Path, val_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """The multi-label split of a labels.csv manifest; its errors raise one DataError that says them all."""
    m = read_manifest(path, IMAGE_EXTS)
    if m.errors:
        raise DataError("; ".join(p.text for p in m.errors))
    classes = m.labels
    idx = {c: i for i, c in enumerate(classes)}
    sets: dict[tuple[int, ...], int] = {}
    items = []
    for rel, labels, _ in m.rows:
        key = tuple(sorted(idx[lbl] for lbl in labels))
        items.append((path.parent / rel, sets.setdefault(key, len(sets))))
    train_i, val_i = split_rows(m.rows, val_fraction, seed)
    how = "its split column" if all(r[2] for r in m.rows) else f"split {val_fraction:.0%} for val"
    split = DataSplit(path.parent, f"{MANIFEST} (multi-label, {how})", classes, [items[i] for i in train_i],
                      [items[i] for i in val_i], [p.text for p in m.warnings], task="multilabel",
                      label_sets=list(sets))
    if not split.val:
        raise DataError(f"no validation images: add rows with split val to {MANIFEST}, or more images")
    counts = split.counts()
    missing = [c for c in classes if not counts["val"][c]]
    if missing:
        split.warnings.append(f"no val images for label(s) {', '.join(missing)}: their F1 and AP cannot be measured")
    return split


def subsample(items: list[tuple[Path, int]], n: int, seed: int) -> list[tuple[Path, int]]:
    """A stratified, seeded subset of at most n items (for quick runs). Every class keeps at least one
    item: with n below the number of classes, that is one item per class."""
    if n >= len(items):
        return items
    rng = random.Random(seed)
    by: dict[int, list[tuple[Path, int]]] = {}
    for it in items:
        by.setdefault(it[1], []).append(it)
    groups = sorted(by.items())
    share = {lbl: n * len(its) / len(items) for lbl, its in groups}
    quota = {lbl: max(1, int(share[lbl])) for lbl, _ in groups}
    spare = n - sum(quota.values())  # largest remainders first, so the total never goes over n
    for lbl in sorted(quota, key=lambda lbl: quota[lbl] - share[lbl])[:max(0, spare)]:
        quota[lbl] += 1
    out = []
    for lbl, its in groups:
        out.extend(rng.sample(its, min(quota[lbl], len(its))))
    return sorted(out)
