"""deploy/ validated offline: the Dockerfile by hadolint, compose.yaml against the Compose
Specification's JSON schema (vendored by check-jsonschema), the Kubernetes manifests against the
Kubernetes schemas (vendored by kubernetes-validate), and the gateway configs both mount loaded
with the project's own loader. Each validator also rejects a broken file here, so a validator
that checks nothing fails the test. Cross-file checks: what one file names (a service, a model
id, a GPU, a secret, a metric) exists where another says it does.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import promql_parser
import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from test_ledger_postgres import Cluster
from test_ledger_postgres import _server_binaries as server_binaries

from greenroute.backends.fake_openai import free_port
from greenroute.gateway.config import GatewayConfig, load_config
from greenroute.gateway.ledger.writer import LedgerWriter

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.37.0"

# The request metrics the dashboard uses, exposed by gateway/metrics.py since issue 13 item 4
# (tests/test_metrics.py checks a few requests leave them in /metrics).
PLANNED_METRICS = {
    "greenroute_requests_total",  # counter: tier, route, status
    "greenroute_request_duration_seconds",  # histogram: tier, route
    "greenroute_time_to_first_token_seconds",  # histogram: tier
    "greenroute_tokens_total",  # counter: tier, kind (prompt | completion)
    "greenroute_tier_energy_joules_total",  # counter: tier, source
    "greenroute_routing_decisions_total",  # counter: tier (the router's first choice for green)
    "greenroute_escalations_total",  # counter: from_tier, to_tier
}
# Grafana's variables in the dashboard's queries, as Grafana fills them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "6h", "$largest": "large"}
# Series from the other exporters Prometheus scrapes.
FOREIGN_METRICS = {"DCGM_FI_DEV_POWER_USAGE", "vllm:num_requests_running",
                   "vllm:num_requests_waiting"}


def tool(name: str) -> str:
    """A validator's executable in this environment; missing is a failure, never a skip."""
    path = BIN / name
    assert path.exists(), f"{name} is missing: pip install -e '.[test]'"
    return str(path)


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    files = sorted(KUBERNETES.glob("*.yaml")) + sorted(KUBERNETES.glob("*.yaml.example"))
    return [(path, doc) for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict[str, Any]:
    for _, doc in manifests():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in {KUBERNETES}")


def load_toml_text(text: str, tmp_path: Path) -> GatewayConfig:
    path = tmp_path / "greenroute.toml"
    path.write_text(text)
    return load_config(path)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# -- the image ---------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint_which_rejects_a_bad_one(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install -y curl\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "DL3006" in result.stdout


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [line.strip() for line in joined.splitlines() if line.strip()]


def test_dockerfile_is_multi_stage_slim_non_root_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions()
    stages = [line for line in instructions if line.startswith("FROM ")]
    assert stages == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in instructions
    split = instructions.index("FROM ${PYTHON_IMAGE}")
    build, final = instructions[:split], instructions[split:]
    assert "ARG EMBEDDED=0" in build and "ARG EMBEDDED=0" in final  # the build arg, both stages
    assert any(line.startswith("COPY --from=build ") for line in final)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = [line for line in final if line.startswith("HEALTHCHECK ")]
    assert healthcheck.endswith('CMD ["python", "/opt/greenroute/healthcheck.py"]')
    assert "COPY deploy/healthcheck.py /opt/greenroute/healthcheck.py" in final


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    """The context is the repository root; Dockerfile.dockerignore lets only these in."""
    allowed = {line[1:].rstrip("/") for line in
               (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = {source for line in dockerfile_instructions()
               if line.startswith("COPY ") and "--from=" not in line
               for source in line.split()[1:-1]}
    assert "gateway" in sources and "deploy/healthcheck.py" in sources
    for source in sources:
        assert source in allowed, f"COPY {source}: not in Dockerfile.dockerignore's allow list"
        assert (REPO / source).exists(), source


def test_image_requirements_leave_out_llama_cpp_unless_embedded() -> None:
    requirements = load_script("requirements").requirements
    slim = requirements(REPO / "pyproject.toml", embedded=False)
    embedded = requirements(REPO / "pyproject.toml", embedded=True)
    assert not any(r.startswith("llama-cpp-python") for r in slim)
    assert [r for r in embedded if r not in slim] == [
        r for r in embedded if r.startswith("llama-cpp-python")] != []
    assert any(r.startswith("psycopg") for r in slim)  # the ledger on Postgres
    assert any(r.startswith("starlette") for r in slim)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/up/health" else 503)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("path", "live", "healthy"), [
    ("/up/health", False, True), ("/up/health", True, True),
    ("/health", False, False),  # 503: a tier is down, so not ready
    ("/health", True, True),  # ... but alive: no restart while vLLM loads
])
def test_healthcheck_script(health_server: str, path: str, live: bool, healthy: bool) -> None:
    command = [sys.executable, str(DEPLOY / "healthcheck.py"), "--url", health_server + path]
    result = subprocess.run(command + (["--live"] if live else []), capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode == 0) == healthy, result.stdout + result.stderr


@pytest.mark.parametrize("live", [False, True])
def test_healthcheck_fails_when_nothing_listens(live: bool) -> None:
    url = f"http://127.0.0.1:{free_port()}/health"
    result = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), "--url", url]
                            + (["--live"] if live else []), capture_output=True, timeout=30)
    assert result.returncode == 1


# -- compose -----------------------------------------------------------------------------------

def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    checker = tool("check-jsonschema")
    command = [checker, "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(command + [str(DEPLOY / "compose.yaml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = compose()
    broken["services"]["gateway-1"]["restart"] = ["always"]  # a string in the spec
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(broken))
    result = subprocess.run(command + [str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "restart" in result.stdout


def compose_gateway_config() -> GatewayConfig:
    """The file compose mounts into the gateways, loaded as `greenroute serve` loads it."""
    return load_config(DEPLOY / compose()["configs"]["gateway"]["file"])


def test_compose_gateway_config_loads_and_names_the_compose_services() -> None:
    spec = compose()
    services = spec["services"]
    config = compose_gateway_config()
    assert [t.name for t in config.tiers_by_energy()] == ["small", "large"]
    gateways = [name for name, service in services.items()
                if any(c["source"] == "gateway" for c in service.get("configs", []))]
    assert len(gateways) == 2
    for name in gateways:
        service = services[name]
        assert service["environment"]["GREENROUTE_CONFIG"] == next(
            c["target"] for c in service["configs"] if c["source"] == "gateway")
        for key in config.keys:  # every key's secret is set from the environment file
            assert key.key is None and key.key_env in service["environment"]
    for tier in config.tiers:
        assert tier.url is not None and tier.meter is not None and tier.meter.url is not None
        host = urlsplit(tier.url).hostname
        assert host in services, f"tier {tier.name}: no service {host}"
        vllm = services[host]
        args = vllm["command"]
        assert vllm["entrypoint"] == ["vllm", "serve"]
        assert flag(args, "--served-model-name") == tier.model
        assert "--enable-prefix-caching" in args
        assert flag(args, "--port") == str(urlsplit(tier.url).port)
        devices = vllm["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        # The tier's meter reads the GPUs its server runs on, from the DCGM exporter.
        assert [int(d) for d in devices[0]["device_ids"]] == list(tier.meter.gpus)
        assert urlsplit(tier.meter.url).hostname == "dcgm-exporter" in services
    ledger = urlsplit(config.ledger.url or "")
    assert ledger.hostname in services and ledger.password is None
    assert services[ledger.hostname]["image"].startswith("postgres:")


class PasswordCluster(Cluster):
    """A throwaway PostgreSQL cluster that, unlike the ledger tests' one, asks for a password
    (SCRAM), as the deployed database does."""

    user = "greenroute"
    password = "a-password-only-the-environment-knows"

    def init(self) -> None:
        secret = self.root / "password"
        secret.write_text(self.password)
        if self.prefix:
            shutil.chown(secret, "postgres")
        self.run("initdb", "-D", str(self.data), "-A", "scram-sha-256", "-U", self.user,
                 f"--pwfile={secret}", "--no-sync")  # a throwaway: no fsync


def test_the_ledger_url_without_a_password_logs_in_with_pgpassword(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployed gateways' [ledger] url names no password; libpq takes $PGPASSWORD."""
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    url = urlsplit(compose_gateway_config().ledger.url or "")
    assert url.username == PasswordCluster.user and url.password is None
    cluster = PasswordCluster(binaries)
    cluster.init()
    cluster.start()
    try:
        local = url._replace(netloc=f"{url.username}@127.0.0.1:{cluster.port}").geturl()
        admin = create_engine(local.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        monkeypatch.delenv("PGPASSWORD", raising=False)
        with pytest.raises(OperationalError, match="password"):
            admin.connect().close()
        monkeypatch.setenv("PGPASSWORD", PasswordCluster.password)
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{url.path.lstrip("/")}"'))
        admin.dispose()
        writer = LedgerWriter(local, flush_interval_s=0.05, retry_s=0.05, spill_dir=tmp_path)
        writer.start()
        writer.put("requests", {"id": "deployed", "created": datetime.now(UTC),
                                "endpoint": "chat/completions", "status": 200,
                                "latency_ms": 1.0})
        writer.close()
        assert (writer.written, writer.failures) == (1, 0)
        engine = create_engine(local)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id FROM requests")).scalars().all() == [
                "deployed"]
        engine.dispose()
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def test_compose_secrets_come_from_the_environment_only() -> None:
    secret_names = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")
    for name, service in compose()["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if secret_names.search(variable):
                assert re.fullmatch(r"\$\{[A-Z_]+:[?-][^}]*\}", value), (name, variable, value)
    required = set(re.findall(r"\$\{([A-Z_]+):\?", (DEPLOY / "compose.yaml").read_text()))
    assert required == {"GREENROUTE_API_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    example = dict(line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required <= set(example) and all(example[name] == "" for name in required)


def test_proxy_and_prometheus_reach_every_replica_and_exporter() -> None:
    services = compose()["services"]
    gateways = sorted(name for name in services if name.startswith("gateway-"))
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert sorted(re.findall(r"^\s*server (\S+):8000", nginx, re.M)) == gateways
    assert "proxy_buffering off;" in nginx  # streams
    proxy = services["proxy"]
    assert {c["source"] for c in proxy["configs"]} == {"nginx"}
    assert compose()["configs"]["nginx"]["file"] == "./nginx.conf"

    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {target.split(":")[0] for job in scrape["scrape_configs"]
               for group in job["static_configs"] for target in group["targets"]}
    assert {*gateways, "vllm-small", "vllm-large", "dcgm-exporter", "grafana"} <= targets
    assert targets - {"localhost"} <= set(services)


# -- Grafana -----------------------------------------------------------------------------------

def exposed_metric_names() -> set[str]:
    """Every greenroute_* name written as a string in the package's source, with the suffixes
    Prometheus clients add to counters and histograms."""
    names: set[str] = set()
    for folder in ("gateway", "backends"):
        for path in (REPO / folder).rglob("*.py"):
            names |= set(re.findall(r"[\"'](greenroute_[a-z_]+)[\"']", path.read_text()))
    return names | {name + suffix for name in names for suffix in ("_total", "_bucket")}


def selected_metrics(query: str) -> set[str]:
    """The metric names a dashboard query selects, parsed as PromQL (a syntax error raises)."""
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    assert "$" not in query, query
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(query), pre_visit=visit)
    return names


def test_promql_check_rejects_a_broken_query() -> None:
    assert selected_metrics('sum by (tier) (rate(greenroute_tokens_total{kind="x"}[$__range]))') \
        == {"greenroute_tokens_total"}
    with pytest.raises(ValueError):
        selected_metrics("sum by (tier) (rate(greenroute_tokens_total[5m])")


def test_dashboard_panels_use_real_metric_names_and_the_provisioned_datasource() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/greenroute.json").read_text())
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert urlsplit(datasources[0]["url"]).hostname in compose()["services"]
    uid = datasources[0]["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " / ".join(p["title"] for p in panels).lower()
    for wanted in ("requests", "latency", "joules per completion token", "saved vs always the "
                   "largest", "routing shares", "escalations", "ledger backlog"):
        assert wanted in titles, wanted
    exposed = exposed_metric_names()
    assert "greenroute_ledger_rows_buffered" in exposed  # the scan finds today's names
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            used |= selected_metrics(target["expr"])
    assert {"greenroute_ledger_rows_buffered", "DCGM_FI_DEV_POWER_USAGE"} <= used
    assert exposed >= PLANNED_METRICS
    unknown = used - exposed - FOREIGN_METRICS
    assert not unknown, f"the dashboard uses metrics nobody exposes or plans: {unknown}"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/greenroute.yaml").read_text())
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


# -- Kubernetes --------------------------------------------------------------------------------

def test_kubernetes_manifests_match_the_kubernetes_schemas() -> None:
    documents = manifests()
    kinds = sorted({doc["kind"] for _, doc in documents})
    assert kinds == ["ConfigMap", "DaemonSet", "Deployment", "PersistentVolumeClaim",
                     "PodDisruptionBudget", "Secret", "Service"]
    for _, doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    broken = find("Deployment", "greenroute")
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = find("Service", "greenroute")
    broken["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubernetes_gateway_deployment() -> None:
    deployment = find("Deployment", "greenroute")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    live = container["livenessProbe"]["exec"]["command"]
    assert live[:3] == ["python", "/opt/greenroute/healthcheck.py", "--live"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY deploy/healthcheck.py /opt/greenroute/healthcheck.py" in dockerfile
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert find("Service", "greenroute")["spec"]["selector"] == labels
    assert find("PodDisruptionBudget", "greenroute")["spec"]["selector"]["matchLabels"] == labels
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == "greenroute-config"


def test_kubernetes_config_loads_and_its_secrets_come_from_the_secret(tmp_path: Path) -> None:
    deployment = find("Deployment", "greenroute")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    (file_name,) = find("ConfigMap", "greenroute-config")["data"]
    assert env["GREENROUTE_CONFIG"]["value"] == f"{mount['mountPath']}/{file_name}"
    config = load_toml_text(find("ConfigMap", "greenroute-config")["data"][file_name], tmp_path)
    secret = find("Secret", "greenroute")
    assert all(value == "" for value in secret["stringData"].values())  # a template only
    for name in [key.key_env for key in config.keys] + ["PGPASSWORD"]:
        assert name is not None
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "greenroute" and ref["key"] in secret["stringData"]
    ledger = urlsplit(config.ledger.url or "")
    assert ledger.scheme == "postgresql+psycopg" and ledger.password is None
    for tier in config.tiers:
        assert tier.url is not None and tier.meter is not None and tier.meter.url is not None
        host, port = urlsplit(tier.url).hostname, urlsplit(tier.url).port
        assert port in [p["port"] for p in find("Service", str(host))["spec"]["ports"]]
        vllm = find("Deployment", str(host))
        (server,) = vllm["spec"]["template"]["spec"]["containers"]
        assert server["command"] == ["vllm", "serve"]
        assert flag(server["args"], "--served-model-name") == tier.model
        assert "--enable-prefix-caching" in server["args"]
        assert server["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert server["readinessProbe"]["httpGet"]["path"] == "/health"
        exporter = urlsplit(tier.meter.url)
        assert exporter.port in [p["port"] for p in
                                 find("Service", str(exporter.hostname))["spec"]["ports"]]
    find("DaemonSet", "dcgm-exporter")


def test_no_deploy_file_carries_a_password_in_a_url() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:  # bytecode of deploy/*.py
            for url in re.findall(r"[a-z+]+://[^\s\"']+", path.read_text()):
                assert urlsplit(url).password is None, (path, url)
