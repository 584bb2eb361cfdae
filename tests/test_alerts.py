"""The alert rules and the Grafana dashboard in docs/, checked against what the daemon exports.

- promtool accepts the rules, and their unit tests (docs/alerts_test.yml) pass;
- every alert has a unit test where it fires and one where it must not;
- every metric named in a rule or a dashboard query is one that ``daemon.metrics.Metrics``
  really exports (with its ``_total``/``_bucket``/``_sum``/``_count`` form), and every label
  named in a selector is one of that metric's labels or a target label;
- the dashboard is an importable Grafana dashboard with one repeated row per layer.

No YAML library is a dependency of trainguard, so the rule expressions are read by a small
line-based reader of ``expr:`` keys (inline or block scalars). It is cross-checked twice:
the number of expressions it finds must equal the number of rules promtool reports, and
promtool must accept every extracted expression on its own (written as a JSON rule file,
which is valid YAML).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainguard.metrics import Metrics

DOCS = Path(__file__).resolve().parent.parent / "docs"
RULES = DOCS / "alerts.yml"
RULE_TESTS = DOCS / "alerts_test.yml"
DASHBOARD = DOCS / "dashboard.json"

# Exported by the delivery and artifact plugins (issue 5); remove from PENDING when they land.
# (They landed in 42bb246, so the set is empty; it stays for the next metric written against
# a name before the code exports it.)
PENDING: frozenset[str] = frozenset()
#: Series that are not ours: Prometheus' own per-target ``up``.
EXTERNAL = frozenset({"up"})
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Prometheus) is not on PATH; CI installs it"
)

# -- PromQL: just enough of a lexer to find the metric names --------------------------------
#: Words of PromQL that look like identifiers but are not metric names: keywords, and the
#: functions/aggregations (also recognised by the "(" that follows a call).
PROMQL_WORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "rate",
        "increase",
        "histogram_quantile",
        "time",
    }
)
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`|#[^\n]*')
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def _blank_strings(expr: str) -> str:
    """Strings become ``""`` and comments disappear, so neither can look like a name."""
    return _STRING_OR_COMMENT.sub(lambda m: "" if m[0].startswith("#") else '""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (Grafana variables allowed)."""
    text = _GRAFANA_VARIABLE.sub("x", _blank_strings(expr))
    text = _MATCHERS.sub(" ", text)  # label names inside {...}
    text = _RANGE.sub(" ", text)  # [5m], [1h:1m]
    text = _GROUPING.sub(" ", text)  # by (le, layer), on (job)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match[0]
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation call
        if word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def selector_labels(expr: str) -> Iterator[tuple[str, set[str]]]:
    """``(metric, label names)`` for each ``metric{...}`` selector in an expression."""
    for match in _SELECTOR.finditer(_blank_strings(expr)):
        yield match[1], set(_MATCHER_LABEL.findall(match[2]))


def test_metric_names_reader() -> None:
    expr = """
        # a comment naming not_a_metric
        histogram_quantile(0.99, sum by (le, operation) (
          rate(trainguard_fal_request_duration_seconds_bucket{job="$job", le!="+Inf"}[$__rate_interval])
        ))
        / on (job) group_left() max without (layer) (a_gauge offset 5m) > bool 1e3
        and time() - b:recorded:rate5m{x=~"y|z"} unless count(c_total) or absent(up)
        + label_replace(d, "dst", "$1", "src", "(.*)") * topk(5, e[1h:1m])
    """
    assert metric_names(expr) == {
        "trainguard_fal_request_duration_seconds_bucket",
        "a_gauge",
        "b:recorded:rate5m",
        "c_total",
        "up",
        "d",
        "e",
    }
    assert dict(selector_labels(expr)) == {
        "trainguard_fal_request_duration_seconds_bucket": {"job", "le"},
        "b:recorded:rate5m": {"x"},
    }


# -- what the daemon exports ------------------------------------------------------------------
def exported() -> dict[str, set[str]]:
    """Every series name ``Metrics()`` exports, with the label names seen on it."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    names: dict[str, set[str]] = {}
    text = Metrics().render().decode()
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


# -- the rules ----------------------------------------------------------------------------------
_RULE_KEY = re.compile(r"^(?P<indent>\s*)(?:-\s+)?(?P<key>alert|record|expr):\s*(?P<value>.*)$")


def _scalar(value: str) -> str:
    value = value.strip()
    if value[:1] == "'" and value[-1:] == "'":
        return value[1:-1].replace("''", "'")
    if value[:1] == '"' and value[-1:] == '"':
        return json.loads(value)
    return re.sub(r"\s+#.*$", "", value)


def rule_expressions(path: Path = RULES) -> list[tuple[str, str]]:
    """``(rule name, expression)`` for every rule of a rule file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rules: list[tuple[str, str]] = []
    name = ""
    i = 0
    while i < len(lines):
        match = _RULE_KEY.match(lines[i])
        i += 1
        if match is None:
            continue
        if match["key"] != "expr":
            name = _scalar(match["value"])
            continue
        value = match["value"].strip()
        if value[:1] in "|>":  # a block scalar: the more indented lines that follow
            indent = len(match["indent"]) + (2 if lines[i - 1].lstrip().startswith("-") else 0)
            block: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i])
                i += 1
            margin = min(len(x) - len(x.lstrip()) for x in block if x.strip())
            expr = "\n".join(x[margin:] for x in block).strip()
        else:
            expr = _scalar(value)
        rules.append((name, expr))
    return rules


def alert_names() -> list[str]:
    return [name for name, _ in rule_expressions()]


# -- the dashboard ----------------------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # inside collapsed rows


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every panel target."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in all_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<selector>.*)\)\s*$", re.S)


def variable_queries() -> list[tuple[str, str]]:
    """``(variable, PromQL)`` for the query variables: the selector of ``label_values(sel,
    label)`` or the expression of ``query_result(expr)``."""
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        for text in {query, variable.get("definition")} - {None, ""}:
            match = _LABEL_VALUES.match(text) or _QUERY_RESULT.match(text)
            if match is not None:
                found.append((variable["name"], match["selector"]))
    return found


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by something PromQL accepts."""
    expr = re.sub(r"\$\{?__(?:rate_interval|interval|range)\}?", "5m", expr)
    return _GRAFANA_VARIABLE.sub("x", expr)


# -- the tests ----------------------------------------------------------------------------------
def test_rule_file_reader_finds_every_alert() -> None:
    rules = rule_expressions()
    text = RULES.read_text(encoding="utf-8")
    assert len(rules) == len(re.findall(r"^\s*-\s+(?:alert|record):", text, re.M))
    assert len({name for name, _ in rules}) == len(rules), "duplicate alert names"
    assert all(expr for _, expr in rules)
    assert set(alert_names()) >= {
        "TrainguardNoWebhooks",
        "TrainguardFallbacksHigh",
        "TrainguardLayerRestarting",
        "TrainguardLayerStale",
        "TrainguardDown",
        "TrainguardTrainingsPastDeadline",
        "TrainguardDeliveryBacklogGrowing",
        "TrainguardArtifactDownloadsFailing",
        "TrainguardFalErrors",
    }


def test_every_alert_has_a_severity_for_and_annotations() -> None:
    # One block of lines per rule; checked as text, since there is no YAML parser here.
    text = RULES.read_text(encoding="utf-8")
    blocks = re.split(r"^\s*-\s+alert:", text, flags=re.M)[1:]
    assert len(blocks) == len(alert_names())
    for name, block in zip(alert_names(), blocks, strict=True):
        assert re.search(r"^\s+for:\s*\d+[smh]\s*$", block, re.M), f"{name}: no for:"
        assert re.search(r"^\s+severity:\s*(critical|warning|info)\s*$", block, re.M), name
        assert re.search(r"^\s+summary:", block, re.M), f"{name}: no summary"
        assert re.search(r"^\s+description:", block, re.M), f"{name}: no description"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    alertname = None
    for line in RULE_TESTS.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^\s*alertname:\s*(\S+)\s*$", line):
            alertname = m[1]
        elif (m := re.match(r"^\s*exp_alerts:\s*(.*?)\s*(?:#.*)?$", line)) and alertname:
            (quiet if m[1] == "[]" else firing).add(alertname)
            alertname = None
    assert set(alert_names()) - firing == set(), "alerts never tested firing"
    assert set(alert_names()) - quiet == set(), "alerts never tested staying quiet"
    assert (firing | quiet) - set(alert_names()) == set(), "tests of alerts that do not exist"


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found is not None, result.stdout
    assert int(found[1]) == len(rule_expressions()), "the expr reader missed a rule"


@needs_promtool
def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_extracted_and_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    # Each expression as a recording rule of its own: promtool parses every one, so a rule
    # expression cut short by the reader, or a dashboard query with a typo, fails here.
    exprs = [expr for _, expr in rule_expressions()]
    exprs += [grafana_to_promql(expr) for _, expr in dashboard_queries() + variable_queries()]
    rules = [{"record": f"trainguard_check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "extracted.yml"
    path.write_text(json.dumps({"groups": [{"name": "extracted", "rules": rules}]}))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_pending_metrics_are_not_exported_yet() -> None:
    # When the delivery and artifact plugins land, this fails: move their names out of PENDING.
    assert PENDING & exported().keys() == set(), "exported now: remove from PENDING"


def _used() -> list[tuple[str, str]]:
    return (
        [(f"rule {name}", expr) for name, expr in rule_expressions()]
        + [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
        + [(f"variable ${name}", expr) for name, expr in variable_queries()]
    )


def test_every_metric_used_is_exported() -> None:
    known = exported()
    unknown = {}
    for where, expr in _used():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        if missing := names - known.keys() - PENDING - EXTERNAL:
            unknown[where] = sorted(missing)
    assert unknown == {}
    used = set().union(*(metric_names(expr) for _, expr in _used()))
    assert PENDING - used == set(), "PENDING names no rule or panel uses: drop them"


def test_every_label_used_in_a_selector_exists() -> None:
    known = exported()
    wrong = {}
    for where, expr in _used():
        for name, labels in selector_labels(expr):
            if name in known and (extra := labels - known[name] - TARGET_LABELS):
                wrong[f"{where}: {name}"] = sorted(extra)
    assert wrong == {}


def test_dashboard_shape() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    panels = list(all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["layer"]["includeAll"] and variables["layer"]["multi"]
    # The repeated row: every panel after it (up to the next row) is about $layer.
    top = dash["panels"]
    start = next(i for i, p in enumerate(top) if p.get("repeat") == "layer")
    assert top[start]["type"] == "row"
    layer_panels = []
    for panel in top[start + 1 :]:
        if panel["type"] == "row":
            break
        layer_panels.append(panel)
    assert layer_panels
    for panel in layer_panels:
        for target in panel["targets"]:
            assert 'layer="$layer"' in target["expr"], (panel["title"], target["expr"])
    per_layer = {n for p in layer_panels for t in p["targets"] for n in metric_names(t["expr"])}
    assert per_layer >= {
        "trainguard_results_recovered_total",
        "trainguard_fallbacks_applied_total",
        "trainguard_fallbacks_upgraded_total",
        "trainguard_layer_errors_total",
        "trainguard_layer_restarts_total",
        "trainguard_layer_last_success_timestamp_seconds",
    }


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, check=False, timeout=120
    )
