"""The counting rules of DESIGN.md "Delivery semantics", played against the database (SQLite and PostgreSQL)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.downloads import delivery as rules
from app.downloads import inflight
from app.downloads.errors import (
    DigestMismatch, DownloadsExhausted, FileUnavailable, InvalidInput, LinkExpired, ProofMismatch,
)
from app.downloads.index import index_files
from app.downloads.models import Delivery, DownloadLog
from app.extensions import db
from app.timeutil import utcnow
from tests.delivery.rules_helpers import open_shop
from tests.helpers import write_files

KB = 1024


def test_one_complete_get_counts_once_ships_the_order_and_logs_it(app):
    shop = open_shop(app, {"book.pdf": 300 * KB})
    with app.app_context():
        shop.get("book.pdf", ip="198.51.100.7")
        (d,) = shop.deliveries()
        assert (d.evidence, d.counted, d.covered_bytes, d.completed_at is not None) == ("transferred", True,
                                                                                        300 * KB, True)
        assert (shop.used(), shop.held()) == (1, 0)
        order = shop.order()
        assert (order.status, order.evidence, order.shipped_at is not None) == ("shipped", "transferred", True)
        log = db.session.scalars(select(DownloadLog)).one()
        assert (log.path, log.bytes_sent, log.outcome, log.client_ip, log.delivery_id) == (
            "book.pdf", 300 * KB, "complete", "198.51.100.7", d.id)


def test_three_resumed_parts_are_one_download(app):
    shop = open_shop(app, {"a.bin": 300 * KB})
    with app.app_context():
        shop.get("a.bin", 0, None, sent=100 * KB)        # broke off after 100 KiB
        shop.get("a.bin", 100 * KB, None, sent=50 * KB)  # resumed, broke off again
        assert (shop.used(), shop.held(), shop.order().status) == (0, 1, "pending")
        shop.get("a.bin", 150 * KB)                       # resumed to the end
        (d,) = shop.deliveries()
        assert (d.evidence, d.counted, d.attempts) == ("transferred", True, 3)
        assert (shop.used(), shop.held()) == (1, 0)


def test_four_parallel_segments_are_one_delivery(app):
    shop = open_shop(app, {"a.bin": 400 * KB})
    with app.app_context():
        segments = [shop.open("a.bin", i * 100 * KB, 100 * KB) for i in range(4)]  # all in flight at once
        assert len({r.delivery_id for r in segments}) == 1
        for reservation in reversed(segments):
            shop.close(reservation)
        (d,) = shop.deliveries()
        assert (d.evidence, d.counted, d.charged_bytes) == ("transferred", True, 400 * KB)
        assert shop.used() == 1


def test_head_and_scanner_requests_never_use_up_a_download(app):
    shop = open_shop(app, {"a.bin": 300 * KB}, max_downloads=1)
    with app.app_context():
        rules.log_request(db.session, shop.grant(), "a.bin", status=200, outcome="head", client_ip="203.0.113.9",
                          user_agent="Scanner", method="HEAD")
        db.session.commit()
        shop.get("a.bin", 0, 2 * KB, ip="203.0.113.9")    # a mail scanner peeks at the first bytes
        assert (shop.used(), shop.held(), shop.grant().downloads_left) == (0, 0, 1)
        shop.get("a.bin")                                  # the shopper's download continues that delivery
        (d,) = shop.deliveries()
        assert (d.counted, shop.used()) == (True, 1)


@pytest.mark.config(DELIVERY_BUDGET_FACTOR=1.0)
def test_a_scanner_sized_delivery_holds_a_slot_only_while_it_reads(app):
    shop = open_shop(app, {"a.bin": 300 * KB, "b.bin": 300 * KB}, max_downloads=1)
    with app.app_context():
        scanner = shop.open("a.bin", 0, 4 * KB)            # scanner: holds a.bin's only slot while it reads
        with pytest.raises(DownloadsExhausted):
            shop.open("a.bin")                             # a whole copy more does not fit its budget
        shop.get("b.bin")                                  # the limit is per file: b.bin is not held up
        shop.close(scanner)                                # ... and gives it back when it ends
        assert shop.held() == 0
        shop.get("a.bin")                                  # the shopper's real download
        assert (shop.used(), shop.held()) == (2, 0)
        with pytest.raises(DownloadsExhausted):
            shop.open("a.bin")                             # a.bin delivered once: used up


def test_two_full_copies_are_two_deliveries_sequential_and_parallel(app):
    shop = open_shop(app, {"a.bin": 100 * KB}, max_downloads=None)
    with app.app_context():
        shop.get("a.bin")
        shop.get("a.bin")                                  # one after the other
        first, second = shop.open("a.bin"), shop.open("a.bin")  # at once
        assert first.delivery_id != second.delivery_id
        shop.close(first)
        shop.close(second)
        assert [d.counted for d in shop.deliveries()] == [True, True, True, True]
        assert shop.used() == 4


def test_a_new_delivery_past_the_limit_is_refused_before_any_byte_and_writes_nothing(app):
    shop = open_shop(app, {"a.bin": 100 * KB}, max_downloads=1)
    with app.app_context():
        shop.get("a.bin")
        with pytest.raises(DownloadsExhausted):
            shop.open("a.bin")
        assert len(shop.deliveries()) == 1 and shop.used() == 1 and shop.held() == 0
        shop.get("a.bin", 10 * KB, 20 * KB)                # re-fetching a piece within the budget is fine
        assert len(shop.deliveries()) == 1 and shop.used() == 1


@pytest.mark.config(INFLIGHT_ALLOWANCE=0)
def test_restart_from_zero_over_budget_continues_the_unfinished_delivery(app):
    shop = open_shop(app, {"a.bin": 100 * KB}, max_downloads=1)
    with app.app_context():
        shop.get("a.bin", sent=90 * KB)                    # charged 90 KiB, budget 150 KiB
        shop.get("a.bin")                                  # 90 + 100 > 150: new delivery, same slot
        old, new = shop.deliveries()
        assert (old.closed, old.counted, new.counted, new.evidence) == (True, False, True, "transferred")
        assert (shop.used(), shop.held()) == (1, 0)


@pytest.mark.config(INFLIGHT_ALLOWANCE=64 * KB)
def test_broken_off_requests_are_charged_only_beyond_the_inflight_allowance(app):
    shop = open_shop(app, {"a.bin": 100 * KB})
    with app.app_context():
        shop.get("a.bin", sent=80 * KB)
        (d,) = shop.deliveries()
        assert d.charged_bytes == 16 * KB


def exited_process() -> str:
    """The owner name of a process that has ended (what a SIGKILLed sidecar worker leaves behind)."""
    stat = subprocess.run([sys.executable, "-c", "import os; print(os.getpid(), open('/proc/self/stat').read())"],
                          capture_output=True, text=True, check=True).stdout
    pid, rest = stat.split(" ", 1)
    return f"{inflight.HOST}/{pid}/{rest[rest.rindex(')') + 2:].split()[19]}"


def served_by(shop, owner: str) -> None:
    """Make every range in flight look served by ``owner``."""
    for d in shop.deliveries():
        d.open_ranges = json.dumps([r[:6] + [owner, r[7]] for r in json.loads(d.open_ranges)])
    db.session.commit()


def test_an_orphaned_reservation_of_a_killed_sidecar_does_not_eat_the_budget(app):
    shop = open_shop(app, {"a.bin": 300 * KB}, max_downloads=1)
    with app.app_context():
        shop.open("a.bin")                                 # the sidecar died: this never closes
        served_by(shop, exited_process())
        shop.get("a.bin", 120 * KB)                        # the client resumes where it got to
        (d,) = shop.deliveries()
        assert d.evidence is None                          # bytes before 120 KiB were never seen leaving
        assert shop.confirm("a.bin") == "verified"
        assert (shop.used(), shop.held(), shop.order().evidence) == (1, 0, "verified")


def test_a_live_request_keeps_its_charge_however_a_newer_one_overlaps_it(app):
    """Issue 12: a newer request starting inside an older one is no evidence that the older ended."""
    shop = open_shop(app, {"a.bin": 300 * KB}, max_downloads=1)
    with app.app_context():
        first = shop.open("a.bin")                         # still sending (this process serves it)
        for k in range(1, 12):
            with pytest.raises(DownloadsExhausted):
                shop.open("a.bin", k)                      # does not fit: a new delivery, and no slot left
        (d,) = shop.deliveries()
        assert d.charged_bytes == 300 * KB and len(json.loads(d.open_ranges)) == 1
        shop.open("a.bin", 200 * KB)                       # what still fits the budget (450 KiB) joins it
        shop.close(first)
        assert (shop.used(), shop.held()) == (1, 0)


def test_a_reused_pid_is_not_the_worker_that_reserved(app):
    import os
    shop = open_shop(app, {"a.bin": 300 * KB}, max_downloads=1)
    with app.app_context():
        shop.open("a.bin")
        served_by(shop, f"{inflight.HOST}/{os.getpid()}/1")  # our pid, another process's start time
        shop.get("a.bin", 120 * KB)
        assert [d.charged_bytes for d in shop.deliveries()] == [180 * KB]


def test_a_request_that_sent_nothing_for_the_idle_bound_is_presumed_dead_unless_it_shows_progress(app):
    shop = open_shop(app, {"a.bin": 300 * KB}, max_downloads=1)
    with app.app_context():
        start = utcnow()
        first = shop.open("a.bin", now=start)              # the process lives, its client went silent
        with pytest.raises(DownloadsExhausted):
            shop.open("a.bin", 120 * KB, now=start + timedelta(seconds=59))
        rules.record_progress(db.session, first, start + timedelta(seconds=30))  # the heartbeat: bytes moved
        db.session.commit()
        with pytest.raises(DownloadsExhausted):
            shop.open("a.bin", 120 * KB, now=start + timedelta(seconds=61))
        shop.get("a.bin", 120 * KB, now=start + timedelta(seconds=91))
        (d,) = shop.deliveries()
        assert d.charged_bytes == 180 * KB and (shop.used(), shop.held()) == (0, 1)


def test_a_multipart_request_is_one_reservation_and_one_log_row_with_the_coverage_of_each_part(app):
    shop = open_shop(app, {"a.bin": 300 * KB}, max_downloads=1)
    with app.app_context():
        entry = shop.entry("a.bin")
        parts = ((0, 10 * KB), (100 * KB, 150 * KB), (200 * KB, 300 * KB))
        reservation = rules.open_request(db.session, shop.grant(), entry, start=0, length=160 * KB, parts=parts)
        db.session.commit()
        (d,) = shop.deliveries()
        assert d.charged_bytes == 160 * KB and [r[1:4] for r in json.loads(d.open_ranges)] == [[0, 300 * KB, 160 * KB]]
        shop.close(reservation, sent=30 * KB)              # the first part and 20 KiB of the second left
        (d,) = shop.deliveries()
        assert json.loads(d.coverage) == [[0, 10 * KB], [100 * KB, 120 * KB]] and d.covered_bytes == 30 * KB
        assert db.session.scalar(select(func.count(DownloadLog.id))) == 1


def test_confirm_upgrades_transferred_without_counting_twice(app):
    shop = open_shop(app, {"a.bin": 100 * KB})
    with app.app_context():
        shop.get("a.bin")
        assert shop.confirm("a.bin") == "verified"
        assert shop.confirm("a.bin") == "verified"
        (d,) = shop.deliveries()
        assert (d.evidence, d.verified_at is not None, shop.used()) == ("verified", True, 1)
        assert shop.order().evidence == "verified"         # shipped at the first evidence; the level rose


@pytest.mark.parametrize("digest, error, message", [
    ("0" * 64, DigestMismatch, "does not match"),
    ("xyz", InvalidInput, "64 hexadecimal digits"),
])
def test_confirm_refusals_count_nothing(app, digest, error, message):
    shop = open_shop(app, {"a.bin": 10 * KB})
    with app.app_context():
        with pytest.raises(error, match=message):
            shop.confirm("a.bin", digest)
        assert shop.deliveries() == [] and shop.used() == 0


def test_flagged_files_are_never_confirmed_as_verified(app):
    shop = open_shop(app, {"a.bin": 10 * KB})
    with app.app_context():
        shop.entry("a.bin").flagged = "checksum changed on disk"
        db.session.commit()
        with pytest.raises(FileUnavailable, match="integrity check"):
            shop.confirm("a.bin")
        assert shop.deliveries() == []


def test_a_replaced_file_starts_a_new_delivery_and_the_old_version_gives_its_slot_back(app):
    shop = open_shop(app, {"a.bin": 200 * KB}, max_downloads=1)
    with app.app_context():
        shop.get("a.bin", sent=100 * KB)
        write_files(app.config["DOWNLOAD_DIR"], "BOOK", {"a.bin": 210 * KB})
        index_files(db.session, app.config["DOWNLOAD_DIR"])
        db.session.commit()
        shop.get("a.bin")
        old, new = shop.deliveries()
        assert old.sha256 != new.sha256 and (old.counted, new.counted) == (False, True)
        assert (shop.used(), shop.held()) == (1, 0)


def test_idle_unfinished_deliveries_give_their_slot_back(app):
    shop = open_shop(app, {"a.bin": 300 * KB, "b.bin": 300 * KB}, max_downloads=1)
    with app.app_context():
        shop.get("a.bin", sent=200 * KB)                   # more than a scanner; then nothing for hours
        assert shop.held() == 1
        shop.get("b.bin")                                  # per file: a.bin's held slot is not b.bin's
        later = utcnow() + timedelta(hours=2)
        assert rules.release_stale_deliveries(db.session, later) == 1
        db.session.commit()
        assert shop.held() == 0
        shop.get("a.bin", 200 * KB, now=later)             # the resume takes a slot again and completes
        assert shop.used() == 2 and [d.counted for d in shop.deliveries("a.bin")] == [True]


def test_expiry_grace_finishes_a_delivery_but_never_starts_one(app):
    shop = open_shop(app, {"a.bin": 300 * KB, "b.bin": 10 * KB}, max_downloads=None, days=1)
    with app.app_context():
        shop.get("a.bin", sent=100 * KB)
        expires = shop.grant().expires_at
        soon_after = expires + timedelta(minutes=10)
        assert rules.grace_allows(db.session, shop.grant(), shop.entry("a.bin"), soon_after)
        assert not rules.grace_allows(db.session, shop.grant(), shop.entry("b.bin"), soon_after)
        with pytest.raises(LinkExpired):
            shop.open("b.bin", now=soon_after)
        with pytest.raises(LinkExpired):
            shop.open("a.bin", 100 * KB, now=expires + timedelta(hours=2))
        shop.get("a.bin", 100 * KB, now=soon_after)
        assert shop.deliveries("a.bin")[0].counted


def test_the_order_ships_when_every_file_has_evidence_with_the_weakest_level(app):
    shop = open_shop(app, {"a.bin": 10 * KB, "sub/b.bin": 20 * KB})
    with app.app_context():
        shop.confirm("sub/b.bin")
        assert shop.order().status == "pending"
        shop.get("a.bin")
        order = shop.order()
        assert (order.status, order.evidence) == ("shipped", "transferred")
        rows = {r["path"]: r for r in rules_order_evidence(shop)}
        assert rows["a.bin"]["evidence"] == "transferred" and rows["sub/b.bin"]["evidence"] == "verified"
        assert rows["a.bin"]["bytes_delivered"] == 10 * KB and rows["a.bin"]["ips"] == ["192.0.2.1"]
        assert rows["a.bin"]["attempts"] == 1 and rows["sub/b.bin"]["bytes_delivered"] == 0


def rules_order_evidence(shop):
    from app.downloads.evidence import order_evidence

    return order_evidence(db.session, shop.order())


def test_concurrent_complete_downloads_count_exactly_the_limit(app):
    """20 shoppers at once against max_downloads=3: exactly 3 deliveries counted, 17 refused before any byte."""
    shop = open_shop(app, {"a.bin": 64 * KB}, max_downloads=3)
    barrier = threading.Barrier(20)
    outcomes: list[str] = []

    def shopper() -> None:
        with app.app_context():
            barrier.wait(timeout=30)
            try:
                reservation = shop.open("a.bin")
            except DownloadsExhausted:
                outcomes.append("refused")
                return
            finally:
                db.session.remove()
            shop.close(reservation)
            outcomes.append("served")
            db.session.remove()

    threads = [threading.Thread(target=shopper) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["refused"] * 17 + ["served"] * 3
    with app.app_context():
        assert (shop.used(), shop.held()) == (3, 0)
        assert db.session.scalar(select(func.count()).select_from(Delivery).where(Delivery.counted.is_(True))) == 3


def test_concurrent_downloads_of_two_files_count_exactly_the_limit_of_each(app):
    """The limit is per file: 10 shoppers at once on each of two files, max_downloads=3: 3 each."""
    shop = open_shop(app, {"a.bin": 64 * KB, "b.bin": 32 * KB}, max_downloads=3)
    barrier = threading.Barrier(20)
    outcomes: list[tuple[str, str]] = []

    def shopper(path: str) -> None:
        with app.app_context():
            barrier.wait(timeout=30)
            try:
                reservation = shop.open(path)
            except DownloadsExhausted:
                outcomes.append((path, "refused"))
                return
            finally:
                db.session.remove()
            shop.close(reservation)
            outcomes.append((path, "served"))
            db.session.remove()

    threads = [threading.Thread(target=shopper, args=(path,)) for path in ["a.bin", "b.bin"] * 10]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for path in ("a.bin", "b.bin"):
        assert sorted(o for p, o in outcomes if p == path) == ["refused"] * 7 + ["served"] * 3
    with app.app_context():
        assert (shop.used(), shop.held()) == (6, 0)
        assert [sum(d.counted for d in shop.deliveries(p)) for p in ("a.bin", "b.bin")] == [3, 3]


def test_each_file_of_a_product_is_delivered_max_downloads_times(app):
    """A 3-file product with max_downloads=2: every file twice; a third copy of one file is refused
    before anything is reserved while the others still work; confirm never counts past the limit."""
    from app.downloads.access import counted_by_file, file_downloads_left, files_for_grant, used_up

    shop = open_shop(app, {"a.bin": 20 * KB, "b.bin": 30 * KB, "c/d.bin": 10 * KB}, max_downloads=2)
    with app.app_context():
        for path in ("a.bin", "b.bin", "c/d.bin"):
            shop.get(path)
        assert shop.order().status == "shipped"
        shop.get("a.bin")
        shop.get("b.bin")
        with pytest.raises(DownloadsExhausted, match="this file"):
            shop.open("a.bin")                             # a third complete copy of a.bin
        assert len(shop.deliveries("a.bin")) == 2 and shop.held() == 0
        grant = shop.grant()
        counted = counted_by_file(db.session, grant)
        left = {e.path: file_downloads_left(grant, counted, e) for e in files_for_grant(db.session, grant)}
        assert left == {"a.bin": 0, "b.bin": 0, "c/d.bin": 1} and not used_up(db.session, grant)
        assert shop.confirm("a.bin") == "verified"         # a proof upgrades a counted delivery: no count
        shop.get("c/d.bin")                                # the last file still works
        assert (shop.used(), shop.held()) == (6, 0) and used_up(db.session, shop.grant())
        shop.get("c/d.bin", 2 * KB, 4 * KB)                # a piece within the budget is still fine
        assert shop.used() == 6


def test_a_copy_that_completes_after_the_shop_replaced_the_file_is_recorded_but_not_counted(app):
    shop = open_shop(app, {"a.bin": 100 * KB}, max_downloads=1)
    with app.app_context():
        old_copy = shop.open("a.bin")
        write_files(app.config["DOWNLOAD_DIR"], "BOOK", {"a.bin": 120 * KB})
        index_files(db.session, app.config["DOWNLOAD_DIR"])
        db.session.commit()
        shop.close(old_copy)                               # the old version finished on its open file
        assert shop.deliveries()[0].evidence == "transferred" and (shop.used(), shop.held()) == (0, 0)
        shop.get("a.bin")                                  # the new version is the shopper's one download
        assert (shop.used(), [d.counted for d in shop.deliveries()]) == (1, [False, True])


def test_class_entitlements_ship_when_every_chosen_item_is_delivered(app):
    from app.downloads.access import choose_entitlement
    from app.downloads.models import FileEntry, UserDownload
    from app.store.models import Order
    from tests.helpers import grant_link, make_product

    make_product(app, "CLASSIC1", {"one.epub": 10 * KB}, content_class="classics")
    make_product(app, "CLASSIC2", {"two.epub": 20 * KB}, content_class="classics")
    make_product(app, "PICK2", None, entitlement_class="classics", entitlement_count=2)
    grant_link(app, "PICK2")
    with app.app_context():
        grant = db.session.scalars(select(UserDownload)).one()

        def deliver(sku: str, path: str) -> None:
            entry = db.session.scalar(select(FileEntry).where(FileEntry.sku == sku, FileEntry.path == path))
            reservation = rules.open_request(db.session, grant, entry, start=0, length=entry.size)
            rules.close_request(db.session, reservation, entry.size, status=200, outcome="complete",
                                client_ip="192.0.2.1", user_agent=None, range_header=None)
            db.session.commit()

        choose_entitlement(db.session, grant, "CLASSIC1")
        db.session.commit()
        deliver("CLASSIC1", "one.epub")
        assert db.session.get(Order, grant.order_id, populate_existing=True).status == "pending"  # 1 of 2 chosen
        choose_entitlement(db.session, grant, "CLASSIC2")
        db.session.commit()
        deliver("CLASSIC2", "two.epub")
        order = db.session.get(Order, grant.order_id, populate_existing=True)
        assert (order.status, order.evidence) == ("shipped", "transferred")
        assert db.session.get(UserDownload, grant.id, populate_existing=True).downloads_used == 2


def test_mixed_concurrent_requests_keep_the_books_consistent(app):
    """Shoppers, download managers and clients at once on one link: no deadlock, no lost update, and
    the grant's counters always equal what its deliveries say."""
    import random

    shop = open_shop(app, {"a.bin": 256 * KB, "b.bin": 128 * KB}, max_downloads=4)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with app.app_context():
            for _ in range(12):
                path = rng.choice(["a.bin", "b.bin"])
                size = 256 * KB if path == "a.bin" else 128 * KB
                start = rng.choice([0, 0, size // 4, size // 2])
                try:
                    reservation = shop.open(path, start)
                    sent = rng.choice([reservation.length, reservation.length, reservation.length // 3])
                    shop.close(reservation, sent)
                    if rng.random() < 0.2:
                        shop.confirm(path)
                except (DownloadsExhausted, ProofMismatch):  # another thread spent the nonce first
                    db.session.rollback()
                except BaseException as exc:  # reported below: a failure in a thread would be lost
                    errors.append(exc)
                    return
                finally:
                    db.session.remove()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    with app.app_context():
        deliveries = shop.deliveries()
        grant = shop.grant()
        assert grant.downloads_used == sum(d.counted for d in deliveries) <= 2 * 4
        assert grant.downloads_held == sum(d.holds_slot for d in deliveries)
        for path in ("a.bin", "b.bin"):                    # the limit is per file
            assert sum(d.counted + d.holds_slot for d in deliveries if d.path == path) <= 4
        assert all(not (d.counted and d.holds_slot) for d in deliveries)
        assert all(d.charged_bytes >= 0 and d.open_ranges == "[]" for d in deliveries)
