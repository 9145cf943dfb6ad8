"""Archives and picked files -> a folder on disk, checked entry by entry before anything is written: zip
slip, links, devices, bombs (entry count, total size, compression ratio) and write errors, every problem
listed in one error with its fix."""
from __future__ import annotations

import errno
import lzma
import stat
import tarfile
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from app.core.errors import AppError, BadRequest, PayloadTooLarge
from app.core.settings import Settings
from app.services.doctor import Problem, examples, plural, refuse

CHUNK = 1 << 20


class TooLarge(Exception):
    pass


class ZipSource:
    """An entry being read: its decompression errors are the archive's fault (a corrupt zip), unlike the
    OSErrors of writing it out."""

    def __init__(self, f: IO[bytes]):
        self.f = f

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise zipfile.BadZipFile(str(e) or e.__class__.__name__) from None


def copy_limited(src: BinaryIO | ZipSource, dst: Path, limit: int) -> int:
    n = 0
    with open(dst, "wb") as f:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if n > limit:
                raise TooLarge
            f.write(chunk)
    return n


def upload_too_large(limit: int) -> AppError:
    return PayloadTooLarge(f"the upload is larger than the limit of {limit} bytes: upload a smaller dataset or "
                           "raise GRAFT_MAX_UPLOAD_BYTES",
                           details=[Problem(f"the upload is larger than the limit of {limit} bytes",
                                            "upload a smaller dataset or raise GRAFT_MAX_UPLOAD_BYTES").as_dict()])


def extracted_too_large(limit: int) -> AppError:
    p = Problem(f"the zip expands to more than {limit} bytes (a zip bomb?)",
                "upload a smaller dataset or raise GRAFT_MAX_EXTRACTED_BYTES")
    return BadRequest(p.text, details=[p.as_dict()])


def write_entry(target: Path, src: BinaryIO | ZipSource, limit: int) -> int:
    """One file of an upload. Raises TooLarge past `limit`; OSError for a path the file system cannot hold."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return copy_limited(src, target, limit)


class EntryProblems:
    """The problems of an upload's entries (paths, links, clashes), collected item by item."""

    def __init__(self):
        self.by_kind: dict[str, list[str]] = defaultdict(list)

    def path(self, name: str) -> PurePosixPath | None:
        """A relative path with no absolute root, drive, '..' or empty parts; None (and noted) otherwise."""
        clean = name.replace("\\", "/")
        p = PurePosixPath(clean)
        if not clean or p.is_absolute() or clean.startswith("/") or (p.parts and ":" in p.parts[0]):
            self.by_kind["absolute"].append(name)
            return None
        if any(part in ("..", "") for part in clean.rstrip("/").split("/")):
            self.by_kind["dotdot"].append(name)
            return None
        return p

    def os_error(self, name: str, e: OSError) -> None:
        if isinstance(e, (FileExistsError, IsADirectoryError, NotADirectoryError)):
            self.by_kind["clash"].append(name)
        elif e.errno == errno.ENAMETOOLONG:
            self.by_kind["long"].append(name)
        else:
            raise e

    def problems(self) -> list[Problem]:
        k = self.by_kind
        out = []
        if k["absolute"]:
            out.append(Problem(f"refused {plural(len(k['absolute']), 'entry', 'entries')} with an absolute path "
                               f"({examples(map(repr, k['absolute']))}): absolute paths are not allowed in an upload",
                               "zip the dataset folder itself, so that the paths inside are relative",
                               k["absolute"]))
        if k["dotdot"]:
            out.append(Problem(f"refused {plural(len(k['dotdot']), 'entry', 'entries')} with '..' in the path "
                               f"({examples(map(repr, k['dotdot']))}): '..' could write outside the dataset "
                               "(zip slip)", "re-create the archive from the dataset folder", k["dotdot"]))
        if k["link"]:
            out.append(Problem(f"refused {plural(len(k['link']), 'symbolic link')} "
                               f"({examples(map(repr, k['link']))}): symbolic links are not allowed in an upload",
                               "replace each link by the file it points to (zip without --symlinks)", k["link"]))
        if k["encrypted"]:
            out.append(Problem(f"refused {plural(len(k['encrypted']), 'encrypted entry', 'encrypted entries')} "
                               f"({examples(map(repr, k['encrypted']))}): the server cannot read them",
                               "zip the dataset again without a password", k["encrypted"]))
        if k["clash"]:
            out.append(Problem(f"refused {plural(len(k['clash']), 'entry', 'entries')} "
                               f"({examples(map(repr, k['clash']))}): each clashes with another entry of the "
                               "upload, a file and a folder of the same name",
                               "rename one of each pair and upload again", k["clash"]))
        if k["long"]:
            out.append(Problem(f"refused {plural(len(k['long']), 'entry', 'entries')} whose name is too long for the "
                               f"server's file system ({examples(map(repr, k['long']))})",
                               "rename them shorter and upload again", k["long"]))
        if k["ratio"]:
            out.append(Problem(f"refused {plural(len(k['ratio']), 'entry', 'entries')} compressed far beyond what "
                               f"images allow (a zip bomb?): {examples(k['ratio'])}",
                               "upload a normally compressed zip, or raise GRAFT_MAX_ZIP_RATIO",
                               [n.rsplit(' (', 1)[0] for n in k["ratio"]]))
        return out


def safe_relpath(name: str) -> PurePosixPath:
    """A relative path with no absolute root, drive, '..' or empty parts; raises BadRequest otherwise."""
    found = EntryProblems()
    p = found.path(name)
    if p is None:
        refuse(found.problems(), BadRequest)
    return p


def check_zip(zf: zipfile.ZipFile, settings: Settings) -> list[zipfile.ZipInfo]:
    """Every entry checked before extracting anything: paths, symlinks, sizes, ratios, count. Every problem
    found is reported in one BadRequest."""
    infos = zf.infolist()
    found = EntryProblems()
    total = 0
    keep = []
    for info in infos:
        if found.path(info.filename) is None:
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            found.by_kind["link"].append(info.filename)
            continue
        if info.flag_bits & 0x1:
            found.by_kind["encrypted"].append(info.filename)
            continue
        if not info.is_dir():
            total += info.file_size
            if (info.compress_size and info.file_size > (1 << 20)
                    and info.file_size / info.compress_size > settings.max_zip_ratio):
                found.by_kind["ratio"].append(f"{info.filename} ({info.file_size / info.compress_size:.0f}:1, the "
                                              f"limit is {settings.max_zip_ratio:.0f}:1)")
                continue
        keep.append(info)
    problems = []
    if len(infos) > settings.max_zip_entries:
        problems.append(Problem(f"the zip has {len(infos)} entries, more than the limit of {settings.max_zip_entries} "
                                "(a zip bomb?)", "upload fewer files or raise GRAFT_MAX_ZIP_ENTRIES"))
    if total > settings.max_extracted_bytes:
        problems.append(Problem(f"the zip expands to {total} bytes, more than the limit of "
                                f"{settings.max_extracted_bytes} (a zip bomb?)",
                                "upload a smaller dataset or raise GRAFT_MAX_EXTRACTED_BYTES"))
    problems += found.problems()
    if problems:
        refuse(problems, BadRequest)
    return keep


def extract_zip(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, settings: Settings) -> None:
    """Entries already checked by check_zip. Folders are created too, so that an empty class folder shows."""
    extract_entries(((i.filename, i.is_dir(), partial(zf.open, i)) for i in infos), dest, settings)


def extract_entries(entries: Iterable[tuple[str, bool, Callable[[], IO[bytes] | None]]], dest: Path,
                     settings: Settings) -> None:
    """(name, is a folder, open it) of an archive's checked entries into `dest`: the sizes are counted as they
    come out (a declared size may lie), names that would leave `dest` are refused, write errors named."""
    found = EntryProblems()
    written = 0
    root = dest.resolve()
    for name, is_dir, open_entry in entries:
        target = dest / PurePosixPath(name.replace("\\", "/"))
        if not target.resolve().is_relative_to(root):
            found.by_kind["dotdot"].append(name)
            continue
        try:
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            src = open_entry()
            if src is not None:
                with src:
                    written += write_entry(target, ZipSource(src), settings.max_extracted_bytes - written)
        except TooLarge:
            raise extracted_too_large(settings.max_extracted_bytes) from None
        except OSError as e:
            found.os_error(name, e)
    if found.problems():
        refuse(found.problems(), BadRequest)


def check_tar(tf: tarfile.TarFile, settings: Settings) -> list[tarfile.TarInfo]:
    """check_zip for a tar (plain, gz, bz2 or xz): relative paths only, regular files and folders only (no
    links, devices or fifos), the entry count and the total size under the limits."""
    found = EntryProblems()
    special: list[str] = []
    keep, total, count = [], 0, 0
    for m in tf:
        count += 1
        if count > settings.max_zip_entries:
            break
        if found.path(m.name) is None:
            continue
        if m.issym() or m.islnk():
            found.by_kind["link"].append(m.name)
        elif not (m.isfile() or m.isdir()):
            special.append(m.name)
        else:
            total += m.size if m.isfile() else 0
            keep.append(m)
    problems = []
    if count > settings.max_zip_entries:
        problems.append(Problem(f"the archive has more than {settings.max_zip_entries} entries (a bomb?)",
                                "upload fewer files or raise GRAFT_MAX_ZIP_ENTRIES"))
    if total > settings.max_extracted_bytes:
        problems.append(Problem(f"the archive expands to {total} bytes, more than the limit of "
                                f"{settings.max_extracted_bytes}", "upload a smaller dataset or raise "
                                "GRAFT_MAX_EXTRACTED_BYTES"))
    problems += found.problems()
    if special:
        problems.append(Problem(f"refused {plural(len(special), 'entry', 'entries')} that are devices or pipes "
                                f"({examples(map(repr, special))}): only files and folders are allowed",
                                "archive the dataset folder's images only", special))
    if problems:
        refuse(problems, BadRequest)
    return keep


def extract_tar(tf: tarfile.TarFile, infos: list[tarfile.TarInfo], dest: Path, settings: Settings) -> None:
    """extract_zip for a tar's entries already checked by check_tar."""
    extract_entries(((m.name, m.isdir(), partial(tf.extractfile, m)) for m in infos), dest, settings)


def extract_part(path: Path, dest: Path, settings: Settings) -> None:
    """One part (a zip or a tar) into `dest`, with every check of a zip upload."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                extract_zip(zf, check_zip(zf, settings), dest, settings)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path, "r:*") as tf:
                extract_tar(tf, check_tar(tf, settings), dest, settings)
        else:
            refuse([Problem("the part is not a zip or tar archive",
                            "send zips (or tars) of the dataset folder's files")], BadRequest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, NotImplementedError,
            zlib.error) as e:
        refuse([Problem(f"the archive is corrupt or uses an unsupported feature ({e})",
                        "create it again with a standard zip or tar tool")], BadRequest)
