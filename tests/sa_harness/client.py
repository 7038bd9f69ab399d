"""A plain HTTP/1.1 client for tests: one request on a fresh connection, headers in
the order and spelling given (duplicates and non-UTF-8 bytes included), so tests can send
what a hostile client would."""

from __future__ import annotations

import http.client
import json


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def cookies(self) -> dict[str, str]:
        out = {}
        for v in self.all("set-cookie"):
            k, _, rest = v.partition("=")
            out[k] = rest.split(";", 1)[0]
        return out

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


def request(port: int, method: str = "GET", path: str = "/", headers: dict | list | None = None, body: bytes | None = None,
            host: str = "127.0.0.1", timeout: float = 30.0) -> Response:
    """One HTTP/1.1 request on a fresh connection. `headers` may be a list of pairs (to
    send duplicates) and values may be bytes (to send non-UTF-8)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for k, v in items:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return Response(r.status, r.getheaders(), r.read())
    finally:
        conn.close()
