"""FAKE InfluxDB 3 write endpoint, for the answers the lab's real database cannot give.

The lab database (VictoriaMetrics) never answers 500, 429, 413, 401 or a
400 partial write. This small server does, with the bodies InfluxDB 3's
docs show (``/api/v3/write_lp``: 400 ``partial write of line protocol
occurred`` with ``data[].line_number`` counted from 1). Everything it is
not told to refuse it records as accepted, so a test can check which lines
were delivered, and how many times.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
    reject: Rejector | None = None
    max_lines: int | None = None  # more lines than this in one request: 413
    delay_s: float = 0.0  # a slow database: each answer waits this long
    requests: list[list[str]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, lines: list[str]) -> Answer:
        time.sleep(self.delay_s)
        with self.lock:
            self.paths.append(path)
            self.requests.append(lines)
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
def serve(fake: FakeInflux3) -> Iterator[str]:
    """Run the fake on a free loopback port; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length).decode()
            answer = fake.answer(self.path, [line for line in body.split("\n") if line])
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

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
