"""Envoy configurations for `make bench` (see docs/benchmarks.md).

Every arm of the per-request benchmark is one Envoy process with one listener and the
same route, cluster timeouts and HTTP connection manager defaults; arms differ only in
their HTTP filters and the upstream cluster's load-balancing policy:

    A    router only (round robin over one endpoint)
    B    noop-filter (reads one header, sets one) + router
    A8   no filter, the same override_host cluster of 3 hosts as C, the override header set
         natively by the route (`request_headers_to_add`): the price of Envoy's override_host
         routing itself, which C and B8 pay and A and B do not
    B8   noop-filter "hostcalls": the host calls session-affinity makes, with the values
         it sets, nothing else; same override_host cluster as C
    C    session-affinity, 3 static hosts + override_host policy
    C1k  session-affinity, 1000 static hosts + override_host policy
    Cp   C with `placement` on as in the reference config (balance_factor 150, saturation
         with spill: every request asks for a load report and the response is searched
         for one, drain)
    D    jwt_authn (HS256, local JWKS, forward) + hash_policy on the session token
         header + RING_HASH over 3 hosts (hashing the token itself is the cheapest
         composite; copying the sid claim to a header first would cost D more)
    E    stateful_session (header-based state) over 3 hosts

The backend is another Envoy: `direct_response` on 0.0.0.0, so it answers for every
loopback address 127.x.y.z. `/verify` also echoes what it saw (the local address it was
reached on and the headers the filters set) so the bench can check routing before it
measures; `/` is a bare 200.
"""

from __future__ import annotations

import json

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}

# Headers the filters set upstream, echoed by the backend's /verify route.
ECHO = {
    "x-served-by": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "x-echo-noop": "%REQ(x-noop)%",
    "x-echo-session-id": "%REQ(x-session-id)%",
    "x-echo-affinity": "%REQ(x-session-affinity)%",
    "x-echo-override": "%REQ(x-gateway-destination-endpoint)%",
    "x-echo-load-format": "%REQ(endpoint-load-metrics-format)%",
}

# The backend's answer to a request that asks for a load report (arm Cp): an idle node's
# ORCA TEXT report, as a chat node or vLLM sends with every response, so Cp pays for
# reading and parsing one on every request. Requests that do not ask get none.
LOAD_REPORT = "TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=0.0"


def _admin(port: int) -> dict:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def _listener(name: str, address: str, port: int, routes: list, http_filters: list, access_log: list | None = None) -> dict:
    hcm = {
        "@type": HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        # Every arm's virtual host adds `x-envoy-attempt-count` to responses, as the
        # reference envoy.yaml does (session-affinity reads it instead of asking for
        # `upstream.address` when the first attempt served): the same work for all arms.
        "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes,
                                                          "include_attempt_count_in_response": True}]},
        "http_filters": http_filters + [ROUTER],
    }
    if access_log:
        hcm["access_log"] = access_log
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def backend(port: int, admin: int) -> dict:
    """The fast local backend: a bare 200 on `/`, the same plus echoes on `/verify`."""
    echo = [{"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for k, v in ECHO.items()]
    report = [{"header": {"key": "endpoint-load-metrics", "value": LOAD_REPORT},
               "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    asks = [{"name": "endpoint-load-metrics-format", "present_match": True}]
    ok = {"status": 200, "body": {"inline_string": "ok"}}
    routes = [
        {"match": {"prefix": "/verify", "headers": asks}, "direct_response": ok,
         "response_headers_to_add": echo + report},
        {"match": {"prefix": "/verify"}, "direct_response": ok, "response_headers_to_add": echo},
        {"match": {"prefix": "/", "headers": asks}, "direct_response": ok, "response_headers_to_add": report},
        {"match": {"prefix": "/"}, "direct_response": ok},
    ]
    return {
        "admin": _admin(admin),
        "static_resources": {"listeners": [_listener("backend", "0.0.0.0", port, routes, [])]},
    }


def endpoints(addrs: list[str]) -> list[dict]:
    out = []
    for a in addrs:
        ip, _, port = a.rpartition(":")
        out.append({"endpoint": {"address": {"socket_address": {"address": ip, "port_value": int(port)}}}})
    return out


def cluster(name: str, addrs: list[str], policy: str = "ROUND_ROBIN", override_header: str | None = None) -> dict:
    c = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints(addrs)}]},
    }
    if override_header:
        c["load_balancing_policy"] = {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [{"header": override_header}],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"},
                }}]},
            },
        }}]}
    else:
        c["lb_policy"] = policy
    return c


def wasm(name: str, path: str, configuration: str, env: dict | None = None, fail_reload: bool = False) -> dict:
    vm = {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": path}}}
    if env:
        vm["environment_variables"] = {"key_values": env}
    cfg = {
        "name": name,
        "root_id": name,
        "vm_config": vm,
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
    }
    if fail_reload:
        cfg["failure_policy"] = "FAIL_RELOAD"
    return {"name": "envoy.filters.http.wasm",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": cfg}}


def session_affinity_plugin(hosts: list[str], token_key_b64: str, ticket_key_b64: str, mode: str = "pinned",
                            fallbacks: int = 2) -> dict:
    """The reference configuration (envoy/envoy.yaml) with static hosts."""
    return {
        "token": {
            "sources": [{"header": "x-session-token"}, {"cookie": "session_token"},
                        {"header": "authorization", "prefix": "Bearer "}],
            "keys": [{"kid": "k1", "alg": "HS256", "secret_base64": token_key_b64}],
            "leeway_seconds": 30,
        },
        "on_missing": "mint",
        "on_invalid": "reject",
        "mint": {"ttl_seconds": 86400, "cookie": "session_token"},
        "ticket": {"secret_base64": ticket_key_b64, "cookie": "sa_ticket", "ttl_seconds": 86400},
        "mode": mode,
        "upstream": {"override_header": "x-gateway-destination-endpoint", "fallbacks": fallbacks,
                     "hosts": [{"address": a, "weight": 1} for a in hosts]},
    }


def _route(cluster_name: str, hash_policy: list | None = None) -> dict:
    action = {"cluster": cluster_name, "timeout": "10s"}
    if hash_policy:
        action["hash_policy"] = hash_policy
    return {"match": {"prefix": "/"}, "route": action}


def arm(kind: str, *, listen: int, admin: int, hosts: list[str], noop_wasm: str, sa_wasm: str, token_key_b64: str,
        ticket_key_b64: str, jwks_k: str, hostcalls: str = "hostcalls", noop: str = "noop",
        override: str = "") -> dict:
    """One arm of the per-request benchmark. `hosts` are the upstream addresses (one for
    A/B, three for B8/C/D/E, a thousand for C1k). `hostcalls` is B8's plugin
    configuration (`hostcalls|<override>|<session>`); `noop` B's (`repeat|<call>|<n>` for
    the per-call costs); `override` the list A8's route sets."""
    filters: list = []
    route = _route("upstream")
    up = cluster("upstream", hosts)
    if kind == "A8":
        route["request_headers_to_add"] = [{"header": {"key": "x-gateway-destination-endpoint", "value": override},
                                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
        up = cluster("upstream", hosts, override_header="x-gateway-destination-endpoint")
    elif kind == "B":
        filters = [wasm("noop", noop_wasm, noop)]
    elif kind == "B8":
        filters = [wasm("noop", noop_wasm, hostcalls)]
        up = cluster("upstream", hosts, override_header="x-gateway-destination-endpoint")
    elif kind in ("C", "C1k", "Cp"):
        plugin = session_affinity_plugin(hosts, token_key_b64, ticket_key_b64)
        if kind == "Cp":
            plugin["placement"] = {"balance_factor": 150, "drain": True,
                                   "saturation": {"metric": "kv_cache_usage_perc", "threshold": 0.9,
                                                  "stale_ms": 5000, "spill": True}}
        filters = [wasm("session_affinity", sa_wasm, json.dumps(plugin), fail_reload=True)]
        up = cluster("upstream", hosts, override_header="x-gateway-destination-endpoint")
    elif kind == "D":
        jwks = json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "kid": "k1", "k": jwks_k}]})
        filters = [{
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"session": {
                    "forward": True,
                    "from_headers": [{"name": "x-session-token"}],
                    "local_jwks": {"inline_string": jwks},
                }},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "session"}}],
            },
        }]
        route = _route("upstream", [{"header": {"header_name": "x-session-token"}}])
        up = cluster("upstream", hosts, policy="RING_HASH")
    elif kind == "E":
        filters = [{
            "name": "envoy.filters.http.stateful_session",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.stateful_session.v3.StatefulSession",
                "session_state": {
                    "name": "envoy.http.stateful_session.header",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.http.stateful_session.header.v3.HeaderBasedSessionState",
                        "name": "x-session-host",
                    },
                },
            },
        }]
    elif kind not in ("A", "A8"):
        raise ValueError(kind)
    return {
        "admin": _admin(admin),
        "static_resources": {
            "listeners": [_listener("bench", "127.0.0.1", listen, [route], filters)],
            "clusters": [up],
        },
    }


def distribution(*, listen: int, admin: int, sets: dict[str, list[str]], access_log: str, filter_listeners: dict,
                 sa_wasm: str, token_key_b64: str, ticket_key_b64: str) -> dict:
    """The distribution Envoy.

    - One listener where `/ring_<set>?sid=...` and `/maglev_<set>?sid=...` go to a
      RING_HASH or MAGLEV cluster over that host set, hashed on the `sid` query parameter;
      the access log records path and `%UPSTREAM_HOST%`.
    - One listener per entry of `filter_listeners` (`{port: set name}`) with
      session-affinity (pinned mode) over that set and an override_host cluster.
    """
    routes, clusters = [], []
    for name, addrs in sets.items():
        for policy, prefix in (("RING_HASH", "ring"), ("MAGLEV", "maglev")):
            cname = f"{prefix}_{name}"
            clusters.append(cluster(cname, addrs, policy=policy))
            routes.append({"match": {"path": f"/{cname}"},
                           "route": {"cluster": cname, "timeout": "10s",
                                     "hash_policy": [{"query_parameter": {"name": "sid"}}]}})
    log = [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": access_log,
            "log_format": {"text_format_source": {"inline_string": "%REQ(:PATH)% %UPSTREAM_HOST% %RESPONSE_CODE%\n"}},
        },
    }]
    listeners = [_listener("dist", "127.0.0.1", listen, routes, [], access_log=log)]
    for port, name in filter_listeners.items():
        addrs = sets[name]
        plugin = session_affinity_plugin(addrs, token_key_b64, ticket_key_b64, mode="pinned")
        cname = f"sa_{name}"
        clusters.append(cluster(cname, addrs, override_header="x-gateway-destination-endpoint"))
        listeners.append(_listener(f"sa_{name}", "127.0.0.1", port, [_route(cname)],
                                   [wasm("session_affinity", sa_wasm, json.dumps(plugin))]))
    return {"admin": _admin(admin), "static_resources": {"listeners": listeners, "clusters": clusters}}
