"""Metalink 4 (RFC 5854) documents: one file, its size, whole-file SHA-256, per-piece SHA-256 hashes
and its URL, so ``aria2c -M`` downloads, verifies and re-fetches only bad pieces."""
from __future__ import annotations

from datetime import datetime, timezone
from xml.etree import ElementTree as ET

from app.downloads.models import FileEntry

NS = "urn:ietf:params:xml:ns:metalink"
MEDIA_TYPE = "application/metalink4+xml"


def metalink_for(entry: FileEntry, name: str, url: str, published: datetime | None = None) -> bytes:
    """The document for one file; ``name`` is the file's path as clients should save it (RFC 5854 §4.1.2.1:
    a relative path without ``..``)."""
    ET.register_namespace("", NS)
    root = ET.Element(f"{{{NS}}}metalink")
    ET.SubElement(root, f"{{{NS}}}generator").text = "Softgoods"
    when = (published or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ET.SubElement(root, f"{{{NS}}}published").text = when
    file_el = ET.SubElement(root, f"{{{NS}}}file", name=name)
    ET.SubElement(file_el, f"{{{NS}}}size").text = str(entry.size)
    ET.SubElement(file_el, f"{{{NS}}}hash", type="sha-256").text = entry.sha256
    pieces = ET.SubElement(file_el, f"{{{NS}}}pieces", length=str(entry.piece_size), type="sha-256")
    for digest in entry.pieces:
        ET.SubElement(pieces, f"{{{NS}}}hash").text = digest
    ET.SubElement(file_el, f"{{{NS}}}url", priority="1").text = url
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
