"""envoy/istio/ cannot be applied here (no Kubernetes cluster, no istioctl), so the parts
that can be checked without one are: the WasmPlugin's pluginConfig is the reference
filter configuration and a real Envoy 1.40 runs the filter with it (secrets from the
host environment, discovery through an `envoy_admin` cluster under Istio's cluster
name), and the EnvoyFilter's cluster patches are valid Envoy 1.40 config when merged
into a cluster shaped like the ones Istio generates."""

from __future__ import annotations

import copy
import subprocess

import yaml

import sa_harness as harness

ISTIO = harness.ROOT / "envoy" / "istio"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ISTIO / name).read_text()) if d]


def wasm_plugin() -> dict:
    (wp,) = [d for d in docs("wasmplugin.yaml") if d["kind"] == "WasmPlugin"]
    return wp


def envoy_filter() -> dict:
    (ef,) = [d for d in docs("envoyfilter.yaml") if d["kind"] == "EnvoyFilter"]
    return ef


def test_plugin_config_is_the_reference_filter_config():
    plugin = wasm_plugin()["spec"]["pluginConfig"]
    reference = harness.filter_json(harness.reference_config())
    assert plugin["upstream"]["discovery"]["cluster"] == "outbound|8001||chat-node.chat.svc.cluster.local"
    # Everything else is the reference configuration (only the cluster name differs).
    plugin = copy.deepcopy(plugin)
    plugin["upstream"]["discovery"]["cluster"] = reference["upstream"]["discovery"]["cluster"]
    reference["upstream"].setdefault("override_header", "x-gateway-destination-endpoint")
    assert plugin == reference
    env = {e["name"]: e["valueFrom"] for e in wasm_plugin()["spec"]["vmConfig"]["env"]}
    secret_envs = {k["secret_env"] for k in plugin["token"]["keys"]} | {plugin["ticket"]["secret_env"]}
    assert env == {name: "HOST" for name in secret_envs}


def test_the_filter_runs_with_the_wasmplugin_config(stack, monkeypatch):
    """The pluginConfig, as Istio hands it over (a JSON string), with the secrets read
    from the proxy's environment (`valueFrom: HOST` is `host_env_keys`)."""
    spec = wasm_plugin()["spec"]
    istio_cluster = spec["pluginConfig"]["upstream"]["discovery"]["cluster"]
    backends = stack.backends(3)
    hosts = [(b.hosts[0], b.port, 1) for b in backends]
    admin = harness.free_port()
    cfg = harness.harness_config(listen=harness.free_port(), admin=admin, hosts=hosts, plugin=spec["pluginConfig"])
    chat = harness.cluster(cfg, "chat_nodes")
    chat["name"] = chat["load_assignment"]["cluster_name"] = istio_cluster
    for l in cfg["static_resources"]["listeners"]:
        for fc in l["filter_chains"]:
            for f in fc["filters"]:
                for vh in f.get("typed_config", {}).get("route_config", {}).get("virtual_hosts", []):
                    for r in vh["routes"]:
                        r["route"]["cluster"] = istio_cluster
    vm = harness.wasm_filter(cfg)["typed_config"]["config"]["vm_config"]
    vm["environment_variables"] = {"host_env_keys": [e["name"] for e in spec["vmConfig"]["env"]]}
    monkeypatch.setenv("SA_TOKEN_KEY_K1", harness.TOKEN_KEY_B64)
    monkeypatch.setenv("SA_TICKET_KEY", harness.TICKET_KEY_B64)

    envoy = stack.envoy(cfg)
    # Every filter VM (each worker's and the main thread's) polls on its own: wait for all.
    envoy.wait_vm_hosts(3)
    r = envoy.request("POST", "/v1/chat", {}, b'{"message":"hi"}')
    assert r.status == 200, r
    assert set(r.cookies()) == {"session_token", "sa_ticket"}
    sid = harness.decode_jwt_payload(r.cookies()["session_token"])["sid"]
    served = r.json()
    assert served["address"] == harness.rank(sid, [(harness.join_address(ip, p), w) for ip, p, w in hosts])[0]


def _validate(cfg: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "validate.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return subprocess.run([str(harness.require_envoy()), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_envoyfilter_patches_are_valid_envoy_config(tmp_path):
    patches = envoy_filter()["spec"]["configPatches"]
    merge = next(p for p in patches if p["patch"]["operation"] == "MERGE")
    add = next(p for p in patches if p["patch"]["operation"] == "ADD")
    assert merge["match"]["cluster"] == {"service": "chat-node.chat.svc.cluster.local", "portNumber": 8001}
    assert add["patch"]["value"]["name"] == wasm_plugin()["spec"]["pluginConfig"]["upstream"]["discovery"]["admin_cluster"]

    # A cluster shaped like Istio's (least request, panic threshold), with the patch
    # merged in; and the admin cluster added.
    istio_like = {
        "name": "outbound|8001||chat-node.chat.svc.cluster.local",
        "type": "STATIC",
        "connect_timeout": "10s",
        "lb_policy": "LEAST_REQUEST",
        "common_lb_config": {"healthy_panic_threshold": {}},
        "load_assignment": {"cluster_name": "x", "endpoints": [{"lb_endpoints": harness.endpoints([("10.0.0.1", 8001, 1)])}]},
    }
    cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": [{**istio_like, **merge["patch"]["value"]}, add["patch"]["value"]]},
    }
    out = _validate(cfg, tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # The same override source as the reference chat_nodes cluster.
    def override(policy):
        return policy["policies"][0]["typed_extension_config"]["typed_config"]["override_host_sources"]

    reference = harness.cluster(harness.reference_config(), "chat_nodes")["load_balancing_policy"]
    assert override(merge["patch"]["value"]["load_balancing_policy"]) == override(reference)

    # Why traffic.yaml turns Istio's locality load balancing off: Envoy refuses the
    # override_host policy next to locality_weighted_lb_config.
    with_locality = copy.deepcopy(cfg)
    with_locality["static_resources"]["clusters"][0]["common_lb_config"] = {"locality_weighted_lb_config": {}}
    out = _validate(with_locality, tmp_path)
    assert out.returncode != 0 and "locality_weighted_lb_config" in out.stdout + out.stderr
    (dr,) = [d for d in docs("traffic.yaml") if d["kind"] == "DestinationRule"]
    assert dr["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"] == {"enabled": False}


def test_retries_match_the_reference_post_route():
    (vs,) = [d for d in docs("traffic.yaml") if d["kind"] == "VirtualService"]
    reference = harness.reference_config()
    routes = reference["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    post = routes[-1]["route"]["retry_policy"]
    retries = vs["spec"]["http"][0]["retries"]
    assert retries == {"attempts": post["num_retries"], "retryOn": post["retry_on"]}
