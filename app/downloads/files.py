"""File manager rules: upload, import, register, move and delete product files, all inside
DOWNLOAD_DIR/<SKU>/** and nowhere else. The index (``app.downloads.index``) records every change.

Plain functions called by the owner pages; they raise InvalidInput before touching anything.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import IO, Callable, ContextManager, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.utils import secure_filename

from app.downloads.errors import InvalidInput
from app.timeutil import utcnow
from app.downloads.index import index_one, product_file_path, walk_product_files
from app.downloads.models import PACKAGES_SKU, FileEntry
from app.downloads.packages import packages_using
from app.store.models import SKU_PATTERN

COPY_BUFFER = 1 << 20
MAX_DEPTH = 8
Opener = Callable[[], ContextManager[IO[bytes]]]  # opens one file's bytes for _save_all


@dataclass(frozen=True)
class Target:
    """A validated place for a file: DOWNLOAD_DIR/<sku>/<rel>."""

    sku: str
    rel: str

    @property
    def registered_path(self) -> str:
        return f"{self.sku}/{self.rel}"

    def on_disk(self, download_dir: str | Path) -> Path:
        return Path(download_dir) / self.sku / self.rel


def target_for(sku: str, folder: str, filename: str) -> Target:
    """Check a SKU, an optional sub-folder and a file name; every part must survive secure_filename unchanged
    (so nothing is silently renamed), and no part may be hidden, '..' or empty."""
    sku = (sku or "").strip()
    if not SKU_PATTERN.fullmatch(sku):
        raise InvalidInput(f"SKU {sku!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
    parts = [p for p in (folder or "").strip().strip("/").split("/") if p] + [(filename or "").strip()]
    if len(parts) > MAX_DEPTH:
        raise InvalidInput(f"folders may be at most {MAX_DEPTH - 1} levels deep")
    for part in parts:
        if not part:
            raise InvalidInput("a file name is required")
        if part.startswith(".") or part != secure_filename(part) or len(part) > 200:
            raise InvalidInput(f"{part!r} is not a safe file or folder name: use letters, digits, '.', '_' and '-' "
                               f"(for example {secure_filename(part) or 'file.bin'!r})")
        if part.endswith((".part", ".tmp", ".crdownload")):
            raise InvalidInput(f"{part!r} ends like a half-written file and would never be served")
    return Target(sku, "/".join(parts))


def parse_registered(registered: str) -> Target:
    sku, _, rel = (registered or "").strip().partition("/")
    folder, _, name = rel.rpartition("/")
    return target_for(sku, folder, name)


def _inside(download_dir: str | Path, path: Path) -> None:
    root = Path(download_dir).resolve()
    if not path.resolve().is_relative_to(root) or path.resolve() == root:
        raise InvalidInput("that path leads outside the download folder")


def _stage(source: IO[bytes], final: Path) -> str:
    """Stream into a hidden temp file next to ``final`` and fsync it; returns its name.

    A full disk (out of space, inodes or quota) refuses even the folder or the empty temp file: every
    failure is an InvalidInput and leaves no temp file behind.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
    except OSError as exc:
        raise _not_saved(exc) from None
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, COPY_BUFFER)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _not_saved(exc) from None
        raise
    return tmp


def _place(tmp: str, final: Path, overwrite: bool) -> None:
    """Rename a staged file into place: never half a file at ``final``."""
    try:
        if overwrite:
            os.replace(tmp, final)
        else:
            os.link(tmp, final)  # fails if someone created the file meanwhile: never overwrite unasked
            os.unlink(tmp)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, FileExistsError):
            raise InvalidInput(f"{final.name} already exists; confirm to replace it", status=409) from None
        if isinstance(exc, OSError):
            raise _not_saved(exc) from None
        raise


def _not_saved(exc: OSError) -> InvalidInput:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # out of space, inodes or quota: all "full" to the owner
        return InvalidInput("the disk is full: the upload was not saved", status=507)
    return InvalidInput(f"the file could not be saved: {exc.strerror}", status=500)


def _save_all(session: Session, download_dir: str | Path, sources: list[tuple[Target, Opener]],
              overwrite: bool) -> list[str]:
    """Write several files as one change and register them.

    Every target is checked first, then every file is staged (a full disk stops here and removes the
    staged ones: nothing changed), then all are renamed into place, so a failed batch never leaves some
    files new or replaced while the caller rolls back their index rows.
    """
    seen: set[str] = set()
    for target, _ in sources:
        if target.registered_path in seen:
            raise InvalidInput(f"{target.rel} is chosen twice in this upload")
        seen.add(target.registered_path)
        _inside(download_dir, target.on_disk(download_dir).parent)
        if not overwrite and target.on_disk(download_dir).exists():
            raise InvalidInput(f"{target.registered_path} already exists; confirm to replace it", status=409)
    staged: list[tuple[Target, str]] = []
    try:
        for target, open_source in sources:
            with open_source() as source:
                staged.append((target, _stage(source, target.on_disk(download_dir))))
        while staged:
            target, tmp = staged.pop(0)
            _place(tmp, target.on_disk(download_dir), overwrite)
            index_one(session, download_dir, target.sku, target.rel)
    finally:
        for _, tmp in staged:  # only left over when something failed
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return [t.registered_path for t, _ in sources]


def save_uploads(session: Session, download_dir: str | Path, uploads: list[tuple[Target, IO[bytes]]],
                 overwrite: bool = False) -> list[str]:
    """Save uploaded streams (the request size limit is MAX_CONTENT_LENGTH) and register them; all or none."""
    return _save_all(session, download_dir, [(t, partial(contextlib.nullcontext, s)) for t, s in uploads],
                     overwrite)


def import_folder(session: Session, download_dir: str | Path, import_dir: str | Path, source: str,
                  sku: str, overwrite: bool = False) -> list[str]:
    """Copy every file below IMPORT_DIR/<source> into DOWNLOAD_DIR/<sku>/ (same sub-folders) and register them.

    All names are checked before the first copy; existing files are refused unless ``overwrite``.
    """
    root = Path(import_dir).resolve()
    folder = (root / (source or "").strip().strip("/")).resolve()
    if not folder.is_relative_to(root) or not folder.is_dir():
        raise InvalidInput(f"{source!r} is not a folder inside the import folder {root}")
    plan = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            src = Path(dirpath) / name
            if src.is_symlink() or not src.is_file():
                continue  # a link could point anywhere on the server
            rel_folder = Path(dirpath).relative_to(folder).as_posix()
            plan.append((target_for(sku, "" if rel_folder == "." else rel_folder, name), partial(open, src, "rb")))
    if not plan:
        raise InvalidInput(f"there are no files in {folder}")
    return _save_all(session, download_dir, plan, overwrite)


def register_file(session: Session, download_dir: str | Path, registered: str) -> FileEntry:
    """Index a file that is already on disk under DOWNLOAD_DIR/<SKU>/."""
    target = parse_registered(registered)
    path = target.on_disk(download_dir)
    _inside(download_dir, path)
    if product_file_path(download_dir, target.sku, target.rel) is None:
        raise InvalidInput(f"{target.registered_path} is not a file in the download folder")
    return index_one(session, download_dir, target.sku, target.rel)


def _entry(session: Session, target: Target) -> FileEntry | None:
    return session.scalar(select(FileEntry).where(FileEntry.sku == target.sku, FileEntry.path == target.rel))


def move_file(session: Session, download_dir: str | Path, source: str, destination: str,
              overwrite: bool = False) -> FileEntry:
    """Rename within the download folder; packages keep their ZIP until they are rebuilt."""
    src, dst = parse_registered(source), parse_registered(destination)
    src_path, dst_path = src.on_disk(download_dir), dst.on_disk(download_dir)
    _inside(download_dir, src_path)
    _inside(download_dir, dst_path.parent)
    if product_file_path(download_dir, src.sku, src.rel) is None:
        raise InvalidInput(f"{src.registered_path} is not in the download folder")
    if dst_path.exists() and not overwrite:
        raise InvalidInput(f"{dst.registered_path} already exists; confirm to replace it", status=409)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src_path, dst_path)
    index_one(session, download_dir, src.sku, src.rel)  # marks the old place missing
    return index_one(session, download_dir, dst.sku, dst.rel)


def delete_file(session: Session, download_dir: str | Path, registered: str) -> None:
    """Remove the file from disk; its index row stays, marked missing, for the delivery history."""
    target = parse_registered(registered)
    path = target.on_disk(download_dir)
    _inside(download_dir, path)
    if not path.is_file():
        raise InvalidInput(f"{target.registered_path} is not in the download folder")
    path.unlink()
    entry = index_one(session, download_dir, target.sku, target.rel)
    if entry is not None:  # deleted on purpose: the owner knows, so it is no "missing" flag
        entry.acknowledged_at = utcnow()
        session.flush()


@dataclass
class FileRow:
    registered_path: str
    size: int | None
    sha256: str | None
    missing: bool = False
    flagged: str | None = None
    registered: bool = True
    packages: list[str] = field(default_factory=list)


def list_files(session: Session, download_dir: str | Path) -> list[FileRow]:
    """Every indexed file plus files on disk that are not registered yet, with the packages using each."""
    rows = {e.registered_path: FileRow(e.registered_path, e.size, e.sha256, e.missing, e.flagged)
            for e in session.scalars(select(FileEntry).where(FileEntry.sku != PACKAGES_SKU))}
    for sku, rel in walk_product_files(Path(download_dir)):
        key = f"{sku}/{rel}"
        if key not in rows:
            size = (Path(download_dir) / sku / rel).stat().st_size
            rows[key] = FileRow(key, size, None, registered=False)
    for path, names in packages_using(session, rows).items():
        rows[path].packages = names
    return [rows[k] for k in sorted(rows)]


def iter_import_folders(import_dir: str | Path) -> Iterator[str]:
    root = Path(import_dir)
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                yield child.name
