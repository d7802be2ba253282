"""The sidecar's HTTP interface (DESIGN.md "Sidecar HTTP"): listing, files, Metalinks, confirm,
class-entitlement picks, the verifying client, health and metrics."""
from __future__ import annotations

import logging
from pathlib import Path

from flask import (Blueprint, Response, current_app, jsonify, redirect, render_template, request,
                   send_file, url_for)
from sqlalchemy import select
from werkzeug.routing import PathConverter

from app.downloads import delivery, proof
from app.downloads.access import (
    OpenedGrant, choices_left, choose_entitlement, class_offer, counted_by_file, file_downloads_left, files_for_grant,
    find_file, flag_unreadable, is_class_entitlement, open_grant, public_path, real_path, used_up,
)
from app.downloads.errors import (
    DeliveryRefused, DigestMismatch, DownloadsExhausted, FileChangedOnDisk, FileNotFound, FileUnreadable,
    InvalidInput, LinkNotFound,
)
from app.downloads.freshness import wait_for_closes
from app.downloads.metalink import MEDIA_TYPE, metalink_for
from app.downloads.models import Delivery
from app.downloads.serving import FileRequest, delivery_mode
from app.errors import wants_json
from app.health import healthz_response, may_read_metrics
from app.sizes import format_size
from app.text_input import json_body, refuses_paths_itself
from app.extensions import client_address, csrf, db
from sidecar import metrics

log = logging.getLogger("softgoods.sidecar")
CLIENT_FILE = Path(__file__).resolve().parent / "client" / "softgoods_fetch.py"


class AnyPathConverter(PathConverter):
    """Like ``path`` but also matches a leading slash, so hostile paths reach our own (logged) 404."""

    regex = ".*"
    part_isolating = False  # werkzeug would otherwise infer "one segment only" from a regex without "/"


bp = Blueprint("sidecar", __name__, template_folder="templates")


@bp.record_once
def _converters(state) -> None:
    state.app.url_map.converters["anypath"] = AnyPathConverter


def _failed_lookup() -> None:
    """Count a failed link lookup against this address (README, "Rate limits"): past the limit it is
    answered 429 instead of 404. Good links never get here, so they are never refused."""
    guesses = current_app.extensions.get("softgoods_guess_limit")
    if guesses is not None:
        guesses.failed_lookup(client_address())


def _open(receipt: str, *, listing: bool = True, finishing=None) -> OpenedGrant:
    try:
        return open_grant(db.session, current_app.config["SECRET_KEY"], receipt, client_address(),
                          listing=listing, finishing=finishing)
    except LinkNotFound:
        _failed_lookup()
        raise


def _finishing(grant, name: str | None) -> bool:
    """Within the grace period, a delivery of this file that started before expiry may finish (its
    bytes, its Metalink, its confirmation)."""
    if not isinstance(name, str):
        return False
    try:
        entry = find_file(db.session, grant, name)
    except FileNotFound:
        return False
    return delivery.grace_allows(db.session, grant, entry)


def _finishing_any(grant) -> bool:
    """Within the grace period, the listing answers while any delivery that started before expiry
    may finish, so the verifying client can resume it."""
    return delivery.grace_allows(db.session, grant)


def _file_request(receipt: str, name: str) -> FileRequest:
    """Validate the link and resolve the file; every refusal is written to the download log."""
    grant = entry = None
    try:
        opened = _open(receipt, listing=False, finishing=lambda g: _finishing(g, name))
        grant = opened.grant
        entry = find_file(db.session, grant, name)
        full = real_path(current_app.config["DOWNLOAD_DIR"], entry)
    except LinkNotFound:
        # Forged or unknown: no database work at all (DESIGN.md); the guess limit and this line remain.
        log.warning("refused link for %r from %s", name, client_address())
        raise
    except DeliveryRefused as refusal:
        db.session.rollback()
        if isinstance(refusal, FileNotFound):
            log.warning("refused path %r from %s", name, client_address())
        if isinstance(refusal, FileChangedOnDisk) and "softgoods_reindexer" in current_app.extensions:
            current_app.extensions["softgoods_reindexer"].request(refusal.sku, refusal.path)
        if isinstance(refusal, FileUnreadable) and entry is not None:
            log.error("product file %s cannot be read (%s): answered 503 and flagged for the owner",
                      entry.registered_path, refusal.reason)
            flag_unreadable(db.session, entry, refusal.reason)
        shown = name.replace("\0", "\\0")[:1024]  # PostgreSQL text cannot hold NUL
        delivery.log_request(db.session, grant, shown, status=refusal.status, outcome="refused",
                             client_ip=client_address(), user_agent=request.user_agent.string,
                             range_header=request.headers.get("Range"), method=request.method)
        db.session.commit()
        raise
    return FileRequest(grant=grant, entry=entry, name=name, full_path=full,
                       metalink_url=url_for("sidecar.metalink", receipt=receipt, name=name, _external=True),
                       method=request.method, headers=request.headers, environ=request.environ,
                       client_ip=client_address(), user_agent=request.user_agent.string or None)


@bp.route("/d/<receipt>/", methods=["GET", "HEAD"])
def listing(receipt: str):
    opened = _open(receipt, listing=False, finishing=_finishing_any)
    # Every count below is read after the closes of responses that already ended (README, "Freshness").
    wait_for_closes(db.session, opened.grant.id, current_app.config["LISTING_CLOSE_WAIT_SECONDS"])
    db.session.expire(opened.grant, ["downloads_used"])
    if used_up(db.session, opened.grant):
        raise DownloadsExhausted()
    grant = opened.grant
    entries = files_for_grant(db.session, grant)
    nonces, created = proof.nonces_for(db.session, grant, entries)
    if created:
        db.session.commit()  # the nonces shown must be the ones a confirm checks against
    evidence = _evidence_by_file(grant.id)
    counted = counted_by_file(db.session, grant) if grant.max_downloads is not None else {}
    files = [{
        "path": public_path(grant, e),
        "size": e.size,
        "sha256": e.sha256,
        "media_type": e.media_type,
        "url": url_for("sidecar.file", receipt=receipt, name=public_path(grant, e), _external=True),
        "metalink_url": url_for("sidecar.metalink", receipt=receipt, name=public_path(grant, e), _external=True),
        "downloads_left": file_downloads_left(grant, counted, e),  # the limit is per file
        "evidence": evidence.get((e.sku, e.path)),
        "proof_nonce": nonces[(e.sku, e.path)],  # key of the confirm's proof (DESIGN "Proof of possession")
    } for e in entries]
    order = grant.order
    data = {
        "order": order.po_number,
        "expires_at": grant.expires_at.isoformat(),
        "confirm_url": url_for("sidecar.confirm", receipt=receipt, _external=True),
        "files": files,
        "order_status": order.status,
    }
    offer = []
    if is_class_entitlement(grant):
        chosen = {c.product_id for c in grant.choices}
        offer = [p for p in class_offer(db.session, grant) if p.id not in chosen]
        data["choices_left"] = choices_left(grant)
        data["choose_url"] = url_for("sidecar.choose", receipt=receipt, _external=True)
        data["offer"] = [{"sku": p.sku, "name": p.name} for p in offer] if data["choices_left"] else []
    if wants_json():
        return jsonify(data)
    return render_template("sidecar/listing.html", data=data, grant=grant, offer=offer,
                           product=grant.product, client_url=url_for("sidecar.client", _external=True))


def _evidence_by_file(grant_id: int) -> dict[tuple[str, str], str]:
    rank = {None: 0, "transferred": 1, "verified": 2}
    best: dict[tuple[str, str], str] = {}
    for sku, path, evidence in db.session.execute(
            select(Delivery.sku, Delivery.path, Delivery.evidence).where(Delivery.grant_id == grant_id)):
        if rank.get(evidence, 0) > rank.get(best.get((sku, path)), 0):
            best[(sku, path)] = evidence
    return best


@bp.route("/d/<receipt>/f/<anypath:name>", methods=["GET", "HEAD"])
@refuses_paths_itself  # a hostile path is a logged 404 (looks_hostile), NUL included
def file(receipt: str, name: str):
    return delivery_mode().deliver(_file_request(receipt, name))


@bp.route("/d/<receipt>/m/<anypath:name>.meta4", methods=["GET", "HEAD"])
@refuses_paths_itself  # a hostile path is a logged 404 (looks_hostile), NUL included
def metalink(receipt: str, name: str):
    opened = _open(receipt, listing=False, finishing=lambda g: _finishing(g, name))
    entry = find_file(db.session, opened.grant, name)
    url = url_for("sidecar.file", receipt=receipt, name=name, _external=True)
    body = metalink_for(entry, name, url)
    return Response(body, mimetype=MEDIA_TYPE,
                    headers={"Content-Disposition": f'attachment; filename="{Path(name).name}.meta4"'})


@bp.route("/d/<receipt>/confirm", methods=["POST"])
@csrf.exempt  # a JSON API called by the verifying client; the secret receipt in the URL is the credential
def confirm(receipt: str):
    payload = json_body()
    named = payload.get("path") if isinstance(payload, dict) else None
    opened = _open(receipt, listing=False, finishing=lambda g: _finishing(g, named))
    if not isinstance(payload, dict) or not isinstance(payload.get("path"), str) \
            or not isinstance(payload.get("sha256"), str):
        raise InvalidInput('Send JSON like {"path": "ch1/intro.pdf", "sha256": "<64 hex digits>", '
                           '"proof": "<64 hex digits>"}.', status=400)
    entry = find_file(db.session, opened.grant, payload["path"])
    try:
        status = delivery.confirm(db.session, opened.grant, entry, payload["sha256"].strip(), payload.get("proof"),
                                  download_dir=current_app.config["DOWNLOAD_DIR"])
    except DigestMismatch:
        db.session.commit()  # only the expected proof of the current nonce: a retry needs no second file read
        raise
    db.session.commit()
    return jsonify(status=status)


@bp.route("/d/<receipt>/choose", methods=["POST"])
@csrf.exempt  # checked below for forms; JSON cannot be posted cross-site without a CORS preflight
def choose(receipt: str):
    if not request.is_json and current_app.config.get("WTF_CSRF_ENABLED", True):
        csrf.protect()
    opened = _open(receipt)
    payload = json_body() if request.is_json else request.form
    sku = payload.get("sku") if isinstance(payload, dict) or hasattr(payload, "get") else None
    if not isinstance(sku, str) or not sku:
        raise InvalidInput("Choose a product (send its SKU).", status=400)
    choose_entitlement(db.session, opened.grant, sku)
    db.session.commit()
    if request.is_json:
        return jsonify(status="chosen", sku=sku, choices_left=choices_left(opened.grant))
    return redirect(url_for("sidecar.listing", receipt=receipt), code=303)


@bp.route("/client")
def client():
    if not CLIENT_FILE.is_file():
        return _unavailable("The verifying downloader is not installed on this download host yet.")
    return send_file(CLIENT_FILE, mimetype="text/x-python", as_attachment=True,
                     download_name="softgoods_fetch.py", max_age=300)


def _unavailable(reason: str, retry_after: int = 60):
    from app.errors import error_response

    return error_response(503, reason, "Please try again later.", {"Retry-After": str(retry_after)})


@bp.route("/healthz")
def healthz():
    return healthz_response()


@bp.route("/metrics")
def prometheus():
    if not may_read_metrics(request):
        from app.errors import error_response

        return error_response(403, "Metrics are only for the shop's monitoring.",
                              "Allow this address in SOFTGOODS_METRICS_ALLOW or send the metrics bearer token.")
    return Response(metrics.render(db.session), mimetype="text/plain; version=0.0.4")


bp.add_app_template_filter(format_size, "filesize")
