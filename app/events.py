"""Facts about orders and grants that other parts of the shop react to (the webhook outbox).

Senders call ``announce`` inside the transaction that made the change, so a listener that writes
to the database (an outbox row) commits or rolls back with the change itself. Blinker is Flask's
own signal library: a sender needs to know nothing about who listens.
"""
from __future__ import annotations

from typing import Any

from blinker import Namespace

_signals = Namespace()

# sender: the event type, e.g. "order.paid"; keyword arguments: session and the object(s) it is about.
shop_event = _signals.signal("softgoods-shop-event")

# The event types a listener can receive (Standard Webhooks names, issue 16).
EVENT_TYPES = ("order.paid", "order.shipped", "delivery.transferred", "delivery.verified",
               "grant.exhausted", "grant.expired", "order.refunded", "order.disputed")


def announce(event_type: str, **objects: Any) -> None:
    """Tell listeners that ``event_type`` happened; ``objects`` names what it is about (``session``,
    ``order``, ``grant``, ``file``)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown shop event {event_type!r}")
    shop_event.send(event_type, **objects)
