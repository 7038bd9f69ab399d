"""envoy/docker-compose.yml and envoy/envoy-compose.yaml, read: what `make compose-test`
(scripts/compose_test.py, which runs them for real) cannot show by running once.

- The compose Envoy config is the reference envoy/envoy.yaml but for its addresses: the
  same filter config, routes, retries, health checks, outlier detection, load-balancing
  policy, redis_proxy and Redis cluster settings. A change to envoy.yaml that is not
  carried over fails here.
- The compose file keeps DESIGN section 11: a user-defined bridge network, only
  127.0.0.1:10000 and 127.0.0.1:9901 published, no top-level `name:`, the pinned images,
  the native harness's Redis flags, the chat nodes' addresses as Envoy names them.
- chat-node/Dockerfile builds with `--locked` and the root .dockerignore lets in every
  Cargo workspace member.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib

import yaml

import sa_harness as harness

COMPOSE = harness.ROOT / "envoy" / "docker-compose.yml"
COMPOSE_ENVOY = harness.ROOT / "envoy" / "envoy-compose.yaml"
PORTS = harness.Ports()  # DESIGN section 8


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_envoy() -> dict:
    return yaml.safe_load(COMPOSE_ENVOY.read_text())


def socket(addr: dict) -> tuple[str, int]:
    sa = addr["socket_address"]
    return sa["address"], sa["port_value"]


def lb_addresses(cluster: dict) -> list[tuple[str, int]]:
    return [socket(e["endpoint"]["address"])
            for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]


def listener(cfg: dict, name: str) -> dict:
    return next(l for l in cfg["static_resources"]["listeners"] if l["name"] == name)


def without_addresses(cfg: dict) -> dict:
    """The config with every address blanked, the wasm file name too, and the DNS
    settings a STRICT_DNS cluster needs dropped: what must equal between the two."""
    cfg = copy.deepcopy(cfg)
    cfg["admin"]["address"] = None
    for l in cfg["static_resources"]["listeners"]:
        l["address"] = None
    for c in cfg["static_resources"]["clusters"]:
        c["load_assignment"]["endpoints"] = None
        c.pop("type", None)
        for key in ("dns_lookup_family", "dns_refresh_rate"):
            c.pop(key, None)
    harness.wasm_filter(cfg)["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = None
    return cfg


def test_compose_envoy_config_is_the_reference_but_for_addresses():
    ref, cfg = harness.reference_config(), compose_envoy()
    assert without_addresses(cfg) == without_addresses(ref)
    # Spelled out, the parts that matter most: the filter's JSON config (discovery over
    # the admin API of the chat_nodes cluster, override header, fallbacks) and its keys.
    assert harness.filter_json(cfg) == harness.filter_json(ref)
    assert harness.filter_json(cfg)["upstream"]["discovery"]["cluster"] == "chat_nodes"
    for name in ("chat_nodes", "redis_cluster", "envoy_admin"):
        for key in ("load_balancing_policy", "health_checks", "outlier_detection", "circuit_breakers",
                    "cluster_type", "lb_policy", "connect_timeout"):
            assert harness.cluster(cfg, name).get(key) == harness.cluster(ref, name).get(key), (name, key)


def test_compose_envoy_addresses():
    ref, cfg = harness.reference_config(), compose_envoy()
    # Same ports as the native harness, on every interface of the container (Docker
    # publishes 10000 and 9901 on the host's 127.0.0.1 only; 6380 stays in the network).
    assert socket(cfg["admin"]["address"]) == ("0.0.0.0", socket(ref["admin"]["address"])[1]) == ("0.0.0.0", PORTS.admin)
    for name, port in (("chat", PORTS.listen), ("redis", PORTS.redis_proxy)):
        assert socket(listener(cfg, name)["address"]) == ("0.0.0.0", port)
        assert socket(listener(ref, name)["address"])[1] == port

    # The chat nodes by service name, resolved by Docker's DNS: STRICT_DNS. Envoy's admin
    # lists each host by its resolved ip:port, which the filter's discovery and the
    # override_host policy use (compose-test routes, kills and moves through it).
    nodes = harness.cluster(cfg, "chat_nodes")
    assert nodes["type"] == "STRICT_DNS" and nodes["dns_lookup_family"] == "V4_ONLY"
    assert lb_addresses(nodes) == [(f"chat-node-{i + 1}", p) for i, p in enumerate(PORTS.nodes)]
    # The filter reads the admin API through the loopback of Envoy's own container.
    assert lb_addresses(harness.cluster(cfg, "envoy_admin")) == [("127.0.0.1", PORTS.admin)]
    # Redis seeds by service name; the topology then names the nodes by IP.
    assert lb_addresses(harness.cluster(cfg, "redis_cluster")) == [(f"redis-{i}", 6379) for i in (1, 2, 3)]


def test_network_ports_and_no_top_level_name():
    doc = compose()
    assert "name" not in doc, "Compose v1 (Debian's docker-compose 1.29) rejects a top-level name"
    assert doc["networks"] == {"sa": {"driver": "bridge"}}
    for name, svc in doc["services"].items():
        assert "network_mode" not in svc, name
        assert svc["networks"] == ["sa"], name
        if name != "envoy":
            assert "ports" not in svc, f"{name}: only Envoy's listener and admin are published"
    assert doc["services"]["envoy"]["ports"] == [f"127.0.0.1:{PORTS.listen}:{PORTS.listen}",
                                                 f"127.0.0.1:{PORTS.admin}:{PORTS.admin}"]


def test_envoy_service_mounts_the_compose_config_and_the_built_wasm():
    envoy = compose()["services"]["envoy"]
    makefile = (harness.ROOT / "Makefile").read_text()
    version = re.search(r"^ENVOY_VERSION := (\S+)", makefile, re.M).group(1)
    assert envoy["image"] == f"envoyproxy/envoy:v{version}"
    mounts = {}
    for v in envoy["volumes"]:
        src, dst, mode = v.split(":")
        assert mode == "ro"
        mounts[dst] = (COMPOSE.parent / src).resolve()
    cmd = envoy["command"]
    assert mounts[cmd[cmd.index("-c") + 1]] == COMPOSE_ENVOY.resolve()
    filename = harness.wasm_filter(compose_envoy())["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]
    assert mounts[filename] == harness.WASM.resolve(), "the .wasm `make build` writes"
    assert envoy["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}


def test_redis_services_run_the_native_flags_and_form_a_cluster():
    services = compose()["services"]
    redis = sorted(n for n in services if re.fullmatch(r"redis-\d", n))
    assert redis == [f"redis-{i}" for i in range(1, 7)]
    native = harness.redis_cluster_flags()
    # Inside the container: every interface (no --bind), and protected mode off, which
    # Debian's build enables by default and the official image does not.
    bind = native.index("--bind")
    flags = native[:bind] + native[bind + 2:]
    for name in redis:
        svc = services[name]
        assert re.fullmatch(r"redis:7\.\d+\.\d+", svc["image"])
        assert svc["command"] == ["redis-server", "--port", "6379", "--protected-mode", "no", *flags, "--dir", "/data"]
        assert svc["volumes"] == [f"{name}:/data"]
        assert svc["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert set(compose()["volumes"]) == set(redis)

    init = services["redis-cluster-init"]
    assert init["image"] == services["redis-1"]["image"] and init["restart"] == "no"
    assert init["depends_on"] == {n: {"condition": "service_healthy"} for n in redis}
    script = init["command"][0]
    assert "redis-cli --cluster create $$nodes --cluster-replicas 1 --cluster-yes" in script
    assert "for n in 1 2 3 4 5 6" in script and "getent hosts redis-$$n" in script
    assert "cluster_state:ok" in script and "state=online" in script


def test_chat_nodes_listen_where_envoy_looks_and_use_the_redis_proxy():
    services = compose()["services"]
    cfg = compose_envoy()
    envoy_sees = dict(lb_addresses(harness.cluster(cfg, "chat_nodes")))
    redis_port = socket(listener(cfg, "redis")["address"])[1]
    nodes = sorted(n for n in services if n.startswith("chat-node-"))
    assert nodes == sorted(envoy_sees)
    for name in nodes:
        svc = services[name]
        i = name.removeprefix("chat-node-")
        assert svc["command"] == ["--listen", f"0.0.0.0:{envoy_sees[name]}", "--node-id", f"node-{i}",
                                  "--redis", f"envoy:{redis_port}"]
        assert svc["image"] == "session-affinity/chat-node:dev"
        assert (COMPOSE.parent / svc["build"]["context"]).resolve() == harness.ROOT
        assert svc["build"]["dockerfile"] == "chat-node/Dockerfile"
        assert svc["depends_on"] == {"envoy": {"condition": "service_started"}}


def test_dockerfile_builds_the_locked_workspace_and_the_context_admits_every_member():
    text = (harness.ROOT / "chat-node" / "Dockerfile").read_text()
    assert re.search(r"^FROM rust:\d+\.\d+(\.\d+)?-slim-bookworm AS chef$", text, re.M)
    assert re.search(r"^FROM debian:bookworm-slim$", text, re.M)
    assert "RUN cargo build --release --locked -p chat-node" in text
    assert "cargo chef cook --release --locked -p chat-node" in text
    assert 'ENTRYPOINT ["/usr/local/bin/chat-node"]' in text

    ignore = [l for l in (harness.ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert ignore[0] == "*", "an allowlist: nothing local gets in by accident"
    allowed = set(ignore)
    workspace = tomllib.loads((harness.ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    assert {"!Cargo.toml", "!Cargo.lock", "!src/"} <= allowed
    for member in workspace:
        if member != ".":
            assert {f"!{member}/Cargo.toml", f"!{member}/src/"} <= allowed, \
                f"workspace member {member} is kept out of the chat node's build context"
    assert "**/target" in allowed


def test_stand_in_script_names_the_images_the_files_name():
    """scripts/compose-images.sh reads the image names from the compose file and the
    Dockerfile; its stand-in Dockerfiles exist for each kind it builds."""
    script = (harness.ROOT / "scripts" / "compose-images.sh").read_text()
    for kind in ("debian", "redis", "envoy", "rust"):
        assert re.search(rf'^\s*ensure "\$\w+_IMAGE" {kind}$', script, re.M), kind
        assert f"build_{kind}()" in script
    for kind in ("redis", "envoy", "rust"):
        assert (harness.ROOT / "scripts" / "compose-images" / f"{kind}.Dockerfile").is_file()
    assert json.dumps(sorted({compose()["services"][s]["image"] for s in ("envoy", "redis-1")})) \
        == json.dumps(["envoyproxy/envoy:v1.40.0", "redis:7.0.15"])
