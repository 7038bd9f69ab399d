"""The whole harness for end-to-end tests: a Redis Cluster (3 masters + 3 replicas),
Envoy with the reference config, and three chat nodes, all on free ports, so these tests
run next to `make run`.

The processes are managed by `scripts/harness.py` (the same code as `make run`), loaded
here as `orchestration` (its module name would clash with this directory's `harness`).
The Envoy config is the reference `envoy/envoy.yaml` moved onto the test's ports by
`harness.harness_config`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import pytest

import harness

_spec = importlib.util.spec_from_file_location("orchestration", harness.ROOT / "scripts" / "harness.py")
orchestration = importlib.util.module_from_spec(_spec)
sys.modules["orchestration"] = orchestration
_spec.loader.exec_module(orchestration)


def build(workdir: Path, mutate: Callable[[dict], None] | None = None, node_args: list[str] | None = None):
    """A Stack (not started) on free ports; `mutate` may edit the Envoy config dict."""
    harness.require_redis()
    harness.require_envoy()
    harness.require_wasm()
    harness.require_chat_node()
    ports = orchestration.Ports.free(harness.free_port)
    cfg = harness.harness_config(
        listen=ports.listen,
        admin=ports.admin,
        hosts=[("127.0.0.1", p, 1) for p in ports.nodes],
        redis_listen=ports.redis_proxy,
        redis_seeds=ports.redis_seeds,
    )
    if mutate is not None:
        mutate(cfg)
    # The built-in deterministic model, whatever the caller's environment says.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    return orchestration.Stack(ports, workdir, envoy_config=cfg, node_args=node_args, node_env=env,
                               say=lambda s: print(s, flush=True))


@pytest.fixture
def full_stack(tmp_path):
    """`full_stack(**build_kwargs)` starts a whole harness; every one started is stopped
    at teardown, which also checks that no process and no port is left behind."""
    stacks = []

    def start(**kwargs):
        s = build(tmp_path / f"stack-{len(stacks)}", **kwargs)
        stacks.append(s)
        s.start()
        return s

    yield start
    for s in stacks:
        s.stop()
        print(f"logs of this stack: {s.workdir}")
        alive = [p.name for p in s.processes() if p.alive()]
        assert not alive, f"processes left running: {alive}"
        assert not s.listening(), f"ports still listening after stop: {s.listening()}"
