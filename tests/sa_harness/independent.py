"""Independent implementations of the contract (DESIGN sections 3-5), written from the
text of the contract and not from the filter's code: HMAC JWT signing and checking, the
affinity function and node ids. Tests compute their expectations with these, so a test
can catch the filter and the contract disagreeing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time

from .paths import TOKEN_KEY_B64


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def sign_jwt(claims: dict, key_b64: str = TOKEN_KEY_B64, alg: str = "HS256", kid: str | None = "k1",
             header: dict | None = None) -> str:
    h = header if header is not None else {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = b64url(json.dumps(h, separators=(",", ":")).encode()) + "." + b64url(
        json.dumps(claims, separators=(",", ":")).encode()
    )
    mac = hmac.new(base64.b64decode(key_b64), signing_input.encode(), _HASHES[alg]).digest()
    return signing_input + "." + b64url(mac)


def session_token(sid: str, ttl: int = 3600, **claims) -> str:
    now = int(time.time())
    return sign_jwt({"sid": sid, "iat": now, "exp": now + ttl, **claims})


def verify_jwt(token: str, key_b64: str, alg: str = "HS256") -> dict | None:
    """Independent check of a compact HMAC JWS: the payload when `token` is signed with
    `key_b64` under `alg` (and says so in its header), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None

    def seg(s: str) -> bytes:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))

    try:
        header, payload, sig = json.loads(seg(parts[0])), json.loads(seg(parts[1])), seg(parts[2])
    except ValueError:
        return None
    if header.get("alg") != alg:
        return None
    mac = hmac.new(base64.b64decode(key_b64), f"{parts[0]}.{parts[1]}".encode(), _HASHES[alg]).digest()
    return payload if hmac.compare_digest(mac, sig) else None


def decode_jwt_payload(token: str) -> dict:
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def h64(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def fmix64(k: int) -> int:
    m = (1 << 64) - 1
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & m
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & m
    k ^= k >> 33
    return k


def rank(session: str, hosts: list[tuple[str, int]]) -> list[str]:
    """The affinity function (DESIGN section 5): host keys best first, for (key, weight)."""
    s = h64(session.encode())
    scored = []
    for key, weight in hosts:
        mix = fmix64(s ^ h64(key.encode()))
        u = ((mix >> 11) + 0.5) / 2.0**53
        d = -math.log(u)
        score = weight / d if d > 0 else math.inf
        scored.append((-score, -mix, key.encode(), key))
    scored.sort()
    return [k for *_, k in scored]


def node_id(key: str) -> str:
    return f"{h64(key.encode()):016x}"


def metric_label(address: str) -> str:
    return "".join("_" if c in ".:[]" else c for c in address)
