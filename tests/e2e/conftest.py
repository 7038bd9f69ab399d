"""Fixtures for the real-Envoy tests: every process a test starts is torn down after it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


class Stack:
    """Processes of one test; stopped in reverse order at teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._items: list = []

    def backend(self, name: str, port: int | None = None, hosts: list[str] | None = None) -> harness.Backend:
        b = harness.Backend(name, port or harness.free_port(), hosts=hosts, workdir=self.workdir).start()
        self._items.append(b)
        return b

    def backends(self, n: int) -> list[harness.Backend]:
        return [self.backend(f"node-{i + 1}") for i in range(n)]

    def envoy(self, cfg: dict, name: str = "envoy", concurrency: int = 2, wait: bool = True) -> harness.Envoy:
        e = harness.Envoy(cfg, self.workdir, concurrency=concurrency, name=name)
        self._items.append(e)
        e.start(wait=wait)
        return e

    def add(self, item):
        self._items.append(item)
        return item

    def close(self) -> None:
        for item in reversed(self._items):
            try:
                if isinstance(item, harness.Envoy):
                    item.stop()
                elif isinstance(item, harness.Backend):
                    item.kill()
                elif hasattr(item, "stop"):
                    item.stop()
                elif hasattr(item, "kill"):
                    item.kill()
            except Exception as e:  # teardown must go on
                print(f"teardown of {item!r} failed: {e}", file=sys.stderr)


@pytest.fixture
def stack(tmp_path):
    harness.require_envoy()
    harness.require_wasm()
    s = Stack(tmp_path)
    yield s
    s.close()
