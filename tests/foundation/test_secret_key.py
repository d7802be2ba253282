"""A published or short SOFTGOODS_SECRET_KEY would let anyone sign sessions and links: the store and
the sidecar refuse to start with it, with a one-line reason; the generated instance secret is fine."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import MIN_SECRET_LENGTH, load_settings
from tests.helpers import ROOT, free_port

EXAMPLE = re.search(r"^SOFTGOODS_SECRET_KEY=(.*)$", (ROOT / "deploy" / "softgoods.env.example").read_text(),
                    re.M)[1]


@pytest.mark.parametrize("secret, reason", [
    (EXAMPLE, "error: SOFTGOODS_SECRET_KEY is the example value"),
    ("x" * (MIN_SECRET_LENGTH - 1), f"error: SOFTGOODS_SECRET_KEY must have at least {MIN_SECRET_LENGTH} characters"),
])
@pytest.mark.parametrize("server", [["-c", "app/gunicorn.conf.py", "wsgi:app"],
                                    ["-c", "sidecar/gunicorn.conf.py", "sidecar.wsgi:app"]])
def test_store_and_sidecar_refuse_to_start_with_a_known_or_short_secret(tmp_path, secret, reason, server):
    env = {"PATH": "/usr/bin:/bin", "SOFTGOODS_INSTANCE_DIR": str(tmp_path / "instance"),
           "SOFTGOODS_SECRET_KEY": secret}
    run = subprocess.run([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{free_port()}", *server],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(reason), run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_the_generated_instance_secret_and_a_long_random_one_are_accepted(tmp_path):
    generated = load_settings({"SOFTGOODS_INSTANCE_DIR": str(tmp_path)})["SECRET_KEY"]
    assert len(generated) >= MIN_SECRET_LENGTH
    assert (Path(tmp_path) / "secret_key").read_text() == generated
    assert load_settings({"SOFTGOODS_INSTANCE_DIR": str(tmp_path), "SOFTGOODS_SECRET_KEY": "k" * 32})["SECRET_KEY"]
    with pytest.raises(SystemExit, match="example value"):
        load_settings({"SOFTGOODS_INSTANCE_DIR": str(tmp_path), "SOFTGOODS_SECRET_KEY": f" {EXAMPLE.upper()} "})
