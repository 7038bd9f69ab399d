"""envoy/docker-compose.yml cannot run here (no Docker engine), so it is kept honest by
reading it: the same topology, ports, commands and mounted Envoy config as the native
harness (sa_harness and envoy/envoy.yaml)."""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path

import yaml

import sa_harness as harness

COMPOSE = harness.ROOT / "envoy" / "docker-compose.yml"
COMPOSE_DIR = COMPOSE.parent
PORTS = harness.Ports()  # DESIGN section 8


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> dict[str, Path]:
    """{container path: host path} of a service's bind mounts (short syntax), host paths
    resolved against the compose file's directory as Compose does."""
    out = {}
    for v in service.get("volumes", []):
        src, dst, *_ = v.split(":")
        if src.startswith((".", "/")):
            out[dst] = (COMPOSE_DIR / src).resolve()
    return out


def socket_ports(cfg: dict) -> dict[str, int]:
    sr = cfg["static_resources"]
    ports = {"admin": cfg["admin"]["address"]["socket_address"]["port_value"]}
    for l in sr["listeners"]:
        ports[l["name"]] = l["address"]["socket_address"]["port_value"]
    return ports


def endpoint_ports(cfg: dict, cluster: str) -> list[int]:
    c = harness.cluster(cfg, cluster)
    return [e["endpoint"]["address"]["socket_address"]["port_value"]
            for group in c["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]


def test_services_and_host_networking():
    services = compose()["services"]
    want = {f"redis-{p}" for p in PORTS.redis} | {"redis-cluster-create", "envoy"}
    want |= {f"chat-node-{i + 1}" for i in range(len(PORTS.nodes))}
    assert set(services) == want
    for name, svc in services.items():
        # The same loopback addresses as the native harness and envoy.yaml.
        assert svc.get("network_mode") == "host", name
        assert "ports" not in svc, f"{name}: published ports mean nothing with host networking"


def test_envoy_mounts_the_reference_config_and_the_built_wasm():
    envoy = compose()["services"]["envoy"]
    makefile = (harness.ROOT / "Makefile").read_text()
    version = re.search(r"^ENVOY_VERSION := (\S+)", makefile, re.M).group(1)
    assert envoy["image"] == f"envoyproxy/envoy:v{version}"

    cmd = envoy["command"]
    config_in_container = cmd[cmd.index("-c") + 1]
    m = mounts(envoy)
    # The mounted config IS envoy/envoy.yaml, unchanged.
    assert m[config_in_container] == harness.REFERENCE_YAML.resolve()

    # The .wasm path in envoy.yaml, relative to Envoy's working directory, lands on the
    # mount of the built filter (what `make build` produces).
    cfg = harness.reference_config()
    filename = harness.wasm_filter(cfg)["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]
    in_container = filename if filename.startswith("/") else posixpath.join(envoy["working_dir"], filename)
    assert m[in_container] == harness.WASM.resolve()
    assert not filename.startswith("/") and (harness.ROOT / filename).resolve() == harness.WASM.resolve(), \
        "make run starts Envoy in the repository root with the same relative path"
    assert all(v.endswith(":ro") for v in envoy["volumes"])


def test_ports_match_the_native_harness_and_envoy_yaml():
    cfg = harness.reference_config()
    ports = socket_ports(cfg)
    assert (ports["chat"], ports["admin"], ports["redis"]) == (PORTS.listen, PORTS.admin, PORTS.redis_proxy)
    assert endpoint_ports(cfg, "chat_nodes") == list(PORTS.nodes)
    assert endpoint_ports(cfg, "redis_cluster") == PORTS.redis_seeds == [7001, 7002, 7003]
    assert endpoint_ports(cfg, "envoy_admin") == [PORTS.admin]

    services = compose()["services"]
    redis_ports = []
    for name, svc in services.items():
        if name.startswith("redis-") and name != "redis-cluster-create":
            cmd = svc["command"]
            port = int(cmd[cmd.index("--port") + 1])
            redis_ports.append(port)
            assert name == f"redis-{port}"
            # The native harness's flags, with the data in the container's volume.
            assert cmd == ["redis-server", "--port", str(port), *harness.redis_cluster_flags(), "--dir", "/data"]
            assert svc["volumes"] == [f"redis-{port}:/data"]
            assert svc["healthcheck"]["test"] == ["CMD", "redis-cli", "-p", str(port), "ping"]
    assert sorted(redis_ports) == list(PORTS.redis) == [7001, 7002, 7003, 7004, 7005, 7006]


def test_cluster_creation_matches_the_native_harness():
    create = compose()["services"]["redis-cluster-create"]
    assert create["restart"] == "no"
    assert set(create["depends_on"]) == {f"redis-{p}" for p in PORTS.redis}
    assert all(d["condition"] == "service_healthy" for d in create["depends_on"].values())
    script = create["command"][0]
    line = next(l for l in script.splitlines() if "--cluster create" in l)
    words = shlex.split(line)
    addresses = words[words.index("create") + 1: words.index("--cluster-replicas")]
    assert addresses == [f"127.0.0.1:{p}" for p in PORTS.redis]
    assert words[words.index("--cluster-replicas") + 1] == "1" and "--cluster-yes" in words
    assert "cluster_state:ok" in script

    # Envoy waits for the cluster; the nodes for Envoy (they reach Redis through it).
    envoy = compose()["services"]["envoy"]
    assert envoy["depends_on"]["redis-cluster-create"]["condition"] == "service_completed_successfully"


def test_chat_nodes_run_the_harness_commands_from_the_dockerfile():
    services = compose()["services"]
    for i, port in enumerate(PORTS.nodes):
        svc = services[f"chat-node-{i + 1}"]
        assert svc["command"] == ["--listen", f"127.0.0.1:{port}", "--node-id", f"node-{i + 1}",
                                  "--redis", f"127.0.0.1:{PORTS.redis_proxy}"]
        assert "envoy" in svc["depends_on"]
        build = svc["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == harness.ROOT
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file()
    text = dockerfile.read_text()
    assert re.search(r"cargo build --release --locked -p chat-node", text)
    assert 'ENTRYPOINT ["/usr/local/bin/chat-node"]' in text
    # The build context leaves out build outputs and local state.
    ignore = (dockerfile.parent / (dockerfile.name + ".dockerignore")).read_text().split()
    assert {"target/", ".venv/", ".run/", ".git/"} <= set(ignore)
