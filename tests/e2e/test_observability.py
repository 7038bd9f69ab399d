"""Observability end to end: after known traffic through the whole harness (Redis
Cluster, Envoy with the reference config and its `stats_tags`, three chat nodes), the
labelled series in Envoy's `/stats/prometheus` have the expected values, and every
series and label that the Prometheus recording and alerting rules and the Grafana
dashboard read is one that Envoy really exports. The rules themselves are checked and
unit-tested with Prometheus's own `promtool` (Debian's prometheus package)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import yaml

import sa_harness as harness

RULES = harness.ROOT / "envoy" / "observability" / "prometheus-rules.yaml"
DASHBOARD = harness.ROOT / "envoy" / "observability" / "grafana-dashboard.json"

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(stack) -> dict[str, list[tuple[dict[str, str], float]]]:
    """`/stats/prometheus` as {series name: [(labels, value)]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in stack.envoy.admin("/stats/prometheus").splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable exposition line: {line!r}"
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))
        out.setdefault(name, []).append((labels, value))
    return out


def value(series, name: str, **labels) -> float | None:
    for got, v in series.get(name, []):
        if got == labels:
            return v
    return None


def test_labelled_series_after_known_traffic(full_stack):
    stack = full_stack()
    port = stack.ports.listen
    convs = [harness.Conversation(port, f"obs{i}") for i in range(10)]
    harness.run_turns(convs, lambda c, t: f"{c.name} {t}", 3)

    # Two rejected tokens, with known reasons.
    now = int(time.time())
    expired = harness.sign_jwt({"sid": "x", "iat": now - 7200, "exp": now - 3600})
    forged = harness.sign_jwt({"sid": "x", "iat": now, "exp": now + 600}, key_b64=harness.TICKET_KEY_B64)
    for tok in (expired, forged):
        r = harness.request(port, "POST", "/v1/chat", {"x-session-token": tok}, b'{"message":"hi"}')
        assert r.status == 401, r

    # A node leaves; once the filter has dropped it, one more turn each: the victim's
    # conversations are `moved`, the others `sticky`.
    homes = [c.turns[-1].node for c in convs]
    victim = stack.node(max(set(homes), key=homes.count))
    victim.kill()
    stack.wait_healthy(2)
    harness.run_turns(convs, lambda c, t: f"{c.name} {t}", 1)
    moved = homes.count(victim.node_id)

    per_node: dict[str, int] = {}
    for c in convs:
        for t in c.turns:
            label = harness.metric_label(stack.node(t.node).address)
            per_node[label] = per_node.get(label, 0) + 1
    want = [
        ("session_affinity_requests", {}, 42),
        ("session_affinity_outcome", {"outcome": "new"}, 10),
        ("session_affinity_outcome", {"outcome": "sticky"}, 20 + 10 - moved),
        ("session_affinity_outcome", {"outcome": "moved"}, moved),
        ("session_affinity_outcome", {"outcome": "rejected"}, 2),
        ("session_affinity_outcome", {"outcome": "no_host"}, 0),
        ("session_affinity_token_invalid", {"reason": "expired"}, 1),
        ("session_affinity_token_invalid", {"reason": "bad_signature"}, 1),
        ("session_affinity_token_invalid", {"reason": "malformed"}, 0),
        ("session_affinity_token_minted", {}, 10),
        ("session_affinity_upstream_errors", {}, 0),
        ("session_affinity_hosts_healthy", {}, 2),
        *[("session_affinity_node_requests", {"node": n}, v) for n, v in per_node.items()],
    ]
    series: dict = {}

    def all_there() -> bool:
        nonlocal series
        series = scrape(stack)
        return all(value(series, n, **l) == v for n, l, v in want)

    try:
        harness.wait_for(all_there, 10, "the expected Prometheus samples")
    except harness.HarnessError:
        diff = [(n, l, value(series, n, **l), v) for n, l, v in want if value(series, n, **l) != v]
        raise AssertionError(f"(series, labels, got, want): {diff}") from None
    # The tags took the per-node name apart: no unlabelled per-node series is left.
    assert not [n for n in series if re.match(r"session_affinity_node_\d", n)], sorted(series)
    assert {tuple(l) for l, _ in series["session_affinity_node_requests"]} == {("node",)}

    # The DESIGN section 7 figures, from the scrape.
    sticky = value(series, "session_affinity_outcome", outcome="sticky")
    assert sticky / (sticky + moved) == (30 - moved) / 30
    counts = [v for _, v in series["session_affinity_node_requests"]]
    assert max(counts) / (sum(counts) / len(counts)) == max(per_node.values()) / (40 / len(per_node))

    check_rules_read_only_exported_series(series)
    check_dashboard(series)


# --------------------------------------------------------------------------------------
# The rules and the dashboard against a real scrape.

_FUNCTIONS = {
    "sum", "avg", "max", "min", "count", "rate", "irate", "increase", "by", "without", "on", "ignoring",
    "group_left", "group_right", "bool", "and", "or", "unless", "clamp_min", "clamp_max", "topk", "bottomk",
    "histogram_quantile", "abs", "vector", "scalar", "offset",
}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]], list[str]]]:
    """The series selectors of a PromQL expression (the subset these files use):
    [(metric name, [(label, op, value)], grouping labels of the enclosing aggregation)]."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    out = []
    grouping = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
    groups = [g.strip() for gs in grouping for g in gs.split(",") if g.strip()]
    expr_wo_groups = re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", expr)
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr_wo_groups):
        name, matchers = m.group(1), m.group(2) or ""
        if name in _FUNCTIONS or re.fullmatch(r"\d+(e\d+)?", name):
            continue
        ms = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers)
        out.append((name, ms, groups))
    return out


def check_rules_read_only_exported_series(series) -> None:
    doc = yaml.safe_load(RULES.read_text())
    recorded: set[str] = set()
    names = [r.get("record") for g in doc["groups"] for r in g["rules"]]
    for want in ("session_affinity:sticky_rate:ratio_rate5m", "session_affinity:node_concentration:ratio_rate5m",
                 "session_affinity:error_reconnection_rate:ratio_rate5m",
                 "session_affinity:placement_spilled:rate5m", "session_affinity:placement_bounded:ratio_rate5m",
                 "session_affinity:node_load:sum"):
        assert want in names, f"{RULES.name} has no rule recording {want}"
    alerts = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert {"SessionAffinityNodesSaturated", "SessionAffinityPlacementBounded", "SessionAffinityLoadSkew"} <= alerts
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
                for name, _, _ in selectors(rule["expr"]):
                    assert name in recorded or name in series, f"alert {rule['alert']} reads unknown {name}"
                continue
            assert set(rule) <= {"record", "expr", "labels"}, rule
            found = selectors(rule["expr"])
            assert found, rule
            for name, matchers, grouping in found:
                if ":" in name:
                    assert name in recorded, f"{rule['record']} reads {name}, not recorded before it"
                    continue
                assert name in series, f"{rule['record']} reads {name}, which Envoy does not export"
                label_sets = [labels for labels, _ in series[name]]
                for label, op, val in matchers:
                    values = {ls.get(label) for ls in label_sets}
                    assert label in set().union(*label_sets), f"{rule['record']}: {name} has no label {label}"
                    if op == "=":
                        assert val in values, f"{rule['record']}: no {name}{{{label}={val!r}}} in {values}"
                    elif op == "=~":
                        for alt in val.split("|"):
                            assert alt in values, f"{rule['record']}: no {name}{{{label}={alt!r}}}"
                for label in grouping:
                    assert all(label in ls for ls in label_sets), f"{rule['record']}: {name} lacks label {label}"
            recorded.add(rule["record"])


def check_dashboard(series) -> None:
    dash = json.loads(DASHBOARD.read_text())
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    shown = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for name, _, _ in selectors(target["expr"]):
                assert name in recorded or name in series, f"panel {panel['title']!r} reads unknown {name}"
                shown.add(name)
    for figure in ("sticky_rate", "node_concentration", "error_reconnection_rate", "placement_bounded"):
        assert f"session_affinity:{figure}:ratio_rate5m" in shown, f"the dashboard does not show {figure}"
    for series_name in ("session_affinity:placement_spilled:rate5m", "session_affinity:node_load:sum"):
        assert series_name in shown, f"the dashboard does not show {series_name}"


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = shutil.which("promtool")
    assert promtool, ("promtool not found: run `make promtool` (or `make test`), which installs Debian's "
                      "prometheus package, or `apt-get install -y prometheus`")
    for args in (["check", "rules", RULES.name], ["test", "rules", "prometheus-rules.test.yaml"]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent)
        assert out.returncode == 0, out.stdout + out.stderr
