from __future__ import annotations

from email_validator import EmailNotValidError, validate_email

from app.downloads.errors import InvalidInput


def normalize_email(email: str) -> str:
    """A deliverable-looking address, lower-cased; no DNS lookups (works offline and in tests)."""
    try:
        return validate_email((email or "").strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise InvalidInput(f"{email!r} is not a valid email address: {exc}") from None
