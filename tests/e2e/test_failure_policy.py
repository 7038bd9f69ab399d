"""What Envoy 1.40 really does when the filter's Wasm VM fails, under each
`failure_policy`, with the TEST-ONLY `test-trap` build of the filter (Cargo feature
`test-trap`: a request carrying `x-sa-test-trap: request`, or an upstream response carrying
`x-sa-test-trap: response`, makes the filter panic, which with `panic = "abort"` is a wasm
`unreachable` trap).

Facts these tests pin (README "Failure policy", docs/security.md):

- Every policy: the request whose callback trapped gets a local 503 with an empty body; a
  trap in the request phase means it is never forwarded. Envoy logs the Rust panic
  ("panicked at ...") and "Function: proxy_on_request_headers failed: Uncaught
  RuntimeError: unreachable". A VM belongs to one worker: only that worker's VM fails.
- FAIL_RELOAD (the reference config): while the reload backoff runs (1 s by default) the
  worker answers 503 without forwarding (`wasm.<plugin>.vm_reload_backoff` counts them);
  the next request after it starts a fresh VM (`vm_reload_success`), which routes
  correctly again.
- FAIL_CLOSED: the worker answers 503 to every later request, for good.
- FAIL_OPEN: later requests skip the filter and are forwarded as the client sent them: a
  spoofed `x-session-id` and override header reach the node, so a client picks its node
  and speaks as another session. This is why the reference config does not fail open.

Each Envoy here runs one worker (`--concurrency 1`), so the trapped VM is the one that
serves every request. "Not forwarded" is read from Envoy's live counter
`cluster.chat_nodes.upstream_rq_total`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import sa_harness as harness
from sa_harness import join_address, rank


def start_trap_envoy(stack, policy: str, hosts: list[tuple[str, int, int]]) -> harness.Envoy:
    """An Envoy (one worker) with the test-trap filter, static hosts and the given
    failure_policy."""
    wasm = harness.require_trap_wasm()
    plugin = harness.static_plugin(hosts, ticket={"secret_base64": harness.TICKET_KEY_B64})
    cfg = harness.harness_config(listen=harness.free_port(), admin=harness.free_port(), hosts=hosts, plugin=plugin)
    wf = harness.wasm_filter(cfg)["typed_config"]["config"]
    wf["failure_policy"] = policy
    wf["vm_config"]["code"]["local"]["filename"] = str(wasm)
    return stack.envoy(cfg, name=f"envoy-{policy}", concurrency=1)


def forwarded(envoy: harness.Envoy) -> int:
    """Requests Envoy's router sent upstream (health checks not included): a request that
    does not move it was never forwarded. Counters are read live, no flush to wait for."""
    return envoy.stats("cluster.chat_nodes.").get("upstream_rq_total", 0)


def wasm_stats(envoy: harness.Envoy) -> dict[str, int]:
    """Envoy's own wasm stats, e.g. `session_affinity.vm_reload_success`."""
    return envoy.stats("wasm.")


def spoofed(victim: str) -> list[tuple[str, str]]:
    return [
        ("x-session-id", "victim-session"),
        ("x-gateway-destination-endpoint", victim),
        ("x-session-affinity", "sticky"),
        ("x_session_id", "victim-session"),
    ]


def assert_filtered(seen: dict, sid: str, want: list[str]) -> None:
    """Served by the ranking's primary with exactly the filter's headers."""
    assert seen["address"] == want[0], (seen["address"], want)
    h = seen["headers"]
    assert h["x-session-id"] == [sid]
    assert h["x-gateway-destination-endpoint"] == [",".join(want)]
    assert h["x-session-affinity"] in (["new"], ["sticky"])
    assert "x_session_id" not in h


def assert_trap_logged(envoy: harness.Envoy, callback: str, timeout: float = 10.0) -> None:
    """Envoy's log shows the panic and the trap (what harness.wasm_failures looks for)."""
    deadline = time.time() + timeout
    while True:
        failures = harness.wasm_failures(envoy.log_text())
        if (any("panicked at" in l for l in failures)
                and any(f"Function: {callback} failed: Uncaught RuntimeError: unreachable" in l for l in failures)
                and "session-affinity test-trap" in envoy.log_text()):
            return
        if time.time() > deadline:
            pytest.fail(f"no panic and trap of {callback} in Envoy's log: {failures}", pytrace=False)
        time.sleep(0.05)


def configured_vms(envoy: harness.Envoy) -> int:
    return sum(1 for _, m in envoy.wasm_log() if m == "session-affinity: configured")


def trap_request(envoy, tok, victim) -> harness.Response:
    sent = forwarded(envoy)
    r = envoy.request("GET", "/", [("x-session-token", tok), ("x-sa-test-trap", "request")] + spoofed(victim))
    assert r.status == 503, r
    assert r.body == b"", r
    assert forwarded(envoy) == sent, "the failing request was forwarded"
    return r


def setup(stack, policy: str, n: int = 3):
    backends = stack.backends(n)
    hosts = [("127.0.0.1", b.port, 1) for b in backends]
    envoy = start_trap_envoy(stack, policy, hosts)
    sid = "failure-policy-session"
    want = rank(sid, [(join_address(ip, port), 1) for ip, port, _ in hosts])
    return envoy, sid, want, harness.session_token(sid)


def test_fail_reload_refuses_the_failing_request_then_a_fresh_vm_routes_again(stack):
    envoy, sid, want, tok = setup(stack, "FAIL_RELOAD")
    victim = want[-1]
    r = envoy.request("GET", "/", [("x-session-token", tok)] + spoofed(victim))
    assert r.status == 200
    assert_filtered(r.json(), sid, want)
    assert wasm_stats(envoy).get("session_affinity.vm_reload_success", 0) == 0

    vms_before = configured_vms(envoy)
    trap_request(envoy, tok, victim)
    assert_trap_logged(envoy, "proxy_on_request_headers")

    # While the reload backs off: 503s, never forwarded. Then a fresh VM.
    refused = 0
    deadline = time.time() + 30
    while True:
        sent = forwarded(envoy)
        r = envoy.request("GET", "/", [("x-session-token", tok)] + spoofed(victim))
        if r.status == 200:
            break
        assert r.status == 503 and r.body == b"", r
        assert forwarded(envoy) == sent, "a refused request was forwarded"
        refused += 1
        assert time.time() < deadline, "the VM was never reloaded"
        time.sleep(0.05)
    assert_filtered(r.json(), sid, want)
    w = wasm_stats(envoy)
    assert w["session_affinity.vm_reload_success"] == 1, w
    assert w["session_affinity.vm_reload_backoff"] == refused, (w, refused)
    assert w["session_affinity.vm_reload_failure"] == 0, w
    # The fresh VM was configured (once, on the worker), and routes every request right.
    envoy.wait_vms("a fresh VM", lambda m: m == "session-affinity: configured", since=0, count=1)
    assert configured_vms(envoy) == vms_before + 1
    for _ in range(5):
        r = envoy.request("GET", "/", [("x-session-token", tok)] + spoofed(victim))
        assert r.status == 200
        assert_filtered(r.json(), sid, want)
    # Counts the failed VM had not flushed yet are lost; what is counted adds up. The
    # trapping request and the refused ones never reached a working filter.
    deadline = time.time() + 10
    while True:
        s = envoy.stats()
        if s.get("requests", 0) >= 6 and s["requests"] == sum(v for k, v in s.items() if k.startswith("outcome.")):
            break
        assert time.time() < deadline, s
        time.sleep(0.05)
    assert s["requests"] <= 7 and s["outcome.rejected"] == 0, s


class TrapUpstream:
    """An upstream that answers 200 and records the headers it got; on `/trap` its
    response carries `x-sa-test-trap: response` (the test-trap build then traps in the
    response phase)."""

    def __init__(self):
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = json.dumps({"path": self.path}).encode()
                self.send_response(200)
                if self.path == "/trap":
                    self.send_header("x-sa-test-trap", "response")
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # Envoy resets the upstream when the VM traps

            def log_message(self, *a):
                pass

            def handle(self):
                try:
                    super().handle()
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", harness.free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_fail_reload_trap_in_the_response_phase(stack):
    up = stack.add(TrapUpstream())
    envoy = start_trap_envoy(stack, "FAIL_RELOAD", [("127.0.0.1", up.port, 1)])
    tok = harness.session_token("resp-session")
    assert envoy.request("GET", "/ok", {"x-session-token": tok}).status == 200
    r = envoy.request("GET", "/trap", [("x-session-token", tok), ("x-session-id", "victim-session")])
    # The node got the request, filtered; the client gets a 503 instead of its answer.
    assert r.status == 503 and r.body == b"", r
    path, headers = up.seen[-1]
    assert path == "/trap" and headers["x-session-id"] == "resp-session", headers
    assert_trap_logged(envoy, "proxy_on_response_headers")
    deadline = time.time() + 30
    while envoy.request("GET", "/ok", {"x-session-token": tok}).status != 200:
        assert time.time() < deadline, "the VM was never reloaded"
        time.sleep(0.05)
    assert wasm_stats(envoy)["session_affinity.vm_reload_success"] == 1


def test_fail_closed_stays_failed(stack):
    envoy, sid, want, tok = setup(stack, "FAIL_CLOSED", n=2)
    victim = want[-1]
    assert envoy.request("GET", "/", {"x-session-token": tok}).status == 200
    trap_request(envoy, tok, victim)
    assert_trap_logged(envoy, "proxy_on_request_headers")
    # For at least three times the default reload backoff (1 s): still failed, nothing
    # forwarded. (A slow machine only makes the window longer.)
    sent = forwarded(envoy)
    for _ in range(10):
        r = envoy.request("GET", "/", {"x-session-token": tok})
        assert r.status == 503 and r.body == b"", r
        time.sleep(0.3)
    assert forwarded(envoy) == sent, "FAIL_CLOSED forwarded a request"
    w = wasm_stats(envoy)
    assert w.get("session_affinity.vm_reload_success", 0) == 0 and w.get("session_affinity.vm_reload_backoff", 0) == 0, w


def test_fail_open_forwards_unfiltered_requests(stack):
    envoy, sid, want, tok = setup(stack, "FAIL_OPEN")
    victim = want[-1]  # a real node the ranking puts last
    r = envoy.request("GET", "/", [("x-session-token", tok)] + spoofed(victim))
    assert_filtered(r.json(), sid, want)
    trap_request(envoy, tok, victim)  # the failing request itself is still a 503
    assert_trap_logged(envoy, "proxy_on_request_headers")
    # From now on the filter is skipped: the client's headers reach the node, and the
    # client picks the node.
    for _ in range(3):
        sent = forwarded(envoy)
        r = envoy.request("GET", "/", [("x-session-token", tok)] + spoofed(victim))
        assert r.status == 200, r
        seen = r.json()
        assert seen["address"] == victim != want[0]
        assert seen["headers"]["x-session-id"] == ["victim-session"]
        assert seen["headers"]["x_session_id"] == ["victim-session"]
        assert seen["headers"]["x-session-affinity"] == ["sticky"]
        assert seen["headers"]["x-gateway-destination-endpoint"] == [victim]
        assert forwarded(envoy) == sent + 1
    # Nor does anything else of the filter happen: no session for a new visitor.
    r = envoy.request("GET", "/")
    assert r.status == 200 and r.header("x-session-token") is None and r.header("set-cookie") is None
    w = wasm_stats(envoy)
    assert w.get("session_affinity.vm_reload_success", 0) == 0, w
