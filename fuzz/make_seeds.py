#!/usr/bin/env python3
"""Writes the committed seed inputs of the fuzz targets (fuzz/seeds/<target>/): the
token vectors, hand-made hostile tokens, issued tickets, the reference and documented
plugin configurations, admin bodies and request header maps. Deterministic; rerun after
changing the vectors or the reference config (needs PyYAML, which `make venv` installs):
    .venv/bin/python fuzz/make_seeds.py
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEEDS = Path(__file__).resolve().parent / "seeds"
VECTORS = json.loads((ROOT / "tests/vectors/tokens.json").read_text())
NOW = VECTORS["now"]
TICKET_KEY = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc="
K1 = VECTORS["keys"][0]["secret_base64"]


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jws(header: bytes, payload: bytes, key_b64: str = K1, alg=hashlib.sha256) -> bytes:
    si = b64url(header) + "." + b64url(payload)
    return (si + "." + b64url(hmac.new(base64.b64decode(key_b64), si.encode(), alg).digest())).encode()


def write(target: str, name: str, data: bytes) -> None:
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def tokens() -> None:
    for i, case in enumerate(VECTORS["cases"]):
        write("token", f"vector-{i:02}", case["token"].encode())
    good_h = b'{"alg":"HS256","kid":"k1"}'
    claims = {"iss": "https://auth.example", "aud": "chat", "sid": "s", "exp": NOW + 600}
    hand = {
        "empty": b"",
        "dots": b"..",
        "three-empty": b"a..b",
        "padding": jws(good_h, json.dumps(claims).encode()) + b"=",
        "len-4n+1": b"eyJhb.eyJzaWQiOiJzIn0.a",
        "bad-chars": b"ey+J/.eyJ=.***",
        "json-array-payload": jws(good_h, b'["sid","s"]'),
        "json-array-header": jws(b'["HS256"]', json.dumps(claims).encode()),
        "invalid-utf8-in-json": jws(good_h, b'{"sid":"\xff\xfe","exp":1790000600,"iss":"https://auth.example","aud":"chat"}'),
        "huge-numbers": jws(good_h, json.dumps({**claims, "exp": 1e308, "nbf": -1e308, "iat": 10**30}).encode()),
        "deep-nesting": jws(good_h, b'{"x":' + b"[" * 200 + b"]" * 200 + b',"sid":"s","exp":1790000600}'),
        "dup-sid": jws(good_h, b'{"sid":"a","sid":"b","exp":1790000600,"iss":"https://auth.example","aud":"chat"}'),
        "crit": jws(b'{"alg":"HS256","kid":"k1","crit":["exp"]}', json.dumps(claims).encode()),
        "kid-number": jws(b'{"alg":"HS256","kid":1}', json.dumps(claims).encode()),
        "sid-crlf": jws(good_h, json.dumps({**claims, "sid": "a\r\nx-session-id: victim"}).encode()),
        "frac-exp": jws(good_h, json.dumps({**claims, "exp": NOW - 30 + 0.5}).encode()),
        "valid-minimal": jws(good_h, json.dumps(claims).encode()),
    }
    for name, data in hand.items():
        write("token", name, data)
    # token_signed: arbitrary-shaped input; a few byte strings to start from.
    for i, data in enumerate([b"", b"\x00" * 16, b"\x01\x00\x05\x00alg\x00HS256\x00sid\x00", bytes(range(64))]):
        write("token_signed", f"seed-{i}", data)


def ticket(sid: str, node: int, iat: int, ttl: int, key: str = TICKET_KEY, alg_header: bytes = b'{"alg":"HS256","typ":"JWT"}') -> bytes:
    payload = json.dumps({"sid": sid, "node": f"{node:016x}", "iat": iat, "exp": iat + ttl}, separators=(",", ":")).encode()
    return jws(alg_header, payload, key)


def tickets() -> None:
    prefix = bytes(20)  # selector 0 (session "conv-7f3a"), now offset 0, node 0, ttl 1, no flip
    cases = {
        "valid": ticket("conv-7f3a", 0xD512C4E7211FADE9, NOW - 10, 86400),
        "other-session": ticket("alice", 1, NOW, 86400),
        "expired": ticket("conv-7f3a", 1, NOW - 200, 100),
        "other-key": ticket("conv-7f3a", 1, NOW, 86400, key=K1),
        "alg-none": b64url(b'{"alg":"none"}').encode() + b"." + ticket("conv-7f3a", 1, NOW, 86400).split(b".")[1] + b".",
        "node-uppercase": jws(b'{"alg":"HS256"}', b'{"sid":"conv-7f3a","node":"D512","iat":1,"exp":1790086400}', TICKET_KEY),
        "node-17-digits": jws(b'{"alg":"HS256"}', b'{"sid":"conv-7f3a","node":"00000000000000001","iat":1,"exp":1790086400}', TICKET_KEY),
        "garbage": b"garbage",
    }
    for name, data in cases.items():
        write("ticket", name, prefix + data)


def configs() -> None:
    ref = yaml.safe_load((ROOT / "envoy/envoy.yaml").read_text())
    for l in ref["static_resources"]["listeners"]:
        for fc in l["filter_chains"]:
            for f in fc["filters"]:
                for hf in f.get("typed_config", {}).get("http_filters", []):
                    if hf["name"] == "envoy.filters.http.wasm":
                        write("config", "reference", hf["typed_config"]["config"]["configuration"]["value"].encode())
    static = {
        "token": {"sources": [{"header": "x-session-token"}, {"cookie": "session_token"}, {"header": "authorization", "prefix": "Bearer "}],
                  "keys": [{"kid": "k1", "alg": "HS256", "secret_base64": K1},
                           {"kid": "k2", "alg": "HS384", "secret_base64": VECTORS["keys"][1]["secret_base64"]},
                           {"kid": "k0", "alg": "HS256", "secret_env": "SA_KEY_K0"}],
                  "issuer": "https://auth.example", "audience": "chat", "session_claim": "sid", "leeway_seconds": 30,
                  "require_exp": True, "max_token_bytes": 4096},
        "on_missing": "mint", "on_invalid": "reject", "mint": {"ttl_seconds": 86400, "cookie": "session_token"},
        "ticket": {"secret_base64": TICKET_KEY, "cookie": "sa_ticket", "ttl_seconds": 86400}, "mode": "pinned",
        "upstream": {"override_header": "x-gateway-destination-endpoint", "fallbacks": 2,
                     "hosts": [{"address": "127.0.0.1:8001", "weight": 1}, {"address": "[2001:db8::1]:8080", "weight": 3, "key": "n2"}]},
        "metrics": {"flush_ms": 250},
    }
    write("config", "full-static", json.dumps(static, indent=2).encode())
    write("config", "minimal", json.dumps({"token": {"keys": [{"alg": "HS256", "secret_base64": K1}]},
                                             "upstream": {"hosts": [{"address": "127.0.0.1:8001"}]}}).encode())
    for name, data in {
        "empty": b"", "array": b"[]", "not-json": b"{token", "deep": b'{"token":' + b"[" * 300,
        "bad-type": b'{"token":{"keys":[{"alg":"HS256","secret_base64":7}]},"upstream":{"hosts":[]}}',
        "unknown-field": b'{"token":{"keys":[]},"upstream":{"hosts":[]},"bogus":1}',
    }.items():
        write("config", name, data)
    for i, data in enumerate([b"", b"\x00" * 32, bytes(range(128))]):
        write("config_json", f"seed-{i}", data)


def admin() -> None:
    def host(ip, port, health=None, weight=1, priority=None):
        h = {"address": {"socket_address": {"address": ip, "port_value": port}},
             "stats": [{"name": "cx_connect_fail", "value": "0"}, {"name": "rq_total", "value": "7"}],
             "health_status": health or {"eds_health_status": "HEALTHY"}, "weight": weight,
             "locality": {}, "hostname": ""}
        if priority is not None:
            h["priority"] = priority
        return h

    body = {"cluster_statuses": [
        {"name": "envoy_admin", "host_statuses": [host("127.0.0.1", 9901)]},
        {"name": "chat_nodes", "added_via_api": True, "host_statuses": [
            host("127.0.0.1", 8001, weight=3),
            host("::1", 8002, {"eds_health_status": "DEGRADED"}),
            host("127.0.0.1", 8003, {"failed_active_health_check": True, "eds_health_status": "HEALTHY"}),
            host("127.0.0.1", 8004, {"failed_outlier_check": True, "eds_health_status": "HEALTHY"}),
            host("127.0.0.1", 8005, {"eds_health_status": "UNHEALTHY"}),
            host("127.0.0.1", 8006, priority=1)]},
    ]}
    write("admin", "envoy-like", json.dumps(body, indent=1).encode())
    write("admin", "empty-cluster", b'{"cluster_statuses":[{"name":"chat_nodes"}]}')
    write("admin", "bad-address", b'{"cluster_statuses":[{"name":"chat_nodes","host_statuses":[{"address":{"socket_address":{"address":"x","port_value":1}}}]}]}')
    write("admin", "pipe", b'{"cluster_statuses":[{"name":"chat_nodes","host_statuses":[{"address":{"pipe":{"path":"/x"}}}]}]}')
    for i, data in enumerate([b"", b"\x02\x01\x00" * 8, bytes(range(96))]):
        write("admin_json", f"seed-{i}", data)


def header_map(headers: list[tuple[bytes, bytes]]) -> bytes:
    out = struct.pack("<I", len(headers))
    for n, v in headers:
        out += struct.pack("<II", len(n), len(v))
    for n, v in headers:
        out += n + b"\0" + v + b"\0"
    return out


def headers() -> None:
    tok = VECTORS["cases"][0]["token"].encode()
    cases = {
        "browser": [(b":method", b"POST"), (b":path", b"/v1/chat"), (b":authority", b"chat"),
                    (b"cookie", b"a=1; session_token=" + tok + b"; sa_ticket=\"t\""), (b"cookie", b"session_token=second")],
        "bearer": [(b":path", b"/"), (b"authorization", b"Bearer " + tok), (b"x-session-token", tok)],
        "spoofed": [(b"x-gateway-destination-endpoint", b"10.0.0.1:80"), (b"x_session_id", b"victim"),
                    (b"x-session-affinity", b"sticky"), (b"x-session-previous-node", b"0000000000000001")],
        "non-utf8": [(b"cookie", b"session_token=\xff\xfe; x=\xc3\x28"), (b"x-session-token", b"\x80abc")],
        "empty": [],
    }
    for name, hs in cases.items():
        write("headers", name, header_map(hs))
    for i, data in enumerate([b"\x00" * 24, bytes(range(200))]):
        write("decision", f"seed-{i}", data)


if __name__ == "__main__":
    tokens()
    tickets()
    configs()
    admin()
    headers()
