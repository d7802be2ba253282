"""``softgoods package ...`` as DESIGN.md describes it: one line and exit 2 on bad input, nothing changed."""
from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from app.downloads.models import AuditEntry, Package
from app.extensions import db
from tests.helpers import ROOT, make_product


def sg(runner, *args):
    return runner.invoke(args=["softgoods", *args])


@pytest.fixture
def kit(app):
    make_product(app, "KIT", {"a.bin": 200_000, "b/c.txt": b"text " * 500})
    return Path(app.config["DOWNLOAD_DIR"])


def test_create_add_list_remove_delete(app, runner, kit):
    zip_file = kit / ".packages" / "P1.zip"
    assert sg(runner, "package", "create", "P1", "--days", "30", "--expires", "2099-01-31").exit_code == 0
    assert not zip_file.exists()
    result = sg(runner, "package", "add", "P1", "KIT/a.bin", "KIT/b/c.txt")
    assert result.exit_code == 0, result.output
    assert sorted(zipfile.ZipFile(zip_file).namelist()) == ["KIT/a.bin", "KIT/b/c.txt"]
    listing = sg(runner, "package", "list").output
    assert "P1\texpires 2099-01-31\tlifetime 30 days\t2 file(s)\tzip " in listing and "  KIT/b/c.txt" in listing
    assert hashlib.sha256(zip_file.read_bytes()).hexdigest() in listing
    assert sg(runner, "package", "remove", "P1", "KIT/a.bin", "KIT/b/c.txt").exit_code == 0
    assert not zip_file.exists()
    assert sg(runner, "package", "delete", "P1").exit_code == 0
    assert "P1" not in sg(runner, "package", "list").output
    with app.app_context():
        actions = list(db.session.scalars(select(AuditEntry.action).order_by(AuditEntry.id)))
    assert actions == ["package.create", "package.add", "package.remove", "package.delete"]


@pytest.mark.parametrize("args, message", [
    (["create", "../P"], "package name '../P' is not allowed"),
    (["create", "P1"], "a package named P1 already exists"),
    (["create", "P2", "--expires", "31/12/2030"], "--expires must be a date like 2030-12-31"),
    (["create", "P2", "--expires", "2001-01-01"], "expiry date 2001-01-01 is already past"),
    (["create", "P2", "--days", "0"], "Invalid value for '--days'"),
    (["create", "P2", "--managers", "ghost@example.com"], "no account for manager ghost@example.com"),
    (["add", "NOPE", "KIT/a.bin"], "no package named 'NOPE'"),
    (["add", "P1"], "Missing argument 'FILES'"),
    (["add", "P1", "../../etc/passwd"], "'../../etc/passwd' is not a registered file"),
    (["add", "P1", "/etc/passwd"], "'/etc/passwd' is not a registered file"),
    (["add", "P1", "KIT/../../secret"], "'KIT/../../secret' is not a registered file"),
    (["add", "P1", "KIT/nope.bin"], "KIT/nope.bin is not registered"),
    (["remove", "P1", "KIT/b/c.txt"], "KIT/b/c.txt is not in package P1"),
    (["delete", "NOPE"], "no package named 'NOPE'"),
])
def test_bad_arguments_give_one_line_and_change_nothing(app, runner, kit, args, message):
    assert sg(runner, "package", "create", "P1").exit_code == 0
    assert sg(runner, "package", "add", "P1", "KIT/a.bin").exit_code == 0
    before = (kit / ".packages" / "P1.zip").read_bytes()
    result = sg(runner, "package", *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert (kit / ".packages" / "P1.zip").read_bytes() == before
    with app.app_context():
        assert [p.name for p in db.session.scalars(select(Package))] == ["P1"]
        assert [f.file_path for f in db.session.scalars(select(Package)).one().files] == ["KIT/a.bin"]


def _limit_file_size():
    # A file-size limit makes the ZIP write fail the way a full disk does (EFBIG instead of ENOSPC).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


@pytest.mark.backends("postgresql")
def test_a_failed_build_keeps_the_old_zip_and_says_why(app, runner, env, kit):
    assert sg(runner, "package", "create", "P1").exit_code == 0
    assert sg(runner, "package", "add", "P1", "KIT/b/c.txt").exit_code == 0
    zip_file = kit / ".packages" / "P1.zip"
    before = zip_file.read_bytes()
    (kit / "KIT" / "big.bin").write_bytes(os.urandom(1_500_000))
    assert sg(runner, "index").exit_code == 0
    proc = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "softgoods", "package", "add", "P1",
                           "KIT/big.bin"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith("error: ZIP not rebuilt, the previous one is kept: File too large")
    assert "Traceback" not in proc.stderr
    assert zip_file.read_bytes() == before
    assert [p.name for p in zip_file.parent.iterdir()] == ["P1.zip"]
    listing = sg(runner, "package", "list").output
    assert "KIT/big.bin" not in listing and "ERROR" not in listing  # a failed add changed nothing


def test_rebuild_and_add_after_a_source_was_deleted_leave_it_out_and_say_so(app, runner, kit):
    assert sg(runner, "package", "create", "P1").exit_code == 0
    assert sg(runner, "package", "add", "P1", "KIT/a.bin", "KIT/b/c.txt").exit_code == 0
    (kit / "KIT" / "a.bin").unlink()
    result = sg(runner, "package", "rebuild", "P1")
    assert result.exit_code == 0, result.output
    assert "left out 1 file(s) deleted from the download folder: KIT/a.bin" in result.output
    with zipfile.ZipFile(kit / ".packages" / "P1.zip") as archive:
        assert archive.namelist() == ["KIT/b/c.txt"]
    listing = sg(runner, "package", "list").output
    assert "KIT/a.bin" not in listing and "1 file(s)" in listing
