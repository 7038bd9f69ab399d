"""A tiny upstream for real-Envoy tests: answers every request with who served it and
which headers it saw, so a test can check routing and header stripping.

    python -m sa_harness.backend_server --port 8001 --name node-1 [--host 127.0.0.1 ...]

`GET /healthz` answers 200 `ok` unless the file given by --unhealthy-file exists (503).
Run it as its own process: a test kills the process to simulate a dead node.

For placement tests:
- a request header `x-test-delay-ms: N` delays the answer by N ms, and
  `x-test-hold-file: PATH` holds it while PATH exists (load that stays in flight until
  the test lets it go);
- with --load-file, a request that asks `endpoint-load-metrics-format: TEXT` gets an ORCA
  load report: when the file holds a number v, `endpoint-load-metrics: TEXT
  named_metrics.kv_cache_usage_perc=v, named_metrics.num_requests_waiting=0`; when it
  holds `raw:<text>`, that text verbatim (hostile reports); when it is missing, no report.
"""

import argparse
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def address(sa) -> str:
    host, port = sa[0], sa[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_report(path: str) -> str | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text.startswith("raw:"):
        return text[4:]
    return f"TEXT named_metrics.kv_cache_usage_perc={text}, named_metrics.num_requests_waiting=0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--host", action="append", help="address to listen on (repeatable)")
    ap.add_argument("--unhealthy-file")
    ap.add_argument("--load-file")
    args = ap.parse_args()
    hosts = args.host or ["127.0.0.1"]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle on, the body waits for
        # Envoy's delayed ACK on a pooled connection (~40 ms a request).
        disable_nagle_algorithm = True

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path == "/healthz":
                bad = args.unhealthy_file and os.path.exists(args.unhealthy_file)
                self._send(503 if bad else 200, b"unhealthy" if bad else b"ok", "text/plain")
                return
            delay = self.headers.get("x-test-delay-ms")
            if delay and delay.isdigit():
                time.sleep(int(delay) / 1000)
            # A gate: hold the answer while this file exists (at most two minutes).
            hold = self.headers.get("x-test-hold-file")
            if hold:
                deadline = time.monotonic() + 120
                while os.path.exists(hold) and time.monotonic() < deadline:
                    time.sleep(0.01)
            seen = {}
            for name, value in self.headers.raw_items():
                # http.server decodes header bytes as latin-1; undo that to report UTF-8.
                raw = value.encode("latin-1", errors="replace")
                seen.setdefault(name.lower(), []).append(raw.decode("utf-8", errors="backslashreplace"))
            out = {
                "node": args.name,
                "address": address(self.server.server_address),
                "method": self.command,
                "path": self.path,
                "headers": seen,
                "body_len": len(body),
            }
            extra = []
            if args.load_file and self.headers.get("endpoint-load-metrics-format") == "TEXT":
                report = load_report(args.load_file)
                if report is not None:
                    extra.append(("endpoint-load-metrics", report))
            self._send(200, json.dumps(out).encode(), "application/json", extra)

        def _send(self, status: int, body: bytes, ctype: str, extra: list | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.send_header("x-served-by", args.name)
            for k, v in extra or []:
                self.send_header(k, v)
            # Head and body in one write: a backend killed mid-answer (the tests' dead
            # node) then either answered whole or not at all, never a head without its
            # body (which Envoy could not retry).
            self._headers_buffer.append(b"\r\n")
            self.wfile.write(b"".join(self._headers_buffer) + body)
            self._headers_buffer = []

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        def log_message(self, *a) -> None:  # quiet
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    class Server6(Server):
        address_family = socket.AF_INET6

    servers = [(Server6 if ":" in h else Server)((h, args.port), Handler) for h in hosts]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
