"""Refusals of the delivery domain: one type per kind, each with the status and the sentence it shows.

The store and the sidecar map these in one place (``app.errors``) to pages and JSON.
"""
from __future__ import annotations

from datetime import datetime


class DeliveryRefused(Exception):
    status = 400
    message = "This request cannot be served."
    advice = ""
    headers: dict[str, str] = {}

    def __init__(self, message: str | None = None, *, advice: str | None = None):
        super().__init__(message or self.message)
        if message:
            self.message = message
        if advice is not None:
            self.advice = advice


class LinkNotFound(DeliveryRefused):
    status = 404
    message = "This download link is not valid."
    advice = ("Check that you copied the whole link from your email, or sign in to the shop "
              "and open My downloads.")


class TooManyGuesses(DeliveryRefused):
    """Too many failed link lookups from one address (only failures count: a good link still opens)."""

    status = 429
    message = "Too many attempts from your address."
    advice = "Please wait a minute and try again."

    def __init__(self, retry_after: int):
        super().__init__()
        self.headers = {"Retry-After": str(retry_after)}


class LinkRevoked(DeliveryRefused):
    status = 403
    message = "This download link has been withdrawn by the shop."
    advice = "Please contact the shop and quote your order number."


class LinkExpired(DeliveryRefused):
    status = 410
    message = "This download link has expired."
    advice = "Please contact the shop and quote your order number; they can extend it."

    def __init__(self, expires_at: datetime | None = None, **kw):
        super().__init__(None, **kw)
        self.expires_at = expires_at
        if expires_at is not None:
            self.message = f"This download link expired on {expires_at:%Y-%m-%d %H:%M} UTC."


class DownloadsExhausted(DeliveryRefused):
    status = 403
    message = "All downloads of this link have been used."
    advice = "Please contact the shop and quote your order number; they can add downloads."


class AddressMismatch(DeliveryRefused):
    status = 403
    message = "This download link is bound to another network address."
    advice = "Open it from the network you bought from, or ask the shop to release it."


class FileNotFound(DeliveryRefused):
    status = 404
    message = "There is no such file in this download."
    advice = "Go back to the list of files of your download and pick one from there."


class FileUnavailable(DeliveryRefused):
    status = 503
    message = "This file is temporarily unavailable."
    advice = "The shop has been told. Please try again later."


class FileUnreadable(FileUnavailable):
    """The indexed file cannot be read on disk (gone, a dangling link, a folder, no permission):
    503 for the shopper; ``reason`` is the flag the owner sees on the dashboard."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


class FileChangedOnDisk(FileUnavailable):
    """The file's size or mtime differ from the index: it is being replaced, and its bytes would not
    match the listed SHA-256. The sidecar re-indexes it in the background (``freshness``)."""

    message = "This file is being updated right now."
    advice = "Please try again in a minute."
    headers = {"Retry-After": "10"}

    def __init__(self, sku: str, path: str):
        super().__init__()
        self.sku, self.path = sku, path


class DigestMismatch(DeliveryRefused):
    status = 409
    message = "The SHA-256 you reported does not match the file."
    advice = "Download the file again; the verifying client re-fetches only the damaged parts."


class ProofMismatch(DigestMismatch):
    message = "The proof you sent does not match this file and this link's current proof nonce."
    advice = ("Read the file list again for a fresh proof_nonce and compute the proof over the file you "
              "downloaded; the verifying client does this for you.")


class InvalidInput(ValueError):
    """Bad input from a form, a request or the command line: nothing has been written."""

    status = 422

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.message = message
        self.status = status
