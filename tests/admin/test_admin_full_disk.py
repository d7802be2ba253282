"""A full disk while receiving uploads: the error is shown, nothing is written, an old file stays.

The disk is real: a small tmpfs mounted over DOWNLOAD_DIR in a private mount namespace (``unshare``),
so the kernel itself answers ENOSPC; nothing in the app is patched. One tmpfs runs out of space, the
other out of inodes (then even creating the temporary file fails).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.admin.conftest import make_user

ROOT = Path(__file__).resolve().parents[2]

# Runs inside the namespace, after the mount: fills the disk as asked, uploads through the owner page.
UPLOAD_ON_A_FULL_DISK = r"""
import io, json, os, sys
from pathlib import Path
from sqlalchemy import select
from app import create_app
from app.downloads.models import AuditEntry, FileEntry
from app.extensions import db

env, user_id, fill_inodes = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "inodes"
root = Path(env["SOFTGOODS_DOWNLOAD_DIR"])
(root / "BOOK").mkdir()
(root / "BOOK" / "a.txt").write_bytes(b"old bytes")
if fill_inodes:
    for n in range(1000):  # bounded: the tmpfs has a handful of inodes
        try:
            (root / f"filler{n}").touch()
        except OSError:
            break
app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "RATELIMIT_ENABLED": False}, env=env)
client = app.test_client()
with client.session_transaction() as session:
    session["_user_id"], session["_fresh"] = f"{user_id}.0", True
answers = []
# A batch whose second file does not fit (the first one that did is taken back), then a replacement.
for names, extra in [(["small.txt", "big.bin"], {}), (["a.txt"], {"overwrite": "yes"})]:
    files = [(io.BytesIO(os.urandom(1_000 if name == "small.txt" else 400_000)), name) for name in names]
    data = {"sku": "BOOK", "folder": "", "file": files, **extra}
    response = client.post("/admin/files/upload", data=data, content_type="multipart/form-data",
                           follow_redirects=True)
    answers.append([response.status_code, response.get_data(as_text=True)])
with app.app_context():
    rows = [e.path for e in db.session.scalars(select(FileEntry))]
    audit = [a.action for a in db.session.scalars(select(AuditEntry))]
print(json.dumps({"answers": answers, "files": sorted(os.listdir(root / "BOOK")),
                  "old": (root / "BOOK" / "a.txt").read_text(), "rows": rows, "audit": audit}))
"""


def run_in_small_tmpfs(mount_options: str, env: dict[str, str], user_id: int, fill: str) -> dict:
    unshare = shutil.which("unshare")
    assert unshare, "util-linux unshare is needed to mount a private, small filesystem"
    # root may mount in a private mount namespace; anyone else in a user namespace of their own
    namespace = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    script = 'mount -t tmpfs -o "$1" softgoods-full "$2" && shift 2 && exec "$@"'
    proc = subprocess.run([unshare, *namespace, "sh", "-c", script, "sh", mount_options,
                           env["SOFTGOODS_DOWNLOAD_DIR"], sys.executable, "-c", UPLOAD_ON_A_FULL_DISK,
                           json.dumps(env), str(user_id), fill],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.backends("sqlite")  # the disk, not the database, is under test
@pytest.mark.parametrize("mount_options, fill", [("size=256k", "space"), ("size=64m,nr_inodes=8", "inodes")])
def test_a_full_disk_refuses_the_upload_and_writes_nothing(app, env, mount_options, fill):
    outcome = run_in_small_tmpfs(mount_options, env, make_user(app, "owner@example.com", "owner"), fill)
    for status, page in outcome["answers"]:
        assert status == 200 and "the disk is full: the upload was not saved" in page
        assert "Something went wrong" not in page and "Traceback" not in page
    assert outcome["files"] == ["a.txt"], "a partial or temporary file was left behind"
    assert outcome["old"] == "old bytes"
    assert outcome["rows"] == [] and outcome["audit"] == []
