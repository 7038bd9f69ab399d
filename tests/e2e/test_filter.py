"""The filter inside a real Envoy 1.40 with a static host set: routing by the affinity
function, header stripping, the 401/503 replies, fallback on a dead primary, stats, and
configuration errors."""

from __future__ import annotations

import json
import random
import subprocess
import time
import uuid

import sa_harness as harness
from sa_harness import join_address, rank, sign_jwt

KEYS = [
    {"kid": "k1", "alg": "HS256", "secret_base64": harness.TOKEN_KEY_B64},
    # Two more keys, so tokens of every algorithm are routed (not only the vectors' keys).
    {"kid": "k2", "alg": "HS384", "secret_base64": "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoOEhYaHiImKi4yNjo+QkZKT"},
    {"kid": "k3", "alg": "HS512",
     "secret_base64": "BwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4/QEFCQ0RFRg=="},
]


def token_for(sid: str, key: dict | None = None, **claims) -> str:
    key = key or KEYS[0]
    now = int(time.time())
    return sign_jwt({"sid": sid, "iat": now, "exp": now + 600, **claims}, key_b64=key["secret_base64"],
                    alg=key["alg"], kid=key["kid"])


def start(stack, backends, weights=None, concurrency=2, **plugin_overrides):
    weights = weights or [1] * len(backends)
    hosts = [(b.hosts[0], b.port, w) for b, w in zip(backends, weights)]
    plugin = harness.static_plugin(hosts, **plugin_overrides)
    plugin["token"]["keys"] = KEYS
    cfg = harness.harness_config(listen=harness.free_port(), admin=harness.free_port(), hosts=hosts, plugin=plugin)
    return stack.envoy(cfg, concurrency=concurrency), hosts


def ranking(sid, hosts):
    return rank(sid, [(join_address(ip, port), w) for ip, port, w in hosts])


def test_requests_land_where_the_affinity_function_says(stack):
    # Five nodes on different loopback addresses (one IPv6), unequal weights.
    backends = [
        stack.backend("a", hosts=["127.0.0.1"]),
        stack.backend("b", hosts=["127.0.0.2"]),
        stack.backend("c", hosts=["127.0.0.3"]),
        stack.backend("d", hosts=["::1"]),
        stack.backend("e", hosts=["127.0.0.5"]),
    ]
    envoy, hosts = start(stack, backends, weights=[1, 3, 1, 2, 5])
    rng = random.Random(7)
    for i in range(150):
        sid = rng.choice([str(uuid.UUID(int=rng.getrandbits(128))), f"conv-{i}", f"会话-{i}-ü"])
        tok = token_for(sid, rng.choice(KEYS))
        r = envoy.request("POST", "/v1/chat", {"x-session-token": tok}, b'{"message":"hi"}')
        assert r.status == 200, r
        seen = r.json()
        want = ranking(sid, hosts)
        assert seen["address"] == want[0], (sid, seen["address"], want)
        assert seen["headers"]["x-gateway-destination-endpoint"] == [",".join(want[:3])]
        assert seen["headers"]["x-session-id"] == [sid]
        assert seen["headers"]["x-session-affinity"] == ["new"]
        assert "x-session-previous-node" not in seen["headers"]


def test_client_cannot_choose_the_node_or_the_session(stack):
    backends = stack.backends(4)
    envoy, hosts = start(stack, backends, on_missing="pass")
    sid = "alice-conversation"
    want = ranking(sid, hosts)
    victim_host = want[-1]  # a real cluster host that the ranking puts last
    spoofed = [
        ("x-gateway-destination-endpoint", victim_host),
        ("X-Gateway-Destination-Endpoint", victim_host),
        ("x_gateway_destination_endpoint", victim_host),
        ("x-session-id", "bob-conversation"),
        ("X_Session_Id", "bob-conversation"),
        ("x-session-affinity", "sticky"),
        ("x-session-previous-node", "0000000000000001"),
    ]
    # With a valid token: the filter's values replace the client's.
    for _ in range(5):
        r = envoy.request("GET", "/", [("x-session-token", token_for(sid))] + spoofed)
        seen = r.json()
        assert seen["address"] == want[0]
        h = seen["headers"]
        assert h["x-gateway-destination-endpoint"] == [",".join(want[:3])]
        assert h["x-session-id"] == [sid]
        assert h["x-session-affinity"] == ["new"]
        assert "x_session_id" not in h and "x_gateway_destination_endpoint" not in h
        assert "x-session-previous-node" not in h
    # Without a token (on_missing: pass): nothing of the client's survives, and Envoy's
    # fallback policy (round robin) places the requests, not the spoofed header.
    served = set()
    for _ in range(12):
        seen = envoy.request("GET", "/", spoofed).json()
        served.add(seen["address"])
        for name in ("x-gateway-destination-endpoint", "x_gateway_destination_endpoint", "x-session-id",
                     "x_session_id", "x-session-affinity", "x-session-previous-node"):
            assert name not in seen["headers"], (name, seen["headers"])
    assert len(served) == len(backends), served
    envoy.wait_stats({"requests": 17, "outcome.new": 5, "outcome.unaffined": 12, "token.missing": 12})


def test_every_rejection_reason_gets_the_contract_401(stack):
    backends = stack.backends(2)
    envoy, _ = start(stack, backends, on_missing="reject", on_invalid="reject")
    now = int(time.time())
    good = token_for("s")
    h, p, s = good.split(".")
    cases = {
        "malformed": "not-a-token",
        "oversized": "a" * 5000,
        "disallowed_alg": sign_jwt({"sid": "s", "exp": now + 60}, alg="HS256", header={"alg": "none", "typ": "JWT"}).rsplit(".", 1)[0] + ".",
        "unknown_key": sign_jwt({"sid": "s", "exp": now + 60}, kid="nope"),
        "bad_signature": f"{h}.{harness.b64url(json.dumps({'sid': 'victim', 'exp': now + 60}).encode())}.{s}",
        "expired": token_for("s", exp=now - 100),
        "not_yet_valid": token_for("s", nbf=now + 3600),
        "bad_claims": sign_jwt({"exp": now + 60, "iat": now}),
    }
    for reason, tok in cases.items():
        for headers in ({"x-session-token": tok}, {"cookie": f"session_token={tok}"}, {"authorization": f"Bearer {tok}"}):
            r = envoy.request("GET", "/", headers)
            assert r.status == 401, (reason, r)
            assert r.header("content-type") == "application/json"
            assert r.header("www-authenticate") == 'Bearer error="invalid_token"'
            assert r.json() == {"error": "invalid_session_token", "reason": reason}
            assert tok[:40] not in r.body.decode()
    r = envoy.request("GET", "/")
    assert r.status == 401 and r.json() == {"error": "invalid_session_token", "reason": "missing"}
    assert r.header("www-authenticate") == 'Bearer error="invalid_token"'
    want = {f"token.invalid.{k}": 3 for k in cases}
    want.update({"requests": 25, "outcome.rejected": 25, "token.missing": 1})
    envoy.wait_stats(want)
    # The token never reaches Envoy's log.
    assert good[:30] not in envoy.log_text()


def test_dead_primary_is_skipped_through_the_fallback_entries(stack):
    backends = stack.backends(3)
    envoy, hosts = start(stack, backends)
    by_addr = {b.address: b for b in backends}
    # A session whose primary we kill, and one whose first two nodes we kill.
    sid = "dead-primary"
    want = ranking(sid, hosts)
    assert envoy.request("GET", "/", {"x-session-token": token_for(sid)}).json()["address"] == want[0]
    by_addr[want[0]].kill()
    for _ in range(5):
        r = envoy.request("GET", "/", {"x-session-token": token_for(sid)})
        assert r.status == 200, r
        assert r.json()["address"] == want[1]
        assert r.json()["headers"]["x-gateway-destination-endpoint"] == [",".join(want)]
    sid2 = next(f"s{i}" for i in range(1000) if ranking(f"s{i}", hosts)[:2] == [want[1], want[0]])
    by_addr[want[1]].kill()
    r = envoy.request("GET", "/", {"x-session-token": token_for(sid2)})
    assert r.status == 200 and r.json()["address"] == want[2]
    envoy.wait_stats({"requests": 7, "served.primary": 1, "served.fallback": 6, "upstream.errors": 0})


def test_stats_after_a_known_sequence(stack):
    backends = stack.backends(3)
    envoy, hosts = start(stack, backends, ticket={"secret_base64": harness.TICKET_KEY_B64})
    now = int(time.time())
    served = {}

    def go(headers):
        r = envoy.request("GET", "/", headers)
        if r.status == 200:
            served[r.json()["address"]] = served.get(r.json()["address"], 0) + 1
        return r

    # Two sessions, two turns each, the ticket sent back on the second turn.
    for sid in ("alpha", "beta"):
        tok = token_for(sid)
        first = go({"x-session-token": tok})
        ticket = first.cookies()["sa_ticket"]
        second = go({"x-session-token": tok, "cookie": f"sa_ticket={ticket}"})
        assert second.json()["headers"]["x-session-affinity"] == ["sticky"]
        assert "sa_ticket" not in second.cookies()  # same node: no new ticket
    # A new visitor: minted.
    minted = go({})
    assert minted.status == 200 and minted.header("x-session-token")
    # Two bad tokens.
    assert go({"x-session-token": token_for("x", exp=now - 100)}).status == 401
    assert go({"x-session-token": token_for("x")[:-3] + "AAA"}).status == 401

    want = {
        "requests": 7,
        "outcome.new": 3, "outcome.sticky": 2, "outcome.moved": 0, "outcome.rejected": 2,
        "outcome.unaffined": 0, "outcome.no_host": 0,
        "token.valid": 4, "token.missing": 1, "token.minted": 1,
        "token.invalid.expired": 1, "token.invalid.bad_signature": 1, "token.invalid.malformed": 0,
        "ticket.issued": 3, "ticket.ignored": 0,
        "served.primary": 5, "served.fallback": 0, "upstream.errors": 0,
        "hosts.healthy": 3,
    }
    for addr, n in served.items():
        want[f"node.{harness.metric_label(addr)}.requests"] = n
    got = envoy.wait_stats(want)
    assert got["requests"] == sum(v for k, v in got.items() if k.startswith("outcome."))
    # The same numbers, as Prometheus sees them (names without the wasmcustom prefix,
    # labels from the reference stats_tags).
    prom = envoy.admin("/stats/prometheus")
    assert "session_affinity_requests{} 7" in prom
    assert 'session_affinity_outcome{outcome="sticky"} 2' in prom
    assert 'session_affinity_token_invalid{reason="expired"} 1' in prom
    for addr, n in served.items():
        assert f'session_affinity_node_requests{{node="{harness.metric_label(addr)}"}} {n}' in prom


def test_no_healthy_host_is_a_503(stack):
    # A discovery source whose cluster has no healthy host: every host fails its checks.
    b = stack.backend("sick")
    b.set_healthy(False)
    admin = harness.free_port()
    cfg = harness.harness_config(listen=harness.free_port(), admin=admin, hosts=[("127.0.0.1", b.port, 1)])
    e = stack.envoy(cfg)
    e.wait_vm_hosts(0)
    r = e.request("GET", "/", {"x-session-token": harness.session_token("s")})
    assert r.status == 503
    assert r.header("content-type") == "application/json"
    assert r.json() == {"error": "no_healthy_upstream"}
    e.wait_stats({"outcome.no_host": 1, "requests": 1})


def invalid(plugin_patch) -> dict:
    plugin = harness.static_plugin([("127.0.0.1", 1, 1)])
    plugin_patch(plugin)
    return plugin


def test_invalid_configuration_stops_envoy_naming_the_field(tmp_path):
    harness.require_envoy()
    cases = [
        (lambda p: p.update(bogus=1), "unknown field `bogus`"),
        (lambda p: p["token"]["keys"][0].update(secret_base64="c2hvcnQ="), "token.keys[0].secret_base64: key is 5 bytes"),
        (lambda p: p["token"]["keys"][0].update(alg="RS256"), "token.keys[0].alg: unknown variant `RS256`"),
        (lambda p: p["upstream"].update(discovery={"admin_cluster": "a", "cluster": "b"}), "upstream: set either"),
        (lambda p: p["upstream"]["hosts"].append({"address": "127.0.0.1:1"}), "upstream.hosts[1].address: duplicate"),
        (lambda p: p["upstream"]["hosts"][0].update(weight=0), "upstream.hosts[0].weight: must be at least 1"),
        (lambda p: p["token"].update(keys=[]), "token.keys: must list at least one key"),
        (lambda p: p.update(mode="sticky"), "mode: unknown variant `sticky`"),
        # static_plugin has no ticket: placement needs one (and pinned mode).
        (lambda p: p.update(placement={"balance_factor": 150}), "placement: needs `mode: \"pinned\"` and a `ticket`"),
        (lambda p: p.update(placement={"balance_factor": 99}, ticket={"secret_base64": harness.TICKET_KEY_B64}),
         "placement.balance_factor: must be 101-1000"),
        (lambda p: p["token"]["keys"][0].update(secret_env="NOT_SET", secret_base64=None) or p["token"]["keys"][0].pop("secret_base64"),
         "token.keys[0].secret_env: environment variable NOT_SET is not set"),
    ]
    for i, (patch, want) in enumerate(cases):
        cfg = harness.harness_config(listen=harness.free_port(), admin=harness.free_port(), hosts=[("127.0.0.1", 1, 1)],
                                     plugin=invalid(patch))
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(__import__("yaml").safe_dump(cfg))
        p = subprocess.run([str(harness.ENVOY_BIN), "-c", str(path), "--disable-hot-restart", "--concurrency", "1"],
                           capture_output=True, text=True, timeout=60, cwd=str(harness.ROOT))
        assert p.returncode != 0, f"Envoy accepted a bad config ({want})"
        lines = [l for l in (p.stdout + p.stderr).splitlines() if "invalid configuration" in l]
        assert len(lines) == 1 and want in lines[0], (want, lines)
        assert harness.TOKEN_KEY_B64 not in p.stdout + p.stderr
