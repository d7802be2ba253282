"""Download packages: named, deterministic ZIPs of registered files in DOWNLOAD_DIR/.packages/<name>.zip.

Plain rules called by the owner pages, the ``softgoods package`` commands and ``purge``. They add and
flush; the caller commits once. A refused call raises InvalidInput before anything is written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.accounts.models import User
from app.downloads.errors import InvalidInput
from app.downloads.index import index_one, open_product_file, product_file_path
from app.downloads.models import PACKAGES_SKU, FileEntry, Package, PackageFile, PackageManager
from app.store.models import SKU_PATTERN, Product
from app.timeutil import utcnow

NAME_PATTERN = SKU_PATTERN  # same alphabet as SKUs: safe as a file name, never ".." or hidden
MAX_LIFETIME_DAYS = 3650
# Fixed metadata: the same files always give the same bytes (ZIP's DOS epoch, rw-r--r--).
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
ZIP_FILE_MODE = 0o100644 << 16
COPY_BUFFER = 4 << 20  # large copies keep a stored build as fast as `zip -0` (bench/zip_build.py)
# Media that is already compressed gains nothing from deflate, it only costs CPU: stored as is.
STORED_SUFFIXES = frozenset("""
    .zip .7z .rar .gz .tgz .bz2 .tbz2 .xz .txz .zst .lz .lzma .br .jar .apk .epub .docx .xlsx .pptx
    .odt .ods .odp .mp4 .m4v .m4a .mov .mkv .webm .avi .wmv .flv .mp3 .aac .ogg .oga .opus .flac .wma
    .jpg .jpeg .png .gif .webp .avif .heic .jxl .pdf .woff .woff2 .dmg .iso .deb .rpm .whl
""".split())


class BuildFailed(Exception):
    """The ZIP could not be written (disk full, unreadable source); the previous ZIP is untouched."""


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    error: str | None = None
    left_out: tuple[str, ...] = ()  # sources deleted since they were assigned: taken out of the package

    @property
    def notice(self) -> str:
        """What the owner must be told beside "done" (empty when nothing was left out)."""
        if not self.left_out:
            return ""
        return (f"left out {len(self.left_out)} file(s) deleted from the download folder: "
                + ", ".join(self.left_out))


def packages_dir(download_dir: str | Path) -> Path:
    return Path(download_dir) / PACKAGES_SKU


def zip_path(download_dir: str | Path, name: str) -> Path:
    return packages_dir(download_dir) / f"{name}.zip"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"package name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def get_package(session: Session, name: str) -> Package:
    package = session.scalar(select(Package).where(Package.name == name))
    if package is None:
        raise InvalidInput(f"no package named {name!r}", status=404)
    return package


def can_manage(user: User | None, package: Package) -> bool:
    """Admins manage every package; owners those that list them, or any package that lists nobody."""
    if user is None or not getattr(user, "is_owner", False):
        return False
    if user.is_admin or not package.managers:
        return True
    return any(m.user_id == user.id for m in package.managers)


SHELL = "shell"  # the operator at the server's command line: trusted like an admin


def check_may_sell(actor: User | str | None, package: Package) -> None:
    """Only a package's managers (and admins, and the shell) may put it in a product or change such a
    product: otherwise an owner refused on the package could sell it for $0."""
    if actor != SHELL and not can_manage(actor if isinstance(actor, User) else None, package):
        raise InvalidInput(f"only the managers of package {package.name} (and administrators) may sell it "
                           "or change a product that sells it", status=403)


def _check_lifetime(lifetime_days: int | None) -> None:
    if lifetime_days is not None and not 1 <= lifetime_days <= MAX_LIFETIME_DAYS:
        raise InvalidInput(f"lifetime must be between 1 and {MAX_LIFETIME_DAYS} days")


def resolve_managers(session: Session, emails: Iterable[str]) -> list[User]:
    """Owner or admin accounts by email; an unknown address or a customer is refused."""
    users = []
    for email in dict.fromkeys(e.strip().lower() for e in emails if e and e.strip()):
        user = session.scalar(select(User).where(func.lower(User.email) == email))
        if user is None:
            raise InvalidInput(f"no account for manager {email}")
        if not user.is_owner:
            raise InvalidInput(f"{email} is not an owner account and cannot manage packages")
        users.append(user)
    return users


def create_package(session: Session, name: str, expires_on: date | None = None, lifetime_days: int | None = None,
                   managers: Sequence[str] = (), *, today: date | None = None) -> Package:
    """An empty package (no files, no ZIP yet)."""
    check_name(name)
    _check_lifetime(lifetime_days)
    if expires_on is not None and expires_on < (today or utcnow().date()):
        raise InvalidInput(f"expiry date {expires_on} is already past")
    if session.scalar(select(Package.id).where(Package.name == name)) is not None:
        raise InvalidInput(f"a package named {name} already exists", status=409)
    users = resolve_managers(session, managers)
    package = Package(name=name, expires_on=expires_on, lifetime_days=lifetime_days)
    package.managers = [PackageManager(user_id=u.id) for u in users]
    session.add(package)
    session.flush()
    return package


def update_package(session: Session, package: Package, *, expires_on: date | None, lifetime_days: int | None,
                   managers: Sequence[str]) -> None:
    """The editor's attributes. A past expiry is allowed here: it retires the package at the next purge."""
    _check_lifetime(lifetime_days)
    users = resolve_managers(session, managers)
    package.expires_on = expires_on
    package.lifetime_days = lifetime_days
    wanted = {u.id for u in users}
    package.managers = [m for m in package.managers if m.user_id in wanted] + [
        PackageManager(user_id=uid) for uid in sorted(wanted - {m.user_id for m in package.managers})]
    session.flush()


def on_sale(package: Package, today: date | None = None) -> bool:
    """Offered for sale: within its lifetime from creation and not past its expiry."""
    today = today or utcnow().date()
    if package.expires_on is not None and today > package.expires_on:
        return False
    if package.lifetime_days is not None:
        return (today - package.created_at.date()).days < package.lifetime_days
    return True


def resolve_registered(session: Session, registered: str) -> FileEntry:
    """``<SKU>/<path>`` of a file known to the index and present; anything else is refused."""
    text = registered.strip() if isinstance(registered, str) else ""
    if not text or text.startswith("/") or "\\" in text or "\x00" in text:
        raise InvalidInput(f"{registered!r} is not a registered file: give <SKU>/<path> inside the download folder")
    parts = PurePosixPath(text).parts
    if len(parts) < 2 or any(p in ("", ".", "..") for p in text.split("/")) or not SKU_PATTERN.fullmatch(parts[0]):
        raise InvalidInput(f"{registered!r} is not a registered file: give <SKU>/<path> inside the download folder")
    sku, rel = parts[0], "/".join(parts[1:])
    entry = session.scalar(select(FileEntry).where(FileEntry.sku == sku, FileEntry.path == rel))
    if entry is None:
        raise InvalidInput(f"{registered} is not registered: add it with the file manager or `softgoods index`")
    if entry.missing:
        raise InvalidInput(f"{registered} is registered but missing from the download folder")
    return entry


def _stored(path: str) -> bool:
    name = path.lower()
    return name.endswith(".tar.gz") or PurePosixPath(name).suffix in STORED_SUFFIXES


def _packable(download_dir: str | Path, registered: str) -> Path:
    """The real path of a package member, if it is still a product file (``product_file_path``):
    a file swapped for a link out of its folder after it was indexed is never packed."""
    sku, _, rel = registered.partition("/")
    real = product_file_path(download_dir, sku, rel)
    if real is None:
        raise BuildFailed(f"{registered} is not a product file any more (gone, or a link out of its folder)")
    return Path(real)


def write_zip(target: Path, members: Sequence[tuple[str, Path]]) -> None:
    """Write members ``(name in archive, source)`` sorted by name into ``target`` atomically.

    Temp file in the same folder, fsync, ``os.replace``: a shopper mid-download keeps the old inode,
    and a failure (disk full, vanished source) leaves the previous ZIP exactly as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            with zipfile.ZipFile(raw, "w", allowZip64=True) as archive:
                for arcname, source in sorted(members):
                    _add_member(archive, arcname, source)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise BuildFailed(f"{exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}") from exc
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _add_member(archive: zipfile.ZipFile, arcname: str, source: Path) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_EPOCH)
    info.create_system = 3  # unix, so external_attr carries the fixed permissions
    info.external_attr = ZIP_FILE_MODE
    info.compress_type = zipfile.ZIP_STORED if _stored(arcname) else zipfile.ZIP_DEFLATED
    # O_NOFOLLOW: a link put in the file's place after _packable checked it is refused, not followed.
    with open(open_product_file(str(source)), "rb") as src:
        info.file_size = os.fstat(src.fileno()).st_size  # decides ZIP64 up front, deterministically
        with archive.open(info, "w") as dst:
            shutil.copyfileobj(src, dst, COPY_BUFFER)


def build_zip(session: Session, download_dir: str | Path, package: Package) -> BuildResult:
    """(Re)build the package's ZIP from its files and register it in the index.

    Callers change ``package.files`` without flushing: nothing is written to the database until the ZIP
    is on disk, so a long build never holds a write lock.

    No files: no ZIP (an existing one is removed). On failure the old ZIP stays and the error is
    recorded on the package (``build_error``) and returned.
    """
    target = zip_path(download_dir, package.name)
    # A source deleted since it was assigned leaves the package at this build (Download Manager design):
    # the record and the ZIP keep agreeing, and the result tells the owner which files went.
    gone = [pf for pf in package.files if not (Path(download_dir) / pf.file_path).is_file()]
    for pf in gone:
        package.files.remove(pf)
    left_out = tuple(pf.file_path for pf in gone)
    if not package.files:
        _remove_zip(session, download_dir, package.name)
        package.built_at, package.build_error = None, None
        session.flush()
        return BuildResult(True, left_out=left_out)
    try:
        members = [(pf.file_path, _packable(download_dir, pf.file_path)) for pf in package.files]
    except BuildFailed as exc:  # a member turned into a link out of its folder: nothing is packed
        return BuildResult(False, f"ZIP not rebuilt, the previous one is kept: {exc}")
    try:
        write_zip(target, members)
    except BuildFailed as exc:
        # The caller rolls back (add/remove change nothing) or records build_error (a rebuild says why).
        return BuildResult(False, f"ZIP not rebuilt, the previous one is kept: {exc}")
    # No autoflush while the new ZIP is hashed: on SQLite a pending write would hold the database's write
    # lock for the whole hash, and the sidecar's download log would wait behind it.
    with session.no_autoflush:
        index_one(session, download_dir, PACKAGES_SKU, target.name)
    package.built_at, package.build_error = utcnow(), None
    session.flush()
    return BuildResult(True, left_out=left_out)


def record_build_error(session: Session, package: Package, result: BuildResult) -> None:
    """After a failed rebuild was rolled back: only the reason is kept, so the owner sees it in the list."""
    package.build_error = result.error
    session.flush()


def add_files(session: Session, download_dir: str | Path, package: Package, files: Sequence[str]) -> BuildResult:
    """Assign registered files (all validated first; already assigned ones are ignored), then rebuild."""
    if not files:
        raise InvalidInput("name at least one file to add")
    entries = [resolve_registered(session, f) for f in files]
    present = {pf.file_path for pf in package.files}
    for entry in entries:
        if entry.registered_path not in present:
            package.files.append(PackageFile(file_path=entry.registered_path))
            present.add(entry.registered_path)
    return build_zip(session, download_dir, package)


def remove_files(session: Session, download_dir: str | Path, package: Package, files: Sequence[str]) -> BuildResult:
    """Take files out of the package (each must be in it), then rebuild (or drop the ZIP when empty)."""
    if not files:
        raise InvalidInput("name at least one file to remove")
    by_path = {pf.file_path: pf for pf in package.files}
    unknown = [f for f in files if f.strip() not in by_path]
    if unknown:
        raise InvalidInput(f"{unknown[0]} is not in package {package.name}")
    for f in dict.fromkeys(f.strip() for f in files):
        package.files.remove(by_path[f])
    return build_zip(session, download_dir, package)


def _remove_zip(session: Session, download_dir: str | Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        zip_path(download_dir, name).unlink()
    session.execute(delete(FileEntry).where(FileEntry.sku == PACKAGES_SKU, FileEntry.path == f"{name}.zip"))


def products_selling(session: Session, package: Package) -> list[Product]:
    return list(session.scalars(select(Product).where(Product.package_id == package.id).order_by(Product.sku)))


def delete_package(session: Session, download_dir: str | Path, package: Package) -> list[str]:
    """The record and its ZIP; the original files belong to the file manager and stay. Products that sold
    it are withdrawn from sale (nothing would be left to deliver); returns their SKUs."""
    withdrawn = []
    for product in products_selling(session, package):
        product.active, product.package = False, None
        withdrawn.append(product.sku)
    _remove_zip(session, download_dir, package.name)
    session.delete(package)
    session.flush()
    return withdrawn


def expired_packages(session: Session, today: date) -> list[Package]:
    return list(session.scalars(select(Package).where(Package.expires_on < today).order_by(Package.name)))


def purge_expired_packages(session: Session, download_dir: str | Path, today: date,
                           dry_run: bool = False) -> list[str]:
    """Delete packages whose expiry date is before ``today`` (records and ZIPs); returns their names."""
    names = []
    for package in expired_packages(session, today):
        names.append(package.name)
        if not dry_run:
            delete_package(session, download_dir, package)
    return names


def packages_using(session: Session, registered_paths: Iterable[str]) -> dict[str, list[str]]:
    """For the file manager: registered path -> names of the packages that contain it."""
    paths = list(registered_paths)
    usage: dict[str, list[str]] = {p: [] for p in paths}
    if not paths:
        return usage
    rows = session.execute(select(PackageFile.file_path, Package.name).join(Package)
                           .where(PackageFile.file_path.in_(paths)).order_by(Package.name))
    for path, name in rows:
        usage[path].append(name)
    return usage


def zip_entry(session: Session, name: str) -> FileEntry | None:
    return session.scalar(select(FileEntry).where(FileEntry.sku == PACKAGES_SKU, FileEntry.path == f"{name}.zip"))
