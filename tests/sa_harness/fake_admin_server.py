"""A stand-in for Envoy's admin API, for the discovery fault tests: the filter's
`admin_cluster` points here instead of at the real admin.

    python -m sa_harness.fake_admin_server --port P --upstream-port ADMIN --mode-file FILE

Each request reads the mode from FILE (`proxy` when the file is missing or empty):

- `proxy`        forward `GET <path>` to the real admin on 127.0.0.1:ADMIN and relay it
- `garbage`      200, a body that is not JSON
- `truncated`    200, the real admin's body cut in half (JSON that does not parse)
- `wrong_shape`  200, valid JSON without the filter's cluster
- `status_500`   500 with a plausible body (valid JSON naming one healthy host): a
                 non-200 answer must be a failed poll whatever its body says
- `reset`        reads the request, then resets the connection without answering
- `hang`         reads the request, answers nothing for 3 s (past the poll timeout)

"Stopped" is killing the process (connection refused). Run it as its own process.
"""

import argparse
import json
import socket
import struct
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, required=True)
    ap.add_argument("--mode-file", required=True)
    args = ap.parse_args()

    def mode() -> str:
        try:
            with open(args.mode_file) as f:
                return f.read().strip() or "proxy"
        except FileNotFoundError:
            return "proxy"

    def upstream(path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{args.upstream_port}{path}", timeout=2) as r:
            return r.status, r.read()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            m = mode()
            if m == "proxy":
                try:
                    status, body = upstream(self.path)
                except OSError as e:
                    status, body = 502, str(e).encode()
                self._send(status, body)
            elif m == "garbage":
                self._send(200, b"<html><body>502 Bad Gateway</body></html>\x00\xff")
            elif m == "truncated":
                _, body = upstream(self.path)
                self._send(200, body[: len(body) // 2])
            elif m == "wrong_shape":
                self._send(200, json.dumps({"cluster_statuses": [{"name": "some_other_cluster"}]}).encode())
            elif m == "status_500":
                doc = {"cluster_statuses": [{"name": "chat_nodes", "host_statuses": [
                    {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}]}]}
                self._send(500, json.dumps(doc).encode())
            elif m == "reset":
                # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
            elif m == "hang":
                time.sleep(3)
                self.close_connection = True
            else:
                self._send(400, f"unknown mode {m}".encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a) -> None:  # quiet
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", args.port), Handler)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
