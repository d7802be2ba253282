"""The shipped cron and systemd files run the documented commands with the shared environment file."""
from __future__ import annotations

import configparser
import re

import pytest

from tests.helpers import ROOT

UNITS = ROOT / "deploy" / "systemd"
ENV_FILE = "/etc/softgoods/softgoods.env"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("name, command", [
    ("softgoods-purge.service", "softgoods purge"),
    ("softgoods-watch.service", "softgoods watch"),
    ("softgoods-ingest.service", "softgoods ingest-nginx-log"),
])
def test_services_run_the_commands_with_the_environment(name, command):
    service = unit(name)["Service"]
    assert command in service["ExecStart"] and "flask --app wsgi" in service["ExecStart"]
    assert service["EnvironmentFile"] == ENV_FILE and service["User"] == "softgoods"


def test_watcher_stops_on_sigterm_and_comes_back():
    service = unit("softgoods-watch.service")["Service"]
    assert (service["Type"], service["KillSignal"], service["Restart"]) == ("simple", "SIGTERM", "on-failure")


@pytest.mark.parametrize("name", ["softgoods-purge.timer", "softgoods-ingest.timer"])
def test_timers_repeat_and_catch_up(name):
    timer = unit(name)
    assert timer["Timer"]["OnUnitActiveSec"] and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_crontab_lines_are_well_formed():
    jobs = [line for line in (ROOT / "cron" / "softgoods.cron").read_text().splitlines()
            if line and not line.startswith("#") and "=" not in line.split()[0]]
    assert len(jobs) == 2
    for job in jobs:
        fields = job.split(None, 6)
        assert all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]) and fields[5] == "softgoods"
        assert f". {ENV_FILE}" in fields[6] and "flask --app wsgi softgoods" in fields[6]
    assert "softgoods purge" in jobs[0] and "ingest-nginx-log" in jobs[1]


def test_example_environment_names_only_known_settings():
    from app.config import load_settings

    lines = [line.lstrip("# ") for line in (ROOT / "deploy" / "softgoods.env.example").read_text().splitlines()]
    pairs = dict(line.split("=", 1) for line in lines if re.fullmatch(r"[A-Z_]+=\S+", line))
    assert {"SOFTGOODS_DOWNLOAD_DIR", "DATABASE_URL", "SOFTGOODS_SYMLINK_DIR"} <= set(pairs)
    with pytest.raises(SystemExit, match="example value"):  # copied unchanged, the example cannot run a shop
        load_settings({k: v for k, v in pairs.items() if "DATABASE" not in k})
    settings = load_settings({k: v for k, v in pairs.items() if "DATABASE" not in k}
                             | {"SOFTGOODS_SECRET_KEY": "a-real-secret-" + "x" * 40})
    assert settings["REHASH_BYTES_PER_SECOND"] == 20 * 1024 * 1024 and settings["DELIVERY"] == "accel"
