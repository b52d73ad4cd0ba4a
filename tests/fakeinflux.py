"""FAKE InfluxDB 3 write endpoint, for the answers the lab's real database cannot give.

The lab database (VictoriaMetrics) never answers 500, 429, 413, 401 or a
400 partial write. This small server does, with the bodies InfluxDB 3's
docs show (``/api/v3/write_lp``: 400 ``partial write of line protocol
occurred`` with ``data[].line_number`` counted from 1). Everything it is
not told to refuse it records as accepted, so a test can check which lines
were delivered, and how many times.

It checks what a real InfluxDB 3 checks before it reads a line: the token
(``Authorization: Token|Bearer <token>``, else 401), the database (``db=``
on ``/api/v3/write_lp``, ``bucket=`` on ``/api/v2/write``, else 404), the
precision (our timestamps are nanoseconds: ``nanosecond`` or ``ns``, else
400), and a gzip body when ``Content-Encoding: gzip`` says so.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

TOKEN = "secret-token"
DATABASE = "db"
PRECISIONS = {"/api/v3/write_lp": ("nanosecond", "db"), "/api/v2/write": ("ns", "bucket")}


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, object] | None = None
    headers: dict[str, str] = field(default_factory=dict)


Rejector = Callable[[str], str | None]  # a line -> the reason to reject it, or None


@dataclass
class FakeInflux3:
    """Answers from ``script`` first, in order; then 204, or a partial write for rejected lines."""

    script: list[Answer] = field(default_factory=list)
    token: str = TOKEN
    database: str = DATABASE
    reject: Rejector | None = None
    max_lines: int | None = None  # more lines than this in one request: 413
    delay_s: float = 0.0  # a slow database: each answer waits this long
    requests: list[list[str]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)  # each request body as received
    encodings: list[str] = field(default_factory=list)  # each request's Content-Encoding
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, target: str, headers: dict[str, str], lines: list[str]) -> Answer:
        time.sleep(self.delay_s)
        path = urlsplit(target).path
        with self.lock:
            self.paths.append(target)
            self.requests.append(lines)
            refusal = self._refusal(path, parse_qs(urlsplit(target).query), headers)
            if refusal is not None:
                return refusal
            if self.script:
                return self.script.pop(0)
            if self.max_lines is not None and len(lines) > self.max_lines:
                return Answer(413, {"error": "the request was too large"})
            errors = self._line_errors(lines)
            rejected = {e["line_number"] for e in errors}
            self.accepted.extend(line for n, line in enumerate(lines, 1) if n not in rejected)
        if not errors:
            return Answer(204)
        return Answer(400, {"error": "partial write of line protocol occurred", "data": errors})

    def _refusal(
        self, path: str, query: dict[str, list[str]], headers: dict[str, str]
    ) -> Answer | None:
        if path not in PRECISIONS:
            return Answer(404, {"error": f"no such endpoint {path}"})
        precision, database_key = PRECISIONS[path]
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme not in ("Token", "Bearer") or given != self.token:
            return Answer(401, {"error": "the request was not authenticated"})
        if query.get(database_key) != [self.database]:
            return Answer(404, {"error": f"database not found: {query.get(database_key)}"})
        if query.get("precision") != [precision]:
            return Answer(400, {"error": f"invalid precision {query.get('precision')}"})
        return None

    def _line_errors(self, lines: list[str]) -> list[dict[str, object]]:
        if self.reject is None:
            return []
        errors: list[dict[str, object]] = []
        for number, line in enumerate(lines, 1):
            reason = self.reject(line)
            if reason is not None:
                errors.append(
                    {"original_line": line, "line_number": number, "error_message": reason}
                )
        return errors


@contextmanager
def serve(fake: FakeInflux3, port: int = 0) -> Iterator[str]:
    """Run the fake on loopback (a free port unless given: a database back where it was);
    yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            encoding = self.headers.get("Content-Encoding", "")
            with fake.lock:
                fake.wire_bytes.append(len(raw))
                fake.encodings.append(encoding)
            body = (gzip.decompress(raw) if encoding == "gzip" else raw).decode()
            headers = {name.lower(): value for name, value in self.headers.items()}
            answer = fake.answer(self.path, headers, [line for line in body.split("\n") if line])
            payload = json.dumps(answer.body).encode() if answer.body is not None else b""
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            if payload:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
