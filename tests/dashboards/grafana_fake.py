"""A local stand-in for the Grafana HTTP API endpoints `metering dashboards push` calls:
`GET /api/search` (folders), `POST /api/folders`, `POST /api/dashboards/db`. It records
every request and checks the bearer token the way Grafana does (401 otherwise)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrafana:
    token: str
    folders: list[dict[str, Any]] = field(default_factory=list)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def answer(self, request: Request) -> tuple[int, Any]:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"message": "Unauthorized"}
        if request.method == "GET" and request.path == "/api/search":
            text = request.query.get("query", [""])[0].lower()
            if request.query.get("type") != ["dash-folder"]:
                return 400, {"message": "this fake serves folder searches only"}
            return 200, [
                {"type": "dash-folder", **f} for f in self.folders if text in f["title"].lower()
            ]
        if request.method == "POST" and request.path == "/api/folders":
            folder = {"uid": f"folder-{len(self.folders) + 1}", "title": request.body["title"]}
            self.folders.append(folder)
            return 200, {"id": len(self.folders), **folder, "url": f"/dashboards/f/{folder['uid']}"}
        if request.method == "POST" and request.path == "/api/dashboards/db":
            model = request.body["dashboard"]
            old = self.dashboards.get(model["uid"])
            if old is not None and not request.body.get("overwrite"):
                return 412, {"message": "A dashboard with the same uid already exists"}
            version = 1 if old is None else old["version"] + 1
            self.dashboards[model["uid"]] = {**request.body, "version": version}
            return 200, {
                "id": len(self.dashboards),
                "uid": model["uid"],
                "url": f"/d/{model['uid']}/x",
                "status": "success",
                "version": version,
            }
        return 404, {"message": "not found"}


@contextmanager
def serve(fake: FakeGrafana) -> Iterator[FakeGrafana]:
    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = Request(
                self.command,
                parts.path,
                parse_qs(parts.query),
                {k.lower(): v for k, v in self.headers.items()},
                json.loads(raw) if raw else None,
            )
            fake.requests.append(request)
            status, body = fake.answer(request)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
