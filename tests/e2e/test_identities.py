"""Other session identities (DESIGN section 3a), in a real Envoy, checked against the
independent Python implementation of the affinity function (`harness.rank`,
`harness.node_id`):

- unsigned sources (a header and a cookie, for trusted callers): the value is the session
  id, routed by the ranking, with tickets as for signed sessions; a value outside 1-256
  visible ASCII bytes is `401 bad_claims` under `on_invalid: reject`;
- `on_missing: client_address`: the session id is `addr:<client IP>` from Envoy's
  `source.address`, which Envoy's own `use_remote_address` / `x-forwarded-for` handling
  decides; no token, no ticket, no set-cookie;
- the counters move, and Envoy's response-code details name each local reply.
"""

from __future__ import annotations

import copy
import http.client
import re
import subprocess
import textwrap

import yaml

import sa_harness as harness

ACCESS_LOG_FORMAT = "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS%\n"

UNSIGNED_SOURCES = [
    {"header": "x-conversation-id", "unsigned": True},
    {"cookie": "conv", "unsigned": True},
    {"header": "x-session-token"},
]


def plugin(hosts: list[tuple[str, int, int]], **overrides) -> dict:
    settings = {"on_missing": "client_address", "on_invalid": "reject",
                "ticket": {"secret_base64": harness.TICKET_KEY_B64}, **overrides}
    p = harness.static_plugin(hosts, **settings)
    p["token"]["sources"] = UNSIGNED_SOURCES
    return p


def start(stack, *, use_remote_address: bool | None = None, dual_stack: bool = False):
    backends = stack.backends(3)
    hosts = [(b.hosts[0], b.port, 1) for b in backends]
    listen = harness.free_port()
    cfg = harness.harness_config(listen=listen, admin=harness.free_port(), hosts=hosts, plugin=plugin(hosts))
    chat = next(l for l in cfg["static_resources"]["listeners"] if l["name"] == "chat")
    if dual_stack:  # IPv6 and IPv4 clients on one listener
        chat["address"]["socket_address"].update({"address": "::", "ipv4_compat": True})
    hcm = chat["filter_chains"][0]["filters"][0]["typed_config"]
    if use_remote_address is not None:
        hcm["use_remote_address"] = use_remote_address
    access = stack.workdir / f"access-{listen}.log"
    harness.add_access_log(cfg, access, ACCESS_LOG_FORMAT)
    envoy = stack.envoy(cfg)
    return envoy, [b.address for b in backends], access


def ask(envoy: harness.Envoy, headers: dict | list, host: str = "127.0.0.1") -> harness.Response:
    return harness.request(envoy.port, "GET", "/", headers, host=host)


def test_unsigned_sessions_route_by_the_ranking_with_tickets(stack):
    envoy, addresses, _ = start(stack)
    weights = [(a, 1) for a in addresses]
    sids = [f"conversation-{i}" for i in range(12)] + ["user:42/chat#7", "~!$%&'*+-.^_`|"]
    tickets = {}
    for i, sid in enumerate(sids):
        # Alternate the header and the cookie source.
        headers = {"x-conversation-id": sid} if i % 2 == 0 else {"cookie": f"a=1; conv={sid}"}
        r = ask(envoy, headers)
        assert r.status == 200, r
        seen = r.json()
        ranking = harness.rank(sid, weights)
        assert seen["address"] == ranking[0], sid
        assert seen["headers"]["x-session-id"] == [sid]
        assert seen["headers"]["x-gateway-destination-endpoint"] == [",".join(ranking[:3])]
        assert seen["headers"]["x-session-affinity"] == ["new"]
        assert "session_token" not in r.cookies() and r.header("x-session-token") is None, "nothing minted"
        ticket = r.cookies()["sa_ticket"]
        payload = harness.verify_jwt(ticket, harness.TICKET_KEY_B64)
        assert payload["sid"] == sid and payload["node"] == harness.node_id(ranking[0])
        tickets[sid] = ticket
    # With its ticket, a session is sticky; the first present source wins over a signed
    # token that comes later in the list.
    for sid, ticket in tickets.items():
        r = ask(envoy, [("x-conversation-id", sid), ("x-session-ticket", ticket),
                        ("x-session-token", harness.session_token("someone-else"))])
        assert r.status == 200, r
        assert r.json()["headers"]["x-session-id"] == [sid]
        assert r.json()["headers"]["x-session-affinity"] == ["sticky"]
        assert r.json()["address"] == harness.rank(sid, weights)[0]
    n = 2 * len(sids)
    envoy.wait_stats({"requests": n, "token.unsigned": n, "token.valid": 0, "token.client_address": 0,
                      "outcome.new": len(sids), "outcome.sticky": len(sids), "ticket.issued": len(sids)})


def test_invalid_unsigned_values_are_401_bad_claims(stack):
    envoy, _, access = start(stack)
    bad = [("x-conversation-id", b"two words"), ("x-conversation-id", b"x" * 257),
           ("x-conversation-id", "caf\u00e9".encode()), ("cookie", b"conv=a\tb"), ("cookie", b"conv=")]
    for name, value in bad:
        r = ask(envoy, [(name, value)])
        assert r.status == 401, (name, value, r)
        assert r.json() == {"error": "invalid_session_token", "reason": "bad_claims"}
        assert r.header("www-authenticate") == 'Bearer error="invalid_token"'
    # The longest and the most varied valid values pass.
    for value in [b"x" * 256, b"!", bytes(range(0x21, 0x7F))]:
        r = ask(envoy, [("x-conversation-id", value)])
        assert r.status == 200, (value, r)
        assert r.json()["headers"]["x-session-id"] == [value.decode()]
    envoy.wait_stats({"token.invalid.bad_claims": len(bad), "outcome.rejected": len(bad), "token.unsigned": 3})
    lines = harness.access_log_lines(access, len(bad) + 3)
    assert [line.split()[:2] for line in lines[: len(bad)]] == [["401", "session_affinity_invalid_token"]] * len(bad)


def test_client_address_sessions_follow_envoys_source_address(stack):
    # Reference HCM settings (use_remote_address unset: false): Envoy takes the client
    # address from the last x-forwarded-for entry, so one client can stand for many.
    envoy, addresses, _ = start(stack)
    weights = [(a, 1) for a in addresses]
    clients = [(None, "addr:127.0.0.1"), ("10.0.0.1", "addr:10.0.0.1"), ("192.0.2.7", "addr:192.0.2.7"),
               ("198.51.100.1, 203.0.113.9", "addr:203.0.113.9"), ("2001:DB8:0::5", "addr:2001:db8::5"),
               ("::ffff:192.0.2.99", "addr:192.0.2.99")]
    for xff, sid in clients:
        headers = {"x-forwarded-for": xff} if xff else {}
        for _ in range(2):
            r = ask(envoy, headers)
            assert r.status == 200, r
            seen = r.json()
            ranking = harness.rank(sid, weights)
            assert seen["headers"]["x-session-id"] == [sid], (xff, seen["headers"].get("x-session-id"))
            assert seen["address"] == ranking[0], sid
            assert seen["headers"]["x-gateway-destination-endpoint"] == [",".join(ranking[:3])]
            assert seen["headers"]["x-session-affinity"] == ["new"]
            assert r.all("set-cookie") == [] and r.header("x-session-ticket") is None, "no token, no ticket"
            assert r.header("x-session-token") is None
    n = 2 * len(clients)
    envoy.wait_stats({"requests": n, "token.missing": n, "token.client_address": n, "token.minted": 0,
                      "ticket.issued": 0, "outcome.new": n})


def test_client_address_with_use_remote_address_ignores_a_forged_forwarded_for(stack):
    # At the edge (use_remote_address: true, no trusted hops), the client's own
    # x-forwarded-for is not believed: the session is the peer's address, here over IPv6.
    envoy, addresses, _ = start(stack, use_remote_address=True, dual_stack=True)
    for xff in [None, "10.0.0.1", "2001:db8::5"]:
        r = ask(envoy, {"x-forwarded-for": xff} if xff else {}, host="::1")
        assert r.status == 200, r
        seen = r.json()
        assert seen["headers"]["x-session-id"] == ["addr:::1"]
        assert seen["address"] == harness.rank("addr:::1", [(a, 1) for a in addresses])[0]
    # An IPv4 client of the same dual-stack listener is its IPv4 address.
    r = ask(envoy, {"x-forwarded-for": "10.0.0.1"})
    assert r.json()["headers"]["x-session-id"] == ["addr:127.0.0.1"]
    envoy.wait_stats({"token.client_address": 4})


def docs_snippet(marker: str) -> list:
    text = (harness.ROOT / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    (block,) = [b for b in blocks if marker in b]
    return yaml.safe_load(textwrap.dedent(block))


def request_from(source_ip: str, port: int, headers: dict) -> harness.Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source_ip, 0))
    try:
        conn.request("GET", "/", headers=headers)
        r = conn.getresponse()
        return harness.Response(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


def test_the_app_server_recipe_admits_only_the_app_server_and_strips_the_header_elsewhere(stack):
    """docs/configuration.md "Recipes": an RBAC network filter admits only the app
    server's address to its listener, and a header_mutation filter before the
    session-affinity filter strips the unsigned header on a public listener."""
    backends = stack.backends(3)
    hosts = [(b.hosts[0], b.port, 1) for b in backends]
    weights = [(b.address, 1) for b in backends]
    public = harness.free_port()
    cfg = harness.harness_config(listen=public, admin=harness.free_port(), hosts=hosts,
                                 plugin=plugin(hosts, on_missing="mint"))
    listeners = cfg["static_resources"]["listeners"]
    chat = next(l for l in listeners if l["name"] == "chat")
    app = copy.deepcopy(chat)
    app["name"] = "app"
    app_port = harness.free_port()
    app["address"]["socket_address"]["port_value"] = app_port
    rbac = docs_snippet("envoy.filters.network.rbac")[0]
    rbac["typed_config"]["rules"]["policies"]["app-server"]["principals"][0]["direct_remote_ip"]["address_prefix"] = "127.0.0.2"
    app["filter_chains"][0]["filters"].insert(0, rbac)
    listeners.append(app)
    strip = docs_snippet("envoy.filters.http.header_mutation")[0]
    chat["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"].insert(0, strip)
    envoy = stack.envoy(cfg)

    # The app server names its sessions.
    for sid in ["conv-1", "user-9:conv-3"]:
        r = request_from("127.0.0.2", app_port, {"x-conversation-id": sid})
        assert r.status == 200, r
        assert r.json()["headers"]["x-session-id"] == [sid]
        assert r.json()["address"] == harness.rank(sid, weights)[0]
    # Anyone else is refused at the connection.
    try:
        r = request_from("127.0.0.1", app_port, {"x-conversation-id": "conv-1"})
    except (OSError, http.client.HTTPException):
        pass
    else:
        raise AssertionError(f"a client other than the app server got an HTTP reply: {r}")
    # On the public listener the header never reaches the filter: a new session is minted.
    r = envoy.request("GET", "/", {"x-conversation-id": "conv-1"})
    assert r.status == 200, r
    seen = r.json()
    assert "x-conversation-id" not in seen["headers"]
    minted = harness.decode_jwt_payload(r.cookies()["session_token"])["sid"]
    assert seen["headers"]["x-session-id"] == [minted] and minted != "conv-1"
    envoy.wait_stats({"token.unsigned": 2, "token.minted": 1})


def test_envoy_refuses_a_client_address_fallback_for_invalid_tokens(tmp_path):
    """`on_invalid: client_address` (and an out-of-range startup_wait_ms) make
    on_configure fail with one line naming the field; Envoy then refuses to start."""
    harness.require_envoy()
    hosts = [("127.0.0.1", 1, 1)]
    discovery = {"admin_cluster": "envoy_admin", "cluster": "chat_nodes", "startup_wait_ms": 60001}
    cases = [
        (plugin(hosts, on_invalid="client_address"), "on_invalid: cannot be `client_address`"),
        ({**plugin(hosts), "upstream": {"discovery": discovery}}, "upstream.discovery.startup_wait_ms: must be at most 60000"),
    ]
    for i, (p, want) in enumerate(cases):
        cfg = harness.harness_config(listen=harness.free_port(), admin=harness.free_port(), hosts=hosts, plugin=p)
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = subprocess.run([str(harness.ENVOY_BIN), "-c", str(path), "--disable-hot-restart", "--concurrency", "1"],
                             capture_output=True, text=True, timeout=60, cwd=str(harness.ROOT))
        assert run.returncode != 0, f"Envoy accepted a bad config ({want})"
        lines = [l for l in (run.stdout + run.stderr).splitlines() if "invalid configuration" in l]
        assert len(lines) == 1 and want in lines[0], (want, lines)
