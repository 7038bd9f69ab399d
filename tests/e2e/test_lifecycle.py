"""Session lifecycle in a real Envoy 1.40 with real backend processes: minted sessions,
signed affinity tickets, pinned and rendezvous modes, live host discovery and failover
(issue 3; DESIGN sections 2-7).

Every Envoy here runs the reference configuration (envoy/envoy.yaml: discovery through
the admin API, active health checks, outlier detection, the retry policies) moved onto
free ports, with its chat_nodes cluster read from a file-based EDS that the test rewrites
to add nodes. A dead node is a killed backend process.

Expectations come from the harness's independent code (the affinity function
`harness.rank`, HS256 `harness.verify_jwt`), never from the filter. Every request goes
through a `Client` that records what the backend saw and what came back, so the filter's
counters can be checked exactly at the end of each test.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import sa_harness as harness
from sa_harness import node_id

TOKEN_TTL = 86400  # mint.ttl_seconds of the reference config
TICKET_TTL = 86400


# --------------------------------------------------------------------------------------
# Nodes, clients, sessions.


class Nodes:
    """Backend processes listed in a file-based EDS that every Envoy of a test reads."""

    def __init__(self, stack, n: int, weights: list[int] | None = None):
        self.stack = stack
        self.eds = stack.workdir / "eds.json"
        self.backends = [stack.backend(f"node-{i + 1}") for i in range(n)]
        self.weight = {b.address: w for b, w in zip(self.backends, weights or [1] * n)}
        self.publish()

    def hosts(self) -> list[tuple[str, int, int]]:
        return [(b.hosts[0], b.port, self.weight[b.address]) for b in self.backends]

    def publish(self) -> None:
        harness.write_eds(self.eds, self.hosts())

    def add(self, backend: harness.Backend | None = None, weight: int = 1) -> harness.Backend:
        b = backend or self.stack.backend(f"node-{len(self.backends) + 1}")
        self.backends.append(b)
        self.weight[b.address] = weight
        self.publish()
        return b

    def pick(self, prefix: str, want, n: int, hosts: list[tuple[str, int]] | None = None) -> list[str]:
        """The first `n` session ids `<prefix>-<i>` whose independent ranking over
        `hosts` ((address, weight); default: these nodes) satisfies `want(ranking)`.
        Backends listen on free ports, so which node a fixed id ranks first differs from
        run to run; choosing ids by their ranking makes every count exact."""
        hosts = hosts or [(b.address, self.weight[b.address]) for b in self.backends]
        out = []
        for i in range(100_000):
            sid = f"{prefix}-{i}"
            if want(harness.rank(sid, hosts)):
                out.append(sid)
                if len(out) == n:
                    return out
        raise AssertionError(f"fewer than {n} ids with the wanted ranking")

    def rank(self, sid: str, among: list[harness.Backend] | None = None) -> list[str]:
        return harness.rank(sid, [(b.address, self.weight[b.address]) for b in (among or self.backends)])

    def envoy(self, name: str = "envoy", plugin_update: dict | None = None, mutate=None) -> harness.Envoy:
        cfg = harness.harness_config(listen=harness.free_port(), admin=harness.free_port(), eds_path=self.eds,
                                     hosts=self.hosts(), plugin_update=plugin_update)
        # These tests check the ranking and pinning of DESIGN sections 2-5 exactly, under
        # concurrent traffic: placement under load (section 10, test_placement.py) off.
        harness.without_placement(cfg)
        if mutate:
            mutate(cfg)
        e = self.stack.envoy(cfg, name=name)
        # Every filter VM (one per worker, one on the main thread) has the whole set.
        e.wait_host_set(len(self.backends))
        return e


@dataclass
class Seen:
    """One exchange: what the backend saw (from its JSON echo) and what the client got."""

    status: int
    served: str | None  # address of the backend that answered
    sid: str | None  # x-session-id the backend saw
    affinity: str | None  # x-session-affinity the backend saw
    previous: str | None  # x-session-previous-node the backend saw
    override: list[str]  # entries of x-gateway-destination-endpoint the backend saw
    cookies: dict[str, str]  # set-cookie name -> value
    set_cookie: list[str]  # raw set-cookie values
    token: str | None  # x-session-token response header
    ticket_header: str | None  # x-session-ticket response header
    body: dict = field(default_factory=dict)

    @property
    def primary(self) -> str | None:
        return self.override[0] if self.override else None

    @property
    def ticket(self) -> str | None:
        return self.cookies.get("sa_ticket")

    def ticket_node(self) -> str | None:
        """The node id of the ticket issued with this response, verified independently."""
        if self.ticket is None:
            return None
        claims = harness.verify_jwt(self.ticket, harness.TICKET_KEY_B64)
        assert claims is not None, "ticket does not verify with the ticket key"
        assert claims["sid"] == self.sid
        return claims["node"]


class Client:
    """Sends requests through one Envoy; keeps a ledger of every exchange."""

    def __init__(self, envoy: harness.Envoy):
        self.envoy = envoy
        self.rows: list[tuple[Seen, bool, str | None, bool]] = []
        self.lock = threading.Lock()

    def send(self, cookies: dict | None = None, headers: dict | None = None, method: str = "GET",
             invalid: str | None = None, ignored: bool = False) -> Seen:
        """`invalid`: the reason the filter will find the token invalid; `ignored`: the
        request carries a ticket the filter must ignore. Both only feed the ledger."""
        h = dict(headers or {})
        if cookies:
            h["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        body = f'{{"message":"turn at {time.time()}"}}'.encode() if method == "POST" else None
        r = self.envoy.request(method, "/v1/chat", h, body)
        doc = {}
        try:
            doc = r.json()
        except ValueError:
            pass
        seen_h = doc.get("headers", {}) if r.status == 200 else {}

        def one(name):
            v = seen_h.get(name)
            assert v is None or len(v) == 1, (name, v)
            return v[0] if v else None

        override = one("x-gateway-destination-endpoint")
        seen = Seen(
            status=r.status,
            served=doc.get("address") if r.status == 200 else None,
            sid=one("x-session-id"),
            affinity=one("x-session-affinity"),
            previous=one("x-session-previous-node"),
            override=override.split(",") if override else [],
            cookies=r.cookies(),
            set_cookie=r.all("set-cookie"),
            token=r.header("x-session-token"),
            ticket_header=r.header("x-session-ticket"),
            body=doc,
        )
        had_token = "session_token" in (cookies or {}) or any(k in h for k in ("x-session-token", "authorization"))
        with self.lock:
            self.rows.append((seen, had_token, invalid, ignored))
        return seen

    def expected(self) -> dict[str, int]:
        """The filter's counters as the ledger predicts them (DESIGN section 7)."""
        want = {f"outcome.{o}": 0 for o in ("new", "sticky", "moved", "unaffined", "rejected", "no_host")}
        want.update({k: 0 for k in ("requests", "token.valid", "token.missing", "token.minted", "ticket.issued",
                                    "ticket.ignored", "served.primary", "served.fallback", "upstream.errors")})
        with self.lock:
            rows = list(self.rows)
        for seen, had_token, invalid, ignored in rows:
            want["requests"] += 1
            if invalid:
                want[f"token.invalid.{invalid}"] = want.get(f"token.invalid.{invalid}", 0) + 1
            elif had_token:
                want["token.valid"] += 1
            else:
                want["token.missing"] += 1
            if seen.status == 401:
                want["outcome.rejected"] += 1
                continue
            if seen.status == 503 and seen.body == {"error": "no_healthy_upstream"}:
                want["outcome.no_host"] += 1
                continue
            assert seen.status == 200 and seen.affinity, seen
            want[f"outcome.{seen.affinity}"] += 1
            want["token.minted"] += seen.token is not None
            want["ticket.issued"] += seen.ticket is not None
            want["ticket.ignored"] += ignored
            want["served.primary" if seen.served == seen.primary else "served.fallback"] += 1
            label = f"node.{harness.metric_label(seen.served)}.requests"
            want[label] = want.get(label, 0) + 1
        return want

    def check_counters(self) -> dict[str, int]:
        got = self.envoy.wait_stats(self.expected(), timeout=10)
        assert got["requests"] == sum(v for k, v in got.items() if k.startswith("outcome.")), got
        return got


class Session:
    """A client conversation: its cookie jar round-trips the token and the ticket."""

    def __init__(self, first: Seen, token: str | None = None):
        assert first.status == 200 and (first.token or token), first
        self.first = first
        self.sid = first.sid
        self.home = first.served
        self.jar = dict(first.cookies)
        if token is not None:
            self.jar["session_token"] = token
        assert set(self.jar) == {"session_token", "sa_ticket"}, first.set_cookie

    @classmethod
    def mint(cls, client: Client, method: str = "GET") -> "Session":
        """A new session, minted by the filter (a random id)."""
        return cls(client.send({}, method=method))

    @classmethod
    def signed(cls, client: Client, sid: str, method: str = "GET") -> "Session":
        """A session with a fixed id (a token signed here): its first request gets a
        ticket, so from then on it is pinned like a minted one."""
        token = harness.session_token(sid, ttl=TOKEN_TTL)
        return cls(client.send({"session_token": token}, method=method), token)

    def turn(self, client: Client, method: str = "GET") -> Seen:
        seen = client.send(self.jar, method=method)
        self.jar.update(seen.cookies)
        return seen

    def token_only(self) -> dict:
        return {"session_token": self.jar["session_token"]}


def expect(seen: Seen, *, served: str, affinity: str, sid: str | None = None, previous: str | None = None,
           ticket_for: str | None = None) -> None:
    """One exchange as expected: status, node, affinity header, previous node, and a
    fresh ticket naming `ticket_for` (or none at all)."""
    what = (seen.sid, seen.served, seen.affinity, seen.override, seen.set_cookie)
    assert seen.status == 200, what
    assert seen.served == served, what
    assert seen.affinity == affinity, what
    if sid is not None:
        assert seen.sid == sid, what
    assert seen.previous == previous, what
    assert seen.token is None and "session_token" not in seen.cookies, what
    if ticket_for is None:
        assert seen.ticket is None and seen.ticket_header is None, what
    else:
        assert seen.ticket_node() == node_id(ticket_for), what
        assert seen.ticket_header == seen.ticket, what


def envoy_healthy(envoy: harness.Envoy, cluster: str = "chat_nodes") -> set[str]:
    """The healthy hosts of `cluster` as Envoy's real admin lists them (DESIGN section 6)."""
    doc = json.loads(envoy.admin("/clusters?format=json"))
    out = set()
    for c in doc.get("cluster_statuses", []):
        if c["name"] != cluster:
            continue
        for h in c.get("host_statuses", []):
            hs = h.get("health_status", {})
            if hs.get("eds_health_status", "HEALTHY") in ("HEALTHY", "DEGRADED") and not any(
                hs.get(k) for k in ("failed_active_health_check", "failed_outlier_check",
                                    "pending_dynamic_removal", "excluded_via_immediate_hc_fail")):
                sa = h["address"]["socket_address"]
                out.add(harness.join_address(sa["address"], sa["port_value"]))
    return out


def wait_until(cond, what: str, timeout: float = 15.0):
    deadline = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------
# Minting.


def test_minted_sessions_are_random_signed_and_come_back(stack):
    nodes = Nodes(stack, 3)
    envoy = nodes.envoy()
    c = Client(envoy)
    now = int(time.time())
    firsts = [c.send({}) for _ in range(40)]

    sids = [f.sid for f in firsts]
    assert len(set(sids)) == len(sids), "two minted session ids are equal"
    for f in firsts:
        # 128 random bits as unpadded base64url: 22 characters.
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", f.sid), f.sid
        raw = base64.urlsafe_b64decode(f.sid + "==")
        assert len(raw) == 16

        # The token: header and cookie agree; the cookie has the contract's attributes.
        assert f.token and f.cookies["session_token"] == f.token
        cookie = next(v for v in f.set_cookie if v.startswith("session_token="))
        attrs = {a.strip().split("=", 1)[0].lower(): a.strip().partition("=")[2] for a in cookie.split(";")[1:]}
        assert attrs == {"max-age": str(TOKEN_TTL), "path": "/", "httponly": "", "secure": "", "samesite": "Lax"}, cookie
        # It validates under the harness's own HS256 code, with the first key.
        claims = harness.verify_jwt(f.token, harness.TOKEN_KEY_B64)
        assert claims is not None, "minted token does not verify"
        header = json.loads(base64.urlsafe_b64decode(f.token.split(".")[0] + "=="))
        assert header["alg"] == "HS256" and header["kid"] == "k1"
        assert claims["sid"] == f.sid
        assert claims["exp"] - claims["iat"] == TOKEN_TTL and abs(claims["iat"] - now) <= 30

        # The first request is placed by the ranking and told it is new; a ticket names
        # the node that served (by node id: the client never learns an address).
        assert f.served == nodes.rank(f.sid)[0] and f.affinity == "new" and f.previous is None
        assert f.override == nodes.rank(f.sid)[:3]
        assert f.ticket_node() == node_id(f.served)
        ticket_claims = harness.verify_jwt(f.ticket, harness.TICKET_KEY_B64)
        assert set(ticket_claims) == {"sid", "node", "iat", "exp"}
        assert ticket_claims["exp"] - ticket_claims["iat"] == TICKET_TTL
        given = " ".join(f.set_cookie + [json.dumps(claims), json.dumps(ticket_claims)])
        assert "127.0.0.1" not in given, given

    # The minted token comes back, from each configured source: same session, no new
    # token. Without the ticket the session is `new` (and gets a ticket); with it, sticky.
    for f in firsts[:6]:
        node = f.served
        expect(c.send({"session_token": f.token, "sa_ticket": f.ticket}), served=node, affinity="sticky", sid=f.sid)
        expect(c.send(headers={"x-session-token": f.token, "x-session-ticket": f.ticket}),
               served=node, affinity="sticky", sid=f.sid)
        expect(c.send({"session_token": f.token}), served=node, affinity="new", sid=f.sid, ticket_for=node)
        expect(c.send(headers={"authorization": f"Bearer {f.token}"}), served=node, affinity="new", sid=f.sid,
               ticket_for=node)

    # Tickets that are not this session's are ignored (and counted): another session's
    # ticket, and a forged one naming the session's last-ranked node.
    a, b = firsts[0], next(f for f in firsts if f.served != firsts[0].served)
    expect(c.send({"session_token": a.token, "sa_ticket": b.ticket}, ignored=True),
           served=a.served, affinity="new", sid=a.sid, ticket_for=a.served)
    last = nodes.rank(a.sid)[-1]
    forged = harness.sign_jwt({"sid": a.sid, "node": node_id(last), "iat": now, "exp": now + 600},
                              key_b64=harness.TOKEN_KEY_B64, kid=None)
    expect(c.send({"session_token": a.token, "sa_ticket": forged}, ignored=True),
           served=a.served, affinity="new", sid=a.sid, ticket_for=a.served)
    got = c.check_counters()
    assert got["token.minted"] == 40 and got["ticket.ignored"] == 2

    # on_invalid "mint": an expired or forged token starts a new session (the reference
    # config rejects them).
    minting = nodes.envoy(name="mint-on-invalid", plugin_update={"on_invalid": "mint"})
    cm = Client(minting)
    for reason, tok in (("expired", harness.session_token("old-session", ttl=-100)),
                        ("bad_signature", harness.session_token("old-session")[:-4] + "AAAA")):
        seen = cm.send({"session_token": tok}, invalid=reason)
        assert seen.status == 200 and seen.token and seen.sid not in (None, "old-session"), seen
        assert harness.verify_jwt(seen.token, harness.TOKEN_KEY_B64)["sid"] == seen.sid
        assert seen.affinity == "new" and seen.served == nodes.rank(seen.sid)[0]
        rejected = c.send({"session_token": tok}, invalid=reason)
        assert rejected.status == 401 and rejected.body == {"error": "invalid_session_token", "reason": reason}
    cm.check_counters()
    c.check_counters()


# --------------------------------------------------------------------------------------
# Stickiness.


def test_two_hundred_conversations_stay_on_their_node(stack):
    nodes = Nodes(stack, 3)
    envoy = nodes.envoy()
    c = Client(envoy)

    def conversation(_):
        s = Session.mint(c, method="POST")
        assert s.home == nodes.rank(s.sid)[0]
        for _turn in range(4):
            # Token and ticket come back from the cookie jar; same node, nothing new.
            expect(s.turn(c, method="POST"), served=s.home, affinity="sticky", sid=s.sid)
        return s

    with ThreadPoolExecutor(4) as ex:
        sessions = list(ex.map(conversation, range(200)))
    assert len({s.sid for s in sessions}) == 200
    # Each session on its ranking's first node, so the per-node counts are the ranking's.
    per_node = {b.address: sum(s.home == b.address for s in sessions) for b in nodes.backends}
    assert per_node == {b.address: sum(nodes.rank(s.sid)[0] == b.address for s in sessions) for b in nodes.backends}
    print(f"200 minted sessions per node: {per_node}")
    got = c.check_counters()
    assert (got["outcome.new"], got["outcome.sticky"], got["ticket.issued"], got["served.primary"]) == (200, 800, 200, 1000)


# --------------------------------------------------------------------------------------
# A node dies under traffic, and comes back.


def test_killed_node_moves_only_its_sessions_once(stack):
    nodes = Nodes(stack, 3)
    envoy = nodes.envoy()
    c = Client(envoy)
    victim = nodes.backends[0]
    survivors = nodes.backends[1:]
    # 30 sessions on each node, by their ranking (fixed ids chosen for it).
    sids = [sid for b in nodes.backends for sid in nodes.pick(f"killed-{b.port}", lambda r, a=b.address: r[0] == a, 30)]
    sessions = [Session.signed(c, sid) for sid in sids]
    on_victim = [s for s in sessions if s.home == victim.address]
    assert len(on_victim) == 30, len(on_victim)
    old_jar = {s.sid: dict(s.jar) for s in sessions}

    # GET traffic (idempotent: the reference route retries it) from eight client
    # threads, each session always on the same thread so its turns stay in order. With
    # this many requests in flight, the victim's sessions retry onto their fallbacks
    # several at a time: beyond Envoy's default retry budget (circuit breaker
    # max_retries 3) those GETs would fail with 503, which the reference config's
    # cluster circuit breaker prevents.
    log: dict[str, list[Seen]] = {s.sid: [] for s in sessions}
    stop = threading.Event()
    failures: list[BaseException] = []

    def drive(group):
        try:
            while not stop.is_set():
                for s in group:
                    log[s.sid].append(s.turn(c))
                    time.sleep(0.001)
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=drive, args=(sessions[i::8],), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(log[s.sid] for s in sessions), "traffic on every session")
        mark = envoy.log_mark()
        victim.kill()
        # Health checks (0.5 s) and outlier detection remove it from Envoy's healthy set;
        # each filter VM drops it at its next poll.
        envoy.wait_host_set(2, since=mark, timeout=20)
        # Let every session make two more turns once no VM lists the victim.
        after = {sid: len(v) for sid, v in log.items()}
        wait_until(lambda: failures or all(len(log[sid]) >= n + 2 for sid, n in after.items()), "traffic after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures
    retries = {k: v for k, v in envoy.stats("cluster.chat_nodes.").items()
               if k in ("upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_retry_overflow",
                        "outlier_detection.ejections_enforced_total", "outlier_detection.ejections_overflow",
                        "outlier_detection.ejections_detected_consecutive_local_origin_failure",
                        "health_check.failure")}
    print(f"Envoy while the victim died: {retries}")
    assert retries.get("upstream_rq_retry_overflow", 0) == 0, retries
    # Outlier detection did eject it (the reference config lets it eject one node of three).
    assert retries.get("outlier_detection.ejections_enforced_total", 0) >= 1, retries

    window = moved_live = 0
    for s in sessions:
        seq = log[s.sid]
        assert all(x.status == 200 for x in seq), [x.status for x in seq]  # no GET failed
        if s.home != victim.address:
            # Only the victim's sessions move: the others never noticed.
            for x in seq:
                expect(x, served=s.home, affinity="sticky", sid=s.sid)
            continue
        # The victim's sessions move to the next node of their own ranking (the best of
        # the survivors), once, and stay there.
        nxt = nodes.rank(s.sid)[1]
        assert nxt == nodes.rank(s.sid, among=survivors)[0]
        k = next(i for i, x in enumerate(seq) if x.served != victim.address)
        for x in seq[:k]:
            expect(x, served=victim.address, affinity="sticky", sid=s.sid)
        first = seq[k]
        if first.affinity == "sticky":
            # The window before the VM dropped the victim: the filter still chose the
            # ticket's node (so it said `sticky`), Envoy found it dead and the retry
            # walked to the next entry of the override header. The response carries a
            # ticket for the node that really served, so later turns are sticky there.
            window += 1
            assert first.override == nodes.rank(s.sid), first.override
            expect(first, served=nxt, affinity="sticky", sid=s.sid, ticket_for=nxt)
        else:
            # After the VM dropped it: the ticket's node is not healthy, the ranking
            # chooses, and the node is told where the session was.
            moved_live += 1
            assert first.override == [nxt, nodes.rank(s.sid)[2]], first.override
            expect(first, served=nxt, affinity="moved", sid=s.sid, previous=node_id(victim.address), ticket_for=nxt)
        assert len(seq) >= k + 2
        for x in seq[k + 1:]:
            expect(x, served=nxt, affinity="sticky", sid=s.sid)
    print(f"victim's sessions: {len(on_victim)}; first turn after the kill in the window: {window}, "
          f"after the VMs dropped it: {moved_live}")

    # Every VM has dropped the victim: a request carrying the ticket from before the kill
    # is `moved`, names the old node, lands on the next node and gets a ticket for it.
    for s in on_victim:
        nxt = nodes.rank(s.sid)[1]
        seen = c.send(old_jar[s.sid])
        expect(seen, served=nxt, affinity="moved", sid=s.sid, previous=node_id(victim.address), ticket_for=nxt)
        assert seen.primary == nxt

    # The node comes back (same address). Once every VM lists it again, pinned sessions
    # stay where they moved; sessions that never moved stay too.
    mark = envoy.log_mark()
    revived = stack.add(harness.Backend(victim.name, victim.port, workdir=stack.workdir).start())
    # Outlier ejection (base_ejection_time 5 s) can hold it back for a few seconds.
    envoy.wait_host_set(3, since=mark, timeout=30)
    assert envoy_healthy(envoy) == {b.address for b in nodes.backends}
    for s in sessions:
        if s.home == victim.address:
            expect(s.turn(c), served=nodes.rank(s.sid)[1], affinity="sticky", sid=s.sid)
            # Not because the node is unusable: without a ticket the ranking sends the
            # same session straight to it.
            expect(c.send(s.token_only()), served=revived.address, affinity="new", sid=s.sid, ticket_for=revived.address)
        else:
            expect(s.turn(c), served=s.home, affinity="sticky", sid=s.sid)

    got = c.check_counters()
    assert got["upstream.errors"] == 0
    assert got["served.fallback"] == window
    assert got["outcome.moved"] == moved_live + len(on_victim)


# --------------------------------------------------------------------------------------
# A node joins.


def test_added_node_moves_nothing_when_pinned_and_a_quarter_in_rendezvous(stack):
    nodes = Nodes(stack, 3)
    pinned = nodes.envoy(name="pinned")
    rdv = nodes.envoy(name="rendezvous", plugin_update={"mode": "rendezvous"})
    cp, cr = Client(pinned), Client(rdv)
    # Fixed session ids: which of them the new node wins is known in advance (by the
    # independent ranking), so every expectation below is exact.
    sessions = [Session.signed(cp, f"added-node-{i}") for i in range(200)]
    for s in sessions[:20]:
        # Same ranking in both modes while nothing changes.
        expect(cr.send(s.jar), served=s.home, affinity="sticky", sid=s.sid)

    marks = (pinned.log_mark(), rdv.log_mark())
    new = nodes.add()
    all4 = {b.address for b in nodes.backends}
    wait_until(lambda: envoy_healthy(pinned) == all4, "Envoy's health check of the new node")
    t_envoy = time.monotonic()
    pinned.wait_host_set(4, since=marks[0])
    rdv.wait_host_set(4, since=marks[1])
    print(f"every VM of both proxies lists the new node {time.monotonic() - t_envoy:.3f}s after Envoy's admin does")

    moved = []
    for s in sessions:
        best = nodes.rank(s.sid)[0]
        # pinned: the ticket's node is healthy, so nobody moves...
        expect(cp.send(s.jar), served=s.home, affinity="sticky", sid=s.sid)
        # rendezvous: the ranking decides and the ticket only detects the move. Rendezvous
        # hashing moves exactly the sessions the new node wins, all of them to it.
        seen = cr.send(s.jar)
        if best == s.home:
            expect(seen, served=s.home, affinity="sticky", sid=s.sid)
        else:
            assert best == new.address, (s.sid, best)
            expect(seen, served=new.address, affinity="moved", sid=s.sid, previous=node_id(s.home), ticket_for=new.address)
            moved.append(s)
    # Exactly the sessions the independent ranking gives the new node moved (about a
    # quarter of them: 1/(n+1) is rendezvous hashing's ideal).
    want_moved = [s.sid for s in sessions if nodes.rank(s.sid)[0] == new.address]
    assert [s.sid for s in moved] == want_moved
    print(f"{len(moved)} of {len(sessions)} sessions moved to the new node (ideal 1/4: {len(sessions) / 4:.0f})")
    # ... while the pinned proxy does use the new node: the same sessions without their
    # ticket, as any new session, go where the ranking says.
    for s in moved:
        expect(cp.send(s.token_only()), served=new.address, affinity="new", sid=s.sid, ticket_for=new.address)
    cp.check_counters()
    cr.check_counters()


# --------------------------------------------------------------------------------------
# Proxy replicas.


def test_replicas_agree_without_sharing_state(stack):
    # Unequal EDS weights: discovery must carry them from the admin output into the
    # ranking, identically in both replicas.
    nodes = Nodes(stack, 3, weights=[1, 2, 3])
    a = nodes.envoy(name="replica-a")
    b = nodes.envoy(name="replica-b")
    ca, cb = Client(a), Client(b)
    sessions = []
    for i in range(60):
        origin, other = (ca, cb) if i % 2 == 0 else (cb, ca)
        s = Session.mint(origin)
        assert s.home == nodes.rank(s.sid)[0]
        sessions.append(s)
        # The other replica places the session on the same node without any ticket...
        seen = other.send(s.token_only())
        expect(seen, served=s.home, affinity="new", sid=s.sid, ticket_for=s.home)
        assert seen.override == s.first.override
        # ...and trusts the first replica's ticket as its own.
        expect(other.send(s.jar), served=s.home, affinity="sticky", sid=s.sid)
    assert len({s.sid for s in sessions}) == 60

    # Tickets that disagree with the ranking: after a 4th node joins (weight 2 of 8), the
    # sessions it wins stay where their ticket says on both replicas, whichever replica
    # issued it. Besides the minted sessions (about a quarter of which it wins), ten with
    # ids chosen so that it wins them: the check never depends on luck.
    fourth = stack.backend("node-4")
    four = [(bk.address, nodes.weight[bk.address]) for bk in nodes.backends] + [(fourth.address, 2)]
    for i, sid in enumerate(nodes.pick("replica-won", lambda r: r[0] == fourth.address, 10, hosts=four)):
        s = Session.signed(ca if i % 2 == 0 else cb, sid)
        assert s.home == nodes.rank(s.sid)[0]
        expect((cb if i % 2 == 0 else ca).send(s.jar), served=s.home, affinity="sticky", sid=s.sid)
        sessions.append(s)
    marks = (a.log_mark(), b.log_mark())
    new = nodes.add(fourth, weight=2)
    a.wait_host_set(4, since=marks[0])
    b.wait_host_set(4, since=marks[1])
    won = [s for s in sessions if nodes.rank(s.sid)[0] == new.address]
    assert len(won) >= 10, len(won)
    for s in sessions:
        for client in (ca, cb):
            expect(client.send(s.jar), served=s.home, affinity="sticky", sid=s.sid)
    for s in won:
        for client in (ca, cb):
            expect(client.send(s.token_only()), served=new.address, affinity="new", sid=s.sid, ticket_for=new.address)
    ca.check_counters()
    cb.check_counters()


def test_a_new_replica_routes_as_soon_as_envoy_has_a_healthy_host(stack):
    # A proxy that starts while its nodes are not (yet) healthy: its first polls see an
    # empty set, and every request is a 503. With a refresh_ms of ten minutes, only the
    # filter's startup polling (every tick until a healthy host is seen) can make it
    # route within the test's deadline after Envoy's own health checks pass. (One node
    # turns healthy, so no VM can catch a partial set.)
    nodes = Nodes(stack, 3)
    for b in nodes.backends:
        b.set_healthy(False)
    upstream = harness.filter_json(harness.reference_config())["upstream"]
    upstream["discovery"]["refresh_ms"] = 600_000
    cfg = harness.harness_config(listen=harness.free_port(), admin=harness.free_port(), eds_path=nodes.eds,
                                 hosts=nodes.hosts(), plugin_update={"upstream": upstream})
    envoy = stack.envoy(cfg)
    envoy.wait_host_set(0)
    c = Client(envoy)
    r = c.send(headers={"x-session-token": harness.session_token("early")})
    assert r.status == 503 and r.body == {"error": "no_healthy_upstream"}

    mark = envoy.log_mark()
    first = nodes.backends[1]
    first.set_healthy(True)
    wait_until(lambda: envoy_healthy(envoy) == {first.address}, "Envoy's health check to pass")
    t_envoy = time.monotonic()
    # Generous for a loaded machine, and still far under refresh_ms.
    envoy.wait_host_set(1, since=mark, timeout=60)
    print(f"every VM routes {time.monotonic() - t_envoy:.3f}s after Envoy's admin shows a healthy host")
    for _ in range(5):
        s = Session.mint(c)
        assert s.home == first.address and s.first.override == [first.address]
    c.check_counters()

    # Settled: polls now follow refresh_ms (10 min), not every tick. After the set
    # holds still for one poll, a VM does not poll again: over a second (at least; a
    # slow machine only makes it longer), at most that one poll per VM, where fast
    # polling would have made ~20 each.
    ok = envoy.stats()["discovery.ok"]
    time.sleep(1.0)
    assert envoy.stats()["discovery.ok"] - ok <= 2 * len(envoy.vm_threads())


# --------------------------------------------------------------------------------------
# Discovery faults.


def test_discovery_faults_keep_the_last_good_host_set(stack):
    nodes = Nodes(stack, 3)
    admin = harness.free_port()
    fake = stack.add(harness.FakeAdmin(harness.free_port(), admin, stack.workdir).start())

    def via_fake_admin(cfg):
        ep = harness.cluster(cfg, "envoy_admin")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        ep["endpoint"]["address"]["socket_address"]["port_value"] = fake.port
        cfg["admin"]["address"]["socket_address"]["port_value"] = admin

    envoy = nodes.envoy(mutate=via_fake_admin)
    c = Client(envoy)
    sessions = [Session.mint(c) for _ in range(30)]
    first3 = list(nodes.backends)
    # A 4th node Envoy will learn about while the filter cannot, and sessions it would win.
    fourth = stack.backend("node-4")
    everyone = nodes.backends + [fourth]
    probes = []
    for i in range(10_000):
        sid = f"probe-{i}"
        if harness.rank(sid, [(b.address, 1) for b in everyone])[0] == fourth.address:
            probes.append((sid, harness.session_token(sid)))
            if len(probes) == 8:
                break

    def routing_unchanged():
        assert envoy.stats()["hosts.healthy"] == 3
        for s in sessions:
            expect(s.turn(c), served=s.home, affinity="sticky", sid=s.sid)
        for sid, tok in probes:
            best = nodes.rank(sid, among=first3)[0]  # ranked over the last good set
            expect(c.send({"session_token": tok}), served=best, affinity="new", sid=sid, ticket_for=best)

    def fault(apply, text: str):
        """Applies a fault, waits until every filter VM has failed two polls with a
        message containing `text`, and checks the filter still routes on the last good
        set."""
        before = envoy.stats()
        mark = envoy.log_mark()
        apply()
        envoy.wait_vms(f"failed polls ({text})",
                       lambda m: m.startswith("session-affinity: discovery poll failed") and text in m,
                       since=mark, count=2)
        # The counter is flushed on the VMs' timers, after the log lines.
        wait_until(lambda: envoy.stats().get("discovery.failed", 0) > before.get("discovery.failed", 0),
                   "discovery.failed to count the failed polls")
        after = envoy.stats()
        routing_unchanged()
        return after

    routing_unchanged()
    fault(lambda: fake.set_mode("garbage"), "not the expected JSON")
    ok_during = envoy.stats()["discovery.ok"]
    # Envoy itself now learns the 4th node; the filter, blind, must not.
    nodes.add(fourth)
    wait_until(lambda: envoy_healthy(envoy) == {b.address for b in everyone}, "Envoy to see the 4th node healthy")
    routing_unchanged()
    fault(lambda: fake.set_mode("truncated"), "not the expected JSON")
    fault(lambda: fake.set_mode("wrong_shape"), "cluster not found")
    # A 500 whose body is a valid listing (of one bogus host) is still a failed poll.
    fault(lambda: fake.set_mode("status_500"), "admin answered status 500")
    # Envoy's async client turns a reset into a local 503, a poll past timeout_ms into a
    # 504, and a refused connection into a 503.
    fault(lambda: fake.set_mode("reset"), "admin answered status 503")
    fault(lambda: fake.set_mode("hang"), "admin answered status 504")
    fault(fake.kill, "admin answered status 503")
    assert envoy.stats()["discovery.ok"] == ok_during, "a poll succeeded during the faults"

    # The admin comes back: the next good poll installs the set Envoy has now, with the
    # 4th node. Pinned sessions stay; the probes go to the node they rank first.
    mark = envoy.log_mark()
    fake.set_mode("proxy")
    stack.add(harness.FakeAdmin(fake.port, admin, stack.workdir).start())
    envoy.wait_host_set(4, since=mark)
    wait_until(lambda: envoy.stats()["discovery.ok"] > ok_during, "discovery.ok to grow again")
    for s in sessions:
        expect(s.turn(c), served=s.home, affinity="sticky", sid=s.sid)
    for sid, tok in probes:
        expect(c.send({"session_token": tok}), served=fourth.address, affinity="new", sid=sid, ticket_for=fourth.address)
    c.check_counters()
