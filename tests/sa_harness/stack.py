"""The whole harness of DESIGN section 8 as a library: a Redis Cluster (3 masters + 3
replicas), Envoy with the session-affinity filter and its redis_proxy, and chat nodes,
on the contract's ports (`make run`) or on free ports (tests, soak, benchmarks); and a
client conversation that checks every reply.

    ports = Ports.free(free_port)
    stack = Stack(ports, workdir, envoy_config=cfg)   # cfg: a dict or a path
    stack.start(); ...; stack.stop()

Processes are started in their own sessions, and stopped in order: chat nodes (they
finish in-flight turns, which still need Redis), then Envoy, then Redis. On Linux each
child also gets a parent-death signal, so even a killed harness leaves no strays behind.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .envoy import Envoy, filter_json, harness_config, load_yaml
from .paths import REFERENCE_YAML, ROOT, require_chat_node, require_envoy, require_redis, require_wasm
from .procs import HarnessError, Process, port_open, wait_for
from .redis_cluster import RedisCluster


@dataclass(frozen=True)
class Ports:
    """Every port of one harness, all on 127.0.0.1. The defaults are DESIGN section 8."""

    listen: int = 10000
    admin: int = 9901
    redis_proxy: int = 6380
    # Masters first (they are the seeds in envoy.yaml), then replicas.
    redis: tuple[int, ...] = (7001, 7002, 7003, 7004, 7005, 7006)
    # Cluster bus ports; None: Redis's default, port + 10000.
    redis_bus: tuple[int, ...] | None = None
    nodes: tuple[int, ...] = (8001, 8002, 8003)
    # Each chat node's admin listener (`--admin-listen`: engine costs at run time);
    # None: no admin listener (the reference ports have none).
    node_admin: tuple[int, ...] | None = None

    @classmethod
    def free(cls, free_port: Callable[[], int], nodes: int = 3, redis: int = 6, node_admin: bool = False) -> "Ports":
        """A harness on ports picked by `free_port`, bus ports included, so it can run
        next to `make run`; with `node_admin`, each chat node also gets an admin listener
        (`ChatNode.set_engine`)."""
        return cls(
            listen=free_port(),
            admin=free_port(),
            redis_proxy=free_port(),
            redis=tuple(free_port() for _ in range(redis)),
            redis_bus=tuple(free_port() for _ in range(redis)),
            nodes=tuple(free_port() for _ in range(nodes)),
            node_admin=tuple(free_port() for _ in range(nodes)) if node_admin else None,
        )

    @property
    def redis_seeds(self) -> list[int]:
        return list(self.redis[: len(self.redis) // 2])

    def bus(self, i: int) -> int:
        return self.redis_bus[i] if self.redis_bus else self.redis[i] + 10000

    def all(self) -> list[int]:
        buses = [self.bus(i) for i in range(len(self.redis))]
        return [self.listen, self.admin, self.redis_proxy, *self.redis, *buses, *self.nodes, *(self.node_admin or ())]


def envoy_config_for(ports: Ports, **kwargs) -> dict:
    """envoy/envoy.yaml moved onto `ports` (listeners, admin, the admin cluster the
    filter polls, the chat-node endpoints, the Redis seeds) with an absolute .wasm path;
    `kwargs` go to `harness_config` (e.g. `plugin_update`)."""
    return harness_config(listen=ports.listen, admin=ports.admin, hosts=[("127.0.0.1", p, 1) for p in ports.nodes],
                          redis_listen=ports.redis_proxy, redis_seeds=ports.redis_seeds, **kwargs)


class ChatNode(Process):
    """`chat-node --listen 127.0.0.1:<port> --node-id <id> --redis 127.0.0.1:<redis_proxy>`,
    plus `--admin-listen 127.0.0.1:<admin_port>` when `admin_port` is given (then
    `set_engine` changes the engine model's costs while the node runs: a benchmark slows
    one node down). `env` None inherits this environment (so `LLM_BASE_URL` reaches the
    nodes)."""

    def __init__(self, node_id: str, port: int, redis_port: int, workdir: Path, extra: list[str] | None = None,
                 env: dict | None = None, admin_port: int | None = None):
        binary = require_chat_node()
        self.node_id, self.port, self.admin_port = node_id, port, admin_port
        args = [str(binary), "--listen", f"127.0.0.1:{port}", "--node-id", node_id, "--redis",
                f"127.0.0.1:{redis_port}", *(extra or [])]
        if admin_port is not None:
            args += ["--admin-listen", f"127.0.0.1:{admin_port}"]
        super().__init__(node_id, args, workdir / f"{node_id}.log", env=env)

    def set_engine(self, prefill_us_per_token: int | None = None, decode_us_per_token: int | None = None) -> dict:
        """PUT /admin/engine: new per-token costs for the turns that start from now on."""
        if self.admin_port is None:
            raise HarnessError(f"{self.node_id} has no admin listener (start it with an admin port)")
        patch = {k: v for k, v in (("prefill_us_per_token", prefill_us_per_token),
                                   ("decode_us_per_token", decode_us_per_token)) if v is not None}
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/admin/engine", method="PUT",
                                     data=json.dumps(patch).encode(), headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "ChatNode":
        super().start()
        if wait:
            wait_for(lambda: (self.check_alive("starting"), port_open(self.port))[1], 10,
                     f"{self.node_id} to listen on {self.port}")
        return self

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.loads(r.read())


class Stack:
    """The whole harness: Redis Cluster, Envoy, chat nodes.

    `envoy_config` is a path or a dict; None means envoy/envoy.yaml as is (only valid on
    the reference ports). Start and stop are idempotent; `start` after `stop` resumes
    with the same ports and Redis data (a restart of the whole harness).
    """

    def __init__(self, ports: Ports, workdir: Path, envoy_config: Path | dict | None = None, concurrency: int = 2,
                 node_args: list[str] | None = None, node_env: dict | None = None,
                 say: Callable[[str], None] = lambda _: None):
        self.ports, self.workdir, self.concurrency, self.say = ports, workdir, concurrency, say
        self.node_args, self.node_env = node_args or [], node_env
        if envoy_config is None:
            envoy_config = REFERENCE_YAML if ports == Ports() else envoy_config_for(ports)
        self.envoy_config = envoy_config
        self.redis: RedisCluster | None = None
        self.envoy: Envoy | None = None
        self.nodes: list[ChatNode] = []

    # -- lifecycle --------------------------------------------------------------------

    def check_prerequisites(self) -> None:
        require_redis()
        require_envoy()
        require_wasm()
        require_chat_node()

    def start(self, timeout: float = 90.0) -> "Stack":
        self.check_prerequisites()
        self.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self.redis = RedisCluster(list(self.ports.redis), [self.ports.bus(i) for i in range(len(self.ports.redis))],
                                  self.workdir / "redis")
        self.say(f"starting Redis Cluster on {_ports(self.ports.redis)}")
        self.redis.start(timeout)
        self.say(f"  cluster_state:ok after {time.monotonic() - t0:.1f}s")
        self.envoy = Envoy(self.envoy_config, self.workdir, concurrency=self.concurrency)
        self.say(f"starting Envoy ({_rel(self.envoy.config_path)})")
        self.envoy.start(timeout=timeout)
        admin = self.ports.node_admin or (None,) * len(self.ports.nodes)
        self.nodes = [
            ChatNode(f"node-{i + 1}", p, self.ports.redis_proxy, self.workdir, self.node_args, self.node_env,
                     admin_port=admin[i])
            for i, p in enumerate(self.ports.nodes)
        ]
        self.say(f"starting chat nodes on {_ports(self.ports.nodes)}")
        for n in self.nodes:
            n.start()
        self.wait_healthy(len(self.nodes), timeout)
        self.say(f"  the filter sees {len(self.nodes)} healthy hosts after {time.monotonic() - t0:.1f}s in all")
        return self

    def wait_healthy(self, n: int, timeout: float = 30.0) -> float:
        """Waits until the filter routes over exactly `n` healthy chat nodes: Envoy itself
        counts n healthy hosts, then every filter VM (one per worker, plus the main
        thread's; each polls the admin API on its own) has installed a host set of n
        hosts since Envoy's count reached n. Returns the seconds it took."""
        assert self.envoy is not None
        envoy = self.envoy
        start = time.monotonic()
        cluster = self._discovery()["cluster"]

        def envoy_sees() -> bool:
            envoy.check_alive("waiting for healthy hosts")
            healthy = envoy.healthy_addresses(cluster)
            return healthy is not None and len(healthy) == n

        wait_for(envoy_sees, timeout, f"Envoy to count {n} healthy chat nodes (admin /clusters)")
        if self._filter_config().get("upstream", {}).get("discovery"):
            envoy.wait_vm_hosts(n, timeout)
        envoy.wait_healthy_hosts(n, timeout)
        return time.monotonic() - start

    def _filter_config(self) -> dict:
        cfg = self.envoy_config if isinstance(self.envoy_config, dict) else load_yaml(Path(self.envoy_config))
        try:
            return filter_json(cfg)
        except KeyError:
            raise HarnessError("no session-affinity filter in the Envoy config") from None

    def _discovery(self) -> dict:
        d = self._filter_config().get("upstream", {}).get("discovery")
        return d or {"cluster": "chat_nodes"}

    def stop(self) -> None:
        """Chat nodes first (an in-flight turn still writes to Redis through Envoy), then
        Envoy, then Redis. Every process is reaped."""
        for n in self.nodes:
            n.signal(signal.SIGTERM)
        for n in self.nodes:
            n.stop(timeout=15)
        if self.envoy is not None:
            self.envoy.stop(timeout=15)
        if self.redis is not None:
            self.redis.stop()

    def processes(self) -> list[Process]:
        return [*self.nodes, *([self.envoy] if self.envoy else []), *(self.redis.nodes if self.redis else [])]

    def listening(self) -> list[int]:
        """Ports of this harness that still accept connections."""
        return [p for p in self.ports.all() if port_open(p)]

    def node(self, node_id: str) -> ChatNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def node_by_address(self, address: str) -> ChatNode:
        return next(n for n in self.nodes if n.address == address)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _ports(ports: Iterable[int]) -> str:
    ports = list(ports)
    if ports == list(range(ports[0], ports[0] + len(ports))):
        return f"127.0.0.1:{ports[0]}-{ports[-1]}"
    return ", ".join(str(p) for p in ports)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def history_digest(messages: Iterable[str]) -> str:
    """DESIGN section 8: lowercase hex SHA-256 of the user messages, each followed by "\\n"."""
    h = hashlib.sha256()
    for m in messages:
        h.update(m.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class Turn:
    turn: int
    node: str
    context: str
    digest: str
    attempts: int
    seconds: float


@dataclass
class Conversation:
    """A client conversation through Envoy: keeps the cookies the filter sets (session
    token and affinity ticket), sends turns, and checks `turn` and `history_digest`
    against its own record. A turn answered with an error is not acknowledged: the
    client sends the same message again, numbered the same (`"turn"`), so the retry
    becomes the same turn even if the failed attempt was applied."""

    port: int
    name: str
    cookies: dict[str, str] = field(default_factory=dict)
    said: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def send(self, message: str, retry_for: float = 30.0) -> Turn:
        start = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            status, body, set_cookies = self._post(message)
            for c in set_cookies:
                k, _, rest = c.partition("=")
                self.cookies[k.strip()] = rest.split(";", 1)[0]
            if status == 200:
                break
            self.errors.append(f"{status} {body[:200]!r}")
            if time.monotonic() - start > retry_for:
                raise HarnessError(f"{self.name}: turn {len(self.said) + 1} kept failing: {self.errors[-3:]}")
            time.sleep(0.1)
        self.said.append(message)
        reply = json.loads(body)
        t = Turn(reply["turn"], reply["node"], reply["context"], reply["history_digest"], attempts,
                 time.monotonic() - start)
        self.turns.append(t)
        return t

    def check(self) -> list[str]:
        """Problems with the turns so far: a turn number out of order or a digest that
        is not the client's own (a lost or duplicated turn shows here)."""
        problems = []
        for i, t in enumerate(self.turns):
            if t.turn != i + 1:
                problems.append(f"{self.name}: reply {i + 1} says turn {t.turn}")
            if t.digest != history_digest(self.said[: i + 1]):
                problems.append(f"{self.name}: turn {i + 1} digest differs from the client's")
        return problems

    @property
    def session_id(self) -> str | None:
        """The session id, read from the token the filter minted (no signature check)."""
        token = self.cookies.get("session_token")
        if not token:
            return None
        seg = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))).get("sid")

    def _post(self, message: str) -> tuple[int, bytes, list[str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"content-type": "application/json"}
            if self.cookies:
                headers["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            # `turn`: a retry of a turn the node applied but whose reply was lost is
            # answered again instead of being applied twice (docs/chat-node.md).
            body = {"message": message, "turn": len(self.said) + 1}
            conn.request("POST", "/v1/chat", body=json.dumps(body).encode(), headers=headers)
            r = conn.getresponse()
            return r.status, r.read(), [v for k, v in r.getheaders() if k.lower() == "set-cookie"]
        except (OSError, http.client.HTTPException) as e:
            return 0, str(e).encode(), []
        finally:
            conn.close()


def run_turns(conversations: list[Conversation], messages: Callable[[Conversation, int], str], turns: int,
              workers: int = 16) -> None:
    """`turns` more turns of every conversation, conversations in parallel, each
    conversation's turns in order."""

    def drive(c: Conversation) -> None:
        for _ in range(turns):
            c.send(messages(c, len(c.said) + 1))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(drive, c) for c in conversations]:
            f.result()
