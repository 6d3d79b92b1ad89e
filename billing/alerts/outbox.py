"""The durable outbox of alert deliveries: written with the alert, sent by a worker.

`enqueue` adds one `alert_deliveries` row per channel to the caller's session, in the
transaction that writes the alert: an alert and the deliveries it owes exist together
or not at all, and a crash after the commit loses nothing. Each row holds the exact body
to send, so every attempt (and its signature) is identical.

`Deliverer` sends them. A pass (`run_due`) reads the due rows (pending and due, or
"sending" with an expired lease: a worker died mid-send) and claims each with an
optimistic `UPDATE ... WHERE id = :id AND status, lease_until, attempts = what was
read`: only the writer whose update matched one row sends it, so two threads, two
Deliverers or two API replicas on one database never both send a row. The claim holds a
lease (`lease_seconds`, longer than a send can take); the outcome is recorded only under
that same lease. A failed attempt is retried after a full-jitter exponential backoff
(uniform in [0, min(max_delay, base_delay * 2**attempts)]) until `max_attempts`, then
the row is failed. A missing SMTP configuration fails an email delivery at once.

Exactly once, and its one gap: a row is sent again only if its sender died after the
receiver accepted it but before the outcome was committed (or a send outlived its
lease). Receivers dedupe on `X-Metering-Delivery`, which is the same on every attempt.
"""

from __future__ import annotations

from billing.alerts.deliverer import Deliverer
from billing.alerts.messages import sign, verify_signature
from billing.alerts.store import deliveries_for, enqueue, new_delivery_id, pending_deliveries

__all__ = [
    "Deliverer",
    "deliveries_for",
    "enqueue",
    "new_delivery_id",
    "pending_deliveries",
    "sign",
    "verify_signature",
]
