"""A local HTTP server that answers as Stripe's API does, for the parts we use
(customers, invoices, invoice items, finalize), and fails on purpose.

Stripe cannot be reached from here, so the SDK is pointed at this server. Like Stripe it
checks the secret key, form-encoded parameters, amounts (`amount` in cents, or integer
`quantity` x `unit_amount_decimal` with at most 12 decimals; never both), the currency
(an item's must be its invoice's), that items go on a draft invoice of the same customer,
and idempotency keys: the same key with the same parameters answers the stored response
(whatever happened to the first answer), the same key with other parameters is a 400
`idempotency_error`.

Failures on purpose, by request number: every 4th request fails with a 500 before doing
anything, every 4th (offset 2) applies and then answers 500, and every 8th (offset 1)
applies and then answers only after `hang` seconds, past the client's timeout. Half of
the requests fail; one in eight that do is a timeout after the change was applied.
"""

from __future__ import annotations

import json
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

API_KEY = "sk_test_metering"


class FakeStripe:
    def __init__(self, *, fail: bool = True, hang: float = 1.0) -> None:
        self.fail = fail
        self.hang = hang
        self.lock = threading.Lock()
        self.requests = 0
        self.failures = 0
        self.timeouts = 0
        self.customers: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.items: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._ids = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                status, payload, delay = fake.handle(
                    self.path,
                    self.headers.get("Authorization", ""),
                    self.headers.get("Idempotency-Key"),
                    body,
                )
                if delay:
                    time.sleep(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a timeout on purpose)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeStripe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_fake{self._ids:06d}"

    @staticmethod
    def _error(status: int, kind: str, message: str) -> tuple[int, dict[str, Any]]:
        return status, {"error": {"type": kind, "message": message}}

    def handle(
        self, path: str, auth: str, key: str | None, body: str
    ) -> tuple[int, dict[str, Any], float]:
        with self.lock:
            self.requests += 1
            n = self.requests
            if auth != f"Bearer {API_KEY}":
                return (*self._error(401, "invalid_request_error", "Invalid API Key"), 0.0)
            pairs = parse_qsl(body, keep_blank_values=True)
            fingerprint = json.dumps([path, sorted(pairs)])
            if key is not None and key in self.keys:
                stored_fp, status, payload = self.keys[key]
                if stored_fp != fingerprint:
                    return (
                        *self._error(
                            400,
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same"
                            " parameters they were first used with.",
                        ),
                        0.0,
                    )
                return status, payload, 0.0
            if self.fail and n % 4 == 0:
                self.failures += 1
                return (*self._error(500, "api_error", "fails on purpose (before)"), 0.0)
            status, payload = self.apply(path, dict(pairs))
            if key is not None and status < 500:
                self.keys[key] = (fingerprint, status, payload)
            if self.fail and n % 4 == 2:
                self.failures += 1
                return (*self._error(500, "api_error", "fails on purpose (after applying)"), 0.0)
            if self.fail and n % 8 == 1:
                self.timeouts += 1
                return status, payload, self.hang
            return status, payload, 0.0

    def apply(self, path: str, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        metadata = {k[9:-1]: v for k, v in p.items() if k.startswith("metadata[")}
        if parts == ["v1", "customers"]:
            cid = self._id("cus")
            self.customers[cid] = {
                "id": cid,
                "object": "customer",
                "name": p.get("name"),
                "email": p.get("email"),
                "metadata": metadata,
            }
            return 200, self.customers[cid]
        if parts == ["v1", "invoices"]:
            if p.get("customer") not in self.customers:
                return self._error(400, "invalid_request_error", "No such customer")
            iid = self._id("in")
            self.invoices[iid] = {
                "id": iid,
                "object": "invoice",
                "customer": p["customer"],
                "currency": p.get("currency", "usd"),
                "status": "draft",
                "total": 0,
                "metadata": metadata,
                "lines": [],
            }
            return 200, self.invoices[iid]
        if parts == ["v1", "invoiceitems"]:
            return self._item(p, metadata)
        if len(parts) == 4 and parts[:2] == ["v1", "invoices"] and parts[3] == "finalize":
            inv = self.invoices.get(parts[2])
            if inv is None:
                return self._error(404, "invalid_request_error", "No such invoice")
            if inv["status"] != "draft":
                return self._error(400, "invalid_request_error", "Invoice already finalized")
            inv["status"] = "open"
            return 200, inv
        return self._error(404, "invalid_request_error", f"Unrecognized request URL {path}")

    def _item(self, p: dict[str, str], metadata: dict[str, str]) -> tuple[int, dict[str, Any]]:
        inv = self.invoices.get(p.get("invoice", ""))
        if inv is None or inv["customer"] != p.get("customer"):
            return self._error(400, "invalid_request_error", "No such invoice for this customer")
        if inv["status"] != "draft":
            return self._error(400, "invalid_request_error", "Invoice is not a draft")
        if p.get("currency") != inv["currency"]:
            return self._error(400, "invalid_request_error", "Currency must match the invoice")
        if "amount" in p and "unit_amount_decimal" in p:
            return self._error(400, "invalid_request_error", "amount and unit_amount_decimal")
        if "amount" in p:
            if not p["amount"].isdigit():
                return self._error(400, "invalid_request_error", "amount: an integer in cents")
            amount = int(p["amount"])
        else:
            unit = Decimal(p.get("unit_amount_decimal") or "0")
            exponent = unit.as_tuple().exponent
            too_fine = isinstance(exponent, int) and exponent < -12
            if not p.get("quantity", "").isdigit() or too_fine:
                return self._error(400, "invalid_request_error", "quantity/unit_amount_decimal")
            exact = unit * int(p["quantity"])
            if exact != exact.to_integral_value():
                return self._error(400, "invalid_request_error", "not a whole number of cents")
            amount = int(exact)
        item_id = self._id("ii")
        item = {
            "id": item_id,
            "object": "invoiceitem",
            "invoice": inv["id"],
            "amount": amount,
            "currency": inv["currency"],
            "metadata": metadata,
            "description": p.get("description"),
        }
        self.items[item_id] = item
        inv["lines"].append(item_id)
        inv["total"] += amount
        return 200, item
