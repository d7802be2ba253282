"""CSV export: no cell of the download log can start a formula, whatever separator a spreadsheet splits on."""
from __future__ import annotations

import csv
import io

import pytest

from app.admin.spreadsheet import TRIGGERS, defuse
from app.downloads.models import DownloadLog
from app.extensions import db

HOSTILE = [
    "=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", " =1", '"=1"',
    "a;=cmd|' /C calc'!A0", "a,=cmd|' /C calc'!A0", "a\t=1", "a|=1", "a\n=1", "a; =1", 'a;"=1"',
    "＝1+1", "＋1", "－1", "＠SUM(A1)", "a；＝1", "a，＋1", "−1",
]


def _fields(line_text: str, delimiter: str) -> list[str]:
    return [f for row in csv.reader(io.StringIO(line_text, newline=""), delimiter=delimiter) for f in row]


def _starts_formula(field: str) -> bool:
    shown = field.lstrip(" \"\u3000")
    return bool(shown) and shown[0] in TRIGGERS


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_cell_is_defused_for_every_separator(app, client, owner, value):
    with app.app_context():
        db.session.add(DownloadLog(path="a.bin", status=200, outcome="complete", user_agent=value,
                                   range_header="bytes=0-99"))
        db.session.commit()
    body = client.get("/admin/log.csv").get_data(as_text=True)
    for delimiter in (",", ";", "\t", "|"):
        for field in _fields(body, delimiter):
            assert not _starts_formula(field), (delimiter, field)
    # Read as intended (commas), the cell keeps its text: only a quote mark was added.
    (header, row) = list(csv.reader(io.StringIO(body, newline="")))
    assert row[header.index("user_agent")].replace("'", "") == value.replace("'", "")


@pytest.mark.parametrize("value", ["plain text", "bytes=0-99", "2026-12-05T10:00:00+00:00", "SG-2026-000001", "", None])
def test_harmless_cells_are_left_alone(value):
    assert defuse(value) == ("" if value is None else value)
