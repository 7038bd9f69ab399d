"""Conversations end to end through real processes: a Redis Cluster (3 masters + 3
replicas), Envoy 1.40 with the reference config and the filter, three chat nodes, all on
free ports. Every client computes `history_digest` itself, so a lost, repeated or
reordered turn shows.

Faults: a chat node SIGKILLed mid-run, a Redis master SIGKILLed mid-run, a restart of
the whole harness, and an Envoy retry that lands on a node holding a stale copy.
"""

from __future__ import annotations

import hashlib
import threading
import time

import sa_harness as harness

Conversation = harness.Conversation


def digest(messages) -> str:
    """DESIGN section 8, computed here: SHA-256 of the user messages, each + "\\n"."""
    h = hashlib.sha256()
    for m in messages:
        h.update(m.encode("utf-8") + b"\n")
    return h.hexdigest()


def message(c: Conversation, turn: int) -> str:
    # Non-ASCII on purpose: the digest is over UTF-8.
    return f"{c.name} says #{turn}: {'héllo ☃' if turn % 2 else 'plain'}"


def conversations(stack, n: int, prefix: str = "c") -> list[Conversation]:
    """New visitors: the filter mints their sessions (random ids)."""
    return [Conversation(stack.ports.listen, f"{prefix}{i}") for i in range(n)]


def placed_conversations(stack, per_node: list[int], prefix: str) -> list[Conversation]:
    """Conversations whose session ids (signed tokens, fixed ids) are chosen by the
    independent ranking so that `per_node[i]` of them rank `stack.nodes[i]` first: which
    node a fixed id ranks first depends on the nodes' (free) ports, so choosing the ids
    makes the placement exact instead of lucky."""
    hosts = [(n.address, 1) for n in stack.nodes]
    left = list(per_node)
    out = []
    for i in range(100_000):
        sid = f"{prefix}-{i}"
        k = [n.address for n in stack.nodes].index(harness.rank(sid, hosts)[0])
        if left[k]:
            left[k] -= 1
            out.append(Conversation(stack.ports.listen, sid, cookies={"session_token": harness.session_token(sid)}))
        if not any(left):
            return out
    raise AssertionError("not enough session ids with the wanted placement")


def ranked_first(stack, c: Conversation) -> str:
    """The node id of the chat node the independent ranking puts first for `c`."""
    best = harness.rank(c.session_id, [(n.address, 1) for n in stack.nodes])[0]
    return stack.node_by_address(best).node_id


def assert_contiguous(convs: list[Conversation], turns: int) -> None:
    """Zero lost turns: every conversation's replies are turns 1..n in order, each with
    the digest of exactly the messages this client sent."""
    for c in convs:
        assert [t.turn for t in c.turns] == list(range(1, turns + 1)), (c.name, [t.turn for t in c.turns])
        for i, t in enumerate(c.turns):
            assert t.digest == digest(c.said[: i + 1]), f"{c.name}: digest of turn {i + 1} differs"
        assert not c.check()


def wait_stats(stack, want: dict[str, int], timeout: float = 10.0) -> dict[str, int]:
    """Envoy's filter stats once every entry of `want` holds (counters are flushed on a
    timer)."""
    got: dict[str, int] = {}

    def check() -> bool:
        nonlocal got
        got = stack.envoy.stats()
        return all(got.get(k, 0) == v for k, v in want.items())

    try:
        harness.wait_for(check, timeout, "stats")
    except harness.HarnessError:
        diff = {k: (got.get(k, 0), v) for k, v in want.items() if got.get(k, 0) != v}
        raise AssertionError(f"stats (got, want): {diff}") from None
    return got


def retries(convs: list[Conversation]) -> int:
    return sum(t.attempts - 1 for c in convs for t in c.turns)


# --------------------------------------------------------------------------------------


def test_fifty_conversations_of_six_turns(full_stack):
    stack = full_stack()
    convs = conversations(stack, 50)
    harness.run_turns(convs, message, 6)

    assert_contiguous(convs, 6)
    for c in convs:
        # Sticky: one node for the whole conversation, from its memory after turn 1.
        assert len({t.node for t in c.turns}) == 1, (c.name, [t.node for t in c.turns])
        assert [t.context for t in c.turns] == ["new"] + ["memory"] * 5, c.name
    assert retries(convs) == 0, [e for c in convs for e in c.errors]

    served = {}
    for c in convs:
        served[c.turns[0].node] = served.get(c.turns[0].node, 0) + 6
    want = {"requests": 300, "outcome.new": 50, "outcome.sticky": 250, "outcome.moved": 0, "upstream.errors": 0,
            "token.minted": 50, "served.primary": 300}
    for n in stack.nodes:
        want[f"node.{harness.metric_label(n.address)}.requests"] = served.get(n.node_id, 0)
    got = wait_stats(stack, want)
    # Placement (the reference config bounds loads): each new session placed once, and
    # exactly the `bounded` ones off the node their ranking puts first.
    off_first = [c.name for c in convs if c.turns[0].node != ranked_first(stack, c)]
    assert got.get("placement.first_choice", 0) + got.get("placement.bounded", 0) == 50, got
    assert len(off_first) == got.get("placement.bounded", 0), (off_first, got)
    print(f"turns per node: {served}; placed off their first choice by load: {off_first}")


def test_killed_chat_node_loses_no_turn(full_stack):
    # The ranking alone: this test chooses its sessions' nodes by their rankings.
    stack = full_stack(mutate=harness.without_placement)
    convs = placed_conversations(stack, [14, 13, 13], "killed")
    harness.run_turns(convs, message, 3)
    home = {c.name: c.turns[-1].node for c in convs}
    counts = {n.node_id: sum(1 for h in home.values() if h == n.node_id) for n in stack.nodes}
    assert counts == {"node-1": 14, "node-2": 13, "node-3": 13}, counts
    victim = stack.node("node-1")
    print(f"conversations per node after turn 3: {counts}; SIGKILL {victim.node_id}")

    victim.kill()  # no pause: the first turns race Envoy's health checks
    t0 = time.monotonic()
    harness.run_turns(convs, message, 3)
    print(f"turns 4-6 took {time.monotonic() - t0:.1f}s; client retries: {retries(convs)}")

    assert_contiguous(convs, 6)
    moved = [c for c in convs if home[c.name] == victim.node_id]
    stayed = [c for c in convs if home[c.name] != victim.node_id]
    assert (len(moved), len(stayed)) == (14, 26)
    for c in moved:
        new_home = c.turns[3].node
        assert new_home != victim.node_id
        # First turn on the new node: restored from Redis; then from its memory.
        assert [t.context for t in c.turns[3:]] == ["store", "memory", "memory"], (c.name, c.turns)
        assert {t.node for t in c.turns[3:]} == {new_home}, c.name
    for c in stayed:
        assert [t.context for t in c.turns] == ["new"] + ["memory"] * 5, (c.name, c.turns)
        assert {t.node for t in c.turns} == {home[c.name]}, c.name
    stack.wait_healthy(2)

    # No client saw an error: the turns that raced the health checks were retried by
    # Envoy onto their fallback node (more at once than Envoy's default of 3 concurrent
    # retries, hence circuit_breakers.max_retries in envoy.yaml), and the rest were
    # routed by the filter as `moved`.
    # The filter's counters are flushed on each VM's timer: wait for the moves to show
    # (the assertion below still names the split if they never add up).
    def moves_counted() -> bool:
        got = stack.envoy.stats()
        return got.get("served.fallback", 0) + got.get("outcome.moved", 0) >= len(moved)

    try:
        harness.wait_for(moves_counted, 15, "the filter's stats to count every moved conversation")
    except harness.HarnessError:
        pass
    stats = stack.envoy.stats()
    retried, moved_outcome = stats.get("served.fallback", 0), stats.get("outcome.moved", 0)
    overflow = stack.envoy.admin("/stats?filter=^cluster\\.chat_nodes\\.upstream_rq_retry_overflow$")
    print(f"moved conversations: {len(moved)}; via Envoy retries {retried}, via the filter (moved) {moved_outcome}; "
          f"{overflow.strip()}")
    assert retried + moved_outcome == len(moved), stats
    assert overflow.strip().endswith(": 0")
    assert retries(convs) == 0, [e for c in convs for e in c.errors]
    assert stats.get("upstream.errors", 0) == 0, stats


def test_killed_redis_master_fails_over_without_losing_turns(full_stack):
    stack = full_stack()
    convs = conversations(stack, 30)
    harness.run_turns(convs, message, 2)

    # The master that holds the most of these conversations.
    owners = {c.name: stack.redis.master_for(f"sa:turns:{{{c.session_id}}}") for c in convs}
    victim_port = max(set(owners.values()), key=list(owners.values()).count)
    replica_port = stack.redis.replica_of(victim_port)
    affected = [c for c in convs if owners[c.name] == victim_port]
    assert replica_port is not None and affected
    replica = stack.redis.node(replica_port)
    print(f"SIGKILL Redis master {victim_port} ({len(affected)} of {len(convs)} conversations); "
          f"its replica is {replica_port}")

    promoted: dict[str, float] = {}

    def watch(t0: float) -> None:
        deadline = t0 + 60
        while time.monotonic() < deadline and "ok" not in promoted:
            try:
                if "master" not in promoted and replica.role() == "master":
                    promoted["master"] = time.monotonic() - t0
                if "master" in promoted and stack.redis.ok():
                    promoted["ok"] = time.monotonic() - t0
            except (harness.HarnessError, OSError):
                pass
            time.sleep(0.05)

    t0 = time.monotonic()
    stack.redis.node(victim_port).kill()
    watcher = threading.Thread(target=watch, args=(t0,), daemon=True)
    watcher.start()
    harness.run_turns(convs, message, 4)
    elapsed = time.monotonic() - t0
    watcher.join(timeout=60)
    slowest = max(t.seconds for c in convs for t in c.turns[2:])
    node_stats = [n.stats() for n in stack.nodes]
    print(f"replica promoted after {promoted.get('master', -1):.1f}s, cluster_state ok after "
          f"{promoted.get('ok', -1):.1f}s; turns 3-6 took {elapsed:.1f}s, slowest turn {slowest:.1f}s; "
          f"client retries {retries(convs)}; node redis_retries "
          f"{[s['redis_retries'] for s in node_stats]}, store_failures {[s['store_failures'] for s in node_stats]}")

    assert_contiguous(convs, 6)
    assert "master" in promoted and "ok" in promoted, promoted
    assert victim_port not in stack.redis.masters() and replica_port in stack.redis.masters()
    # Envoy's redis_proxy follows the new master: the affected conversations' keys were
    # written after the failover (every turn writes), and the nodes waited it out.
    assert sum(s["redis_retries"] for s in node_stats) > 0
    for c in convs:
        assert len({t.node for t in c.turns}) == 1, c.name
        assert [t.context for t in c.turns] == ["new"] + ["memory"] * 5, (c.name, c.turns)


def test_whole_harness_restart_resumes_from_redis(full_stack):
    stack = full_stack()
    convs = conversations(stack, 20)
    harness.run_turns(convs, message, 3)
    before = {c.name: c.turns[-1].node for c in convs}
    redis_pids = [n.pid for n in stack.redis.nodes]

    # Everything stops: chat nodes, Envoy, and Redis (SIGTERM: each Redis node flushes
    # its append-only file). Then everything starts again on the same ports, Redis from
    # its AOF and nodes.conf.
    t0 = time.monotonic()
    stack.stop()
    assert not stack.listening(), stack.listening()
    stack.start()
    print(f"restart of the whole harness took {time.monotonic() - t0:.1f}s")
    assert not set(redis_pids) & {n.pid for n in stack.redis.nodes}

    harness.run_turns(convs, message, 3)
    assert_contiguous(convs, 6)
    for c in convs:
        # Same ports, so the affinity ticket still names a live node: sticky, and that
        # node restores the conversation from Redis on its first turn.
        assert [t.node for t in c.turns[3:]] == [before[c.name]] * 3, c.name
        assert [t.context for t in c.turns[3:]] == ["store", "memory", "memory"], (c.name, c.turns)


def _no_active_health_checks(cfg: dict) -> None:
    # Envoy keeps listing a dead node as healthy (no health checks, no outlier
    # detection), so the filter keeps choosing it and Envoy's retry walks to the next
    # entry of the override header: the window that health checks make short, made
    # permanent so the test is deterministic.
    chat = harness.cluster(cfg, "chat_nodes")
    chat.pop("health_checks", None)
    chat.pop("outlier_detection", None)


def test_retry_on_a_fallback_node_reloads_its_stale_copy(full_stack):
    """Conversation on A, then on B, then B dies: Envoy retries the next turn on A (the
    override header's next entry) with `x-session-affinity: sticky`, and A holds a copy
    two turns old. A sees it is not the header's first entry and reloads from Redis."""
    stack = full_stack(mutate=_no_active_health_checks)
    c = Conversation(stack.ports.listen, "fallback")
    c.send("one")
    c.send("two")
    sid = c.session_id
    ranking = harness.rank(sid, [(n.address, 1) for n in stack.nodes])
    a = stack.node_by_address(ranking[0])
    b = stack.node_by_address(ranking[1])
    assert {t.node for t in c.turns} == {a.node_id}

    # Move the conversation to B with a ticket naming B (signed with the harness's
    # ticket key: what the filter issues after B served it).
    now = int(time.time())
    c.cookies["sa_ticket"] = harness.sign_jwt(
        {"sid": sid, "node": harness.node_id(b.address), "iat": now, "exp": now + 600},
        key_b64=harness.TICKET_KEY_B64, kid=None)
    assert (c.send("three").node, c.turns[-1].context) == (b.node_id, "store")
    assert (c.send("four").node, c.turns[-1].context) == (b.node_id, "memory")

    b.kill()
    t5 = c.send("five")
    assert (t5.turn, t5.node, t5.context) == (5, a.node_id, "store"), t5
    assert a.stats()["fallback"] == 1
    t6 = c.send("six")
    assert (t6.turn, t6.node, t6.context) == (6, a.node_id, "memory"), t6
    assert_contiguous([c], 6)
    assert retries([c]) == 0, c.errors
    stats = wait_stats(stack, {"requests": 6})
    assert stats.get("served.fallback") == 1, stats
