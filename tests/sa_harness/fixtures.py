"""pytest fixtures for the real-Envoy and end-to-end tests: every process a test starts
is torn down after it, and a missing prerequisite fails the test with how to get it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

from .backends import Backend
from .envoy import Envoy
from .paths import require_chat_node, require_envoy, require_redis, require_wasm
from .procs import free_port
from .stack import Ports, Stack, envoy_config_for


class Processes:
    """Processes of one test; stopped in reverse order at teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._items: list = []

    def backend(self, name: str, port: int | None = None, hosts: list[str] | None = None) -> Backend:
        b = Backend(name, port or free_port(), hosts=hosts, workdir=self.workdir).start()
        self._items.append(b)
        return b

    def backends(self, n: int) -> list[Backend]:
        return [self.backend(f"node-{i + 1}") for i in range(n)]

    def envoy(self, cfg: dict, name: str = "envoy", concurrency: int = 2, wait: bool = True) -> Envoy:
        e = Envoy(cfg, self.workdir, concurrency=concurrency, name=name)
        self._items.append(e)
        e.start(wait=wait)
        return e

    def add(self, item):
        self._items.append(item)
        return item

    def close(self) -> None:
        for item in reversed(self._items):
            try:
                if hasattr(item, "stop"):
                    item.stop()
                elif hasattr(item, "kill"):
                    item.kill()
            except Exception as e:  # teardown must go on
                print(f"teardown of {item!r} failed: {e}", file=sys.stderr)


@pytest.fixture
def stack(tmp_path):
    """Processes started by one test (backends, Envoys, anything with stop/kill)."""
    require_envoy()
    require_wasm()
    s = Processes(tmp_path)
    yield s
    s.close()


def build_stack(workdir: Path, mutate: Callable[[dict], None] | None = None, node_args: list[str] | None = None,
                nodes: int = 3) -> Stack:
    """A whole harness (not started) on free ports; `mutate` may edit the Envoy config."""
    require_redis()
    require_envoy()
    require_wasm()
    require_chat_node()
    ports = Ports.free(free_port, nodes=nodes)
    cfg = envoy_config_for(ports)
    if mutate is not None:
        mutate(cfg)
    # The built-in deterministic model, whatever the caller's environment says.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    return Stack(ports, workdir, envoy_config=cfg, node_args=node_args, node_env=env,
                 say=lambda s: print(s, flush=True))


@pytest.fixture
def full_stack(tmp_path):
    """`full_stack(**build_stack_kwargs)` starts a whole harness; every one started is
    stopped at teardown, which also checks that no process and no port is left behind."""
    stacks = []

    def start(**kwargs):
        s = build_stack(tmp_path / f"stack-{len(stacks)}", **kwargs)
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
