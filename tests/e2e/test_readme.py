"""The README's Envoy snippet, used as written: an Envoy built around it routes sessions
exactly as the affinity function says, and mints sessions for new visitors."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets

import yaml

import sa_harness as harness


def readme_snippet() -> dict:
    text = (harness.ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    snippet = next(b for b in blocks if "envoy.filters.http.wasm" in b)
    return yaml.safe_load(snippet)


def test_readme_configuration_routes_by_the_affinity_function(stack, monkeypatch):
    snippet = readme_snippet()
    backends = [stack.backend(f"n{i}", hosts=[f"127.0.0.{i + 1}"]) for i in range(4)]
    hosts = [b.address for b in backends]

    filters = snippet["http_filters"]
    wasm = filters[0]["typed_config"]["config"]
    wasm["vm_config"]["code"]["local"]["filename"] = str(harness.require_wasm())
    plugin = json.loads(wasm["configuration"]["value"])
    # The snippet's two example hosts become our four backends; nothing else changes.
    assert [h["address"] for h in plugin["upstream"]["hosts"]] == ["10.0.0.11:8000", "10.0.0.12:8000"]
    plugin["upstream"]["hosts"] = [{"address": a} for a in hosts]
    wasm["configuration"]["value"] = json.dumps(plugin)

    listen, admin = harness.free_port(), harness.free_port()
    cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "chat",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "chat",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                                            "routes": [{"match": {"prefix": "/"},
                                                                        "route": {"cluster": "nodes"}}]}]},
                        "http_filters": filters,
                    },
                }]}],
            }],
            "clusters": [{
                "name": "nodes",
                "type": "STATIC",
                "connect_timeout": "0.25s",
                "load_balancing_policy": snippet["load_balancing_policy"],
                "load_assignment": {"cluster_name": "nodes", "endpoints": [{"lb_endpoints": harness.endpoints(
                    [(b.hosts[0], b.port, 1) for b in backends])}]},
            }],
        },
    }
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    monkeypatch.setenv("SA_TOKEN_KEY", key)  # read through host_env_keys
    envoy = stack.envoy(cfg)

    for i in range(120):
        sid = f"readme-{i}-{secrets.token_hex(4)}"
        tok = harness.sign_jwt({"sid": sid, "exp": 4_000_000_000}, key_b64=key)
        seen = envoy.request("GET", "/", {"x-session-token": tok}).json()
        want = harness.rank(sid, [(a, 1) for a in hosts])
        assert seen["address"] == want[0]
        assert seen["headers"]["x-gateway-destination-endpoint"] == [",".join(want[:3])]
        assert seen["headers"]["x-session-id"] == [sid]

    # A new visitor gets a session; sending it back keeps the same node.
    first = envoy.request("GET", "/")
    assert first.status == 200
    token = first.cookies()["session_token"]
    assert first.header("x-session-token") == token
    sid = harness.decode_jwt_payload(token)["sid"]
    node = first.json()["address"]
    assert node == harness.rank(sid, [(a, 1) for a in hosts])[0]
    for _ in range(3):
        again = envoy.request("GET", "/", {"cookie": f"session_token={token}"}).json()
        assert again["address"] == node and again["headers"]["x-session-id"] == [sid]
    assert os.environ["SA_TOKEN_KEY"] not in envoy.log_text()
