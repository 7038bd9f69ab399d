"""Placement under load (DESIGN section 10) in a real Envoy 1.40, one rule at a time, with
backends the test controls: requests held in flight to create load, load reports the
backend is told to send, and a file-based EDS that marks a node DRAINING.

The Envoys here run the reference configuration (envoy/envoy.yaml: discovery, placement
with balance_factor 150, saturation with spill, drain) on one worker, so a single filter
VM routes every request and its view of the loads is exact: the requests it routed since
the last admin poll plus that poll's `rq_active`. Expectations come from the formula and
the independent ranking (`sa_harness.rank`), never from the filter.
"""

from __future__ import annotations

import json
import threading
import time

import sa_harness as harness

TICKET_TTL = 86400


def envoy(stack, backends, eds: bool = False, plugin_update: dict | None = None, name: str = "envoy"):
    hosts = [(b.hosts[0], b.port, 1) for b in backends]
    cfg = harness.harness_config(listen=harness.free_port(), admin=harness.free_port(), hosts=hosts,
                                 eds_path=stack.workdir / f"{name}-eds.json" if eds else None,
                                 plugin_update=plugin_update)
    e = stack.envoy(cfg, name=name, concurrency=1)
    e.wait_vm_hosts(len(backends))
    return e


def ticket(sid: str, address: str) -> str:
    now = int(time.time())
    return harness.sign_jwt({"sid": sid, "node": harness.node_id(address), "iat": now, "exp": now + TICKET_TTL},
                            key_b64=harness.TICKET_KEY_B64, kid=None)


def session_headers(sid: str, pinned_to: str | None = None, **extra) -> dict:
    h = {"x-session-token": harness.session_token(sid)}
    if pinned_to is not None:
        h["x-session-ticket"] = ticket(sid, pinned_to)
    h.update(extra)
    return h


def sid_ranked(addresses: list[str], first: str, prefix: str, skip: int = 0) -> str:
    """A session id whose independent ranking over `addresses` starts with `first`."""
    found = 0
    for i in range(100_000):
        sid = f"{prefix}-{i}"
        if harness.rank(sid, [(a, 1) for a in addresses])[0] == first:
            if found == skip:
                return sid
            found += 1
    raise AssertionError("no such session id")


def seen(r: harness.Response) -> dict:
    assert r.status == 200, r
    return r.json()


def rq_active(e: harness.Envoy, address: str) -> int:
    for h in e.cluster_hosts("chat_nodes") or []:
        if harness.host_address(h) == address:
            return next((int(s.get("value", 0)) for s in h.get("stats", []) if s.get("name") == "rq_active"), 0)
    return -1


def test_bounded_placement_sends_new_sessions_past_a_loaded_node_but_never_moves_a_pinned_one(stack):
    backends = stack.backends(3)
    addresses = [b.address for b in backends]
    e = envoy(stack, backends)
    a = addresses[0]
    label = harness.metric_label(a)

    # Four requests of sessions pinned to A, held in flight until the gate file goes.
    gate = stack.workdir / "gate"
    gate.write_text("hold")
    held = []
    for i in range(4):
        sid = f"heavy-{i}"
        t = threading.Thread(target=lambda sid=sid: held.append(
            e.request("GET", "/", session_headers(sid, a, **{"x-test-hold-file": str(gate)}))), daemon=True)
        t.start()
    try:
        harness.wait_for(lambda: rq_active(e, a) == 4, 30, "four requests in flight to A")
        # The VM's load of A is 4 (every one of them passed the filter): the gauge says so.
        e.wait_stats({f"node.{label}.load": 4})
        prom = e.admin("/stats/prometheus")
        assert f'session_affinity_node_load{{node="{label}"}} 4' in prom

        # A new session whose ranking starts with A: L = 4, W = 3, A's bound is
        # ⌈1.5 × 5 / 3⌉ = 3 < 4 + 1: it goes to its ranking's second node (load 0 ≤ 3),
        # with the ranking's next nodes as fallbacks.
        sid = sid_ranked(addresses, a, "new-on-a")
        ranking = harness.rank(sid, [(x, 1) for x in addresses])
        s = seen(e.request("GET", "/", session_headers(sid)))
        assert s["address"] == ranking[1]
        assert s["headers"]["x-gateway-destination-endpoint"] == [",".join([ranking[1], ranking[0], ranking[2]])]
        assert s["headers"]["x-session-affinity"] == ["new"]

        # A session pinned to A stays there, however loaded A is: no move for balance.
        s = seen(e.request("GET", "/", session_headers("pinned-on-a", a)))
        assert s["address"] == a and s["headers"]["x-session-affinity"] == ["sticky"]

        # A new session ranked first on an idle node goes there: its first choice.
        b = addresses[1]
        s = seen(e.request("GET", "/", session_headers(sid_ranked(addresses, b, "new-on-b"))))
        assert s["address"] == b
    finally:
        gate.unlink()
    harness.wait_for(lambda: len(held) == 4, 60, "the held requests to finish")
    assert all(r.status == 200 for r in held), held
    harness.wait_for(lambda: rq_active(e, a) == 0, 30, "nothing in flight to A")
    # Once the VM's next poll shows A idle, new sessions ranked on A go there again.
    e.wait_stats({f"node.{label}.load": 0})
    s = seen(e.request("GET", "/", session_headers(sid_ranked(addresses, a, "new-on-a", skip=1))))
    assert s["address"] == a
    e.wait_stats({"placement.first_choice": 2, "placement.bounded": 1, "placement.spilled": 0,
                  "outcome.new": 3, "outcome.sticky": 5, "requests": 8})


def test_a_saturated_node_takes_no_new_session_and_spills_pinned_ones(stack):
    backends = stack.backends(3)
    addresses = [b.address for b in backends]
    # stale_ms one minute: a generous bound that only a stuck test reaches (staleness
    # itself is the next test's).
    sat = {"metric": "kv_cache_usage_perc", "threshold": 0.9, "stale_ms": 60_000, "spill": True}
    e = envoy(stack, backends, plugin_update={"placement": {"balance_factor": 150, "saturation": sat, "drain": True}})
    a, a_backend = addresses[0], backends[0]
    sid = sid_ranked(addresses, a, "spill")
    ranking = harness.rank(sid, [(x, 1) for x in addresses])

    # A says its KV cache is 95% full. The filter learns it from A's next answer: it
    # asks every upstream for a report and takes the report off the client's response.
    a_backend.set_load(0.95)
    r = e.request("GET", "/", session_headers(sid, a))
    s = seen(r)
    assert s["address"] == a and s["headers"]["x-session-affinity"] == ["sticky"]
    assert s["headers"]["endpoint-load-metrics-format"] == ["TEXT"]
    assert r.header("endpoint-load-metrics") is None
    # A client that asks for the report itself gets it.
    backends[1].set_load(0.25)
    r = e.request("GET", "/", session_headers(sid_ranked(addresses, addresses[1], "asks"),
                                              **{"endpoint-load-metrics-format": "TEXT"}))
    assert r.header("endpoint-load-metrics") == \
        "TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=0"

    # The pinned session spills off A: to its ranking's next node, told it moved (and
    # from where), pinned there by a new ticket.
    r = e.request("GET", "/", session_headers(sid, a))
    s = seen(r)
    assert s["address"] == ranking[1], (s["address"], ranking)
    assert s["headers"]["x-session-affinity"] == ["moved"]
    assert s["headers"]["x-session-previous-node"] == [harness.node_id(a)]
    new_ticket = r.header("x-session-ticket")
    assert harness.verify_jwt(new_ticket, harness.TICKET_KEY_B64)["node"] == harness.node_id(ranking[1])
    # ...and stays there with it.
    s = seen(e.request("GET", "/", {"x-session-token": harness.session_token(sid), "x-session-ticket": new_ticket}))
    assert s["address"] == ranking[1] and s["headers"]["x-session-affinity"] == ["sticky"]

    # A new session ranked first on A passes over it (one saturated skip).
    other = sid_ranked(addresses, a, "new-on-a")
    s = seen(e.request("GET", "/", session_headers(other)))
    other_ranking = harness.rank(other, [(x, 1) for x in addresses])
    assert s["address"] == other_ranking[1]

    # Hostile and malformed reports are ignored, never a trap.
    b_backend, b = backends[1], addresses[1]
    for report in ["raw:TEXT named_metrics.kv_cache_usage_perc=inf", "raw:" + "TEXT " + "x=1," * 3000,
                   "raw:JSON {\"named_metrics\":{\"kv_cache_usage_perc\":1}}", "raw:TEXT named_metrics.kv_cache_usage_perc"]:
        b_backend.set_load(report)
        s = seen(e.request("GET", "/", session_headers("on-b", b)))
        assert s["address"] == b
        s = seen(e.request("GET", "/", session_headers("on-b", b)))
        assert s["address"] == b and s["headers"]["x-session-affinity"] == ["sticky"]

    got = e.wait_stats({"placement.spilled": 1, "placement.bounded": 1, "placement.saturated_skips": 2})
    assert got["upstream.errors"] == 0
    assert harness.wasm_failures(e.log_text()) == []


def test_a_stale_load_report_no_longer_counts(stack):
    backends = stack.backends(3)
    addresses = [b.address for b in backends]
    sat = {"metric": "kv_cache_usage_perc", "threshold": 0.9, "stale_ms": 1000, "spill": True}
    e = envoy(stack, backends, plugin_update={"placement": {"saturation": sat}})
    a = addresses[0]
    backends[0].set_load(0.95)
    s = seen(e.request("GET", "/", session_headers("stale", a)))
    assert s["address"] == a
    # At least stale_ms later (a sleep is never shorter), the report no longer counts:
    # the pinned session stays, a new session ranked on A goes to A.
    backends[0].set_load(0.2)
    time.sleep(1.1)
    s = seen(e.request("GET", "/", session_headers("stale", a)))
    assert s["address"] == a and s["headers"]["x-session-affinity"] == ["sticky"]
    s = seen(e.request("GET", "/", session_headers(sid_ranked(addresses, a, "after-stale"))))
    assert s["address"] == a
    e.wait_stats({"placement.spilled": 0, "placement.bounded": 0, "placement.first_choice": 1})


def test_a_draining_node_keeps_its_conversations_takes_no_new_ones_and_loses_none_when_it_leaves(full_stack, tmp_path):
    eds = tmp_path / "eds.json"
    nodes: list[tuple[str, int, int]] = []

    def to_eds(cfg: dict) -> None:
        chat = harness.cluster(cfg, "chat_nodes")
        for ep in chat["load_assignment"]["endpoints"][0]["lb_endpoints"]:
            sa = ep["endpoint"]["address"]["socket_address"]
            nodes.append((sa["address"], sa["port_value"], 1))
        chat["type"] = "EDS"
        del chat["load_assignment"]
        chat["eds_cluster_config"] = {"eds_config": {"path_config_source": {"path": str(eds)},
                                                     "resource_api_version": "V3"}}
        cfg.setdefault("node", {"id": "placement-drain", "cluster": "placement-drain"})
        harness.write_eds(eds, nodes)

    stack = full_stack(mutate=to_eds)
    convs = [harness.Conversation(stack.ports.listen, f"drain{i}") for i in range(24)]
    ask = lambda c, t: f"{c.name} turn {t}"  # noqa: E731
    harness.run_turns(convs, ask, 2)
    home = {c.name: c.turns[-1].node for c in convs}
    counts = {n.node_id: sum(h == n.node_id for h in home.values()) for n in stack.nodes}
    victim = stack.node(max(counts, key=counts.get))
    on_victim = [c for c in convs if home[c.name] == victim.node_id]
    assert on_victim

    # HEALTHY -> DRAINING: every VM sees it (its host set counts one draining host).
    mark = stack.envoy.log_mark()
    harness.write_eds(eds, nodes, health={victim.address: "DRAINING"})
    stack.envoy.wait_vms("the draining node", lambda m: m.endswith("(1 draining)"), since=mark)
    before = stack.envoy.stats()
    harness.run_turns(convs, ask, 2)
    # No conversation moved: the draining node kept its own, from memory.
    for c in convs:
        assert [t.node for t in c.turns] == [home[c.name]] * 4, c.name
        assert [t.context for t in c.turns[2:]] == ["memory", "memory"], c.name
    got = stack.envoy.wait_stats({"placement.draining_kept": before.get("placement.draining_kept", 0) + 2 * len(on_victim)})
    assert got["outcome.moved"] == before.get("outcome.moved", 0)
    # New conversations never land on it.
    fresh = [harness.Conversation(stack.ports.listen, f"fresh{i}") for i in range(12)]
    harness.run_turns(fresh, ask, 2)
    assert all(t.node != victim.node_id for c in fresh for t in c.turns)

    # Removed: its conversations move (once), restored from the store; nothing lost.
    mark = stack.envoy.log_mark()
    harness.write_eds(eds, [n for n in nodes if n[1] != victim.port])
    stack.envoy.wait_vms("the node removed", lambda m: m.startswith("session-affinity: 2 healthy hosts in cluster")
                         and "draining" not in m, since=mark)
    harness.run_turns(convs + fresh, ask, 2)
    for c in convs + fresh:
        assert not c.check(), c.check()
        assert [t.turn for t in c.turns] == list(range(1, len(c.turns) + 1))
    for c in on_victim:
        assert c.turns[4].node != victim.node_id and c.turns[4].context == "store", (c.name, c.turns[4])
        assert c.turns[5].node == c.turns[4].node and c.turns[5].context == "memory"
    for c in convs:
        if c not in on_victim:
            assert {t.node for t in c.turns} == {home[c.name]}, c.name
    # Each of them moved exactly once, told by the filter (its node had left the set).
    got = stack.envoy.wait_stats({"outcome.moved": len(on_victim)})
    print(f"drain: {len(on_victim)} of {len(convs)} conversations on {victim.node_id}; "
          f"draining_kept {got.get('placement.draining_kept')}, moved {got.get('outcome.moved')}")
