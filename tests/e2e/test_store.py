"""The store contract (DESIGN section 8) and the OpenAI-compatible endpoint, end to end
on real processes: a Redis Cluster (3 masters + 3 replicas) reached through Envoy's
redis_proxy, Envoy with the filter, chat nodes, all on free ports.

- Two and three chat nodes append to ONE conversation at the same moment (each request
  marked `sticky`, so every node trusts its own soon-stale copy), with and without
  `turn`: the turns the store holds are exactly the turns acknowledged with 200, in the
  order the replies reported (turn number and history_digest checked against the stored
  list), none twice.
- The same while the Redis master that holds the conversation is SIGKILLed and its
  replica takes over.
- A streamed completion through Envoy and the filter: the filter's cookies and headers
  arrive with the response head, the events arrive as the modelled decode produces them,
  and `/v1/chat` and `/v1/chat/completions` continue one history.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time

import sa_harness as harness


def digest(messages) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(m.encode("utf-8") + b"\n")
    return h.hexdigest()


def post(port: int, path: str, body: dict, headers: dict, timeout: float = 60.0) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"content-type": "application/json", **headers})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(data) if data else {}
    finally:
        conn.close()


class Hammer:
    """`workers` client threads per node, all appending to conversation `sid`."""

    def __init__(self, ports: list[int], sid: str, workers: int, sends: int, with_turn: bool):
        self.ports, self.sid, self.workers, self.sends, self.with_turn = ports, sid, workers, sends, with_turn
        self.acked: list[tuple[int, str, str]] = []
        self.conflicts = 0
        self.errors: list[str] = []
        self.slowest = 0.0
        self.lock = threading.Lock()

    def client(self, n: int, w: int) -> None:
        nxt = 1
        for t in range(self.sends):
            m = f"node{n}-client{w}-{t}"
            body = {"message": m, **({"turn": nxt} if self.with_turn else {})}
            headers = {"x-session-id": self.sid, "x-session-affinity": "sticky"}
            started = time.monotonic()
            status, _, v = post(self.ports[n], "/v1/chat", body, headers)
            took = time.monotonic() - started
            with self.lock:
                self.slowest = max(self.slowest, took)
                if status == 200:
                    self.acked.append((v["turn"], m, v["history_digest"]))
                    nxt = v["turn"] + 1
                elif status == 409 and self.with_turn:
                    self.conflicts += 1
                    nxt = v["turns"] + 1
                else:
                    self.errors.append(f"{status} {v}")

    def run(self) -> "Hammer":
        threads = [threading.Thread(target=self.client, args=(n, w)) for n in range(len(self.ports))
                   for w in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self


def stored_messages(stack, sid: str) -> list[str]:
    """The conversation's entries, read through Envoy's redis_proxy; each entry's number
    is checked."""
    raw = harness.resp_command(stack.ports.redis_proxy, "LRANGE", f"sa:turns:{{{sid}}}", "0", "-1", timeout=10)
    out = []
    for i, e in enumerate(raw):
        entry = json.loads(e)
        assert entry["n"] == i + 1, f"entry {i}: {e}"
        out.append(entry["user"])
    return out


def check_store_matches(stack, sid: str, h: Hammer) -> None:
    stored = stored_messages(stack, sid)
    assert not h.errors, h.errors[:5]
    assert len(stored) == len(h.acked), f"stored {len(stored)} turns, acknowledged {len(h.acked)}"
    assert len(set(stored)) == len(stored), "a turn is stored twice"
    for turn, m, d in h.acked:
        assert stored[turn - 1] == m, f"turn {turn}: stored {stored[turn - 1]!r}, acknowledged {m!r}"
        assert d == digest(stored[:turn]), f"turn {turn}: digest differs from the stored history"


def test_concurrent_appends_from_several_nodes_lose_and_duplicate_nothing(full_stack):
    stack = full_stack()
    ports = list(stack.ports.nodes)
    for count, with_turn in [(2, False), (3, False), (2, True), (3, True)]:
        sid = f"shared-{count}-{with_turn}"
        h = Hammer(ports[:count], sid, workers=2, sends=15, with_turn=with_turn).run()
        check_store_matches(stack, sid, h)
        if not with_turn:
            assert len(h.acked) == count * 2 * 15
        print(f"{count} nodes, turn={with_turn}: {len(h.acked)} acknowledged = stored, {h.conflicts} client 409s")
    conflicts = sum(n.stats()["append_conflicts"] for n in stack.nodes)
    assert conflicts > 0, "the nodes never raced: the test proves nothing"


def test_a_master_failover_during_concurrent_appends_loses_nothing(full_stack):
    # Each node retries a Redis command for up to 15 s (default 5 s): a failover takes
    # a few seconds, more on a loaded machine, and this test is about what is stored,
    # not about the budget (a turn that ran out of budget would be a 503, which this
    # client, sending without `turn`, must not retry).
    stack = full_stack(node_args=["--redis-retry-ms", "15000"])
    ports = list(stack.ports.nodes)
    sid = "failover-shared"
    key = f"sa:turns:{{{sid}}}"
    # A first turn creates the key, so we know which master holds it.
    assert post(ports[0], "/v1/chat", {"message": "first"}, {"x-session-id": sid})[0] == 200
    victim_port = stack.redis.master_for(key)
    replica = stack.redis.replica_of(victim_port)
    h = Hammer(ports, sid, workers=2, sends=40, with_turn=False)
    runner = threading.Thread(target=h.run)
    runner.start()
    # Kill the master once the appends are under way (an event: some turns acknowledged).
    harness.wait_for(lambda: len(h.acked) >= 20, 60, "20 concurrent turns acknowledged")
    stack.redis.node(victim_port).kill()
    runner.join()
    harness.wait_for(lambda: stack.redis.master_for(key) == replica, 30, "the replica to serve the key")
    h.acked.append((1, "first", digest(["first"])))
    check_store_matches(stack, sid, h)
    retries = sum(n.stats()["redis_retries"] for n in stack.nodes)
    print(f"failover: {len(h.acked)} acknowledged = stored; slowest turn {h.slowest:.2f}s; "
          f"{retries} Redis retries on the nodes")
    assert retries > 0, "the kill did not hit the appends: the test proves nothing"


def sse_events(port: int, path: str, body: dict, headers: dict, on_first_content=None
               ) -> tuple[int, dict, list[tuple[float, str]]]:
    """POSTs and reads a server-sent event stream as it arrives: (status, headers,
    [(arrival time, data)]). `on_first_content()` runs when the first event with content
    has arrived, before the rest is read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"content-type": "application/json", **headers})
    r = conn.getresponse()
    head = {}
    for k, v in r.getheaders():
        head.setdefault(k.lower(), []).append(v)
    events, buf = [], b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            line = event.decode()
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if on_first_content and data != "[DONE]" and json.loads(data)["choices"][0]["delta"].get("content"):
                on_first_content()
                on_first_content = None
            events.append((time.monotonic(), data))
    conn.close()
    return r.status, head, events


def test_streamed_completion_through_envoy_carries_the_cookies_and_arrives_incrementally(full_stack):
    decode_us = 250_000
    stack = full_stack(node_args=["--decode-us-per-token", str(decode_us)])
    port = stack.ports.listen
    # Turn 1 over /v1/chat through Envoy: the filter mints a session.
    status, headers, v = post(port, "/v1/chat", {"message": "hello from chat"}, {})
    assert status == 200, v
    token = headers["x-session-token"]
    # The token only: turn 2 is placed as a session without a ticket, so the streamed
    # response carries a fresh ticket (its set-cookie must come with the head).
    jar = {"x-session-token": token}

    # Turn 2 streamed over the OpenAI endpoint, same session.
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "and now streamed"}]}
    stored_at_first_event = []
    sent = time.monotonic()
    status, head, events = sse_events(
        port, "/v1/chat/completions", body, jar,
        on_first_content=lambda: stored_at_first_event.append(sum(n.stats()["turns"] for n in stack.nodes)))
    assert status == 200
    assert head["content-type"] == ["text/event-stream"]
    # The filter's ticket arrives with the response head (a set-cookie), before any event.
    assert any(c.startswith("sa_ticket=") for c in head.get("set-cookie", [])), head
    assert head["x-served-by"][0] in {n.node_id for n in stack.nodes}
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    timed = [(t, c["choices"][0]["delta"].get("content")) for (t, _), c in zip(events, chunks)]
    content = [(t, piece) for t, piece in timed if piece]
    text = "".join(p for _, p in content)
    assert text.startswith("turn 2: you said 'and now streamed'; earlier you mentioned 'hello from chat'"), text
    tokens = len(text.split())
    assert len(content) == tokens
    # Incremental, shown by an event: when the first token's event reached the client
    # through Envoy, the node had not stored turn 2 yet (it does so after the last token,
    # (tokens - 1) x 250 ms later); had Envoy or the node buffered the stream, the turn
    # would have been stored first. Paced: the last event cannot come before every
    # token's modelled decode (a lower bound; a sleep is never shorter).
    assert stored_at_first_event == [1], stored_at_first_event
    assert content[-1][0] - sent >= tokens * decode_us / 1e6, f"{content[-1][0] - sent:.3f}s for {tokens} tokens"
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["session_affinity"]["turn"] == 2
    assert final["session_affinity"]["history_digest"] == digest(["hello from chat", "and now streamed"])

    # Turn 3 back on /v1/chat: one history.
    status, _, v3 = post(port, "/v1/chat", {"message": "third", "turn": 3}, jar)
    assert status == 200, v3
    assert v3["turn"] == 3
    assert v3["history_digest"] == digest(["hello from chat", "and now streamed", "third"])
