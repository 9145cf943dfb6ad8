"""Sample thumbnails of a dataset's classes for the dataset page: small JPEGs made with Pillow, cached
under <data_dir>/thumbs/<dataset folder>/. Torch-free. Only files inside the dataset's own folder are
ever read."""
from __future__ import annotations

import io
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from app.core.errors import NotFound, ServiceUnavailable
from app.core.settings import Settings
from app.db.models import Dataset
from app.services import storage
from domain.errors import DataError, ImageError
from domain.images import load_image
from domain.layout import discover

THUMB_MAX = 160
_CACHE_SIZE = 16
_lock = threading.Lock()
_train_lists: OrderedDict[str, dict[int, list[Path]]] = OrderedDict()


def dataset_folder(settings: Settings, ds: Dataset) -> Path:
    """The upload's own folder (datasets/<uuid>), which `discover` read when the dataset was registered: the
    storage's own (the data directory by default), or this host's scratch copy of it."""
    parts = Path(ds.path).parts
    if len(parts) < 2 or parts[0] != settings.datasets_dir.name:
        raise NotFound(f"dataset {ds.id} has no folder on this server")
    try:
        key, _ = storage.dataset_key(ds.path)
        folder = storage.materialize_tree(storage.for_settings(settings), key, settings).resolve()
    except (ValueError, FileNotFoundError):
        raise NotFound(f"the files of dataset {ds.id} are missing on the server") from None
    except storage.StorageError as e:
        raise ServiceUnavailable(str(e)) from None
    if not folder.is_dir():
        raise NotFound(f"the files of dataset {ds.id} are missing on the server")
    return folder


def thumbs_folder(settings: Settings, ds: Dataset) -> Path:
    parts = Path(ds.path).parts
    if len(parts) < 2 or parts[0] != settings.datasets_dir.name or parts[1] in ("..", "."):
        raise NotFound(f"dataset {ds.id} has no folder on this server")
    return settings.thumbs_dir / parts[1]


def _train_images(folder: Path) -> dict[int, list[Path]]:
    """Class (or label) index -> train images, as training sees them (same default split and seed as at upload)."""
    key = str(folder)
    with _lock:
        if key in _train_lists:
            _train_lists.move_to_end(key)
            return _train_lists[key]
    try:
        split = discover(folder, follow_links=False)
    except DataError as e:
        raise NotFound(f"the dataset's files cannot be read any more: {e}") from None
    by: dict[int, list[Path]] = {}
    for p, lbl in split.train:  # (multi-label: an image is a sample of each label it carries)
        for c in split.label_sets[lbl] if split.multilabel else (lbl,):
            by.setdefault(c, []).append(p)
    with _lock:
        _train_lists[key] = by
        while len(_train_lists) > _CACHE_SIZE:
            _train_lists.popitem(last=False)
    return by


def _placeholder() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (THUMB_MAX, THUMB_MAX * 3 // 4), (225, 228, 232)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def sample_thumbnail(settings: Settings, ds: Dataset, class_index: int, n: int) -> bytes:
    """JPEG bytes of the n-th (0-based) train image of class `class_index`, at most THUMB_MAX pixels on
    its long side. Raises NotFound for indexes out of range. An unreadable image gives a grey placeholder."""
    if not 0 <= class_index < len(ds.classes):
        raise NotFound(f"dataset {ds.id} has no class number {class_index} (it has {len(ds.classes)}, from 0)")
    train_count = int((ds.counts or {}).get("train", {}).get(ds.classes[class_index], 0))
    if not 0 <= n < train_count:
        raise NotFound(f"class {ds.classes[class_index]!r} has no train image number {n} (it has {train_count}, "
                       "from 0)")
    cached = thumbs_folder(settings, ds) / f"c{class_index}_{n}.jpg"

    def make() -> bytes:  # only when no copy exists: the dataset's files may not be on this host
        folder = dataset_folder(settings, ds)
        images = _train_images(folder).get(class_index, [])
        if n >= len(images):
            raise NotFound(f"class {ds.classes[class_index]!r} has no train image number {n} on disk")
        return _thumbnail(folder, images[n], cached)

    return _stored(settings, cached, make)


def file_thumbnail(settings: Settings, ds: Dataset, rel: str) -> bytes:
    """JPEG thumbnail of one file of the dataset, named relative to the dataset's root (as in evaluations)."""
    key = uuid.uuid5(uuid.NAMESPACE_URL, rel).hex
    cached = thumbs_folder(settings, ds) / f"f{key}.jpg"

    def make() -> bytes:
        folder = dataset_folder(settings, ds)
        return _thumbnail(folder, folder.joinpath(*Path(ds.path).parts[2:]) / rel, cached)

    return _stored(settings, cached, make)


def _stored(settings: Settings, cached: Path, make: Callable[[], bytes]) -> bytes:
    """A thumbnail from this host's copy, else (object storage) from the bucket, else made, and then kept
    in both: a web process on another host, or after a restart, does not fetch the dataset to show it."""
    if cached.is_file():
        return cached.read_bytes()
    st = storage.for_settings(settings)
    key = "thumbs/" + cached.relative_to(settings.thumbs_dir).as_posix()
    if not st.local:
        try:
            st.get_file(key, cached)
            return cached.read_bytes()
        except (FileNotFoundError, storage.StorageError):
            pass
    data = make()
    if not st.local and cached.is_file():
        try:
            st.put_file(cached, key)
        except storage.StorageError:
            pass  # shown anyway; made again elsewhere
    return data


def _thumbnail(folder: Path, path: Path, cached: Path) -> bytes:
    if cached.is_file():
        return cached.read_bytes()
    if path.is_symlink() or not path.resolve().is_relative_to(folder) or not path.is_file():
        raise NotFound("that image is not in the dataset folder")
    try:
        img = load_image(path, min_short_side=THUMB_MAX)
    except ImageError:
        return _placeholder()
    img.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82, optimize=True)
    data = buf.getvalue()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)  # atomic: a concurrent reader sees the whole file or none
    return data
