"""Hostile requests through a real Envoy 1.40 with the filter: huge and malformed tokens,
hundreds of cookies, duplicates, non-UTF-8 bytes, replayed and forged tickets, and the
filter's own headers sent by clients in every spelling.

Every request gets the contract's answer (docs/protocol.md), or Envoy's own refusal when
Envoy's HTTP codec stops it before any filter runs (431 over 60 KiB of headers or 100
headers, 400 for NUL and other control bytes); after the whole module the filter's stats
add up (`requests` = the requests that reached it = the sum of `outcome.*`) and Envoy's log
shows no wasm panic, trap or VM failure.

One Envoy (two workers, so two filter VMs) and three backends serve the whole module; the
tests run in file order and the last one checks the totals.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

import sa_harness as harness
from sa_harness import TICKET_KEY_B64, TOKEN_KEY_B64, b64url, join_address, node_id, rank, sign_jwt

RESERVED = ["x-gateway-destination-endpoint", "x-session-id", "x-session-affinity", "x-session-previous-node"]
OUTCOMES = ["new", "sticky", "moved", "unaffined", "rejected", "no_host"]
OTHER_KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


class Hostile:
    """The module's Envoy and backends, and the count of requests that reached the filter."""

    def __init__(self, envoy: harness.Envoy, hosts: list[tuple[str, int, int]]):
        self.envoy, self.hosts = envoy, hosts
        self.addresses = [join_address(ip, port) for ip, port, _ in hosts]
        self.reached_filter = 0
        self.envoy_refused = 0
        self.tokens_sent: list[str] = []

    def ranking(self, sid: str) -> list[str]:
        return rank(sid, [(a, 1) for a in self.addresses])

    def send(self, headers, *, method: str = "GET", envoy_refuses: int | None = None) -> harness.Response:
        """One request. `envoy_refuses`: the status Envoy's codec answers before any filter
        (then the filter never sees the request)."""
        r = self.envoy.request(method, "/", headers)
        if envoy_refuses is not None:
            assert r.status == envoy_refuses, (r, "expected Envoy itself to refuse")
            assert r.body in (b"Request Header Fields Too Large", b"Bad Request"), r
            self.envoy_refused += 1
        else:
            self.reached_filter += 1
        return r

    def token(self, sid, ttl: int = 600, **claims) -> str:
        now = int(time.time())
        t = sign_jwt({"sid": sid, "iat": now, "exp": now + ttl, **claims})
        self.tokens_sent.append(t)
        return t

    def settled_stats(self, timeout: float = 10.0) -> dict[str, int]:
        """The filter's stats once every request sent so far is counted (each VM flushes
        its counts every `metrics.flush_ms`)."""
        deadline = time.time() + timeout
        while True:
            s = self.envoy.stats()
            if s.get("requests", 0) == self.reached_filter:
                return s
            if time.time() > deadline:
                pytest.fail(f"requests stat {s.get('requests')} != {self.reached_filter} sent to the filter", pytrace=False)
            time.sleep(0.05)

    def stats_delta(self, before: dict[str, int], want: dict[str, int], timeout: float = 10.0) -> None:
        """Waits until every stat in `want` has grown by exactly that much since `before`."""
        self.envoy.wait_stats({k: before.get(k, 0) + v for k, v in want.items()}, timeout=timeout)


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness.require_envoy()
    harness.require_wasm()
    wd = tmp_path_factory.mktemp("hostile")
    backends = [harness.Backend(f"node-{i + 1}", harness.free_port(), workdir=wd).start() for i in range(3)]
    hosts = [("127.0.0.1", b.port, 1) for b in backends]
    plugin = harness.static_plugin(hosts, ticket={"secret_base64": TICKET_KEY_B64})
    cfg = harness.harness_config(listen=harness.free_port(), admin=harness.free_port(), hosts=hosts, plugin=plugin)
    envoy = harness.Envoy(cfg, wd, concurrency=2, name="envoy-hostile")
    try:
        envoy.start()
        hostile = Hostile(envoy, hosts)
        yield hostile
        # After every test of the module, whatever their order or selection: the totals
        # add up, no VM failed, and no token reached the log.
        after_the_module(hostile)
    finally:
        envoy.stop()
        for b in backends:
            b.kill()


def after_the_module(h: Hostile) -> None:
    """Totals over every request of this module (run at the fixture's teardown)."""
    deadline = time.monotonic() + 30
    while True:
        s = h.envoy.stats()
        outcomes = sum(s.get(f"outcome.{o}", 0) for o in OUTCOMES)
        if s.get("requests", 0) == h.reached_filter == outcomes:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"requests {s.get('requests')}, sent to the filter {h.reached_filter}, outcomes {outcomes}: {s}",
                        pytrace=False)
        time.sleep(0.05)
    # Every request Envoy itself refused is in its own stats, not the filter's.
    codec = h.envoy.stats("http.chat.")
    assert codec.get("downstream_rq_4xx", 0) >= h.envoy_refused
    log = h.envoy.log_text()
    assert harness.wasm_failures(log) == [], harness.wasm_failures(log)[:5]
    # Nothing of any token reached the log (signatures are unique per token).
    for t in h.tokens_sent:
        assert t.rsplit(".", 1)[1] not in log


def assert_401(r: harness.Response, reason: str, token: str | bytes | None = None) -> None:
    assert r.status == 401, (reason, r)
    assert r.header("content-type") == "application/json"
    assert r.header("www-authenticate") == 'Bearer error="invalid_token"'
    assert r.json() == {"error": "invalid_session_token", "reason": reason}, (reason, r)
    if token:
        t = token.encode(errors="replace") if isinstance(token, str) else token
        assert t[-40:] not in r.body


def assert_routed(h: Hostile, r: harness.Response, sid: str, affinity: str = "new") -> dict:
    """The request reached the primary of `sid`'s ranking with exactly the filter's headers."""
    assert r.status == 200, r
    seen = r.json()
    want = h.ranking(sid)
    assert seen["address"] == want[0], (sid, seen["address"], want)
    hd = seen["headers"]
    assert hd["x-gateway-destination-endpoint"] == [",".join(want)]
    assert hd["x-session-id"] == [sid]
    assert hd["x-session-affinity"] == [affinity]
    return hd


def segment(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return b64url(raw)


def signed(header_seg: str, payload_seg: str, key_b64: str = TOKEN_KEY_B64, digest=hashlib.sha256) -> str:
    si = f"{header_seg}.{payload_seg}"
    return si + "." + b64url(hmac.new(base64.b64decode(key_b64), si.encode(), digest).digest())


# --------------------------------------------------------------------------------------


def test_oversized_tokens_our_401_or_envoys_431(h):
    before = h.settled_stats()
    # Just over max_token_bytes (4096), from every source: the filter's `oversized`.
    over = "a" * 4097
    for headers in ({"x-session-token": over}, {"cookie": f"session_token={over}"}, {"authorization": f"Bearer {over}"}):
        assert_401(h.send(headers), "oversized")
    # A real signed token of exactly 4096 bytes passes; one byte more is oversized
    # (size is checked before anything else, even a valid signature).
    now = int(time.time())
    sized = {}
    for pad in range(2900, 3100):
        for extra in ("", "1", "12"):
            t = sign_jwt({"sid": "big", "exp": now + 600, "pad": "x" * pad, "e": extra})
            sized.setdefault(len(t), t)
    assert_routed(h, h.send({"x-session-token": sized[4096]}), "big")
    assert_401(h.send({"x-session-token": sized[4097] if 4097 in sized else sized[4098]}), "oversized")
    # 59 KiB still fits Envoy's default header limit (max_request_headers_kb: 60): ours.
    assert_401(h.send({"x-session-token": "a" * (59 * 1024)}), "oversized")
    # 64 KiB does not: Envoy's HTTP codec answers 431 before any filter runs.
    h.send({"x-session-token": "a" * (64 * 1024)}, envoy_refuses=431)
    h.send({"cookie": "session_token=" + "a" * (64 * 1024)}, envoy_refuses=431)
    h.stats_delta(before, {"token.invalid.oversized": 5, "outcome.rejected": 5, "outcome.new": 1, "requests": 6})


def test_tokens_malformed_in_every_segment(h):
    now = int(time.time())
    H = segment({"alg": "HS256", "typ": "JWT", "kid": "k1"})
    P = segment({"sid": "victim", "iat": now, "exp": now + 600})
    good = signed(H, P)
    S = good.rsplit(".", 1)[1]
    nest = b"[" * 1000 + b"]" * 1000
    cases: list[tuple[str, str, str]] = []
    # Each of the three segments: bad alphabet, padding, impossible length, empty.
    for i, name in enumerate(["header", "payload", "signature"]):
        parts = [H, P, S]

        def with_seg(s, parts=parts, i=i):
            p = list(parts)
            p[i] = s
            return ".".join(p)

        cases += [
            (f"{name}: '*' in base64url", with_seg(parts[i][:5] + "*" + parts[i][6:]), "malformed"),
            (f"{name}: standard alphabet '+'", with_seg(parts[i][:5] + "+" + parts[i][6:]), "malformed"),
            (f"{name}: standard alphabet '/'", with_seg("/" + parts[i][1:]), "malformed"),
            (f"{name}: padding", with_seg(parts[i] + "=" * (-len(parts[i]) % 4 or 4)), "malformed"),
            (f"{name}: 4n+1 length", with_seg(parts[i] + "A" * ((1 - len(parts[i])) % 4)), "malformed"),
        ]
    cases += [
        ("header: empty", f".{P}.{S}", "malformed"),
        ("payload: empty", f"{H}..{S}", "malformed"),
        # An empty signature is valid base64 of nothing: it fails the MAC.
        ("signature: empty", f"{H}.{P}.", "bad_signature"),
        ("signature: truncated", f"{H}.{P}.{S[:20]}", "bad_signature"),
        ("two segments", f"{H}.{P}", "malformed"),
        ("four segments", f"{H}.{P}.{S}.{S}", "malformed"),
        ("only dots", "...", "malformed"),
        ("one dot", ".", "malformed"),
        ("no dots", "x" * 100, "malformed"),
        # JSON that is not an object, not JSON, not UTF-8, too deep, out of range.
        ("header: JSON array", signed(segment(["HS256"]), P), "malformed"),
        ("payload: JSON array", signed(H, segment([{"sid": "victim"}])), "malformed"),
        ("payload: JSON string", signed(H, segment("victim")), "malformed"),
        ("header: not JSON", signed(b64url(b"alg=HS256"), P), "malformed"),
        ("header: invalid UTF-8", signed(segment(b'{"alg":"HS256","kid":"k1","x":"\xff"}'), P), "malformed"),
        ("payload: invalid UTF-8", signed(H, segment(b'{"sid":"vi\xc3\x28ctim","exp":%d}' % (now + 600))), "malformed"),
        ("payload: trailing garbage", signed(H, segment(b'{"sid":"s","exp":%d} {}' % (now + 600))), "malformed"),
        ("payload: number out of range", signed(H, segment(b'{"sid":"s","exp":1e999}')), "malformed"),
        # Deep nesting where a claim is read: refused (serde_json's recursion limit, not a
        # stack overflow). In a member nobody reads it is skipped iteratively (below).
        ("payload: sid nested 1000 deep", signed(H, segment(b'{"sid":%s,"exp":%d}' % (nest, now + 600))), "malformed"),
        ("header: alg nested 1000 deep", signed(segment(b'{"alg":%s,"kid":"k1"}' % nest), P), "malformed"),
        ("payload: duplicate sid", signed(H, segment(b'{"sid":"a","sid":"victim","exp":%d}' % (now + 600))), "malformed"),
        ("header: kid not a string", signed(segment({"alg": "HS256", "kid": 1}), P), "malformed"),
        ("header: crit", signed(segment({"alg": "HS256", "kid": "k1", "crit": ["exp"]}), P), "malformed"),
        # Algorithms.
        ("alg none", f"{segment({'alg': 'none'})}.{P}.", "disallowed_alg"),
        ("alg none with a MAC", signed(segment({"alg": "none"}), P), "disallowed_alg"),
        ("alg HS512 with the HS256 key", signed(segment({"alg": "HS512", "kid": "k1"}), P, digest=hashlib.sha512),
         "disallowed_alg"),
        ("alg RS256", signed(segment({"alg": "RS256"}), P), "disallowed_alg"),
        ("alg number", signed(segment({"alg": 256}), P), "disallowed_alg"),
        ("unknown kid", signed(segment({"alg": "HS256", "kid": "k9"}), P), "unknown_key"),
        ("other key", signed(H, P, key_b64=OTHER_KEY_B64), "bad_signature"),
        ("edited payload", f"{H}.{segment({'sid': 'admin', 'iat': now, 'exp': now + 600})}.{S}", "bad_signature"),
        # Claims, signed: nothing a header could be split with, types, times.
        ("sid with CRLF", signed(H, segment({"sid": "a\r\nx-session-id: victim", "exp": now + 600})), "bad_claims"),
        ("sid with NUL", signed(H, segment({"sid": "a\u0000b", "exp": now + 600})), "bad_claims"),
        ("sid empty", signed(H, segment({"sid": "", "exp": now + 600})), "bad_claims"),
        ("sid a number", signed(H, segment({"sid": 7, "exp": now + 600})), "bad_claims"),
        ("sid an object", signed(H, segment({"sid": {"id": "x"}, "exp": now + 600})), "bad_claims"),
        ("exp a string", signed(H, segment({"sid": "s", "exp": str(now + 600)})), "bad_claims"),
        ("exp missing", signed(H, segment({"sid": "s"})), "bad_claims"),
        ("exp -1e308", signed(H, segment({"sid": "s", "exp": -1e308})), "expired"),
        ("nbf 1e308", signed(H, segment({"sid": "s", "exp": now + 600, "nbf": 1e308})), "not_yet_valid"),
    ]
    before = h.settled_stats()
    reasons: dict[str, int] = {}
    for name, tok, reason in cases:
        r = h.send({"x-session-token": tok})
        assert r.status == 401 and r.json().get("reason") == reason, (name, tok[:80], r)
        assert_401(r, reason, tok)
        reasons[reason] = reasons.get(reason, 0) + 1
    # The same through the cookie and the Bearer source, for a sample.
    for name, tok, reason in cases[::7]:
        assert_401(h.send({"cookie": f"session_token={tok}"}), reason, tok)
        assert_401(h.send({"authorization": f"Bearer {tok}"}), reason, tok)
        reasons[reason] += 2
    # Huge but valid numbers are just times.
    for sid, claims in [("far", {"exp": 1e300}), ("big-int", {"exp": 10**30}), ("old-nbf", {"exp": now + 600, "nbf": -1e308})]:
        assert_routed(h, h.send({"x-session-token": signed(H, segment({"sid": sid, **claims}))}), sid)
    # Valid JSON nested 1000 deep in members the filter does not read, in a signed token.
    deep = signed(H, segment(b'{"sid":"deep","exp":%d,"x":%s}' % (now + 600, nest)))
    assert_routed(h, h.send({"x-session-token": deep}), "deep")
    n = sum(reasons.values())
    want = {f"token.invalid.{k}": v for k, v in reasons.items()}
    want.update({"requests": n + 4, "outcome.rejected": n, "outcome.new": 4, "token.valid": 4})
    h.stats_delta(before, want)


def test_non_utf8_bytes_in_every_header(h):
    before = h.settled_stats()
    tok = h.token("bytes")
    # In the token itself, from each source: refused as malformed, never a trap.
    for headers in (
        {"x-session-token": b"\xff\xfe\xfd"},
        {"x-session-token": tok.encode() + b"\xff"},
        {"x-session-token": b"\xc3\x28." + tok.encode()},
        {"cookie": b"session_token=\xff" + tok.encode()},
        {"authorization": b"Bearer \xff\xfe"},
    ):
        assert_401(h.send(headers), "malformed")
    # Around a valid token: other cookies, other headers, the ticket (ignored), spoofed
    # filter headers (removed).
    r = h.send({"cookie": b"junk=\xff\xfe; session_token=" + tok.encode() + b"; x=\xc3\x28"})
    assert_routed(h, r, "bytes")
    r = h.send({"x-session-token": tok, "x-anything": b"\xff\xfe\x80", "user-agent": b"\xe2\x82"})
    hd = assert_routed(h, r, "bytes")
    assert hd["x-anything"] == ["\\xff\\xfe\\x80"], hd  # passed through untouched
    for ticket in (b"\xff\xfe", b"eyJ\xff.eyJ.x"):
        assert_routed(h, h.send({"x-session-token": tok, "x-session-ticket": ticket}), "bytes")
        assert_routed(h, h.send({"x-session-token": tok, "cookie": b"sa_ticket=" + ticket}), "bytes")
    spoofed = [(name, b"\xff" + name.encode() + b"\xfe") for name in RESERVED]
    assert_routed(h, h.send([("x-session-token", tok)] + spoofed), "bytes")
    # A new visitor with nothing but bytes: minted, and still no spoofed header survives.
    r = h.send(spoofed + [("cookie", b"\xff\xfe")])
    assert r.status == 200 and r.header("x-session-token"), r
    sid = harness.decode_jwt_payload(r.header("x-session-token"))["sid"]
    assert_routed(h, r, sid)
    h.stats_delta(before, {"token.invalid.malformed": 5, "ticket.ignored": 4, "outcome.new": 8, "token.minted": 1,
                           "requests": 13})
    # What Envoy's own codec refuses before any filter: NUL, DEL and other control bytes
    # in a value, and a non-UTF-8 header name (all 400).
    for value in (b"ab\x00cd", b"ab\x7fcd", b"ab\x01cd", b"\x1b[31m"):
        h.send({"x-session-token": value}, envoy_refuses=400)
    h.send([(b"x-\xff", b"v"), ("x-session-token", tok)], envoy_refuses=400)


def test_many_and_duplicate_cookies_and_headers_first_wins(h):
    before = h.settled_stats()
    a, b = h.token("first-sid"), h.token("second-sid")
    bad = a[:-6] + "AAAAAA"
    # Hundreds of cookies in one header, the token last.
    many = "; ".join(f"c{i}=v{i}" for i in range(500))
    assert_routed(h, h.send({"cookie": f"{many}; session_token={a}"}), "first-sid")
    # Sixty cookie headers, the token in the last one.
    assert_routed(h, h.send([("cookie", f"c{i}=v") for i in range(60)] + [("cookie", f"session_token={b}")]), "second-sid")
    # More than Envoy's default max_headers_count (100): Envoy's 431, no filter involved.
    h.send([("cookie", f"c{i}=v") for i in range(150)] + [("cookie", f"session_token={a}")], envoy_refuses=431)
    # Duplicates: the first occurrence wins (docs/configuration.md), even when it is bad.
    assert_routed(h, h.send({"cookie": f"session_token={a}; session_token={b}"}), "first-sid")
    assert_routed(h, h.send({"cookie": f"session_token={b}; session_token={a}"}), "second-sid")
    assert_401(h.send({"cookie": f"session_token={bad}; session_token={a}"}), "bad_signature")
    assert_routed(h, h.send([("cookie", f"x=1; session_token={a}"), ("cookie", f"session_token={b}")]), "first-sid")
    assert_401(h.send([("cookie", f"session_token={bad}"), ("cookie", f"session_token={a}")]), "bad_signature")
    assert_routed(h, h.send([("x-session-token", a), ("x-session-token", b)]), "first-sid")
    assert_401(h.send([("x-session-token", bad), ("x-session-token", a)]), "bad_signature")
    # Except where Envoy itself joins the copies before any filter runs: it folds a
    # repeated `authorization` into one value, "Bearer <b>,Bearer <a>", which is no token.
    assert_401(h.send([("authorization", f"Bearer {b}"), ("authorization", f"Bearer {a}")]), "malformed")
    # Sources in configuration order: the header before the cookie before Bearer.
    assert_routed(h, h.send({"x-session-token": a, "cookie": f"session_token={b}"}), "first-sid")
    assert_routed(h, h.send({"authorization": f"Bearer {a}", "cookie": f"session_token={b}"}), "second-sid")
    # A cookie whose name only contains the token's name is not it; quotes are removed.
    assert_routed(h, h.send({"cookie": f"xsession_token={bad}; session_token_old={bad}; session_token=\"{a}\""}),
                  "first-sid")
    # Duplicate tickets: the first wins too (x-session-ticket header before the cookie).
    r = h.send({"x-session-token": a})
    ticket = r.header("x-session-ticket")
    assert ticket
    assert_routed(h, h.send([("x-session-token", a), ("x-session-ticket", ticket), ("x-session-ticket", "junk")]),
                  "first-sid", "sticky")
    assert_routed(h, h.send([("x-session-token", a), ("x-session-ticket", "junk"), ("x-session-ticket", ticket)]),
                  "first-sid", "new")
    assert_routed(h, h.send({"x-session-token": a, "cookie": f"sa_ticket=junk; sa_ticket={ticket}"}), "first-sid", "new")
    assert_routed(h, h.send({"x-session-token": a, "x-session-ticket": "junk", "cookie": f"sa_ticket={ticket}"}),
                  "first-sid", "new")
    h.stats_delta(before, {"requests": 18, "outcome.rejected": 4, "outcome.sticky": 1, "outcome.new": 13,
                           "token.invalid.bad_signature": 3, "token.invalid.malformed": 1, "ticket.ignored": 3})


def test_tickets_replayed_across_sessions_or_forged_are_ignored(h):
    # Two sessions whose primaries differ.
    alice = "alice-ticket"
    bob = next(f"bob-{i}" for i in range(1000) if h.ranking(f"bob-{i}")[0] != h.ranking(alice)[0])
    ta, tb = h.token(alice), h.token(bob)
    r = h.send({"x-session-token": ta})
    assert_routed(h, r, alice)
    alice_ticket = r.header("x-session-ticket")
    assert harness.verify_jwt(alice_ticket, TICKET_KEY_B64)["node"] == node_id(h.ranking(alice)[0])
    assert_routed(h, h.send({"x-session-token": ta, "x-session-ticket": alice_ticket}), alice, "sticky")
    before = h.settled_stats()

    now = int(time.time())
    alice_node = node_id(h.ranking(alice)[0])  # a node bob's ranking does not put first

    def ticket(claims: dict, key: str = TICKET_KEY_B64, header: dict | None = None, digest=hashlib.sha256) -> str:
        return signed(segment(header or {"alg": "HS256", "typ": "JWT"}), segment(claims), key, digest)

    bob_claims = {"sid": bob, "node": alice_node, "iat": now, "exp": now + 600}
    legit_bob = ticket({"sid": bob, "node": node_id(h.ranking(bob)[0]), "iat": now, "exp": now + 600})
    hb, _, sb = legit_bob.split(".")
    forged = {
        "replayed from another session": alice_ticket,
        "signed with another key": ticket(bob_claims, key=TOKEN_KEY_B64),
        "alg none": f"{segment({'alg': 'none'})}.{segment(bob_claims)}.",
        "alg none with a MAC": ticket(bob_claims, header={"alg": "none"}),
        "alg HS512 with the ticket key": ticket(bob_claims, header={"alg": "HS512"}, digest=hashlib.sha512),
        "edited payload, old signature": f"{hb}.{segment(bob_claims)}.{sb}",
        "expired": ticket({**bob_claims, "exp": now - 1}),
        "node not hex": ticket({**bob_claims, "node": "127.0.0.1:8001"}),
        "node as a number": ticket({**bob_claims, "node": 12345}),
        "sid missing": ticket({k: v for k, v in bob_claims.items() if k != "sid"}),
        "oversized": ticket({**bob_claims, "pad": "x" * 2000}),
    }
    for name, t in forged.items():
        for headers in ({"x-session-token": tb, "x-session-ticket": t}, {"x-session-token": tb, "cookie": f"sa_ticket={t}"}):
            r = h.send(headers)
            hd = assert_routed(h, r, bob)  # bob's own ranking, never alice's node
            assert "x-session-previous-node" not in hd, name
            # A fresh ticket for bob's real node replaces the useless one.
            fresh = harness.verify_jwt(r.header("x-session-ticket"), TICKET_KEY_B64)
            assert fresh["sid"] == bob and fresh["node"] == node_id(h.ranking(bob)[0]), name
    n = 2 * len(forged)
    h.stats_delta(before, {"ticket.ignored": n, "outcome.new": n, "outcome.sticky": 0, "outcome.moved": 0,
                           "ticket.issued": n, "requests": n})

    # A ticket the filter itself signed for bob (an old one) may only name a node that
    # served him: pinned mode keeps him there while it is healthy (sticky), and a node
    # that is not in the healthy set is never routed to (moved, with the old node named).
    before = h.settled_stats()
    other = h.ranking(bob)[1]
    r = h.send({"x-session-token": tb, "x-session-ticket": ticket({**bob_claims, "node": node_id(other)})})
    assert r.status == 200 and r.json()["address"] == other
    assert r.json()["headers"]["x-session-affinity"] == ["sticky"]
    gone = node_id("127.0.0.1:1")
    r = h.send({"x-session-token": tb, "x-session-ticket": ticket({**bob_claims, "node": gone})})
    hd = assert_routed(h, r, bob, "moved")
    assert hd["x-session-previous-node"] == [gone]
    h.stats_delta(before, {"outcome.sticky": 1, "outcome.moved": 1, "ticket.ignored": 0, "requests": 2})


SPELLINGS = [
    lambda n: n,
    lambda n: n.upper(),
    lambda n: n.title(),
    lambda n: n.replace("-", "_"),
    lambda n: n.replace("-", "_").upper(),
    lambda n: n.replace("-", "_", 1),
    lambda n: "-".join(p.capitalize() if i % 2 else p for i, p in enumerate(n.split("-"))),
]


def spoofed_headers(victim_node: str) -> list[tuple[str, str]]:
    """Every reserved header in every spelling, each twice, with values a client would
    like the node to believe."""
    values = {
        "x-gateway-destination-endpoint": victim_node,
        "x-session-id": "victim-session",
        "x-session-affinity": "sticky",
        "x-session-previous-node": "0000000000000001",
    }
    out = []
    for name in RESERVED:
        for spell in SPELLINGS:
            out += [(spell(name), values[name]), (spell(name), values[name] + "-dup")]
    return out


def assert_no_client_copy(hd: dict) -> None:
    """No header a client sent in any spelling of a reserved name reached the node."""
    canon = {k: k.replace("_", "-").lower() for k in hd}
    leaked = [k for k, c in canon.items() if c in RESERVED and k != c]
    assert not leaked, leaked
    for name in RESERVED:
        for v in hd.get(name, []):
            assert v not in ("victim-session", "sticky-dup", "0000000000000001") and "victim" not in v, (name, v)


def test_filter_headers_sent_by_clients_in_every_spelling(h):
    before = h.settled_stats()
    sid = "spelling-session"
    tok = h.token(sid)
    victim = h.ranking(sid)[-1]  # a real cluster host the ranking puts last
    spoofed = spoofed_headers(victim)
    assert len(spoofed) == 4 * len(SPELLINGS) * 2
    # With a valid token: the filter's values, and the ranking's node.
    hd = assert_routed(h, h.send([("x-session-token", tok)] + spoofed), sid)
    assert_no_client_copy(hd)
    assert "x-session-previous-node" not in hd
    # Spoofed headers before and after the token, and mixed with a ticket (sticky).
    r = h.send(spoofed[:20] + [("x-session-token", tok)] + spoofed[20:])
    assert_no_client_copy(assert_routed(h, r, sid))
    ticket = r.header("x-session-ticket")
    hd = assert_routed(h, h.send(spoofed + [("x-session-token", tok), ("x-session-ticket", ticket)]), sid, "sticky")
    assert_no_client_copy(hd)
    assert "x-session-previous-node" not in hd
    # A moved session: the filter's previous-node, one value.
    gone = node_id("127.0.0.1:1")
    now = int(time.time())
    moved_ticket = signed(segment({"alg": "HS256"}), segment({"sid": sid, "node": gone, "iat": now, "exp": now + 600}),
                          TICKET_KEY_B64)
    hd = assert_routed(h, h.send(spoofed + [("x-session-token", tok), ("x-session-ticket", moved_ticket)]), sid, "moved")
    assert hd["x-session-previous-node"] == [gone]
    assert_no_client_copy(hd)
    # No token at all: a minted session, the client's values gone.
    r = h.send(spoofed)
    minted = harness.decode_jwt_payload(r.header("x-session-token"))["sid"]
    assert minted != "victim-session"
    assert_no_client_copy(assert_routed(h, r, minted))
    # Only the spoofed override header, as a bare client would send it: still ignored.
    for spell in SPELLINGS:
        name = spell("x-gateway-destination-endpoint")
        hd = assert_routed(h, h.send([(name, victim), ("x-session-token", tok)]), sid)
        assert_no_client_copy(hd)
    # An invalid token: 401, nothing forwarded at all.
    r = h.send(spoofed + [("x-session-token", tok[:-4] + "AAAA")])
    assert_401(r, "bad_signature")
    n = 6 + len(SPELLINGS)
    h.stats_delta(before, {"requests": n, "outcome.new": 3 + len(SPELLINGS), "outcome.sticky": 1, "outcome.moved": 1,
                           "outcome.rejected": 1, "token.minted": 1})
