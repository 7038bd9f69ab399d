"""`make run` and `make demo`: the reference harness (DESIGN section 8) on the contract's
ports, until Ctrl-C.

    python -m sa_harness.run              # `make run`: start, print how to use it, Ctrl-C stops
    python -m sa_harness.run --demo       # `make demo`: drive conversations, print the figures, stop
    python -m sa_harness.run --keep-data  # resume the Redis data of the last run
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from .figures import figures, per_node
from .paths import ROOT, RUN_DIR, MissingPrerequisite
from .procs import HarnessError, port_bindable, wait_for
from .stack import ChatNode, Conversation, Ports, Stack, _ports, _rel, run_turns


class _Stop(Exception):
    pass


def _raise_stop(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


def _check_ports_free(ports: Ports) -> None:
    busy = [p for p in ports.all() if not port_bindable(p)]
    if busy:
        raise HarnessError(
            f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use (another `make run`?); "
            f"see `ss -ltnp | grep -E ':({'|'.join(map(str, busy))})'`"
        )


def banner(ports: Ports, run_dir: Path, stack: Stack | None = None) -> str:
    n = ports.nodes
    # `make run` runs from the repository root, where the short path works.
    jar = _rel(run_dir / "cookies.txt") if Path.cwd().resolve() == ROOT else run_dir / "cookies.txt"
    pid = stack.nodes[1].pid if stack is not None and len(stack.nodes) > 1 else None
    kill = f"kill -9 {pid}" if pid else "kill -9 <pid of node-2>"
    return f"""
session-affinity harness is up (logs: {_rel(run_dir)}/*.log, {_rel(run_dir)}/redis/*/redis.log)
  Redis Cluster  {_ports(ports.redis)} (3 masters + 3 replicas), reached through Envoy's redis_proxy 127.0.0.1:{ports.redis_proxy}
  Envoy          chat listener with the filter 127.0.0.1:{ports.listen}, admin 127.0.0.1:{ports.admin}
  chat nodes     node-1 127.0.0.1:{n[0]}, node-2 127.0.0.1:{n[1]}, node-3 127.0.0.1:{n[2]}

Hold a conversation (the cookie jar keeps the session token and the affinity ticket):
  curl -s -b {jar} -c {jar} http://127.0.0.1:{ports.listen}/v1/chat -d '{{"message":"hello"}}'; echo
  curl -s -b {jar} -c {jar} http://127.0.0.1:{ports.listen}/v1/chat -d '{{"message":"what did I say first?"}}'; echo
The same conversation through the OpenAI-compatible endpoint, streamed (-N: print events as they come):
  curl -sN -b {jar} -c {jar} http://127.0.0.1:{ports.listen}/v1/chat/completions \\
    -d '{{"model":"chat-node","stream":true,"messages":[{{"role":"user","content":"and now?"}}]}}'
  (any OpenAI client works too: base_url http://127.0.0.1:{ports.listen}/v1; send the `x-session-token`
   header the first reply carried to stay in one conversation; docs/chat-node.md)

Stats: http://127.0.0.1:{ports.admin}/stats?filter=session_affinity  (Prometheus: http://127.0.0.1:{ports.admin}/stats/prometheus)
Try: {kill} (node-2), then talk again: a conversation on node-2 moves and keeps its turns.
Ctrl-C stops everything.
"""


def demo(stack: Stack, say: Callable[[str], None], conversations: int = 12) -> dict:
    """Drives conversations through the harness with one node failure in the middle,
    then prints the DESIGN section 7 figures computed from Envoy's stats."""
    assert stack.envoy is not None
    port = stack.ports.listen
    rng = random.Random(1)
    topics = ["the weather", "a recipe", "Rust lifetimes", "a trip to Lisbon", "jazz", "chess openings"]
    convs = [Conversation(port, f"conv-{i + 1}") for i in range(conversations)]
    ask = lambda c, t: f"{c.name} turn {t}: tell me about {rng.choice(topics)}"  # noqa: E731

    def busiest() -> ChatNode:
        return max(stack.nodes, key=lambda n: sum(1 for c in convs if c.turns[-1].node == n.node_id))

    def held(node: ChatNode) -> int:
        return sum(1 for c in convs if c.turns[-1].node == node.node_id)

    say(f"demo: {conversations} conversations x 3 turns")
    run_turns(convs, ask, 3)
    victim = busiest()
    say(f"demo: SIGKILL {victim.node_id} (it holds {held(victim)} of them) and go on at once: 2 turns each "
        "(Envoy retries onto the fallback node)")
    victim.kill()
    run_turns(convs, ask, 2)
    say(f"demo: restart {victim.node_id}; 1 turn each (pinned: moved conversations stay where they are)")
    victim.start()
    stack.wait_healthy(len(stack.nodes), 30)
    run_turns(convs, ask, 1)
    victim = busiest()
    say(f"demo: SIGKILL {victim.node_id} (it holds {held(victim)}), wait until the filter has noticed, "
        "then 2 turns each (the filter moves them)")
    victim.kill()
    stack.wait_healthy(len(stack.nodes) - 1, 30)
    run_turns(convs, ask, 2)
    victim.start()
    stack.wait_healthy(len(stack.nodes), 30)

    problems = [p for c in convs for p in c.check()]
    moved = sum(1 for c in convs if len({t.node for t in c.turns}) > 1)
    retries = sum(t.attempts - 1 for c in convs for t in c.turns)
    # The filter flushes its counters on a timer: wait until every attempt is counted.
    # (Attempts that got no HTTP answer at all may never have reached Envoy.)
    attempts = sum(len(c.turns) + sum(1 for e in c.errors if not e.startswith("0 ")) for c in convs)
    wait_for(lambda: stack.envoy.stats().get("requests", 0) >= attempts, 30, f"the filter to count {attempts} requests")
    stats = stack.envoy.stats()
    f = figures(stats)
    say("")
    say(f"turns acknowledged: {sum(len(c.turns) for c in convs)}, lost or out of order: {len(problems)}, "
        f"client retries after an error reply: {retries}, conversations that moved: {moved}")
    say("Envoy stats (wasmcustom.session_affinity.*):")
    notes = {
        "outcome.moved": "the filter sent a conversation to a new node",
        "served.fallback": "Envoy retried onto the next node (the node died before the filter noticed)",
        "upstream.errors": "5xx or no answer from a chat node",
    }
    for k in ["requests", "outcome.new", "outcome.sticky", "outcome.moved", "served.primary", "served.fallback",
              "upstream.errors"]:
        say(f"  {k:<16} {stats.get(k, 0):>4}   {notes.get(k, '')}".rstrip())
    for node, count in per_node(stats).items():
        say(f"  node.{node}.requests {count}")
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    say(f"sticky rate            {pct(f['sticky_rate'])}   sticky / (sticky + moved); "
        "moves through Envoy retries count as sticky")
    conc = f["concentration"]
    say(f"per-node concentration {'n/a' if conc is None else f'{conc:.2f}'}    max node requests / mean (1.00 = even)")
    say(f"error rate             {pct(f['error_rate'])}   upstream.errors / requests")
    for p in problems:
        say(f"PROBLEM: {p}")
    return {"figures": f, "problems": problems, "stats": stats}


def cmd_run(args: argparse.Namespace) -> int:
    say = lambda s: print(s, flush=True)  # noqa: E731
    ports = Ports()
    if args.port_offset:
        o = args.port_offset
        ports = Ports(ports.listen + o, ports.admin + o, ports.redis_proxy + o, tuple(p + o for p in ports.redis),
                      tuple(p + 10000 + o for p in ports.redis), tuple(p + o for p in ports.nodes))
    run_dir = RUN_DIR / f"offset-{args.port_offset}" if args.port_offset else RUN_DIR
    stack = Stack(ports, run_dir, node_args=shlex.split(args.node_args), say=say)
    try:
        stack.check_prerequisites()
        _check_ports_free(ports)
    except (MissingPrerequisite, HarnessError) as e:
        print(f"harness: {e}", file=sys.stderr)
        return 2
    if not args.keep_data:
        shutil.rmtree(run_dir / "redis", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for log in run_dir.glob("*.log"):
        log.unlink()
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    code = 0
    try:
        stack.start()
        if args.demo:
            result = demo(stack, say)
            code = 1 if result["problems"] else 0
            if not args.stay:
                return code
        say(banner(ports, run_dir, stack))
        reported: set[str] = set()
        while True:
            time.sleep(0.5)
            for p in stack.processes():
                if p.returncode() is not None and p.name not in reported:
                    reported.add(p.name)
                    say(f"note: {p.name} exited ({p.returncode()}); the others keep running")
            if stack.envoy is not None and not stack.envoy.alive():
                say(f"Envoy exited ({stack.envoy.returncode()}):\n{stack.envoy.log_tail()}")
                return 1
            reported -= {p.name for p in stack.processes() if p.alive()}
    except _Stop as s:
        say(f"\n{s}: stopping")
        return code
    except (HarnessError, MissingPrerequisite) as e:
        print(f"harness: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        t0 = time.monotonic()
        stack.stop()
        left = stack.listening()
        alive = [p.name for p in stack.processes() if p.alive()]
        if left or alive:
            say(f"warning: still listening {left}, still running {alive}")
        else:
            say(f"stopped in {time.monotonic() - t0:.1f}s: every process reaped, no harness port listening")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sa_harness.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", action="store_true", help="drive conversations, print the figures, stop")
    ap.add_argument("--stay", action="store_true", help="with --demo: keep the harness up afterwards")
    ap.add_argument("--keep-data", action="store_true", help="resume the Redis Cluster data of the last run")
    ap.add_argument("--port-offset", type=int, default=0, metavar="N",
                    help="add N to every port (a second harness next to the first; envoy.yaml is rewritten)")
    ap.add_argument("--node-args", default="", metavar="ARGS",
                    help="extra chat-node flags for every node, e.g. \"--decode-us-per-token 20000\" "
                         "(the engine model, docs/chat-node.md)")
    return cmd_run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
