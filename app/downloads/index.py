"""The file index: every file under DOWNLOAD_DIR/<SKU>/** with its size, media type, SHA-256 and
per-piece SHA-256 hashes (for Metalinks and the verifying client).

Only this module hashes files; the request path reads what it recorded.
"""
from __future__ import annotations

import hashlib
import mimetypes
import os
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


def hash_file(path: str | os.PathLike) -> Digest:
    """Whole-file and per-piece SHA-256 in one pass; stat before and after to catch a file being written."""
    with open(path, "rb") as fh:
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


def walk_product_files(download_dir: Path) -> Iterator[tuple[str, str]]:
    """(sku, relative posix path) of every regular file under DOWNLOAD_DIR/<SKU>/**.

    Folders whose name is not a valid SKU (".packages", ".tmp", "../") are not products; links that
    point outside the SKU's folder are never indexed.
    """
    if not download_dir.is_dir():
        return
    for sku_dir in sorted(download_dir.iterdir()):
        if not sku_dir.is_dir() or sku_dir.is_symlink() or not SKU_PATTERN.fullmatch(sku_dir.name):
            continue
        root = sku_dir.resolve()
        for dirpath, dirnames, filenames in os.walk(sku_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name.endswith((".part", ".tmp", ".crdownload")):
                    continue  # hidden and half-written files are never products
                full = Path(dirpath) / name
                if not full.is_file() or not full.resolve().is_relative_to(root):
                    continue
                yield sku_dir.name, full.relative_to(sku_dir).as_posix()


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
    paths = [str(file_path(download_dir, sku, rel)) for sku, rel, _ in todo]
    if len(paths) < 2 or total_bytes < PARALLEL_THRESHOLD:
        yield from map(_hash_one, paths)
        return
    with ProcessPoolExecutor(max_workers=workers or min(os.cpu_count() or 1, 4)) as pool:
        yield from pool.map(_hash_one, paths, chunksize=1)


def index_one(session: Session, download_dir: str | Path, sku: str, rel: str) -> FileEntry | None:
    """Re-index a single file (the watcher's unit of work); marks it missing when it is gone."""
    entry = session.scalar(select(FileEntry).where(FileEntry.sku == sku, FileEntry.path == rel))
    full = file_path(download_dir, sku, rel)
    if not full.is_file():
        if entry is not None and not entry.missing:
            entry.missing, entry.acknowledged_at = True, None  # newly gone: the owner must hear of it
        return entry
    digest = hash_file(full)
    if entry is None:
        entry = FileEntry(sku=sku, path=rel)
        session.add(entry)
    _apply(entry, digest, rel)
    session.flush()
    return entry
