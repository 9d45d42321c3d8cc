"""The chart's Grafana dashboard, alert rules and metric-driven autoscaling, checked offline.

What a dashboard or an alert queries is only worth something if the processes export it: a renamed
metric leaves a panel empty or an alert silent, and nobody notices. So every metric name in the
dashboard's queries, the PrometheusRule's expressions and the Prometheus Adapter rules of
docs/helm.md must be one the code exports: a row of the table in docs/operations.md, *Metrics*
(which tests/test_metrics.py keeps equal to a real scrape), with the series names its type implies
(`_bucket`/`_sum`/`_count` for a histogram), or a standard series of `common.metrics.registry`
(`process_*`, `python_*`), or `up`.

Rendering goes through tests/test_helm.py's helpers (Helm's engine, offline); built-in kinds are
validated with kubernetes-validate, the PrometheusRule (a CRD) against the shape below. Where
`promtool` is installed (Debian's `prometheus` package) every query is also parsed by Prometheus
itself and the alerts are run against made-up series; without it those two tests skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.metrics import LATENCY_BUCKETS_S, Histogram, registry
from tests.test_helm import (
    CHART_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    Manifest,
    find,
    load_values,
    one,
    render,
    render_raw,
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((CHART_DIR / "dashboards").glob("*.json"))
OPERATIONS = ROOT / "docs" / "operations.md"
HELM_DOC = ROOT / "docs" / "helm.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

RULES_ON: dict[str, Any] = {"prometheusRule": {"enabled": True}}
DASHBOARDS_ON: dict[str, Any] = {"dashboards": {"enabled": True}}
SCALING_ON: dict[str, Any] = {
    "node": {"autoscaling": {"enabled": True, "socketsPerPod": 1500}},
    "worker": {"autoscaling": {"enabled": True, "runsPerPod": 6,
                               "runsMetricSelector": {"service": f"{RELEASE}-chorus-worker-internal"}}},
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


# --- what the processes export ----------------------------------------------------------------


def exported_series() -> set[str]:
    """Every series name a Chorus process can expose, from docs/operations.md's metric table (kept
    equal to a real scrape by tests/test_metrics.py) and the standard collectors, plus `up`."""
    section = OPERATIONS.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(chorus_[a-z_]+)` \| (counter|gauge|histogram) \|", section, re.M)
    assert len(rows) > 25, "the metric table of docs/operations.md was not found"
    names = {"up"}
    for name, kind in rows:
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    names |= {s.name for family in registry(list).collect() for s in family.samples}
    return names


# --- reading PromQL ---------------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan"}


def metric_references(expr: str) -> list[str]:
    """Each place a PromQL expression names a metric (not `__name__` matchers): identifiers that
    are not functions, keywords, labels or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'", '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return [match.group(1)
            for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr)
            if match.group(2) is None and match.group(1) not in _KEYWORDS]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(selector, label)`) reads,
    `__name__` matchers included."""
    expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr.strip(), flags=re.S)
    names = {name for pattern in re.findall(r'__name__\s*=~?\s*"([^"]*)"', expr)
             for name in pattern.split("|")}
    return names | set(metric_references(expr))


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (pod) (rate(a_total{x="y", z=~"$pod"}[$__rate_interval]))', {"a_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m]))) > 1", {"b_bucket"}),
        ("(sum(c) or vector(0)) == 0 and on () max(max_over_time(d{j=\"k\"}[1h])) > 0", {"c", "d"}),
        ('x and on (namespace, pod) y{a="b"} - ignoring(le) z offset 5m', {"x", "y", "z"}),
        ('label_values({__name__=~"e|f", namespace="$namespace"}, pod)', {"e", "f"}),
        ('count(max by (endpoint) (g{h="i"}) > 0) or vector(0)', {"g"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, label matchers) for every `metric{...}` in an expression."""
    return re.findall(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr)


# --- the dashboard ----------------------------------------------------------------------------


def load_dashboard(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows only group panels, and hold none while expanded)."""
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    panels += [p for row in dashboard["panels"] if row["type"] == "row" for p in row.get("panels", [])]
    return panels


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def test_there_is_a_dashboard() -> None:
    assert [path.name for path in DASHBOARDS] == ["chorus.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
    assert variables["pod"]["includeAll"] and variables["pod"]["allValue"] == ".*"

    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in query_panels(dashboard):
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == DATASOURCE, where
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, where
        assert panel["targets"], where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, where
            assert target["expr"].strip(), where


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_only_exported_metrics(path: Path) -> None:
    exported = exported_series()
    queried = {name for expr in dashboard_queries(load_dashboard(path)) for name in metric_names(expr)}
    assert queried, "no query found"
    assert queried - exported == set(), "not exported (docs/operations.md, Metrics)"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_query_is_narrowed_by_the_variables(path: Path) -> None:
    """Each metric is read through `{namespace="$namespace", pod=~"$pod"}`: a query without it
    mixes in another namespace's Chorus, or any Python process's `process_*` series."""
    for panel in query_panels(load_dashboard(path)):
        for target in panel["targets"]:
            expr = target["expr"]
            found = selectors(expr)
            assert len(found) == len(metric_references(expr)), (panel["title"], expr)
            for metric, matchers in found:
                assert 'namespace="$namespace"' in matchers and 'pod=~"$pod"' in matchers, (metric, expr)
            assert "$__rate_interval" in expr or ("rate(" not in expr and "increase(" not in expr), expr


def test_dashboard_shows_what_operators_watch() -> None:
    queried = {name for path in DASHBOARDS for expr in dashboard_queries(load_dashboard(path))
               for name in metric_names(expr)}
    assert {
        "chorus_ws_connections", "chorus_events_delivered_total", "chorus_delivery_lag_seconds_bucket",
        "chorus_event_loop_lag_seconds_bucket", "chorus_event_loop_lag_max_seconds",
        "chorus_slow_consumer_closes_total", "chorus_ws_closes_total", "chorus_commands_total",
        "chorus_rate_limited_total", "chorus_runs_total", "chorus_send_first_token_seconds_bucket",
        "chorus_run_first_token_seconds_bucket", "chorus_run_queue_depth", "chorus_run_queue_oldest_seconds",
        "chorus_run_queue_pending", "chorus_llm_requests_total", "chorus_llm_circuit_open",
        "chorus_worker_slots", "chorus_runs_running", "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    } <= queried


# --- the dashboards ConfigMap -----------------------------------------------------------------


def dashboards_config_map(objects: list[Manifest]) -> Manifest:
    return one(objects, "ConfigMap", f"{RELEASE}-chorus-dashboards")


def test_dashboards_config_map_is_labelled_for_the_grafana_sidecar(chart: helm.Chart) -> None:
    objects = render(chart, {**load_values("production"), **DASHBOARDS_ON})
    config_map = dashboards_config_map(objects)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert "annotations" not in config_map["metadata"]
    # The file, byte for byte: Grafana reads the JSON as the chart ships it.
    assert config_map["data"] == {path.name: path.read_text().rstrip("\n") for path in DASHBOARDS}
    assert len(json.dumps(config_map)) < 1024 * 1024  # a ConfigMap's limit


def test_dashboards_config_map_label_folder_and_namespace_are_configurable(chart: helm.Chart) -> None:
    values = {"dashboards": {"enabled": True, "namespace": "monitoring", "label": "grafana.io/dashboard",
                             "labelValue": "chorus", "labels": {"team": "chat"}, "folder": "Chat platform",
                             "folderAnnotation": "k8s-sidecar-target-directory",
                             "annotations": {"note": "x"}}}
    metadata = dashboards_config_map(render(chart, values))["metadata"]
    assert metadata["namespace"] == "monitoring"
    assert metadata["labels"]["grafana.io/dashboard"] == "chorus"
    assert metadata["labels"]["team"] == "chat"
    assert "grafana_dashboard" not in metadata["labels"]
    assert metadata["annotations"] == {"k8s-sidecar-target-directory": "Chat platform", "note": "x"}


# --- the PrometheusRule -----------------------------------------------------------------------

ALERT_NAMES = (
    "ChorusNoWorkerWhileRunsQueue", "ChorusRunsWaitingTooLong", "ChorusDeadLettersGrowing",
    "ChorusLLMCircuitOpen", "ChorusDeliveryLagHigh", "ChorusNodeDeaf", "ChorusPubSubReconnecting",
    "ChorusProcessDown", "ChorusEventLoopLagHigh", "ChorusEventLoopStalls",
)
DURATION = "^[0-9]+(ms|s|m|h|d)$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# The fields a PrometheusRule may carry here, strictly: the Operator would silently drop a typo
# (`annotation:`), and Prometheus would then alert without a runbook, or never.
PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "namespace", "labels"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": STRING_MAP},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^chorus\\."},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr", "labels", "annotations"],
                                    "properties": {
                                        "alert": {"enum": list(ALERT_NAMES)},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": DURATION},
                                        "labels": {
                                            **STRING_MAP,
                                            "required": ["severity", "namespace"],
                                            "properties": {"severity": {"enum": ["warning", "critical"]}},
                                        },
                                        "annotations": {
                                            **STRING_MAP,
                                            "required": ["summary", "description", "runbook_url"],
                                            "properties": {
                                                "runbook_url": {"type": "string",
                                                                "pattern": r"^https?://[^#]+#[a-z]+$"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def rules_of(rule: Manifest) -> list[Manifest]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


@pytest.fixture(scope="module")
def prometheus_rule(chart: helm.Chart) -> Manifest:
    (rule,) = find(render(chart, {**load_values("production"), **RULES_ON}), "PrometheusRule")
    return rule


def test_prometheus_rule_has_the_expected_shape(prometheus_rule: Manifest) -> None:
    jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA).validate(prometheus_rule)
    assert prometheus_rule["metadata"]["name"] == f"{RELEASE}-chorus"
    assert prometheus_rule["metadata"]["namespace"] == NAMESPACE
    assert prometheus_rule["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    alerts = [r["alert"] for r in rules_of(prometheus_rule)]
    assert sorted(alerts) == sorted(ALERT_NAMES)


def test_schema_lists_every_alert_for_disabling() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    disabled = schema["properties"]["prometheusRule"]["properties"]["disabled"]
    assert sorted(disabled["items"]["enum"]) == sorted(ALERT_NAMES)


def test_alerts_query_only_exported_metrics(prometheus_rule: Manifest) -> None:
    exported = exported_series()
    for rule in rules_of(prometheus_rule):
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names - exported == set(), rule["alert"]


def test_alerts_select_this_releases_scrape_targets(chart: helm.Chart, prometheus_rule: Manifest) -> None:
    """Each selector names the release's namespace and the job of one of the Services the
    ServiceMonitor scrapes (the Operator's job label is the Service's name)."""
    objects = render(chart, {**load_values("production"), "serviceMonitor": {"enabled": True}})
    (monitor,) = find(objects, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = {svc["metadata"]["name"] for svc in find(objects, "Service")
               if wanted <= svc["metadata"]["labels"].items()}
    assert len(scraped) == 2
    for rule in rules_of(prometheus_rule):
        found = selectors(rule["expr"])
        assert len(found) == len(metric_references(rule["expr"])), rule["alert"]
        for metric, matchers in found:
            assert f'namespace="{NAMESPACE}"' in matchers, (rule["alert"], metric)
            job = re.search(r'job(=~?)"([^"]*)"', matchers)
            assert job, (rule["alert"], metric)
            jobs = {name for name in scraped if re.fullmatch(job.group(2), name)}
            assert jobs if job.group(1) == "=~" else jobs == {job.group(2)}, (rule["alert"], metric)


def test_alerts_bucket_bounds_are_ones_the_histograms_have(prometheus_rule: Manifest) -> None:
    # `le` is a string: "1.0" selects nothing if the processes wrote "1".
    family = Histogram(LATENCY_BUCKETS_S).family("x_seconds", "x")
    bounds = {s.labels["le"] for s in family.samples if "le" in s.labels}
    used = {le for rule in rules_of(prometheus_rule) for le in re.findall(r'le="([^"]*)"', rule["expr"])}
    assert used and used <= bounds


def test_alert_labels_runbooks_and_selector_labels_are_configurable(chart: helm.Chart) -> None:
    values = {"prometheusRule": {"enabled": True, "namespace": "monitoring",
                                 "labels": {"release": "kube-prometheus-stack"},
                                 "alertLabels": {"team": "chat"},
                                 "runbookUrl": "https://docs.example.com/ops.md"}}
    (rule,) = find(render(chart, values), "PrometheusRule")
    jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA).validate(rule)
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for alert in rules_of(rule):
        assert alert["labels"]["team"] == "chat"
        assert alert["labels"]["namespace"] == NAMESPACE  # the series', not the rule's
        assert alert["annotations"]["runbook_url"].startswith("https://docs.example.com/ops.md#")


def test_alerts_can_be_disabled_one_by_one(chart: helm.Chart) -> None:
    off = ["ChorusDeliveryLagHigh", "ChorusNodeDeaf", "ChorusPubSubReconnecting", "ChorusEventLoopLagHigh"]
    (rule,) = find(render(chart, {"prometheusRule": {"enabled": True, "disabled": off}}), "PrometheusRule")
    jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA).validate(rule)  # no group left empty
    assert sorted(r["alert"] for r in rules_of(rule)) == sorted(set(ALERT_NAMES) - set(off))
    assert "chorus.delivery" not in [group["name"] for group in rule["spec"]["groups"]]


def test_thresholds_reach_the_expressions(chart: helm.Chart) -> None:
    thresholds = {"deliveryLagP99Seconds": 2.5, "eventLoopLagP99Seconds": 0.25,
                  "runQueueOldestSeconds": 30, "deafNodeMinUsers": 100}
    (rule,) = find(render(chart, {"prometheusRule": {"enabled": True, "thresholds": thresholds}}),
                   "PrometheusRule")
    exprs = {r["alert"]: r["expr"] for r in rules_of(rule)}
    assert exprs["ChorusDeliveryLagHigh"].endswith("> 2.5")
    assert exprs["ChorusEventLoopLagHigh"].endswith("> 0.25")
    assert exprs["ChorusRunsWaitingTooLong"].endswith("> 30")
    assert ">= 100\n" in exprs["ChorusNodeDeaf"]


def test_runbooks_are_sections_of_the_operations_guide(prometheus_rule: Manifest) -> None:
    text = OPERATIONS.read_text()
    if "\n## Alerts\n" not in text:
        pytest.skip("docs/operations.md has no '## Alerts' section yet (proposed with this chart change)")
    section = text.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    anchors = {re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
               for heading in re.findall(r"^#{3,4} (.+)$", section, re.M)}
    for rule in rules_of(prometheus_rule):
        assert rule["annotations"]["runbook_url"].rsplit("#", 1)[1] in anchors, rule["alert"]


# --- off by default, and valid when on ----------------------------------------------------------


@pytest.mark.parametrize("case", ["defaults", "minimal", "production"])
def test_nothing_new_is_rendered_by_default(chart: helm.Chart, case: str) -> None:
    objects = render(chart, load_values(case))
    assert find(objects, "PrometheusRule") == []
    assert [obj for obj in find(objects, "ConfigMap") if obj["metadata"]["name"].endswith("-dashboards")] == []
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        assert {metric["type"] for metric in hpa["spec"]["metrics"]} == {"Resource"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_everything_on_validates_strictly(chart: helm.Chart, kube_version: str) -> None:
    values = {**load_values("production"), **RULES_ON, **DASHBOARDS_ON, "serviceMonitor": {"enabled": True}}
    for component in ("node", "worker"):
        values[component] = {**values[component],
                             "autoscaling": {**values[component]["autoscaling"],
                                             **SCALING_ON[component]["autoscaling"]}}
    report = helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{kube_version}.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    objects = render(chart, values)
    kinds = {obj["kind"] for obj in objects}
    assert {"PrometheusRule", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: checked against their shapes above and in test_helm.py
        kubernetes_validate.validate(obj, kube_version, strict=True)


# --- autoscaling on Chorus's metrics ------------------------------------------------------------


def test_autoscalers_scale_on_sockets_and_runs(chart: helm.Chart) -> None:
    objects = render(chart, SCALING_ON)
    node = one(objects, "HorizontalPodAutoscaler", f"{RELEASE}-chorus-ws-node")["spec"]["metrics"]
    worker = one(objects, "HorizontalPodAutoscaler", f"{RELEASE}-chorus-worker")["spec"]["metrics"]
    assert node[0]["type"] == worker[0]["type"] == "Resource"  # CPU stays a floor
    assert node[1] == {"type": "Pods", "pods": {
        "metric": {"name": "chorus_ws_connections"},
        "target": {"type": "AverageValue", "averageValue": "1500"}}}
    assert worker[1] == {"type": "External", "external": {
        "metric": {"name": "chorus_run_demand",
                   "selector": {"matchLabels": {"service": f"{RELEASE}-chorus-worker-internal"}}},
        "target": {"type": "AverageValue", "averageValue": "6"}}}
    # Without a selector none is rendered, and the component's own target only goes on its HPA.
    objects = render(chart, {"node": {"autoscaling": {"enabled": True}},
                             "worker": {"autoscaling": {"enabled": True, "runsPerPod": 4}}})
    node = one(objects, "HorizontalPodAutoscaler", f"{RELEASE}-chorus-ws-node")["spec"]["metrics"]
    worker = one(objects, "HorizontalPodAutoscaler", f"{RELEASE}-chorus-worker")["spec"]["metrics"]
    assert [m["type"] for m in node] == ["Resource"]
    assert worker[1]["external"]["metric"] == {"name": "chorus_run_demand"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_custom_metric_only_autoscalers_validate(chart: helm.Chart, kube_version: str) -> None:
    values = {"node": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None,
                                       "socketsPerPod": 2000}},
              "worker": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None,
                                         "runsPerPod": 12}}}
    hpas = find(render(chart, values), "HorizontalPodAutoscaler")
    assert len(hpas) == 2
    for hpa in hpas:
        assert len(hpa["spec"]["metrics"]) == 1
        kubernetes_validate.validate(hpa, kube_version, strict=True)


def adapter_rules() -> dict[str, Any]:
    """The Prometheus Adapter rules docs/helm.md gives (the `rules:` block under *Scaling*)."""
    blocks = re.findall(r"```yaml\n(.*?)```", HELM_DOC.read_text(), re.S)
    found = [yaml.safe_load(block) for block in blocks if "seriesQuery" in block]
    assert len(found) == 1, "one adapter rules block in docs/helm.md"
    rules: dict[str, Any] = found[0]["rules"]
    return rules


def test_adapter_rules_serve_the_charts_metrics_from_exported_ones() -> None:
    rules = adapter_rules()
    exported = exported_series()
    for rule in rules["custom"] + rules["external"]:
        query = rule["metricsQuery"].replace("<<.Series>>", re.sub(r"\{.*", "", rule["seriesQuery"]))
        query = query.replace("<<.LabelMatchers>>", "").replace("<<.GroupBy>>", "namespace")
        assert metric_names(query) | metric_names(rule["seriesQuery"]) <= exported, rule
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    custom = {rule["name"]["as"] for rule in rules["custom"]}
    external = {rule["name"]["as"] for rule in rules["external"]}
    assert values["node"]["autoscaling"]["socketsMetric"] in custom
    assert values["worker"]["autoscaling"]["runsMetric"] in external


# --- values schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dashboards": {"enable": True}}, "additional properties 'enable' not allowed"),
        ({"prometheusRule": {"thresholds": {"deliveryLag": 1}}}, "additional properties 'deliveryLag'"),
        ({"prometheusRule": {"disabled": ["ChorusNoSuchAlert"]}}, "/prometheusRule/disabled/0"),
        ({"node": {"autoscaling": {"socketsPerPod": 0}}}, "/node/autoscaling/socketsPerPod"),
        ({"worker": {"autoscaling": {"runsPerPod": "6"}}}, "/worker/autoscaling/runsPerPod"),
        ({"node": {"autoscaling": {"runsPerPod": 6}}}, "additional properties 'runsPerPod' not allowed"),
        ({"dashboards": {"label": "not a label"}}, "/dashboards/label"),
    ],
)
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render_raw(chart, values)


# --- Prometheus's own reading (promtool) --------------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package prometheus)")


def promtool(tmp_path: Path, *args: str) -> None:
    result = subprocess.run(["promtool", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_alert_and_dashboard_query(prometheus_rule: Manifest, tmp_path: Path) -> None:
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(prometheus_rule["spec"]))
    grafana = {"$__rate_interval": "5m", "$namespace": NAMESPACE, "$pod": ".*"}
    queries: list[dict[str, str]] = []
    for path in DASHBOARDS:
        for expr in dashboard_queries(load_dashboard(path)):
            if expr.startswith("label_values("):
                expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"count(\1)", expr)
            for variable, value in grafana.items():
                expr = expr.replace(variable, value)
            queries.append({"record": f"dashboard:query{len(queries)}", "expr": expr})
    (tmp_path / "dashboards.yaml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": queries}]}))
    promtool(tmp_path, "check", "rules", "alerts.yaml", "dashboards.yaml")


NODE = f'namespace="{NAMESPACE}", job="{RELEASE}-chorus-ws-node-internal"'
WORKER = f'namespace="{NAMESPACE}", job="{RELEASE}-chorus-worker-internal"'

# Made-up series, one minute apart, and what each alert must make of them.
ALERT_CASES = f"""
- interval: 1m
  input_series:
    # Sends keep coming; the only worker is gone after 10 minutes.
    - series: 'chorus_commands_total{{{NODE}, pod="n1", type="send", result="ok"}}'
      values: '0+1x40'
    - series: 'chorus_worker_slots{{{WORKER}, pod="w1"}}'
      values: '8x10 _x30'
    # n1 and n2 hold 50 users each; after 10 minutes n2 delivers nothing while n1 goes on.
    - series: 'chorus_subscribed_users{{{NODE}, pod="n1"}}'
      values: '50x40'
    - series: 'chorus_subscribed_users{{{NODE}, pod="n2"}}'
      values: '50x40'
    - series: 'chorus_delivery_lag_seconds_count{{{NODE}, pod="n1"}}'
      values: '0+10x40'
    - series: 'chorus_delivery_lag_seconds_count{{{NODE}, pod="n2"}}'
      values: '0+10x10 100x30'
    # n1's loop ticks 2,400 times a minute; one tick after minute 20 is over a second late.
    - series: 'chorus_event_loop_lag_seconds_count{{{NODE}, pod="n1"}}'
      values: '0+2400x40'
    - series: 'chorus_event_loop_lag_seconds_bucket{{{NODE}, pod="n1", le="1.0"}}'
      values: '0+2400x20 50399+2400x19'
    - series: 'chorus_runs_dead_lettered_total{{{WORKER}, pod="w1"}}'
      values: '0x5 1x5'
  alert_rule_test:
    - {{eval_time: 14m, alertname: ChorusNoWorkerWhileRunsQueue, exp_alerts: []}}
    - eval_time: 22m
      alertname: ChorusNoWorkerWhileRunsQueue
      exp_alerts: [{{exp_labels: {{severity: critical, namespace: {NAMESPACE}}}}}]
    - {{eval_time: 28m, alertname: ChorusNodeDeaf, exp_alerts: []}}
    - eval_time: 31m
      alertname: ChorusNodeDeaf
      exp_alerts: [{{exp_labels: {{severity: critical, namespace: {NAMESPACE}, pod: n2}}}}]
    - {{eval_time: 15m, alertname: ChorusEventLoopStalls, exp_alerts: []}}
    - eval_time: 25m
      alertname: ChorusEventLoopStalls
      exp_alerts: [{{exp_labels: {{severity: warning, namespace: {NAMESPACE}, pod: n1}}}}]
    - {{eval_time: 4m, alertname: ChorusDeadLettersGrowing, exp_alerts: []}}
    - eval_time: 8m
      alertname: ChorusDeadLettersGrowing
      exp_alerts: [{{exp_labels: {{severity: warning, namespace: {NAMESPACE}}}}}]
"""


def filled(template: str, labels: dict[str, Any]) -> str:
    """An annotation as Prometheus fills it in; the series above make every `$value` 1."""
    text = template.replace("{{ $value | humanize }}", "1")
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: str(labels[m.group(1)]), text)


@needs_promtool
def test_promtool_alerts_fire_when_they_should(prometheus_rule: Manifest, tmp_path: Path) -> None:
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(prometheus_rule["spec"]))
    cases = yaml.safe_load(ALERT_CASES)
    annotations = {rule["alert"]: rule["annotations"] for rule in rules_of(prometheus_rule)}
    for check in cases[0]["alert_rule_test"]:
        for alert in check["exp_alerts"]:
            alert["exp_annotations"] = {key: filled(text, alert["exp_labels"])
                                        for key, text in annotations[check["alertname"]].items()}
    tests = {"rule_files": ["alerts.yaml"], "evaluation_interval": "1m", "tests": cases}
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(tests))
    promtool(tmp_path, "test", "rules", "alerts_test.yaml")
