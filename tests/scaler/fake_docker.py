"""A tiny Docker Engine API on a unix socket: just the endpoints DockerProvisioner calls.

Real HTTP over a real socket, so the real ``docker`` SDK talks to it exactly as to dockerd.
"""

from __future__ import annotations

import json
import re
import socketserver
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str  # without the /v1.xx prefix
    query: dict[str, list[str]]
    body: Any


@dataclass
class FakeEngine:
    requests: list[Seen] = field(default_factory=list)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> state
    fail_create: bool = False

    def find(self, ref: str) -> dict[str, Any] | None:
        for c in self.containers.values():
            if ref in (c["Id"], c["Name"]):
                return c
        return None


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    engine: FakeEngine


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def address_string(self) -> str:  # unix sockets have no (host, port)
        return "unix"

    def _reply(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        path = re.sub(r"^/v[0-9.]+", "", url.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        engine = self.server.engine
        engine.requests.append(Seen(self.command, path, parse_qs(url.query), body))
        m = self.command
        if m == "GET" and path == "/_ping":
            self._reply(200, "OK")
        elif m == "GET" and path == "/version":
            self._reply(200, {"ApiVersion": "1.43", "Version": "fake"})
        elif m == "POST" and path == "/containers/create":
            if engine.fail_create:
                self._reply(500, {"message": "engine on fire"})
                return
            cid = uuid.uuid4().hex
            name = parse_qs(url.query).get("name", [cid])[0]
            engine.containers[cid] = {
                "Id": cid, "Name": name, "Config": body, "Running": False,
            }
            self._reply(201, {"Id": cid, "Warnings": []})
        elif m == "GET" and path == "/containers/json":
            filters = json.loads(parse_qs(url.query).get("filters", ["{}"])[0])
            wanted = filters.get("label", [])
            rows = []
            for c in engine.containers.values():
                labels = c["Config"].get("Labels") or {}
                if not c["Running"]:
                    continue
                if all(labels.get(k) == v for k, _, v in (w.partition("=") for w in wanted)):
                    rows.append({"Id": c["Id"], "Names": ["/" + c["Name"]], "Labels": labels,
                                 "State": "running"})
            self._reply(200, rows)
        elif (match := re.fullmatch(r"/containers/([^/]+)(/json|/start|/stop)?", path)):
            found = engine.find(match.group(1))
            if found is None:
                self._reply(404, {"message": f"No such container: {match.group(1)}"})
                return
            c = found
            action = match.group(2)
            if m == "GET" and action == "/json":
                self._reply(200, {"Id": c["Id"], "Name": "/" + c["Name"], "Config": c["Config"],
                                  "State": {"Running": c["Running"]}})
            elif m == "POST" and action == "/start":
                c["Running"] = True
                self._reply(204)
            elif m == "POST" and action == "/stop":
                c["Running"] = False
                self._reply(204)
            elif m == "DELETE" and action is None:
                del engine.containers[c["Id"]]
                self._reply(204)
            else:
                self._reply(405, {"message": "not allowed"})
        else:
            self._reply(404, {"message": f"page not found: {m} {path}"})

    do_GET = do_POST = do_DELETE = _handle


class FakeDockerd:
    """Serve a :class:`FakeEngine` on ``socket_path`` in a background thread."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.engine = FakeEngine()
        self._server = _Server(socket_path, _Handler)
        self._server.engine = self.engine
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeDockerd:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
