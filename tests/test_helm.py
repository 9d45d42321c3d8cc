"""The Helm chart in helm/chorus, checked offline.

Lint and render go through helm-python-sdk (``helm_python``: Helm's own Go engine behind a C ABI,
so no ``helm`` binary); every rendered object is validated with kubernetes-validate's strict
schemas for several Kubernetes versions; then the properties the runtime contract depends on are
asserted: probes on the internal port, the drain timings, secrets by name, the migration hook.

Values come from tests/helm_values/*.yaml (parsed by Helm's own ``-f`` parser) plus the chart's
defaults. Helm's lint runs templates in "lint mode", where ``fail`` only logs, so the checks made
with ``fail`` (terminationGracePeriodSeconds) are exercised through render, as `helm template`
and `helm install` would hit them.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version, major_minor

from agent_worker.settings import WorkerSettings
from common.config import SharedSettings, declared, read
from ws_node.settings import NodeSettings

ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = ROOT / "helm" / "chorus"
VALUES_DIR = Path(__file__).resolve().parent / "helm_values"
RELEASE = "rel"
NAMESPACE = "chat"

# Oldest and newer supported minors, plus the newest kubernetes-validate ships schemas for.
KUBE_VERSIONS = ("1.29", "1.31", major_minor(latest_version()))
# API groups of CRDs: no upstream schema, their shape is checked by hand below.
CRD_GROUPS = ("monitoring.coreos.com/",)

VALUES_FILES = sorted(VALUES_DIR.glob("*.yaml"))
CASES = ["defaults", *(path.stem for path in VALUES_FILES)]

Manifest = dict[str, Any]


def load_values(case: str) -> dict[str, Any]:
    """The values a case installs with: {} for the chart defaults, else the file, as `-f` reads it."""
    if case == "defaults":
        return {}
    return helm.values_from_yaml((VALUES_DIR / f"{case}.yaml").read_text())


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render_raw(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(chart: helm.Chart, values: dict[str, Any]) -> list[Manifest]:
    """Every object the chart renders for ``values`` (hooks included), as dicts."""
    objects: list[Manifest] = []
    for template, text in render_raw(chart, values).items():
        if not template.endswith(".yaml"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@pytest.fixture(scope="module")
def rendered(chart: helm.Chart) -> dict[str, list[Manifest]]:
    return {case: render(chart, load_values(case)) for case in CASES}


def find(objects: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        obj for obj in objects if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]


def one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def node_deployment(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment", f"{RELEASE}-chorus-ws-node")


def worker_deployment(objects: list[Manifest]) -> Manifest:
    return one(objects, "Deployment", f"{RELEASE}-chorus-worker")


def worker_deployments(objects: list[Manifest]) -> list[Manifest]:
    """The default worker's Deployment and every pool's (`workerPools`)."""
    return [d for d in find(objects, "Deployment") if container(d)["name"] == "agent-worker"]


def pool_count(case: str) -> int:
    return len(load_values(case).get("workerPools", []))


def container(workload: Manifest) -> Manifest:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Manifest = containers[0]
    return result


def port_number(ctr: Manifest, name: str) -> int:
    numbers = [p["containerPort"] for p in ctr["ports"] if p["name"] == name]
    assert numbers, f"container {ctr['name']} has no port named {name!r}"
    return int(numbers[0])


def config_data(objects: list[Manifest], workload: Manifest) -> dict[str, str]:
    """The ConfigMap a workload's envFrom points at."""
    (source,) = container(workload)["envFrom"]
    data: dict[str, str] = one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
    return data


def secret_refs(ctr: Manifest) -> dict[str, tuple[str, str]]:
    """env name -> (Secret name, key) for every secretKeyRef of a container."""
    return {
        env["name"]: (env["valueFrom"]["secretKeyRef"]["name"], env["valueFrom"]["secretKeyRef"]["key"])
        for env in ctr.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }


def workloads(objects: list[Manifest]) -> list[Manifest]:
    return find(objects, "Deployment") + find(objects, "Job")


# --- lint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_lint_strict_passes(case: str, kube_version: str) -> None:
    report = helm.lint(CHART_DIR, load_values(case), strict=True, kube_version=f"v{kube_version}.0")
    # Severity 2 is a warning, 3 an error; --strict fails on both. 1 ("icon is recommended") is info.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], problems


def test_values_files_exist() -> None:
    assert {"minimal", "production", "pools"} <= {path.stem for path in VALUES_FILES}


# --- Kubernetes schema validation ----------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_validate_strictly(
    rendered: dict[str, list[Manifest]], case: str, kube_version: str
) -> None:
    objects = rendered[case]
    assert objects
    invalid: list[str] = []
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            # Raises SchemaNotFoundError for a kind/apiVersion this Kubernetes version does not serve.
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            invalid.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert invalid == []


# The fields this chart sets on a ServiceMonitor, strictly: typos here would be silently ignored
# by the operator (no scrape) rather than rejected, so they are checked like the built-in kinds.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "labels"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


def test_service_monitor_scrapes_internal_metrics(chart: helm.Chart) -> None:
    # Off in every values file: the components do not serve /metrics yet (a coming release adds it).
    values = {**load_values("production"),
              "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}
    objects = render(chart, values)
    (monitor,) = find(objects, "ServiceMonitor")
    jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA).validate(monitor)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]

    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        svc for svc in find(objects, "Service") if selector.items() <= svc["metadata"]["labels"].items()
    ]
    # Exactly the two internal Services, and through them each component's internal container port.
    assert sorted(svc["metadata"]["name"] for svc in selected) == [
        f"{RELEASE}-chorus-worker-internal",
        f"{RELEASE}-chorus-ws-node-internal",
    ]
    by_name = {svc["metadata"]["name"]: svc for svc in selected}
    for svc, workload, internal_port in (
        (by_name[f"{RELEASE}-chorus-ws-node-internal"], node_deployment(objects), 9090),
        (by_name[f"{RELEASE}-chorus-worker-internal"], worker_deployment(objects), 9091),
    ):
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == "metrics"]
        assert svc_port["targetPort"] == "internal"
        assert port_number(container(workload), "internal") == internal_port == svc_port["port"]
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()


# --- values schema --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values_yaml", "key"),
    [
        ("replicaCount: 3\n", "replicaCount"),
        ("nodee:\n  replicas: 3\n", "nodee"),
        ("node:\n  replicaCount: 3\n", "replicaCount"),
        ("node:\n  resources:\n    request:\n      cpu: 1\n", "request"),
        ("worker:\n  llm:\n    apiKey: sk-oops\n", "apiKey"),
        ("secrets:\n  existingSecrets: mine\n", "existingSecrets"),
        ("ingress:\n  annotation: {}\n", "annotation"),
        ("networkPolicy:\n  egress:\n    reddis:\n      port: 6379\n", "reddis"),
    ],
)
def test_schema_rejects_unknown_keys(chart: helm.Chart, values_yaml: str, key: str) -> None:
    values = helm.values_from_yaml(values_yaml)
    with pytest.raises(helm.HelmValuesError, match=rf"additional properties '{key}' not allowed"):
        render_raw(chart, values)
    report = helm.lint(CHART_DIR, values, strict=True)
    assert any(f"'{key}'" in error for error in report["errors"]), report


@pytest.mark.parametrize(
    ("values", "name"),
    [
        ({"node": {"extraEnv": {"PORT": "1"}}}, "PORT"),
        ({"worker": {"extraEnv": {"LLM_API_KEY": "sk-plain"}}}, "LLM_API_KEY"),
        ({"worker": {"extraEnv": {"not-an-env-name": "1"}}}, "not-an-env-name"),
        # The Redis kind comes from `redis.*` alone, the same for every component (they must agree).
        ({"node": {"extraEnv": {"REDIS_CLUSTER": "true"}}}, "REDIS_CLUSTER"),
        ({"worker": {"extraEnv": {"REDIS_SENTINELS": "sentinel:26379"}}}, "REDIS_SENTINELS"),
        ({"node": {"extraSecretEnv": {"REDIS_SENTINEL_MASTER": {"key": "master"}}}}, "REDIS_SENTINEL_MASTER"),
        ({"workerPools": [{"name": "r", "agents": "a", "extraEnv": {"REDIS_CLUSTER": "true"}}]}, "REDIS_CLUSTER"),
    ],
)
def test_extra_env_cannot_shadow_chart_env(chart: helm.Chart, values: dict[str, Any], name: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=f"invalid propertyName '{name}'"):
        render_raw(chart, values)


def test_extra_env_lands_in_the_components_config(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["production"]
    assert config_data(objects, worker_deployment(objects))["LLM_TIMEOUT_SECONDS"] == "120"
    assert "LLM_TIMEOUT_SECONDS" not in config_data(objects, node_deployment(objects))


def test_schema_rejects_wrong_types(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="/node/replicas"):
        render_raw(chart, {"node": {"replicas": "two"}})


def _object_schemas(schema: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        if "properties" in schema:
            yield path, schema
        for name, sub in schema.get("properties", {}).items():
            yield from _object_schemas(sub, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            yield from _object_schemas(schema["items"], f"{path}[]")


def test_schema_closes_every_object_it_defines() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    objects = list(_object_schemas(schema, "$"))
    assert len(objects) > 30
    open_objects = [path for path, sub in objects if sub.get("additionalProperties") is not False]
    assert open_objects == []


# --- shutdown timings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"node": {"terminationGracePeriodSeconds": 24}},
            r"node\.terminationGracePeriodSeconds \(24\) must be at least "
            r"node\.preStopSleepSeconds \(5\) \+ node\.drainSeconds \(10\) \+ 10 s .* = 25",
        ),
        (
            {"node": {"drainSeconds": 60}},
            r"node\.terminationGracePeriodSeconds \(30\) must be at least .* = 75",
        ),
        (
            {"worker": {"drainSeconds": 45}},
            r"worker\.terminationGracePeriodSeconds \(45\) must be greater than worker\.drainSeconds \(45\)",
        ),
    ],
)
def test_too_small_grace_period_fails_rendering(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render_raw(chart, values)


def test_pdb_needs_exactly_one_bound(chart: helm.Chart) -> None:
    values = {"node": {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}}}
    with pytest.raises(helm.HelmRenderError, match="set exactly one of minAvailable and maxUnavailable"):
        render_raw(chart, values)


@pytest.mark.parametrize("case", CASES)
def test_node_drains_within_grace_period(rendered: dict[str, list[Manifest]], case: str) -> None:
    objects = rendered[case]
    node = node_deployment(objects)
    ctr = container(node)
    command = ctr["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    drain_s = int(config_data(objects, node)["DRAIN_SECONDS"])
    assert pre_stop_s > 0
    # After its window the node waits up to 5 s for sockets that have not closed, then aiohttp's
    # shutdown cancels them (~4.3 s measured): chorus.nodeExitTailSeconds, 10.
    assert node["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 10


@pytest.mark.parametrize("case", CASES)
def test_worker_drains_within_grace_period(rendered: dict[str, list[Manifest]], case: str) -> None:
    objects = rendered[case]
    assert len(worker_deployments(objects)) == 1 + pool_count(case)
    for worker in worker_deployments(objects):
        drain_s = int(config_data(objects, worker)["WORKER_DRAIN_SECONDS"])
        assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain_s


# --- containers -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_commands_env_and_ports(rendered: dict[str, list[Manifest]], case: str) -> None:
    objects = rendered[case]
    node, worker = container(node_deployment(objects)), container(worker_deployment(objects))
    assert node["command"] == ["python", "-m", "ws_node"]
    assert worker["command"] == ["python", "-m", "agent_worker"]
    for ctr in (node, worker):
        (node_id,) = [env for env in ctr["env"] if env["name"] == "NODE_ID"]
        assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    node_config = config_data(objects, node_deployment(objects))
    assert node_config["PORT"] == str(port_number(node, "http")) == "8080"
    assert node_config["INTERNAL_PORT"] == str(port_number(node, "internal")) == "9090"
    worker_config = config_data(objects, worker_deployment(objects))
    assert worker_config["INTERNAL_PORT"] == str(port_number(worker, "internal")) == "9091"
    assert {"WORKER_CONCURRENCY", "LLM_BASE_URL", "LLM_MODEL"} <= worker_config.keys()

    public = one(objects, "Service", f"{RELEASE}-chorus")
    (http,) = public["spec"]["ports"]
    assert (http["name"], http["port"], http["targetPort"]) == ("http", 80, "http")
    assert all(p["port"] != 9090 for p in public["spec"]["ports"])


# The environment variable names each component reads: those its settings class declares
# (`common.config`), plus any its package still reads straight from the environment, found in its
# source as string literals passed as the name next to the environment (`env_url(environ(),
# "DATABASE_URL", ...)`, `env.get("X", ...)`, `os.environ.get("LOG_LEVEL", ...)`).
COMPONENT_SOURCES = {
    "ws-node": tuple(sorted((ROOT / "ws_node").glob("*.py"))),
    "agent-worker": tuple(sorted((ROOT / "agent_worker").glob("*.py"))),
    "migration": (ROOT / "persistence" / "__main__.py",),
}
COMPONENT_SETTINGS: dict[str, type[Any]] = {"ws-node": NodeSettings, "agent-worker": WorkerSettings}
_ENV_READ = re.compile(
    r'(?:\b\w+\(\s*(?:env|environ\(\)),\s*|\benv\.get\(|os\.environ\.get\()"([A-Z][A-Z0-9_]*)"'
)


def names_read_by(component: str) -> set[str]:
    sources = [path.read_text() for path in COMPONENT_SOURCES[component]]
    names = {name for text in sources for name in _ENV_READ.findall(text)}
    if component in COMPONENT_SETTINGS:
        names |= {spec.variable for spec in declared(COMPONENT_SETTINGS[component]).values()}
    return names


def test_names_read_by_finds_the_settings() -> None:
    node = {"PORT", "INTERNAL_PORT", "DRAIN_SECONDS", "NODE_ID", "AUTH_JWT_SECRET", "LOG_LEVEL"}
    assert node <= names_read_by("ws-node")
    worker = {"WORKER_DRAIN_SECONDS", "WORKER_CONCURRENCY", "NODE_ID", "LLM_API_KEY", "LOG_LEVEL"}
    assert worker <= names_read_by("agent-worker")
    assert names_read_by("migration") == {"DATABASE_URL"}


@pytest.mark.parametrize("case", CASES)
def test_every_env_name_the_chart_sets_is_read_by_its_component(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    # A misspelt name (DRAIN_SECOND, WORKER_DRAIN_S) would be ignored silently and the default used.
    objects = rendered[case]
    for workload in workloads(objects):
        ctr = container(workload)
        names = {env["name"] for env in ctr.get("env", [])}
        read: set[str] = set()
        for source in ctr.get("envFrom", []):
            data = one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
            names |= data.keys()
            # An agent's key is read from the variable its `api_key_env` names.
            read |= {agent["api_key_env"] for agent in json.loads(data.get("AGENTS_JSON", "[]"))
                     if "api_key_env" in agent}
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        component = component.removesuffix("-pool")  # a worker pool runs the agent worker too
        unread = names - names_read_by(component) - read
        name = workload["metadata"]["name"]
        assert unread == set(), f"{name} sets {sorted(unread)}, which {component} never reads"


# name -> default, for a variable read straight from the environment with a literal or a module
# constant as default: os.environ.get("LOG_LEVEL", "INFO"), env_float(env, "X", DEFAULT_X_S). The defaults
# of the declared settings are checked against the docs by tests/test_settings.py.
_ENV_DEFAULT = re.compile(
    r'(?:\benv_(?:int|float|str)\([^,()]+(?:\(\))?,\s*|os\.environ\.get\()"([A-Z][A-Z0-9_]*)",\s*'
    r'("[^"]*"|[0-9][0-9_.]*|[A-Z][A-Z0-9_]*\b)'
)
_CONSTANT = re.compile(r'^([A-Z][A-Z0-9_]*) = ("[^"]*"|[0-9][0-9_.]*)$', re.MULTILINE)
OPERATIONS_DOC = ROOT / "docs" / "operations.md"


def documented_settings() -> dict[str, str]:
    """name -> the default cell of its row in the settings tables of docs/operations.md."""
    rows: dict[str, str] = {}
    for line in OPERATIONS_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) < 5 or not cells[1].startswith("`"):
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[1])
        defaults = cells[2].split(", ")  # a row of two names lists their defaults in order
        for index, name in enumerate(names):
            rows[name] = defaults[index] if len(defaults) == len(names) else cells[2]
    return rows


def test_operations_doc_lists_every_setting_with_its_default() -> None:
    rows = documented_settings()
    for component, paths in COMPONENT_SOURCES.items():
        missing = names_read_by(component) - rows.keys()
        assert missing == set(), f"docs/operations.md does not document {sorted(missing)} ({component})"
        texts = [path.read_text() for path in paths]
        constants = dict(pair for text in texts for pair in _CONSTANT.findall(text))
        for name, default in (found for text in texts for found in _ENV_DEFAULT.findall(text)):
            literal = constants.get(default, default)
            if literal[0].isalpha():
                continue  # a computed default (the host name): described in words
            cell = rows[name]
            if literal.startswith('"'):
                assert f"`{literal[1:-1]}`" in cell, (name, literal, cell)
            else:
                number = re.match(r"[0-9][0-9.]*", cell.replace(",", ""))
                expected = float(literal.replace("_", ""))
                assert number and float(number[0]) == expected, (name, literal, cell)


@pytest.mark.parametrize("case", CASES)
def test_nothing_depends_on_metrics_by_default(rendered: dict[str, list[Manifest]], case: str) -> None:
    # Probes never use /metrics, and the ServiceMonitor (a Prometheus Operator CRD) is opt-in.
    assert "/metrics" not in json.dumps(rendered[case])
    assert find(rendered[case], "ServiceMonitor") == []


@pytest.mark.parametrize("case", CASES)
def test_probes_use_internal_port(rendered: dict[str, list[Manifest]], case: str) -> None:
    for workload in (node_deployment(rendered[case]), *worker_deployments(rendered[case])):
        ctr = container(workload)
        assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "internal"}
        assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "internal"}


@pytest.mark.parametrize("case", CASES)
def test_security_contexts_and_resources(rendered: dict[str, list[Manifest]], case: str) -> None:
    objects = rendered[case]
    # ws-node, agent-worker, migration Job, and a worker Deployment per pool
    assert len(workloads(objects)) == 3 + pool_count(case)
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        ctr = container(workload)
        sc = ctr["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # Read-only root: /tmp is the one writable place.
        (tmp,) = [vol for vol in pod["volumes"] if vol["name"] == "tmp"]
        assert "emptyDir" in tmp
        assert {"name": "tmp", "mountPath": "/tmp"} in ctr["volumeMounts"]
        assert {"cpu", "memory"} <= ctr["resources"]["requests"].keys(), name
        assert {"cpu", "memory"} <= ctr["resources"]["limits"].keys(), name


# --- config and secrets ---------------------------------------------------------------------


def _checksums(chart: helm.Chart, values: dict[str, Any]) -> tuple[str, str]:
    objects = render(chart, values)
    node, worker = (
        str(workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"])
        for workload in (node_deployment(objects), worker_deployment(objects))
    )
    return node, worker


def test_checksum_config_follows_each_components_config(chart: helm.Chart) -> None:
    node_before, worker_before = _checksums(chart, {})
    assert re.fullmatch(r"[0-9a-f]{64}", node_before) and re.fullmatch(r"[0-9a-f]{64}", worker_before)
    assert _checksums(chart, {}) == (node_before, worker_before)

    node_after, worker_same = _checksums(chart, {"node": {"allowedOrigins": ["https://chat.example.com"]}})
    assert node_after != node_before and worker_same == worker_before

    node_same, worker_after = _checksums(chart, {"worker": {"concurrency": 16}})
    assert node_same == node_before and worker_after != worker_before

    assert _checksums(chart, {"config": {"logLevel": "DEBUG"}})[0] != node_before
    # Turning to a Redis Cluster or Sentinels rolls both components (and every pool).
    for redis in ({"cluster": True}, {"sentinels": ["sentinel:26379"]}):
        node_redis, worker_redis = _checksums(chart, {"redis": redis})
        assert node_redis != node_before and worker_redis != worker_before


def test_existing_secret_is_referenced_and_none_rendered(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["production"]
    assert find(objects, "Secret") == []
    expected = {
        f"{RELEASE}-chorus-ws-node": {
            "REDIS_URL": "redis-url",
            "DATABASE_URL": "database-url",
            "AUTH_JWT_SECRET": "auth-jwt-secret",
        },
        f"{RELEASE}-chorus-worker": {
            "REDIS_URL": "redis-url",
            "DATABASE_URL": "database-url",
            "LLM_API_KEY": "llm-api-key",
        },
        f"{RELEASE}-chorus-migrate": {"DATABASE_URL": "database-url"},
    }
    for workload in workloads(objects):
        refs = secret_refs(container(workload))
        want = expected[workload["metadata"]["name"]]
        assert refs == {env: ("chorus-credentials", key) for env, key in want.items()}
        # Nothing of the Secret's content is known to the chart, so nothing to hash.
        assert "checksum/secret" not in workload["spec"]["template"]["metadata"].get("annotations", {})


def test_existing_secret_key_names_are_configurable(chart: helm.Chart) -> None:
    values = {"secrets": {"existingSecret": "vault-sync", "keys": {"databaseUrl": "PG_DSN"}}}
    objects = render(chart, values)
    refs = secret_refs(container(one(objects, "Job", f"{RELEASE}-chorus-migrate")))
    assert refs == {"DATABASE_URL": ("vault-sync", "PG_DSN")}


def test_extra_secret_env_reads_from_secrets(chart: helm.Chart) -> None:
    # Settings such as LLM_FALLBACK_API_KEY or an agent's api_key_env must not land in a ConfigMap.
    values = {
        "secrets": {"existingSecret": "chorus-credentials"},
        "worker": {"extraSecretEnv": {"LLM_FALLBACK_API_KEY": {"key": "fallback-key"},
                                      "RESEARCHER_LLM_KEY": {"secretName": "research", "key": "api-key"}}},
        "node": {"extraSecretEnv": {"AUTH_JWT_PUBLIC_KEY": {"secretName": "idp", "key": "public.pem"}}},
    }
    objects = render(chart, values)
    worker_refs = secret_refs(container(worker_deployment(objects)))
    assert worker_refs["LLM_FALLBACK_API_KEY"] == ("chorus-credentials", "fallback-key")
    assert worker_refs["RESEARCHER_LLM_KEY"] == ("research", "api-key")
    assert secret_refs(container(node_deployment(objects)))["AUTH_JWT_PUBLIC_KEY"] == ("idp", "public.pem")
    for workload in (worker_deployment(objects), node_deployment(objects)):
        assert not {"LLM_FALLBACK_API_KEY", "AUTH_JWT_PUBLIC_KEY"} & config_data(objects, workload).keys()

    with pytest.raises(helm.HelmValuesError, match="invalid propertyName 'AUTH_JWT_SECRET'"):
        render_raw(chart, {"node": {"extraSecretEnv": {"AUTH_JWT_SECRET": {"key": "other"}}}})
    with pytest.raises(helm.HelmValuesError, match="missing property 'key'"):
        render_raw(chart, {"worker": {"extraSecretEnv": {"LLM_FALLBACK_API_KEY": {"secretName": "x"}}}})


def test_chart_created_secret_precedes_migration(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["minimal"]
    secret = one(objects, "Secret", f"{RELEASE}-chorus")
    assert set(secret["stringData"]) == {"auth-jwt-secret", "redis-url", "database-url", "llm-api-key"}
    assert secret["stringData"]["redis-url"] == "redis://redis:6379/0"
    # A pre-install hook of lower weight, or the migration Job could not read DATABASE_URL on install.
    annotations = secret["metadata"]["annotations"]
    job = one(objects, "Job", f"{RELEASE}-chorus-migrate")
    assert annotations["helm.sh/hook"] == job["metadata"]["annotations"]["helm.sh/hook"]
    assert int(annotations["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    for workload in workloads(objects):
        assert {name for name, _ in secret_refs(container(workload)).values()} == {f"{RELEASE}-chorus"}


# --- Redis: one primary, Sentinels or a Cluster ----------------------------------------------

REDIS_KIND = ("REDIS_CLUSTER", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER")
SENTINELS = tuple(f"redis-sentinel-{i}.redis-sentinel.data:26379" for i in range(3))
SECRET_ENV = {"REDIS_URL": "redis://:pw@redis.data:6379/0", "DATABASE_URL": "postgresql://c@pg.data/c"}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("defaults", {}),
        ("production", {}),
        ("pools", {}),
        ("redis-cluster", {"REDIS_CLUSTER": "true"}),
        ("redis-sentinel", {"REDIS_SENTINELS": ",".join(SENTINELS), "REDIS_SENTINEL_MASTER": "chorus-primary"}),
    ],
)
def test_every_component_is_told_the_same_redis_kind(
    rendered: dict[str, list[Manifest]], case: str, expected: dict[str, str]
) -> None:
    """The ws-node, the worker and every pool get the same `redis.*` variables (nodes and workers
    must agree), and read them as the chart means them; one primary sets none, so the ConfigMaps of
    an install that uses no Cluster or Sentinels are what they were before these values existed."""
    objects = rendered[case]
    deployments = find(objects, "Deployment")
    assert len(deployments) == 2 + pool_count(case)
    for deployment in deployments:
        data = config_data(objects, deployment)
        name = deployment["metadata"]["name"]
        assert {key: value for key, value in data.items() if key in REDIS_KIND} == expected, name
        settings = read(SharedSettings, {**data, **SECRET_ENV})  # the parsers the processes use
        assert settings["redis_cluster"] is (case == "redis-cluster"), name
        assert settings["redis_sentinels"] == (SENTINELS if case == "redis-sentinel" else ()), name
        if case == "redis-sentinel":
            assert settings["redis_sentinel_master"] == "chorus-primary", name


def test_notes_name_the_redis_kind(chart: helm.Chart) -> None:
    def redis_line(values: dict[str, Any]) -> str:
        notes = render_raw(chart, values)["chorus/templates/NOTES.txt"]
        (line,) = [line.strip() for line in notes.splitlines() if line.strip().startswith("redis:")]
        return line

    assert redis_line({}) == "redis:        one primary, the Secret's redis-url"
    assert "a Redis Cluster" in redis_line(load_values("redis-cluster"))
    assert redis_line(load_values("redis-sentinel")) == (
        f'redis:        the primary Sentinels {",".join(SENTINELS)} name "chorus-primary"')


def test_networkpolicy_opens_the_sentinels_ports(rendered: dict[str, list[Manifest]]) -> None:
    """Every pod asks the Sentinels for the primary on each new Redis connection: each component's
    policy lets it reach their port as well as Redis's, towards the same peers."""

    def redis_rules(objects: list[Manifest]) -> list[Manifest]:
        policies = find(objects, "NetworkPolicy")
        assert len(policies) == 2 + 1  # the ws-node, the worker, the pool
        return [rule for policy in policies for rule in policy["spec"]["egress"]
                if {"port": 6379, "protocol": "TCP"} in rule["ports"]]

    rules = redis_rules(rendered["redis-sentinel"])
    assert len(rules) == 3
    for rule in rules:
        # Three Sentinels on one port: the port once.
        assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}, {"port": 26379, "protocol": "TCP"}]
        assert rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "data"}}}]
    # A Redis Cluster's clients use its nodes' client port (6379 here), nothing more.
    assert [rule["ports"] for rule in redis_rules(rendered["redis-cluster"])] == [
        [{"port": 6379, "protocol": "TCP"}]] * 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # A Redis Cluster has no Sentinels (and the processes refuse both at start).
        ({"redis": {"cluster": True, "sentinels": ["sentinel:26379"]}},
         "at '/redis/sentinels': maxItems: got 1, want 0"),
        ({"redis": {"sentinels": ["sentinel"]}}, "at '/redis/sentinels/0'"),
        ({"redis": {"sentinels": ["sentinel:65536"]}}, "at '/redis/sentinels/0'"),
        ({"redis": {"sentinels": ["s0:26379,s1:26379"]}}, "at '/redis/sentinels/0'"),  # a list, not a string
        ({"redis": {"sentinels": ["s0:26379", "s0:26379"]}}, "at '/redis/sentinels'"),
        ({"redis": {"sentinelMaster": ""}}, "at '/redis/sentinelMaster'"),
        ({"redis": {"cluster": "true"}}, "at '/redis/cluster'"),
        ({"redis": {"clustr": True}}, "additional properties 'clustr' not allowed"),
    ],
)
def test_schema_rejects_bad_redis_values(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render_raw(chart, values)
    report = helm.lint(CHART_DIR, values, strict=True)
    assert any(message in error for error in report["errors"]), report


def test_redis_values_are_the_settings_and_only_the_chart_sets_them() -> None:
    """values.yaml sets every `redis` key, so the merged values Helm validates always hold both
    `cluster` and `sentinels` for the schema's either-or; the variables are the processes'
    settings, and no extraEnv / extraSecretEnv may set them past the chart."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert set(defaults["redis"]) == set(schema["properties"]["redis"]["properties"])
    for variable in REDIS_KIND:
        assert variable in {spec.variable for spec in declared(SharedSettings).values()}
        for component in ("node", "worker"):
            for key in ("extraEnv", "extraSecretEnv"):
                names = schema["properties"][component]["properties"][key]["propertyNames"]["not"]["enum"]
                assert variable in names, (component, key)


# --- migration hook -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_migration_job_is_a_pre_install_upgrade_hook(rendered: dict[str, list[Manifest]], case: str) -> None:
    job = one(rendered[case], "Job", f"{RELEASE}-chorus-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(annotations["helm.sh/hook-weight"]) >= 0
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert container(job)["command"] == ["python", "-m", "persistence", "migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert "DATABASE_URL" in secret_refs(container(job))


def test_migration_can_be_disabled(chart: helm.Chart) -> None:
    assert find(render(chart, {"migration": {"enabled": False}}), "Job") == []


# --- optional objects -----------------------------------------------------------------------

OPTIONAL_KINDS = (
    "Ingress",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "ServiceMonitor",
    "NetworkPolicy",
)


@pytest.mark.parametrize("case", ["defaults", "minimal"])
def test_optional_objects_off_by_default(rendered: dict[str, list[Manifest]], case: str) -> None:
    assert [obj["kind"] for obj in rendered[case] if obj["kind"] in OPTIONAL_KINDS] == []
    assert node_deployment(rendered[case])["spec"]["replicas"] >= 1


def test_ingress_keeps_websockets_open(rendered: dict[str, list[Manifest]]) -> None:
    (ingress,) = find(rendered["production"], "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
    # A draining pod answers new sockets 503: the handshake moves on to another pod (as nginx/ does).
    assert annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"] == "error timeout http_503"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"  # user annotations merge in
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["chat.example.com"], "secretName": "chorus-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert [path["path"] for path in rule["http"]["paths"]] == ["/ws", "/v1"]
    # /ws through the sockets' own Service: no upstream connection kept from REST carries an upgrade
    services = {path["path"]: path["backend"]["service"] for path in rule["http"]["paths"]}
    assert services == {"/ws": {"name": f"{RELEASE}-chorus-sockets", "port": {"name": "http"}},
                        "/v1": {"name": f"{RELEASE}-chorus", "port": {"name": "http"}}}
    public, sockets = one(rendered["production"], "Service", f"{RELEASE}-chorus"), one(
        rendered["production"], "Service", f"{RELEASE}-chorus-sockets")
    assert sockets["spec"]["selector"] == public["spec"]["selector"]
    assert [p["port"] for p in sockets["spec"]["ports"]] == [p["port"] for p in public["spec"]["ports"]]


def test_autoscalers_target_the_deployments(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["production"]
    hpas = {hpa["spec"]["scaleTargetRef"]["name"]: hpa for hpa in find(objects, "HorizontalPodAutoscaler")}
    assert set(hpas) == {f"{RELEASE}-chorus-ws-node", f"{RELEASE}-chorus-worker"}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        # The HPA owns the replica count; a fixed one would fight it on every upgrade.
        assert "replicas" not in one(objects, "Deployment", name)["spec"]

    node_hpa = hpas[f"{RELEASE}-chorus-ws-node"]["spec"]
    assert (node_hpa["minReplicas"], node_hpa["maxReplicas"]) == (3, 20)
    targets = {
        m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in node_hpa["metrics"]
    }
    assert targets == {"cpu": 60, "memory": 75}
    assert node_hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300

    worker_hpa = hpas[f"{RELEASE}-chorus-worker"]["spec"]
    assert (worker_hpa["minReplicas"], worker_hpa["maxReplicas"]) == (2, 30)
    # No metric the cluster may not have: an HPA missing one of its metrics never scales down.
    assert [m["type"] for m in worker_hpa["metrics"]] == ["Resource"]


def test_autoscaler_extra_metrics_pass_through(chart: helm.Chart) -> None:
    backlog = {"type": "External", "external": {"metric": {"name": "chorus_runs_pending"},
                                                "target": {"type": "AverageValue", "averageValue": "4"}}}
    values = {"worker": {"autoscaling": {"enabled": True, "extraMetrics": [backlog]}}}
    (hpa,) = find(render(chart, values), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][-1] == backlog


def test_disruption_budgets_select_their_pods(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["production"]
    budgets = {pdb["metadata"]["name"]: pdb["spec"] for pdb in find(objects, "PodDisruptionBudget")}
    assert budgets[f"{RELEASE}-chorus-ws-node"]["maxUnavailable"] == 1
    assert budgets[f"{RELEASE}-chorus-worker"]["minAvailable"] == 1
    assert "maxUnavailable" not in budgets[f"{RELEASE}-chorus-worker"]
    for name, spec in budgets.items():
        pod_labels = one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= pod_labels.items()


def test_network_policies(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["production"]
    policies = {np["metadata"]["name"]: np["spec"] for np in find(objects, "NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-chorus-ws-node", f"{RELEASE}-chorus-worker"}
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]

    for name, spec in policies.items():
        pod_labels = one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        ingress = {rule["ports"][0]["port"]: rule.get("from") for rule in spec["ingress"]}
        assert ingress["internal"] == monitoring
        egress_ports = {port["port"] for rule in spec["egress"] for port in rule["ports"]}
        assert {53, 6379, 5432} <= egress_ports

    node = policies[f"{RELEASE}-chorus-ws-node"]
    node_ingress = {rule["ports"][0]["port"]: rule.get("from") for rule in node["ingress"]}
    assert node_ingress["http"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]
    worker = policies[f"{RELEASE}-chorus-worker"]
    assert "http" not in {rule["ports"][0]["port"] for rule in worker["ingress"]}
    assert 8000 in {port["port"] for rule in worker["egress"] for port in rule["ports"]}  # the LLM
    assert 8000 not in {port["port"] for rule in node["egress"] for port in rule["ports"]}


def test_network_policy_public_port_open_to_all_by_default(chart: helm.Chart) -> None:
    objects = render(chart, {"networkPolicy": {"enabled": True, "egress": {"enabled": False}}})
    spec = one(objects, "NetworkPolicy", f"{RELEASE}-chorus-ws-node")["spec"]
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    (public,) = [rule for rule in spec["ingress"] if rule["ports"][0]["port"] == "http"]
    assert "from" not in public


# --- agent pools -----------------------------------------------------------------------------
# tests/helm_values/pools.yaml: the default worker serves `default,writer@1`; the pool `researchers`
# (its own concurrency, drain, resources, env, Secret key, HPA) the researcher; `writer-canary`
# (one pod, no budget) writer@2; NetworkPolicies on. Every generic test above runs on it too
# (kubernetes-validate, lint, env names, probes, security contexts).

POOLS = {"researchers": f"{RELEASE}-chorus-worker-researchers", "writer-canary": f"{RELEASE}-chorus-worker-writer-canary"}


def pods_selected(objects: list[Manifest], selector: dict[str, str]) -> list[str]:
    """The Deployments whose pods carry every label of `selector`."""
    return sorted(d["metadata"]["name"] for d in find(objects, "Deployment")
                  if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items())


def test_each_pool_is_a_worker_deployment_serving_its_agents(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["pools"]
    workers = {d["metadata"]["name"]: d for d in worker_deployments(objects)}
    assert set(workers) == {f"{RELEASE}-chorus-worker", *POOLS.values()}
    serves = {name: config_data(objects, d).get("WORKER_AGENTS") for name, d in workers.items()}
    assert serves == {f"{RELEASE}-chorus-worker": "default,writer@1", POOLS["researchers"]: "researcher",
                      POOLS["writer-canary"]: "writer@2"}
    # Nothing set for a worker serving every agent: its ConfigMap is what it was before pools.
    assert "WORKER_AGENTS" not in config_data(rendered["production"], worker_deployment(rendered["production"]))
    for name, deployment in workers.items():
        assert container(deployment)["command"] == ["python", "-m", "agent_worker"]
        assert container(deployment)["envFrom"] == [{"configMapRef": {"name": name}}]

    # A pool inherits what it does not set (AGENTS_JSON: every worker needs every agent's entry) ...
    configs = {name: config_data(objects, d) for name, d in workers.items()}
    assert len({config["AGENTS_JSON"] for config in configs.values()}) == 1
    assert {config["LLM_MODEL"] for config in configs.values()} == {"gpt-4o-mini"}
    # ... and what it sets is its own; maps merge key by key, 0/false/null included.
    researchers, canary = configs[POOLS["researchers"]], configs[POOLS["writer-canary"]]
    assert (researchers["WORKER_CONCURRENCY"], researchers["WORKER_DRAIN_SECONDS"]) == ("4", "120")
    assert researchers["LLM_TIMEOUT_SECONDS"] == "300" and "LLM_TIMEOUT_SECONDS" not in canary
    assert (canary["WORKER_CONCURRENCY"], canary["WORKER_DRAIN_SECONDS"]) == ("8", "30")
    research = workers[POOLS["researchers"]]
    assert container(research)["resources"] == {"requests": {"cpu": "500m", "memory": "384Mi"},
                                                 "limits": {"cpu": "1", "memory": "1Gi"}}
    assert research["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 150
    assert secret_refs(container(research))["RESEARCHER_LLM_KEY"] == ("chorus-credentials", "researcher-llm-key")
    assert "RESEARCHER_LLM_KEY" not in secret_refs(container(workers[POOLS["writer-canary"]]))
    assert "replicas" not in research["spec"]  # its HPA owns the count
    assert workers[POOLS["writer-canary"]]["spec"]["replicas"] == 1
    assert workers[f"{RELEASE}-chorus-worker"]["spec"]["replicas"] == 2


def test_pool_selectors_never_select_another_workers_pods(rendered: dict[str, list[Manifest]]) -> None:
    """A Deployment's selector is immutable and the default worker's predates pools: pool pods must
    fall outside it, and outside each other's, or the default worker's budget, metrics Service and
    NetworkPolicy would count them (and two Deployments would fight over pods)."""
    objects = rendered["pools"]
    for deployment in find(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items(), name
        assert pods_selected(objects, selector) == [name]
    pool_selector = worker_deployments(objects)[1]["spec"]["selector"]["matchLabels"]
    assert pool_selector["app.kubernetes.io/component"] == "agent-worker-pool"
    assert pool_selector["chorus/worker-pool"] in POOLS

    selecting = {"PodDisruptionBudget": lambda o: o["spec"]["selector"]["matchLabels"],
                 "Service": lambda o: o["spec"]["selector"],
                 "NetworkPolicy": lambda o: o["spec"]["podSelector"]["matchLabels"]}
    for kind, selector_of in selecting.items():
        for obj in find(objects, kind):
            name = obj["metadata"]["name"]
            # Each selects the pods of the Deployment of its name (the public Service: the nodes').
            own = {f"{RELEASE}-chorus": f"{RELEASE}-chorus-ws-node", f"{RELEASE}-chorus-sockets": f"{RELEASE}-chorus-ws-node"
                   }.get(name, name.removesuffix("-internal"))
            assert pods_selected(objects, selector_of(obj)) == [own], (kind, name)
    budgets = {pdb["metadata"]["name"] for pdb in find(objects, "PodDisruptionBudget")}
    assert budgets == {f"{RELEASE}-chorus-worker", POOLS["researchers"]}  # the canary turned its off
    policies = {np["metadata"]["name"]: np["spec"] for np in find(objects, "NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-chorus-ws-node", f"{RELEASE}-chorus-worker", *POOLS.values()}
    for name in POOLS.values():  # a pool's workers reach the LLM, like the default worker's
        assert policies[name]["egress"] == policies[f"{RELEASE}-chorus-worker"]["egress"]


def test_pool_autoscaler_scales_on_its_own_runs(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["pools"]
    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"] == POOLS["researchers"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    (external,) = [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    # Each pool's workers report their own pools' queue: the pool's series, by its metrics Service.
    internal = f"{POOLS['researchers']}-internal"
    assert external["metric"]["selector"] == {"matchLabels": {"service": internal}}
    assert one(objects, "Service", internal)["metadata"]["labels"]["chorus/scrape"] == "true"
    assert external["target"] == {"type": "AverageValue", "averageValue": "3"}


def test_pools_are_scraped_and_alerted_on(chart: helm.Chart) -> None:
    values = {**load_values("pools"), "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    objects = render(chart, values)
    (monitor,) = find(objects, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = {svc["metadata"]["name"] for svc in find(objects, "Service") if wanted <= svc["metadata"]["labels"].items()}
    workers = {f"{RELEASE}-chorus-worker-internal", *(f"{name}-internal" for name in POOLS.values())}
    assert scraped == {f"{RELEASE}-chorus-ws-node-internal", *workers}
    (rule,) = find(objects, "PrometheusRule")
    exprs = "\n".join(r["expr"] for group in rule["spec"]["groups"] for r in group["rules"])
    # The worker alerts' job regex selects every worker's Service; the per-process alerts' every one.
    jobs = set(re.findall(r'job=~"([^"]+)"', exprs))
    selected = {frozenset(name for name in scraped if re.fullmatch(job, name)) for job in jobs}
    assert selected == {frozenset(workers), frozenset(scraped)}


def test_pools_leave_the_default_worker_alone(chart: helm.Chart) -> None:
    """Adding a pool, or changing one, neither changes nor restarts the default worker (its
    objects, checksum included, render as without pools); a pool's own checksum follows its config."""
    base = load_values("production")

    def worker_objects(values: dict[str, Any]) -> list[Manifest]:
        return [o for o in render(chart, values)
                if o["metadata"]["labels"].get("app.kubernetes.io/component") == "agent-worker"]

    def checksums(values: dict[str, Any]) -> dict[str, str]:
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for d in worker_deployments(render(chart, values))}

    pool = {"name": "researchers", "agents": "researcher"}
    with_pool = {**base, "workerPools": [pool]}
    assert worker_objects(with_pool) == worker_objects(base)
    before = checksums(with_pool)
    after = checksums({**base, "workerPools": [{**pool, "concurrency": 2}]})
    assert after[f"{RELEASE}-chorus-worker"] == before[f"{RELEASE}-chorus-worker"]
    assert after[POOLS["researchers"]] != before[POOLS["researchers"]]
    # worker.* is every pool's default: changing it rolls the pools that inherit it.
    changed = checksums({**with_pool, "worker": {**base["worker"], "concurrency": 12}})
    assert all(changed[name] != before[name] for name in before)


def test_a_pool_may_say_zero_false_and_null(chart: helm.Chart) -> None:
    # sprig's merge would keep the worker's value for 0, false and null; the chart's overlay does not.
    values = {"worker": {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": None},
                         "nodeSelector": {"pool": "general"}},
              "workerPools": [{"name": "idle", "agents": "default", "replicas": 0,
                               "podDisruptionBudget": {"minAvailable": None, "maxUnavailable": 1},
                               "nodeSelector": {"gpu": "true"}}]}
    objects = render(chart, values)
    idle = one(objects, "Deployment", f"{RELEASE}-chorus-worker-idle")
    assert idle["spec"]["replicas"] == 0
    assert idle["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "true"}  # replaced, not merged
    budget = one(objects, "PodDisruptionBudget", f"{RELEASE}-chorus-worker-idle")["spec"]
    assert budget["maxUnavailable"] == 1 and "minAvailable" not in budget


def test_the_default_worker_can_be_left_out(chart: helm.Chart) -> None:
    values = {"worker": {"enabled": False, "autoscaling": {"enabled": True}},
              "workerPools": [{"name": "all", "agents": "default"}], "prometheusRule": {"enabled": True}}
    objects = render(chart, values)
    assert [d["metadata"]["name"] for d in worker_deployments(objects)] == [f"{RELEASE}-chorus-worker-all"]
    assert not [o for o in objects if o["metadata"]["name"] in (f"{RELEASE}-chorus-worker",
                                                                f"{RELEASE}-chorus-worker-internal")]
    assert [h["metadata"]["name"] for h in find(objects, "HorizontalPodAutoscaler")] == [
        f"{RELEASE}-chorus-worker-all"]  # the pool inherits the worker's autoscaling
    (rule,) = find(objects, "PrometheusRule")
    exprs = "\n".join(r["expr"] for group in rule["spec"]["groups"] for r in group["rules"])
    assert f'chorus_worker_slots{{namespace="{NAMESPACE}", job="{RELEASE}-chorus-worker-all-internal"}}' in exprs
    with pytest.raises(helm.HelmRenderError, match=r"worker\.enabled is false and workerPools is empty"):
        render_raw(chart, {"worker": {"enabled": False}})


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({"name": "researchers"}, "missing property 'agents'"),
        ({"agents": "researcher"}, "missing property 'name'"),
        ({"name": "r", "agents": "researcher", "replica": 2}, "additional properties 'replica' not allowed"),
        ({"name": "Research_Team", "agents": "researcher"}, "/workerPools/0/name"),
        ({"name": "r", "agents": ""}, "/workerPools/0/agents"),
        ({"name": "r", "agents": "writer@"}, "/workerPools/0/agents"),
        ({"name": "r", "agents": "researcher writer"}, "/workerPools/0/agents"),
        ({"name": "r", "agents": "researcher", "replicas": "two"}, "/workerPools/0/replicas"),
        ({"name": "r", "agents": "researcher", "resources": {"request": {"cpu": 1}}},
         "additional properties 'request' not allowed"),
        ({"name": "r", "agents": "researcher", "extraEnv": {"WORKER_AGENTS": "writer"}},
         "invalid propertyName 'WORKER_AGENTS'"),
    ],
)
def test_schema_rejects_a_bad_pool_entry(chart: helm.Chart, pool: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render_raw(chart, {"workerPools": [pool]})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workerPools": [{"name": "r", "agents": "a"}, {"name": "r", "agents": "b"}]},
         'workerPools[1]: another pool is already named "r"'),
        ({"workerPools": [{"name": "r", "agents": "a", "drainSeconds": 60}]},
         r"workerPools[0].terminationGracePeriodSeconds (45) must be greater than workerPools[0].drainSeconds (60)"),
        ({"workerPools": [{"name": "r", "agents": "a", "podDisruptionBudget": {"enabled": True, "minAvailable": 1}}]},
         "workerPools[0].podDisruptionBudget: set exactly one of minAvailable and maxUnavailable"),
        ({"fullnameOverride": "f" * 40, "workerPools": [{"name": "researchers", "agents": "a"}]},
         "would be named " + "f" * 40 + "-worker-researchers-internal, 68 characters; Kubernetes allows 63"),
    ],
)
def test_pool_values_are_checked_when_rendering(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_raw(chart, values)


def test_worker_agents_must_be_agent_names(chart: helm.Chart) -> None:
    objects = render(chart, {"worker": {"agents": "default, writer@2"}})
    assert config_data(objects, worker_deployment(objects))["WORKER_AGENTS"] == "default, writer@2"
    with pytest.raises(helm.HelmValuesError, match="/worker/agents"):
        render_raw(chart, {"worker": {"agents": "writer@2;researcher"}})


# --- labels and notes -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_standard_labels(rendered: dict[str, list[Manifest]], case: str) -> None:
    for obj in rendered[case]:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "chorus"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "chorus-0.1.0"
    for workload in workloads(rendered[case]):
        assert workload["metadata"]["labels"]["app.kubernetes.io/component"] in {
            "ws-node",
            "agent-worker",
            "agent-worker-pool",
            "migration",
        }


def test_notes_say_how_to_connect(chart: helm.Chart) -> None:
    notes = render_raw(chart, load_values("production"))["chorus/templates/NOTES.txt"]
    assert "wss://chat.example.com/ws" in notes
    assert "https://chat.example.com/v1/" in notes
    assert "kubectl get secret -n chat chorus-credentials" in notes
    assert 'algorithm="HS256"' in notes
    assert "WARNING" not in notes

    notes = render_raw(chart, load_values("pools"))["chorus/templates/NOTES.txt"]
    assert "agent-worker: 2 replicas, 8 concurrent runs each, serving default,writer@1" in notes
    assert "worker pool researchers: 2-8 (HPA) replicas, 4 concurrent runs each, serving researcher" in notes
    assert "worker pool writer-canary: 1 replicas, 8 concurrent runs each, serving writer@2" in notes

    notes = render_raw(chart, {})["chorus/templates/NOTES.txt"]
    assert "agent-worker: 2 replicas, 8 concurrent runs each, serving every agent" in notes
    assert "kubectl port-forward -n chat svc/rel-chorus 8080:80" in notes
    assert "ws://127.0.0.1:8080/ws" in notes
    assert "secrets.databaseUrl" in notes  # empty credentials are called out


def test_the_image_build_context_admits_every_package() -> None:
    """.dockerignore is an allow-list: a package left out of it installs fine locally and is
    missing from the image, which then fails at import (found when protocol/, common/ and runs/
    were added)."""
    admitted = {line[1:].strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.startswith("!")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= admitted, f"not in the image: {sorted(packages - admitted)}"
    assert all((ROOT / name).exists() for name in admitted), "admits a file that does not exist"


# --- the README's values table ---------------------------------------------------------------


def render_readme() -> Any:
    """helm/render_readme.py, loaded from its path (helm/ is no package; `helm` here is helm_python)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "helm" / "render_readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_values_table_is_current_and_every_value_described() -> None:
    render = render_readme()
    schema, values = render.load()
    assert render.undescribed(schema) == [], "describe these keys in values.schema.json"
    readme = (CHART_DIR / "README.md").read_text()
    assert render.rewrite(readme, render.table(schema, values)) == readme, (
        "helm/chorus/README.md is stale: run .venv/bin/python helm/render_readme.py --write")
    assert "| `node.replicas` | integer | `2` | Pods; ignored when `node.autoscaling.enabled`. |" in readme
    assert "| `node.autoscaling.targetMemoryUtilizationPercentage` | integer or null | `null` |" in readme
    assert "](../../docs/operations.md)" in readme


def test_readme_check_catches_a_changed_default_and_a_missing_description() -> None:
    render = render_readme()
    schema, values = render.load()
    readme = (CHART_DIR / "README.md").read_text()
    values["node"]["replicas"] = 3
    assert render.rewrite(readme, render.table(schema, values)) != readme
    del schema["properties"]["node"]["properties"]["replicas"]["description"]
    schema["properties"]["worker"]["properties"]["llm"]["properties"]["model"]["description"] = " "
    assert render.undescribed(schema) == ["node.replicas", "worker.llm.model"]
