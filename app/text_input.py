"""Text that may reach the database or the filesystem, checked once at each edge: JSON bodies,
form fields, query strings and URL parts (``refuse_unstorable_request``, every request of both apps),
and command-line arguments (``app.cli``).

Two kinds of character get no further: NUL, which PostgreSQL text cannot hold (psycopg raises) and
which C paths truncate, and lone UTF-16 surrogates (``"\\ud800"`` in JSON, or an undecodable byte in
a command-line argument), which cannot be encoded as UTF-8 by the database driver or the filesystem.
Both answered 500 before; now they are a 400 with a sentence, before anything is written.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterable

from flask import current_app, request

from app.downloads.errors import InvalidInput

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
NOT_TEXT = "The request contains a character that cannot be stored (NUL or a lone surrogate)."


def storable(text: str) -> bool:
    return UNSTORABLE.search(text) is None


def first_unstorable(texts: Iterable[str]) -> str | None:
    """The first of ``texts`` that cannot be stored, or None."""
    return next((t for t in texts if not storable(t)), None)


def _named_strings(value: Any) -> Iterable[tuple[str | None, str]]:
    """Every key and string of a parsed JSON document with the name of the field that holds it,
    walked without recursion (its depth is the sender's choice)."""
    stack: list[tuple[str | None, Any]] = [(None, value)]
    while stack:
        field, item = stack.pop()
        if isinstance(item, str):
            yield field, item
        elif isinstance(item, dict):
            for key, inner in item.items():
                yield key, key
                stack.append((key, inner))
        elif isinstance(item, list):
            stack.extend((field, inner) for inner in item)


def not_text(field: str | None) -> InvalidInput:
    """The 400 for an unstorable character, naming the field when there is a storable name for it."""
    if field is None or not storable(field):
        return InvalidInput(NOT_TEXT, status=400)
    return InvalidInput(f"The field \u201c{field[:40]}\u201d contains a character that cannot be stored "
                        "(NUL or a lone surrogate).", status=400)


def json_body() -> Any:
    """The request's JSON document, or None when the request is not JSON.

    Anything malformed is an InvalidInput 400, never a 500: bytes that are not UTF-8 text, syntax
    errors, numbers Python refuses to convert, nesting deep enough to exhaust the parser's recursion
    (100,000 ``[``), and strings that cannot be stored. Flask's ``get_json`` turns only ValueError
    into a 400; RecursionError and an unstorable string used to escape as 500s.
    """
    if not request.is_json:
        return None
    try:
        document = json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidInput("The request body is not valid JSON.", status=400) from None
    for field, text in _named_strings(document):
        if not storable(text):
            raise not_text(field)
    return document


def refuses_paths_itself(view: Callable) -> Callable:
    """Mark a view whose URL path argument is refused by its own rule (the sidecar's file and
    Metalink views answer any hostile path with a logged 404, NUL included)."""
    view.refuses_paths_itself = True
    return view


def refuse_unstorable_request() -> None:
    """``before_request``: a NUL or lone surrogate in the URL, the query string or a form field is
    refused before any view looks it up or stores it."""
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    view_args = {} if getattr(view, "refuses_paths_itself", False) else (request.view_args or {})
    texts = [(None, v) for v in view_args.values() if isinstance(v, str)]
    for multidict in (request.args, request.form) if request.method in ("POST", "PUT", "PATCH") \
            else (request.args,):
        for key, values in multidict.lists():
            texts.append((key, key))
            texts.extend((key, value) for value in values)
    for field, text in texts:
        if not storable(text):
            raise not_text(field)
