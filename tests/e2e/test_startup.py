"""No request refused at startup (DESIGN sections 2 and 6, `discovery.startup_wait_ms`).

A filter VM that discovers its hosts has none until its first admin poll answers (or
another VM shares its set), and the root context of a new configuration starts the same
way. Requests that arrive meanwhile are held and resumed when the set arrives; only once
`startup_wait_ms` has passed without a healthy host are they answered `503`.

- A fresh Envoy started while clients already loop requests at its port answers every
  request 200, routed exactly as an unheld request would be (the independent ranking of
  `harness.rank`, the session headers, a minted token, a ticket).
- The same across a configuration update (a file-based LDS listener rewritten with a new
  filter configuration while the clients loop).
- With no healthy node ever, requests are answered `503 no_healthy_upstream` (Envoy
  details `session_affinity_no_healthy_upstream`), never before `startup_wait_ms` has
  passed since Envoy started, and after the window nothing is held any more.

Every test prints its figures (replies, connections refused before Envoy listened,
requests held, the longest hold as the filter logs it) with `pytest -s`.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import sa_harness as harness

ACCESS_LOG_FORMAT = "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %REQ(X-LOAD-ID)%\n"


class Reply:
    def __init__(self, sent: float, done: float, response: harness.Response, sid: str | None):
        self.sent, self.done, self.response, self.sid = sent, done, response, sid

    @property
    def status(self) -> int:
        return self.response.status

    def seen(self) -> dict:
        return self.response.json()


class Load:
    """Client threads that loop requests at `port` from before anything listens there.
    A refused connection (Envoy not listening yet) is retried after a short pause and
    counted; every HTTP reply is recorded; any other socket error is recorded too."""

    def __init__(self, port: int, threads: int = 4):
        self.port, self.threads = port, threads
        self.replies: list[Reply] = []
        self.refused = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self) -> "Load":
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            # Thread 0 sends no token (the filter mints a session); the others a signed
            # token for a fixed session each.
            sid = None if i == 0 else f"startup-{i}"
            headers = {"x-load-id": f"{i}-{n}"}
            if sid:
                headers["x-session-token"] = harness.session_token(sid)
            sent = time.time()
            try:
                r = harness.request(self.port, "GET", "/", headers, timeout=60)
            except ConnectionRefusedError:
                with self._lock:
                    self.refused += 1
                time.sleep(0.002)
                continue
            except OSError as e:
                with self._lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.002)
                continue
            with self._lock:
                self.replies.append(Reply(sent, time.time(), r, sid))

    def count(self) -> int:
        with self._lock:
            return len(self.replies)

    def wait_replies(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while self.count() < n:
            assert time.time() < deadline, f"only {self.count()} replies after {timeout}s (errors: {self.errors[:3]})"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=90)


def leave_early(port: int, done: threading.Event) -> None:
    """One client that sends a request as soon as Envoy listens and hangs up 0.2 s later
    without waiting for the reply (while it is held, if it is)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            time.sleep(0.002)
            continue
        tok = harness.session_token("leaves-early")
        s.sendall(f"GET / HTTP/1.1\r\nhost: x\r\nx-session-token: {tok}\r\n\r\n".encode())
        time.sleep(0.2)
        s.close()
        break
    done.set()


def held_figures(envoy: harness.Envoy, since: int = 0) -> tuple[int, int]:
    """(requests resumed, longest hold in ms) from the filter's log lines."""
    resumed, longest = 0, 0
    for _, msg in envoy.wasm_log(since):
        m = re.match(r"session-affinity: resumed (\d+) requests held at startup \(longest (\d+) ms\)", msg)
        if m:
            resumed += int(m.group(1))
            longest = max(longest, int(m.group(2)))
    return resumed, longest


def check_routed(replies: list[Reply], addresses: list[str]) -> int:
    """Every reply is 200 and was routed as the independent ranking and placement allow,
    with the session headers an unheld request gets. The ranking is over the set the VM had: all
    of `addresses`, or, if some node had not passed Envoy's health check yet, the ones
    listed (hosts pass their checks one at a time; rendezvous ranking over a subset is the
    full ranking without the others). Returns how many replies saw a partial set."""
    bad = [(r.status, r.response.body[:120]) for r in replies if r.status != 200]
    assert not bad, f"{len(bad)} of {len(replies)} replies were not 200, e.g. {bad[:5]}"
    partial = 0
    for r in replies:
        seen = r.seen()
        h = seen["headers"]
        sid = r.sid
        if sid is None:
            token = r.response.cookies().get("session_token")
            assert token, f"a minted session got no token: {r.response.headers}"
            sid = harness.decode_jwt_payload(token)["sid"]
        listed = h["x-gateway-destination-endpoint"][0].split(",")
        full = harness.rank(sid, [(a, 1) for a in addresses])
        if len(listed) < min(3, len(addresses)):
            partial += 1
        # The reference config places under load (DESIGN section 10): the chosen node may
        # sit further down the ranking; its fallbacks are the ranking's next nodes.
        assert listed[0] in full, (sid, listed, full)
        assert listed[1:] == [a for a in full if a in listed and a != listed[0]][: len(listed) - 1], (sid, listed, full)
        assert seen["address"] == listed[0], (sid, seen["address"], listed)
        assert h["x-session-id"] == [sid]
        assert h["x-session-affinity"] == ["new"]
        ticket = r.response.cookies().get("sa_ticket")
        assert ticket and harness.verify_jwt(ticket, harness.TICKET_KEY_B64)["node"] == harness.node_id(listed[0])
    return partial


def test_a_fresh_envoy_under_load_refuses_nothing(stack):
    backends = stack.backends(3)
    addresses = [b.address for b in backends]
    listen = harness.free_port()
    cfg = harness.harness_config(listen=listen, admin=harness.free_port(), hosts=[(b.hosts[0], b.port, 1) for b in backends])
    load = Load(listen).start()
    try:
        t0 = time.time()
        envoy = stack.envoy(cfg)
        envoy.wait_host_set(3)
        # Plenty of replies after every VM has its set, so the startup is well covered.
        load.wait_replies(load.count() + 200)
    finally:
        load.stop()
    stats = envoy.stats()
    resumed, longest = held_figures(envoy)
    first = min(r.done for r in load.replies) - t0
    print(f"\nstartup: {load.count()} replies, {sum(r.status != 200 for r in load.replies)} not 200, "
          f"{load.refused} connections refused before Envoy listened, first reply {first:.3f}s after start; "
          f"startup.held {stats.get('startup.held', 0)}, resumed {resumed}, longest hold {longest} ms")
    assert not load.errors, load.errors[:5]
    assert load.count() >= 200
    partial = check_routed(load.replies, addresses)
    print(f"replies routed over a partial host set (a node not yet healthy in Envoy): {partial}")
    # Every request, held or not, was decided once and counted like any other, in the
    # request phase and in the response phase (served by its primary, a ticket issued,
    # its node's counter).
    n = load.count()
    want = {"requests": n, "outcome.new": n, "outcome.no_host": 0, "served.primary": n, "ticket.issued": n,
            "token.minted": sum(r.sid is None for r in load.replies)}
    for a in addresses:
        want[f"node.{harness.metric_label(a)}.requests"] = sum(r.seen()["address"] == a for r in load.replies)
    # Every held request was resumed: the counter (flushed on the VM's timer, so read after
    # the wait, not from the snapshot above) equals the resumes the log reports.
    want["startup.held"] = resumed
    envoy.wait_stats(want)


def write_lds(path: Path, listener: dict) -> None:
    """Atomically rewrites a file-based LDS resource (Envoy watches for a rename)."""
    doc = {"resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)


def test_a_configuration_update_under_load_refuses_nothing(stack):
    """The chat listener comes from a file-based LDS; rewriting it with another filter
    configuration (fallbacks 2 -> 1) makes Envoy build new filter chains whose filter
    has a new root context in every VM, with no host set of its own yet."""
    backends = stack.backends(3)
    addresses = [b.address for b in backends]
    listen = harness.free_port()
    cfg = harness.harness_config(listen=listen, admin=harness.free_port(), hosts=[(b.hosts[0], b.port, 1) for b in backends])
    envoy = harness.Envoy(cfg, stack.workdir)  # reads its ports from the static form
    lds = stack.workdir / "lds.json"
    dynamic = json.loads(json.dumps(cfg))
    sr = dynamic["static_resources"]
    (chat,) = [l for l in sr["listeners"] if l["name"] == "chat"]
    sr["listeners"] = [l for l in sr["listeners"] if l["name"] != "chat"]
    dynamic["dynamic_resources"] = {"lds_config": {"path_config_source": {"path": str(lds)}, "resource_api_version": "V3"}}
    dynamic["node"] = {"id": f"startup-test-{listen}", "cluster": "startup-test"}
    write_lds(lds, chat)
    envoy.cfg = dynamic
    stack.add(envoy)
    envoy.start()
    envoy.wait_host_set(3)
    vms = len(envoy.vm_threads())

    load = Load(listen).start()
    try:
        load.wait_replies(100)
        mark = envoy.log_mark()
        before = load.count()
        updated = json.loads(json.dumps(chat))
        plugin = harness.filter_json({"static_resources": {"listeners": [updated]}})
        plugin["upstream"]["fallbacks"] = 1
        harness.set_filter_json({"static_resources": {"listeners": [updated]}}, plugin)
        write_lds(lds, updated)
        # Every VM configures the new filter (a new root context), then serves with it.
        envoy.wait_vms("configured", lambda m: m == "session-affinity: configured", since=mark)

        def new_config(r: Reply) -> bool:
            return r.status == 200 and len(r.seen()["headers"]["x-gateway-destination-endpoint"][0].split(",")) == 2

        deadline = time.time() + 60
        while sum(new_config(r) for r in load.replies[before:]) < 200:
            assert time.time() < deadline, "the new configuration did not serve 200 requests"
            time.sleep(0.05)
    finally:
        load.stop()
    resumed, longest = held_figures(envoy, since=mark)
    after = load.replies[before:]
    print(f"\nconfiguration update: {len(after)} replies during and after it, "
          f"{sum(r.status != 200 for r in after)} not 200, {sum(new_config(r) for r in after)} from the new "
          f"configuration; {vms} VMs; resumed {resumed} held requests, longest hold {longest} ms")
    assert not load.errors, load.errors[:5]
    bad = [(r.status, r.response.body[:120]) for r in load.replies if r.status != 200]
    assert not bad, f"{len(bad)} of {load.count()} replies were not 200, e.g. {bad[:5]}"
    for r in load.replies:
        seen = r.seen()
        sid = r.sid or harness.decode_jwt_payload(r.response.cookies()["session_token"])["sid"]
        ranking = harness.rank(sid, [(a, 1) for a in addresses])
        listed = seen["headers"]["x-gateway-destination-endpoint"][0].split(",")
        # The chosen node (placement may pick one further down the ranking under load),
        # then the ranking's next nodes: two or three entries, old or new configuration.
        assert len(listed) in (2, 3) and listed[0] in ranking, (sid, listed)
        assert listed[1:] == [a for a in ranking if a != listed[0]][: len(listed) - 1], (sid, listed, ranking)
        assert seen["address"] == listed[0]


def test_with_no_healthy_node_requests_get_503_once_the_wait_has_passed(stack):
    wait_ms = 2000
    backends = stack.backends(2)
    for b in backends:
        b.set_healthy(False)
    listen = harness.free_port()
    access = stack.workdir / "access.log"
    cfg = harness.harness_config(listen=listen, admin=harness.free_port(), hosts=[(b.hosts[0], b.port, 1) for b in backends])
    plugin = harness.filter_json(cfg)
    plugin["upstream"]["discovery"]["startup_wait_ms"] = wait_ms
    harness.set_filter_json(cfg, plugin)
    harness.add_access_log(cfg, access, ACCESS_LOG_FORMAT)
    load = Load(listen, threads=2).start()
    left = threading.Event()
    threading.Thread(target=leave_early, args=(listen, left), daemon=True).start()
    try:
        t0 = time.time()  # before Envoy starts: its VMs' windows open later still
        envoy = stack.envoy(cfg)
        load.wait_replies(20)
        assert left.wait(60)
    finally:
        load.stop()
    stats = envoy.stats()
    resumed, longest = held_figures(envoy)
    first = min(r.done for r in load.replies) - t0
    print(f"\nno healthy node: first reply {first:.3f}s after Envoy started (wait {wait_ms} ms), "
          f"{load.count()} replies, startup.held {stats.get('startup.held', 0)}, resumed {resumed}, "
          f"longest hold {longest} ms")
    assert not load.errors, load.errors[:5]
    for r in load.replies:
        assert r.status == 503 and r.response.json() == {"error": "no_healthy_upstream"}, r.response
        assert r.response.header("content-type") == "application/json"
    # Never answered before the wait had passed: the window opens when a VM is
    # configured, after Envoy started.
    assert first >= wait_ms / 1000, f"a 503 came {first:.3f}s after Envoy started, before the {wait_ms} ms wait"
    # The window has closed for good: later requests are answered at once, not held.
    for _ in range(5):
        r = envoy.request("GET", "/", {"x-session-token": harness.session_token("late")})
        assert r.status == 503 and r.json() == {"error": "no_healthy_upstream"}
    n = load.count() + 5
    # The client that left early was either decided (counted) or forgotten while held.
    deadline = time.time() + 15
    while envoy.stats().get("requests", 0) < n:
        assert time.time() < deadline, envoy.stats()
        time.sleep(0.05)
    time.sleep(0.3)  # two flush periods: nothing more may come
    stats = envoy.stats()
    assert stats["requests"] in (n, n + 1) and stats["outcome.no_host"] == stats["requests"], stats
    # Every held request was resumed, but the one whose client left while held (counters
    # read after the flush: the snapshot taken when the load stopped may lag).
    assert resumed <= stats.get("startup.held", 0) <= resumed + 1, (stats, resumed)
    assert not harness.wasm_failures(envoy.log_text()), harness.wasm_failures(envoy.log_text())
    # Envoy's response-code details name the reply.
    lines = harness.access_log_lines(access, n)
    ours = [line.split() for line in lines if line.split()[0] == "503"]
    assert len(ours) >= n and {tuple(f[:2]) for f in ours} == {("503", "session_affinity_no_healthy_upstream")}, lines
    assert sum(f[2] != "-" for f in ours) == load.count()

