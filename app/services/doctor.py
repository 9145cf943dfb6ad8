"""The dataset doctor: checks an uploaded folder, already on disk, before it becomes a dataset.

Refused (4xx, every problem found listed in one error, each with its fix): decompression bombs, no images
at all, fewer than 2 classes, a class folder with no images, train/ and val/ with different class names.
Tolerated and reported as warnings (plain sentences that say what and how to fix): stray files (removed),
unreadable images (removed, so training never sees them), images outside class folders, odd colour modes,
very small images, classes with few images, class imbalance, a tiny val split, exact duplicates and the
same image in train and val (leakage). A `labels.csv` manifest (multi-label) is checked by
app.services.doctor_manifest, with the same image checks.

Torch-free: Pillow decodes every image once (JPEGs at 1/8 scale, which still reads all of their data) in a
thread pool; Pillow releases the GIL while it decodes.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import resource
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from PIL import Image, UnidentifiedImageError

from app.core import errors
from app.core.errors import AppError, ServiceUnavailable, Unprocessable
from app.core.settings import Settings
from app.services import doctor_manifest
from domain.errors import DataError
from domain.layout import IMAGE_EXTS, JUNK_NAMES, DataSplit, Folders, discover, read_folders
from domain.manifest import ManifestProblem
from domain.spec import AUTO_BALANCE_RATIO

log = logging.getLogger(__name__)

MIN_SIDE = 32  # px: smaller images are upscaled a lot by every backbone
FEW_TRAIN = 10  # training images per class below which a warning is given
IMBALANCE = 5.0  # largest / smallest class (training images) above which a warning is given
TINY_VAL = 10  # val images in all below which the val split is called tiny...
MIN_VAL_PER_CLASS = 2  # ...or per class
SHOWN = 5  # names quoted in a sentence (10 for the files that were removed)
MAX_FILES = 200  # names listed in a problem's structured details
EXTS = "jpg, png, bmp, gif, webp, tif"


# ---------------------------------------------------------------- problems


@dataclass
class Problem(ManifestProblem):
    """One problem of an upload: what is wrong, how to fix it, and the files concerned (relative names); the
    manifest's problems (domain.manifest) with what the API's error details show."""

    def as_dict(self) -> dict:
        return {"problem": self.problem, "fix": self.fix, "files": self.files[:MAX_FILES]}


def refuse(problems: list[Problem], error: type[AppError] = Unprocessable) -> NoReturn:
    """One error that lists every problem, in its message and item by item in `details`."""
    if len(problems) == 1:
        msg = problems[0].text
    else:
        msg = (f"the upload was refused for {len(problems)} problems: "
               + " ".join(f"({i}) {p.text};" for i, p in enumerate(problems, 1)).rstrip(";"))
    raise error(msg, details=[p.as_dict() for p in problems])


def examples(names: Iterable[str], n: int = SHOWN) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


# ---------------------------------------------------------------- files and images


def is_junk(name: str) -> bool:
    """System files and folders (__MACOSX, .DS_Store, Thumbs.db, .ipynb_checkpoints, dot files)."""
    return name in JUNK_NAMES or name.startswith(".")


def sweep(folder: Path, keep: Path | None = None) -> tuple[list[str], list[str], dict[Path, list[str]]]:
    """Removes stray files (system files and folders, non-image files; not `keep`). Returns the removed names (a
    folder once, with a trailing /), the image files that remain (as strings: 100,000 Path objects weigh
    ~100 MB), and the removed names by folder."""
    removed: list[str] = []
    by_dir: dict[Path, list[str]] = defaultdict(list)
    images: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        d = Path(dirpath)
        for n in sorted(dirnames):
            p = d / n
            if is_junk(n) or p.is_symlink():
                shutil.rmtree(p) if not p.is_symlink() else p.unlink()
                removed.append(p.relative_to(folder).as_posix() + "/")
                by_dir[d].append(n + "/")
        dirnames[:] = sorted(n for n in dirnames if (d / n).is_dir() and not (d / n).is_symlink())
        for n in sorted(filenames):
            p = d / n
            if p == keep:
                continue
            if is_junk(n) or p.is_symlink() or p.suffix.lower() not in IMAGE_EXTS:
                p.unlink()
                removed.append(p.relative_to(folder).as_posix())
                by_dir[d].append(n)
            else:
                images.append(str(p))
    return removed, images, by_dir


@dataclass(slots=True)
class ImageCheck:
    path: str
    sha256: str = ""
    mode: str = ""
    size: tuple[int, int] = (0, 0)
    error: str | None = None  # unreadable: why
    bomb: str | None = None  # too large to decode safely: why


def check_image(path: str, max_pixels: int, decode: bool = True) -> ImageCheck:
    """Hash and decode one image (a JPEG at 1/8 scale: every byte is still read and checked); with `decode`
    False (a file the doctor already passed: a version's unchanged images), hash it and read its header only."""
    c = ImageCheck(path)
    try:
        with open(path, "rb") as f:
            c.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        if os.path.getsize(path) == 0:
            c.error = "empty file, 0 bytes"
            return c
        with Image.open(path) as img:
            c.mode, c.size = img.mode, img.size
            w, h = img.size
            if w * h > max_pixels:
                c.bomb = f"{w}x{h} pixels"
                return c
            if not decode:
                return c
            if img.format == "JPEG" and min(w, h) >= 64:
                img.draft(None, (max(1, w // 8), max(1, h // 8)))
            img.load()
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        c.bomb = f"{m.group(1)} pixels" if m else "too many pixels"
    except UnidentifiedImageError:
        c.error = "not an image, or corrupt"
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises, the image is unusable
        msg = str(e) or e.__class__.__name__
        c.error = "truncated file" if "truncated" in msg.lower() else f"unreadable: {msg}"
    return c


CHECK_WINDOW = 1024


def _under(path: str, folder: Path) -> bool:
    return path.startswith(str(folder) + os.sep)


def check_images(paths: list[str], settings: Settings, trusted: frozenset[str] = frozenset()) -> list[ImageCheck]:
    """Every image checked (check_image); those in `trusted` (absolute paths) are not decoded again."""
    if not paths:
        return []
    mp = settings.max_image_pixels
    out: list[ImageCheck] = []
    with ThreadPoolExecutor(max_workers=min(settings.upload_check_threads, len(paths))) as pool:
        # a window at a time: Executor.map makes every task's future up front (100,000 images: ~150 MB)
        for i in range(0, len(paths), CHECK_WINDOW):
            out.extend(pool.map(lambda p: check_image(p, mp, p not in trusted), paths[i:i + CHECK_WINDOW]))
    return out


# ---------------------------------------------------------------- the doctor


@dataclass
class Verdict:
    """What a dataset row records of a checked upload (no per-image lists: those die with the check)."""

    root: Path
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    warnings: list[str]
    num_images: int
    size_bytes: int
    task: str = "multiclass"  # or "multilabel" (a labels.csv manifest)
    label_stats: dict | None = None  # multi-label: doctor_manifest.label_stats


def diagnose(folder: Path, settings: Settings, trusted: frozenset[str] = frozenset()) -> Verdict:
    """`examine`, summed up for the dataset row. Uploads of `doctor_process_min_files` files or more are
    checked in a child process: a check of 100,000 images held ~250 MB of paths, hashes and check records,
    which a long-lived web process keeps as its resident size after they are freed. `trusted`: paths relative
    to `folder` of images the doctor already passed (a version's unchanged ones), hashed but not decoded."""
    if _count_files(folder, settings.doctor_process_min_files) < settings.doctor_process_min_files:
        return _diagnose(folder, settings, trusted)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            outcome, peak_kb = pool.submit(_diagnose_in_child, folder, settings, trusted).result()
            log.info("the doctor's child process checked %s in %.1f s, peak RSS %.1f MB", folder.name,
                     time.perf_counter() - t0, peak_kb / 1000)
        except BrokenProcessPool:
            raise ServiceUnavailable("the process that checks the upload's images stopped before it finished "
                                     "(out of memory?): try again, or ask the administrator to give the web "
                                     "server more memory") from None
    if isinstance(outcome, Verdict):
        return outcome
    kind, message, details = outcome
    error = getattr(errors, kind, None)
    raise (error if isinstance(error, type) and issubclass(error, AppError) else Unprocessable)(message, details)


def _count_files(folder: Path, enough: int) -> int:
    n = 0
    for _, _, filenames in os.walk(folder):
        n += len(filenames)
        if n >= enough:
            break
    return n


def _diagnose(folder: Path, settings: Settings, trusted: frozenset[str] = frozenset()) -> Verdict:
    split = examine(folder, settings, trusted)
    items = split.train + split.val
    return Verdict(split.root, split.layout, split.classes, split.counts(), split.warnings, len(items),
                   sum(p.stat().st_size for p, _ in items), split.task,
                   doctor_manifest.label_stats(split) if split.multilabel else None)


def _diagnose_in_child(folder: Path, settings: Settings, trusted: frozenset[str]
                       ) -> tuple[Verdict | tuple[str, str, list | dict | None], int]:
    """In the child: the verdict, or an AppError as (class name, message, details), which survive pickling;
    with the child's peak RSS in kB."""
    outcome: Verdict | tuple[str, str, list | dict | None]
    try:
        outcome = _diagnose(folder, settings, trusted)
    except AppError as e:
        outcome = type(e).__name__, e.message, e.details
    return outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def examine(folder: Path, settings: Settings, trusted: frozenset[str] = frozenset()) -> DataSplit:
    """Checks the upload in `folder` (stray files and unreadable images are removed from it) and returns
    its split, with the doctor's warnings. Raises a 4xx AppError that lists every problem otherwise."""

    def rel(p: Path | str) -> str:
        return Path(p).relative_to(folder).as_posix()

    manifest = doctor_manifest.find(folder)
    stray, image_paths, stray_by_dir = sweep(folder, keep=manifest)
    checks = check_images(image_paths, settings, frozenset(str(folder / t) for t in trusted))
    unreadable = [c for c in checks if c.error]
    for c in unreadable:
        os.unlink(c.path)
    bombs = [c for c in checks if c.bomb]
    good = [c for c in checks if not c.error and not c.bomb]

    problems: list[Problem] = []
    if bombs:
        problems.append(Problem(
            f"{plural(len(bombs), 'image')} too large to decode safely (a decompression bomb or a huge scan): "
            + examples(f"{rel(c.path)} ({c.bomb})" for c in bombs),
            f"resize {'it' if len(bombs) == 1 else 'them'} below {settings.max_image_pixels} pixels (width x "
            "height) or leave them out; the server's limit is GRAFT_MAX_IMAGE_PIXELS",
            [rel(c.path) for c in bombs]))
    if manifest is not None:
        errs, dropped = doctor_manifest.check(manifest, unreadable)
        if problems or errs:
            refuse(problems + [Problem(p.problem, p.fix, p.files) for p in errs])
        split = _discover(folder)
        split.warnings = _stray_warning(stray) + doctor_manifest.warnings(split, good, unreadable, dropped, MIN_SIDE)
        if dropped:
            doctor_manifest.compact(manifest)  # the stored labels.csv names only the images it keeps
        return split
    found = read_folders(folder)
    problems += _layout_problems(found, folder, rel, unreadable, stray_by_dir, n_images=len(good) + len(bombs),
                                 n_stray=len(stray))
    if problems:
        refuse(problems)
    split = _discover(folder)
    split.warnings = _warnings(split, found, folder, rel, stray, unreadable, good)
    return split


def _discover(folder: Path) -> DataSplit:
    try:
        return discover(folder, follow_links=False)
    except DataError as e:  # said in the upload's own terms, without the server's paths
        msg = str(e).replace(str(folder) + os.sep, "").replace(str(folder), "the upload")
        what, _, fix = msg.partition(": ")
        refuse([Problem(what, fix or "fix the folder and upload it again")])


def _stray_warning(stray: list[str]) -> list[str]:
    if not stray:
        return []
    n_dirs = sum(1 for n in stray if n.endswith("/"))
    what = " and ".join(([plural(n_dirs, "stray folder")] if n_dirs else [])
                        + ([plural(len(stray) - n_dirs, "stray file")] if len(stray) > n_dirs else []))
    return [Problem(f"removed {what} (system files, notes, other formats than images): {examples(stray, 10)}",
                    f"nothing to fix, only images ({EXTS}) are used; leave such files out of the next upload").text]


def _class_dir(found: Folders, split: str, cls: str) -> Path:
    if split == "val":
        return found.val_dirs[0] / cls
    return (found.train_dir or found.root) / cls


def _layout_problems(found: Folders, folder: Path, rel, unreadable: list[ImageCheck],
                     stray_by_dir: dict[Path, list[str]], n_images: int, n_stray: int) -> list[Problem]:
    out: list[Problem] = []
    if n_images == 0:
        if unreadable:
            why = (f"its {plural(len(unreadable), 'image file')} {'is' if len(unreadable) == 1 else 'are all'} "
                   f"unreadable ({examples(f'{rel(c.path)}: {c.error}' for c in unreadable)})")
        elif n_stray:
            why = f"it holds only {plural(n_stray, 'other file')}"
        else:
            why = "it is empty"
        out.append(Problem(f"no images found in the upload: {why}",
                           f"put the images ({EXTS}) in one sub-folder per class, inside train/ and val/ or "
                           "directly in the class folders, and upload that folder (or its zip)",
                           [rel(c.path) for c in unreadable]))
    if found.train_dir is None and found.val_dirs:
        out.append(Problem(f"found {', '.join(rel(d) + '/' for d in found.val_dirs)} but no train/ folder",
                           "rename the folder that holds the training images to train/ (next to val/)"))
        return out
    where = f"in {rel(found.train_dir)}/" if found.train_dir else ("at the top of the upload" if found.root == folder
                                                                    else f"in {rel(found.root)}/")
    classes = sorted(found.train)
    if len(classes) < 2:
        shown = f" ({', '.join(classes)})" if classes else ""
        loose = f"; {plural(len(found.loose), 'image')} lie outside any class folder" if found.loose else ""
        out.append(Problem(f"found {plural(len(classes), 'class folder')}{shown} {where}{loose}",
                           "a classifier needs at least 2 classes: put the images of each class in its own "
                           "sub-folder named after the class (e.g. train/cats/, train/dogs/ and the same in val/)"))
    if n_images:
        empty = []
        for split, per_class in (("train", found.train), ("val", found.val or {})):
            for cls in sorted(per_class):
                if per_class[cls]:
                    continue
                d = _class_dir(found, split, cls)
                lost = [c for c in unreadable if _under(c.path, d)]
                others = [n for k, v in stray_by_dir.items() if k == d or k.is_relative_to(d) for n in v]
                why = (f" (its {plural(len(lost), 'image')} {'was' if len(lost) == 1 else 'were all'} unreadable: "
                       f"{examples(f'{rel(c.path)} ({c.error})' for c in lost)})" if lost
                       else f" (it holds only non-image files: {examples(others)})" if others else "")
                empty.append((rel(d) + "/", why))
        if empty:
            out.append(Problem(f"{plural(len(empty), 'class folder')} with no usable images: "
                               + ", ".join(name + why for name, why in empty),
                               f"add images ({EXTS}) to {'it' if len(empty) == 1 else 'each'}, or remove the "
                               f"folder{'' if len(empty) == 1 else 's'} (from train/ and val/ alike)",
                               [name for name, _ in empty]))
    if found.val is not None and found.train_dir is not None:
        only_train = sorted(set(found.train) - set(found.val))
        only_val = sorted(set(found.val) - set(found.train))
        if only_train or only_val:
            t, v = rel(found.train_dir) + "/", rel(found.val_dirs[0]) + "/"
            parts = ([f"only in {t}: {', '.join(only_train)}"] if only_train else []) + \
                    ([f"only in {v}: {', '.join(only_val)}"] if only_val else [])
            pairs = [f"{a} and {b}" for a in only_train for b in only_val if a.lower() == b.lower()]
            case = f" ({'; '.join(pairs)} differ only in upper/lower case, which counts)" if pairs else ""
            out.append(Problem(f"{t} and {v} have different class folders{case}: {'; '.join(parts)}",
                               f"use exactly the same class folder names in {t} and {v}: rename the folders "
                               "or add the missing ones, with images",
                               [(t if c in only_train else v) + c + "/" for c in only_train + only_val]))
    return out


def _warnings(split: DataSplit, found: Folders, folder: Path, rel, stray: list[str],
              unreadable: list[ImageCheck], good: list[ImageCheck]) -> list[str]:
    w: list[Problem | str] = list(_stray_warning(stray))
    if unreadable:
        w.append(Problem(f"skipped {plural(len(unreadable), 'unreadable image')} (removed from the dataset): "
                         + examples((f"{rel(c.path)} ({c.error})" for c in unreadable), 10),
                         "re-export or re-download them (they are corrupt, truncated or empty) and upload again "
                         "if you need them"))
    w.extend(found.notes)
    used = {str(p) for p, _ in split.train + split.val}
    extra_dirs = found.val_dirs[1:] if found.train_dir is not None and found.val is not None else []
    for d in extra_dirs:
        n = sum(1 for c in good if _under(c.path, d))
        w.append(Problem(f"ignored {rel(d)}/ ({plural(n, 'image')}): {rel(found.val_dirs[0])}/ is the val split",
                         f"merge it into {rel(found.val_dirs[0])}/ if those images should validate the model"))
    if found.junk_dir is not None:
        junk = {str(p) for p in found.junk}
        n_junk = sum(1 for c in good if c.path in junk)
        used |= junk
        w.append(Problem(f"{rel(found.junk_dir)}/: {plural(n_junk, 'image')} of no class, never trained on: they "
                         "measure how often the model answers where it should say \"none of these\" (its "
                         "false-accept rate)" if n_junk else f"{rel(found.junk_dir)}/ holds no readable image",
                         "nothing to fix" if n_junk else "put images that belong to none of the classes in it, "
                                                          "or leave it out"))
        train_paths = {str(q) for q, _ in split.train}
        train_hashes = {c.sha256 for c in good if c.path in train_paths}
        clash = [c for c in good if c.path in junk and c.sha256 in train_hashes]
        if clash:
            w.append(Problem(f"{plural(len(clash), 'image')} of {rel(found.junk_dir)}/ {'is' if len(clash) == 1 else 'are'} "
                             f"also in train: {examples(rel(c.path) for c in clash)}",
                             "an image of no class cannot also be a class's: remove it from one of them"))
    unused = [c for c in good if c.path not in used and not any(_under(c.path, d) for d in extra_dirs)]
    if unused:
        w.append(Problem(f"{plural(len(unused), 'image')} outside the class folders "
                         f"{'is' if len(unused) == 1 else 'are'} not used: {examples(rel(c.path) for c in unused)}",
                         "move each image into the sub-folder named after its class"))

    counts = split.counts()
    train_n, val_n = counts["train"], counts["val"]
    few = [c for c in split.classes if train_n[c] < FEW_TRAIN]
    if few:
        w.append(Problem(f"{plural(len(few), 'class', 'classes')} with very few training images: "
                         + examples(f"{c} ({train_n[c]})" for c in few),
                         f"add images: at least {FEW_TRAIN} per class, ideally 50 or more, for a reliable model"))
    big, small = max(split.classes, key=lambda c: train_n[c]), min(split.classes, key=lambda c: train_n[c])
    if train_n[small] and train_n[big] / train_n[small] > IMBALANCE:
        w.append(Problem(f"strong class imbalance: {big} has {train_n[big]} training images, {small} "
                         f"{train_n[small]} ({train_n[big] / train_n[small]:.0f}:1)",
                         "training balances it by default (class_weighting auto: each class weighs in the "
                         "loss in inverse proportion to its training images, as the largest has over "
                         f"{AUTO_BALANCE_RATIO:.0f}x the smallest); better still, add images to the small classes "
                         f"or leave some out of the large ones (at most {IMBALANCE:.0f}:1)"))
    total_val = sum(val_n.values())
    thin = [c for c in split.classes if val_n[c] < MIN_VAL_PER_CLASS]
    if total_val < TINY_VAL or thin:
        detail = ", ".join(f"{c} {val_n[c]}" for c in split.classes)
        w.append(Problem(f"tiny val split: {plural(total_val, 'image')} in all ({detail})",
                         f"the measured accuracy is noisy: give val at least {TINY_VAL} images, "
                         f"{MIN_VAL_PER_CLASS} or more per class"
                         + (f" (none for {', '.join(c for c in thin if not val_n[c])}: their accuracy cannot "
                            "be measured)" if any(not val_n[c] for c in thin) else "")))

    by_path = {c.path: c for c in good}
    explicit_val = found.val is not None
    for name, items in (("train", split.train), ("val", split.val)):
        groups: dict[str, list[tuple[Path, int]]] = defaultdict(list)
        for p, lbl in items:
            groups[by_path[str(p)].sha256].append((p, lbl))
        dups = [g for g in groups.values() if len(g) > 1]
        if dups:
            copies = sum(len(g) - 1 for g in dups)
            mixed = sum(1 for g in dups if len({lbl for _, lbl in g}) > 1)
            w.append(Problem(
                f"{plural(copies, 'exact duplicate image')} in {name} (the same content under another name): "
                + examples(" = ".join(rel(p) for p, _ in g) for g in dups)
                + (f"; {plural(mixed, 'of them is', 'of them are')} in different classes (a labelling mistake?)"
                   if mixed else ""),
                "delete the copies so that each image counts once" + (", and keep each image in its one right "
                                                                       "class" if mixed else "")))
    train_sha: dict[str, Path] = {}
    for p, _ in split.train:
        train_sha.setdefault(by_path[str(p)].sha256, p)
    leaked = [(p, train_sha[by_path[str(p)].sha256]) for p, _ in split.val if by_path[str(p)].sha256 in train_sha]
    if leaked:
        w.append(Problem(f"{plural(len(leaked), 'val image')} {'is' if len(leaked) == 1 else 'are'} also in train "
                         f"(the same content): {examples(f'{rel(v)} = {rel(t)}' for v, t in leaked)}",
                         f"this inflates the val accuracy: remove them from {rel(found.val_dirs[0])}/"
                         if explicit_val else
                         "this inflates the val accuracy (val is drawn from the same folders): delete the copies"))

    used_checks = [by_path[p] for p in sorted(used, key=lambda s: s.split(os.sep))]  # in Path order
    odd = [c for c in used_checks if c.mode != "RGB"]
    if odd:
        modes = Counter(c.mode for c in odd)
        by_mode = ", ".join(f"{m}: {n}" for m, n in sorted(modes.items()))
        w.append(Problem(f"{plural(len(odd), 'image')} not in RGB ({by_mode}; e.g. "
                         f"{examples((rel(c.path) for c in odd), 3)}) will be converted to RGB",
                         "nothing to fix unless colours matter: transparency becomes white, grey stays grey, CMYK "
                         "and 16-bit images are converted approximately; save them as RGB to control it"))
    tiny = [c for c in used_checks if min(c.size) < MIN_SIDE]
    if tiny:
        w.append(Problem(f"{plural(len(tiny), 'very small image')} (under {MIN_SIDE} px on a side): "
                         + examples(f"{rel(c.path)} ({c.size[0]}x{c.size[1]})" for c in tiny),
                         "they are upscaled to the model's input size, which blurs them: use larger images if you "
                         "have them"))
    return [x.text if isinstance(x, Problem) else x for x in w]
