"""A real S3 endpoint on loopback for the tests: moto's server (as s3fs's own tests use), and a proxy in
front of it that can throttle or drop chosen requests. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWERS = {  # an action's status and S3 error code
    "throttle": (503, "SlowDown"),
    "deny": (403, "AccessDenied"),
}


@dataclass
class Faults:
    """What the proxy does to a request, by its method and path: ``throttle`` answers 503 SlowDown,
    ``deny`` 403 AccessDenied, ``drop`` closes the connection without an answer; ``times`` how often
    (None: always)."""

    rules: list[tuple[Callable[[str, str], bool], str, int | None]] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, matches: Callable[[str, str], bool], action: str, times: int | None = None) -> None:
        with self.lock:
            self.rules.append((matches, action, times))

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.seen.clear()

    def action(self, method: str, path: str) -> str | None:
        with self.lock:
            self.seen.append((method, path))
            for index, (matches, action, times) in enumerate(self.rules):
                if matches(method, path) and (times is None or times > 0):
                    if times is not None:
                        self.rules[index] = (matches, action, times - 1)
                    return action
        return None


def start_proxy(upstream: tuple[str, int], faults: Faults) -> ThreadingHTTPServer:
    """An HTTP proxy on 127.0.0.1 that forwards to ``upstream`` but for what ``faults`` says."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            action = faults.action(self.command, self.path)
            if action == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if action in ANSWERS:
                status, code = ANSWERS[action]
                error = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code></Error>'.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(error)
                return
            connection = http.client.HTTPConnection(*upstream)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    self.send_header(key, value)
            # a HEAD's length is the object's, though no body follows
            length = response.getheader("Content-Length") if self.command == "HEAD" else len(data)
            self.send_header("Content-Length", str(length or 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            connection.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
