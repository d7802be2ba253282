"""The file index: every file under DOWNLOAD_DIR/<SKU>/** with its size, media type, SHA-256 and
per-piece SHA-256 hashes (for Metalinks and the verifying client).

Only this module hashes files; the request path reads what it recorded.
"""
from __future__ import annotations

import errno
import hashlib
import mimetypes
import os
import stat
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.downloads.models import PACKAGES_SKU, FileEntry
from app.store.models import SKU_PATTERN
from app.timeutil import utcnow

MIN_PIECE = 1 << 20      # 1 MiB: one bad piece costs at most this much to fetch again
MAX_PIECES = 4096        # larger files get larger pieces, so a manifest stays small
READ_BLOCK = 1 << 20     # hashlib is fastest fed in large blocks
PARALLEL_THRESHOLD = 8 << 20  # below this much work, a process pool costs more than it saves


def piece_size_for(size: int) -> int:
    piece = MIN_PIECE
    while size > piece * MAX_PIECES:
        piece *= 2
    return piece


def media_type_for(path: str) -> str:
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    if encoding or not guessed:  # "x.tar.gz" is a gzip file to a browser, not a tar
        return {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}.get(
            encoding or "", "application/octet-stream")
    return guessed


@dataclass(frozen=True)
class Digest:
    size: int
    mtime_ns: int
    sha256: str
    piece_size: int
    piece_hashes: str


def hash_file(path: str | os.PathLike, pace: Callable[[int], object] | None = None) -> Digest:
    """Whole-file and per-piece SHA-256 in one pass; stat before and after to catch a file being written.
    ``pace(n)`` after each block read keeps a background job to its byte rate."""
    # O_NOFOLLOW: a file swapped for a link after the rule's check is refused, not hashed.
    with open(open_product_file(os.fspath(path)), "rb") as fh:
        before = os.fstat(fh.fileno())
        piece_size = piece_size_for(before.st_size)
        whole = hashlib.sha256()
        pieces = []
        piece, filled = hashlib.sha256(), 0
        buf = bytearray(READ_BLOCK)
        view = memoryview(buf)
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            chunk = view[:n]
            whole.update(chunk)
            if pace is not None:
                pace(n)
            while chunk:
                take = min(len(chunk), piece_size - filled)
                piece.update(chunk[:take])
                filled += take
                chunk = chunk[take:]
                if filled == piece_size:
                    pieces.append(piece.hexdigest())
                    piece, filled = hashlib.sha256(), 0
        if filled or not pieces:
            pieces.append(piece.hexdigest())
        after = os.fstat(fh.fileno())
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise FileChanging(str(path))
    return Digest(before.st_size, before.st_mtime_ns, whole.hexdigest(), piece_size, "".join(pieces))


class FileChanging(Exception):
    """The file changed while it was hashed (still being copied): index it when it is complete."""


def product_file_path(download_dir: str | Path, sku: str, rel: str) -> str | None:
    """The one rule for "is this a product file?" (index walk, watcher, file manager, package builder):
    DOWNLOAD_DIR/<sku>/<rel> must be a regular file whose real path stays inside DOWNLOAD_DIR/<sku>/.
    Returns that real path, or None.

    A symlink that leaves the folder (``MANUAL/leak.txt -> instance/secret_key``) is not a product
    file: indexed, it was listed, served and packed. A symlink inside the folder that points inside
    it is one (the owner's alias of their own file); the SKU folder itself must not be a link.
    """
    base = os.path.realpath(download_dir)
    root = os.path.realpath(os.path.join(base, sku))
    if root != os.path.join(base, sku):
        return None
    full = os.path.realpath(os.path.join(root, rel))
    if not full.startswith(root + os.sep):
        return None
    try:
        mode = os.stat(full).st_mode
    except OSError:
        return None
    return full if stat.S_ISREG(mode) else None


def open_product_file(real_path: str) -> int:
    """Open a path ``product_file_path`` returned, as a file descriptor, without following a link
    that replaced it since (``O_NOFOLLOW``), and only if it is still a regular file."""
    fd = os.open(real_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "not a regular file", real_path)
    return fd


def walk_product_files(download_dir: Path) -> Iterator[tuple[str, str]]:
    """(sku, relative path) of every product file (``product_file_path``) under DOWNLOAD_DIR/<SKU>/;
    hidden and half-written names are never products."""
    if not download_dir.is_dir():
        return
    for sku_dir in sorted(download_dir.iterdir()):
        if not sku_dir.is_dir() or sku_dir.is_symlink() or not SKU_PATTERN.fullmatch(sku_dir.name):
            continue
        for dirpath, dirnames, filenames in os.walk(sku_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name.endswith((".part", ".tmp", ".crdownload")):
                    continue  # hidden and half-written files are never products
                rel = (Path(dirpath) / name).relative_to(sku_dir).as_posix()
                if product_file_path(download_dir, sku_dir.name, rel) is not None:
                    yield sku_dir.name, rel


def file_path(download_dir: str | Path, sku: str, path: str) -> Path:
    return Path(download_dir) / sku / path


def _apply(entry: FileEntry, digest: Digest, path: str) -> None:
    entry.size = digest.size
    entry.mtime_ns = digest.mtime_ns
    entry.sha256 = digest.sha256
    entry.piece_size = digest.piece_size
    entry.piece_hashes = digest.piece_hashes
    entry.media_type = media_type_for(path)
    entry.indexed_at = utcnow()
    entry.missing = False
    entry.flagged = None
    entry.acknowledged_at = None


@dataclass
class IndexReport:
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    skipped: list[str]


def index_files(session: Session, download_dir: str | Path,
                progress: Callable[[int, int, str], None] | None = None, workers: int | None = None) -> IndexReport:
    """Bring the index in line with the disk; only new or changed files (size or mtime) are hashed.

    Removed files are marked missing (their rows stay for the delivery history and packages).
    """
    download_dir = Path(download_dir)
    existing = {(e.sku, e.path): e for e in session.scalars(select(FileEntry).where(FileEntry.sku != PACKAGES_SKU))}
    on_disk = list(walk_product_files(download_dir))
    todo = []
    report = IndexReport([], [], [], 0, [])
    for sku, rel in on_disk:
        st = os.stat(file_path(download_dir, sku, rel))
        entry = existing.get((sku, rel))
        if entry and not entry.missing and entry.size == st.st_size and entry.mtime_ns == st.st_mtime_ns:
            report.unchanged += 1
            continue
        todo.append((sku, rel, st.st_size))
    total_bytes = sum(size for _, _, size in todo)
    done = 0
    for (sku, rel, size), result in zip(todo, _hash_all(download_dir, todo, total_bytes, workers)):
        done += size
        if progress:
            progress(done, total_bytes, f"{sku}/{rel}")
        if isinstance(result, Exception):
            report.skipped.append(f"{sku}/{rel}: {result.__class__.__name__}")
            continue
        entry = existing.get((sku, rel))
        if entry is None:
            entry = FileEntry(sku=sku, path=rel)
            session.add(entry)
            report.added.append(f"{sku}/{rel}")
        else:
            report.changed.append(f"{sku}/{rel}")
        _apply(entry, result, rel)
    seen = set(on_disk)
    for key, entry in existing.items():
        if key not in seen and not entry.missing:
            entry.missing, entry.acknowledged_at = True, None  # newly gone: the owner must hear of it
            report.removed.append(entry.registered_path)
    session.flush()
    return report


def _hash_one(path: str) -> Digest | Exception:
    try:
        return hash_file(path)
    except (OSError, FileChanging) as exc:
        return exc


def _hash_all(download_dir: Path, todo: list[tuple[str, str, int]], total_bytes: int,
              workers: int | None) -> Iterator[Digest | Exception]:
    # Real paths (hash_file does not follow links); one that stopped being a product file is refused.
    paths = [product_file_path(download_dir, sku, rel) or str(file_path(download_dir, sku, rel))
             for sku, rel, _ in todo]
    if len(paths) < 2 or total_bytes < PARALLEL_THRESHOLD:
        yield from map(_hash_one, paths)
        return
    with ProcessPoolExecutor(max_workers=workers or min(os.cpu_count() or 1, 4)) as pool:
        yield from pool.map(_hash_one, paths, chunksize=1)


def index_one(session: Session, download_dir: str | Path, sku: str, rel: str,
              pace: Callable[[int], object] | None = None) -> FileEntry | None:
    """Re-index a single file (the watcher's and the sidecar's unit of work); marks it missing when it
    is gone. ``pace``: see ``hash_file``."""
    entry = session.scalar(select(FileEntry).where(FileEntry.sku == sku, FileEntry.path == rel))
    full = product_file_path(download_dir, sku, rel)
    if full is None:  # gone, or not a product file (a link out of the folder): never indexed
        if entry is not None and not entry.missing:
            entry.missing, entry.acknowledged_at = True, None  # newly gone: the owner must hear of it
        return entry
    digest = hash_file(full, pace)
    if entry is None:
        entry = FileEntry(sku=sku, path=rel)
        session.add(entry)
    _apply(entry, digest, rel)
    session.flush()
    return entry
