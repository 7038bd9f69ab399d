"""sa_harness: the one Python harness of session-affinity, shared by the real-Envoy and
end-to-end tests (tests/e2e), `make run`/`make demo` (`python -m sa_harness.run`), the
soak (scripts/soak.py) and the benchmarks (bench/). One way to start Envoy, read its
stats, run the reference stack and compute a percentile.

Modules:
- `paths`: where the binaries are, and `require_*` (a missing one says how to get it).
- `procs`: free ports, waiting for a state, child processes.
- `envoy`: the Envoy wrapper, stats and admin parsing, the reference config moved onto
  other ports, file-based EDS.
- `client`: a raw HTTP/1.1 client for tests.
- `backends`: echo backends and a fake admin, as processes.
- `redis_cluster`: a Redis Cluster of redis-server processes.
- `stack`: the whole harness (Redis Cluster + Envoy + chat nodes) and a checking client
  conversation.
- `independent`: the contract re-implemented from its text (JWT, affinity function).
- `figures`: DESIGN section 7 figures and the percentile definition.
- `run`: the `make run` / `make demo` command line.
- `fixtures`: pytest fixtures (`stack`, `full_stack`), loaded by tests/e2e/conftest.py.

The package is installed (editable) into the project's .venv by the Makefile.
"""

from .backends import Backend, FakeAdmin
from .client import Response, request
from .envoy import (STAT_PREFIX, UNHEALTHY_FLAGS, Envoy, absolute_wasm_paths, access_log_lines, add_access_log, cluster,
                    dump_yaml, endpoints,
                    filter_json, harness_config, host_address, host_is_healthy, http_filters, load_yaml, parse_stats,
                    reference_config, set_filter_json, static_plugin, wasm_failures, wasm_filter, without_placement, write_eds)
from .figures import figures, per_node, percentile, percentiles
from .machine import command_output, machine_facts
from .independent import (b64url, decode_jwt_payload, fmix64, h64, metric_label, node_id, rank, session_token,
                          sign_jwt, verify_jwt)
from .paths import (CHAT_NODE_BIN, ENVOY_BIN, REFERENCE_YAML, ROOT, RUN_DIR, TICKET_KEY_B64, TOKEN_KEY_B64, TRAP_WASM,
                    WASM, MissingPrerequisite, require_chat_node, require_envoy, require_redis, require_trap_wasm,
                    require_wasm)
from .procs import (HarnessError, Process, free_port, join_address, kill_hard, port_bindable, port_open, wait_for,
                    wait_port)
from .redis_cluster import RedisCluster, RedisNode, redis_cluster_flags, resp_command
from .stack import ChatNode, Conversation, Ports, Stack, Turn, envoy_config_for, history_digest, run_turns

__all__ = [
    "command_output",
    "machine_facts",
    "Backend",
    "FakeAdmin",
    "Response",
    "request",
    "STAT_PREFIX",
    "UNHEALTHY_FLAGS",
    "Envoy",
    "absolute_wasm_paths",
    "access_log_lines",
    "add_access_log",
    "cluster",
    "dump_yaml",
    "endpoints",
    "filter_json",
    "harness_config",
    "host_address",
    "host_is_healthy",
    "http_filters",
    "load_yaml",
    "parse_stats",
    "reference_config",
    "set_filter_json",
    "static_plugin",
    "wasm_failures",
    "wasm_filter",
    "without_placement",
    "write_eds",
    "figures",
    "per_node",
    "percentile",
    "percentiles",
    "b64url",
    "decode_jwt_payload",
    "fmix64",
    "h64",
    "metric_label",
    "node_id",
    "rank",
    "session_token",
    "sign_jwt",
    "verify_jwt",
    "CHAT_NODE_BIN",
    "ENVOY_BIN",
    "REFERENCE_YAML",
    "ROOT",
    "RUN_DIR",
    "TICKET_KEY_B64",
    "TOKEN_KEY_B64",
    "TRAP_WASM",
    "WASM",
    "MissingPrerequisite",
    "require_chat_node",
    "require_envoy",
    "require_redis",
    "require_trap_wasm",
    "require_wasm",
    "HarnessError",
    "Process",
    "free_port",
    "join_address",
    "kill_hard",
    "port_bindable",
    "port_open",
    "wait_for",
    "wait_port",
    "RedisCluster",
    "RedisNode",
    "redis_cluster_flags",
    "resp_command",
    "ChatNode",
    "Conversation",
    "Ports",
    "Stack",
    "Turn",
    "envoy_config_for",
    "history_digest",
    "run_turns",
]
