"""The production-like stack (docker-compose.yml) is wired together.

No Docker engine is needed: ``docker compose config`` validates and normalises
the compose file (interpolation, profiles, long-form volumes and depends_on), and
its JSON output is what these tests read. The configs the stack mounts
(Prometheus, Alertmanager, Grafana provisioning) are YAML; they are parsed with
PyYAML when it is installed and otherwise by ``docker compose`` itself, which
embeds a YAML parser (see ``load_yaml``), so no YAML library is required.

A missing ``docker compose`` fails these tests: it is never a reason to skip.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DASHBOARD = REPO / "docs" / "grafana" / "backout-dashboard.json"

CORE_SERVICES = {"kafka", "postgres", "jaeger", "prometheus", "alertmanager", "grafana", "backout"}
SHOP_SERVICES = {"orders", "payments", "inventory"}

WEBHOOK_URL = "http://backout:6066/api/alertmanager"

# The worker's metrics (consumers/web.py): name -> (kind, labels).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "backout_events_tracked_total": (
        "counter",
        frozenset({"service", "event_type", "schema_version"}),
    ),
    "backout_events_invalid_total": ("counter", frozenset({"topic"})),
    "backout_compensations_total": ("counter", frozenset({"outcome"})),
    "backout_rollback_duration_seconds": ("histogram", frozenset()),
    "backout_rollbacks_in_progress": ("gauge", frozenset()),
    "backout_ledger_write_seconds": ("histogram", frozenset()),
    "backout_consumer_lag": ("gauge", frozenset({"topic", "partition"})),
    "backout_tracking_catch_up_seconds": ("histogram", frozenset({"caught_up"})),
}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
# What the dashboard must show (consumer lag is a bonus).
DASHBOARD_MUST_QUERY = {
    "backout_events_tracked_total",
    "backout_compensations_total",
    "backout_rollbacks_in_progress",
    "backout_rollback_duration_seconds",
    "backout_events_invalid_total",
    "backout_ledger_write_seconds",
}


# --------------------------------------------------------------------------- helpers


@functools.cache
def compose_command() -> tuple[str, ...]:
    """``docker compose`` (CLI plugin), else a standalone Compose v2 binary."""
    tried: list[str] = []
    docker = shutil.which("docker")
    if docker is None:
        tried.append("`docker` is not on PATH")
    else:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return (docker, "compose")
        tried.append(f"`docker compose version` failed: {(probe.stderr or probe.stdout).strip()}")
    for standalone in (
        shutil.which("docker-compose"),
        str(Path(sys.executable).with_name("docker-compose")),
    ):
        if standalone is None or not Path(standalone).is_file():
            continue
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and re.search(r"\bv?2\.\d+", probe.stdout):
            return (standalone,)
        tried.append(f"{standalone} is not Docker Compose v2: {probe.stdout.strip()}")
    pytest.fail(
        "Docker Compose v2 is required to validate docker-compose.yml and was not found "
        f"({'; '.join(tried)}). Install the Docker CLI with its compose plugin "
        "(`docker compose version` must work; no Docker engine is needed), or a standalone "
        "Compose v2 `docker-compose` binary on PATH.",
        pytrace=False,
    )


def compose_env(**overrides: str) -> dict[str, str]:
    """The environment for ``docker compose``, without settings that would change the model."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMPOSE_", "BACKOUT_", "GRAFANA_"))
    }
    env.update(overrides)
    return env


def run_compose(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose_command(), *args],
        cwd=cwd,
        env=env if env is not None else compose_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def compose_model(*profiles: str, **env: str) -> dict[str, Any]:
    args = ["-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    result = run_compose(*args, "config", "--format", "json", env=compose_env(**env))
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """The whole stack, shop profile included, as ``docker compose config`` resolves it."""
    return compose_model("shop")


def load_yaml(path: Path, tmp_dir: Path) -> Any:
    """Parse a YAML file: with PyYAML if installed, else with docker compose's parser.

    Compose keeps top-level ``x-`` extension fields as they are, so the document is
    nested under ``x-doc`` in a throw-away compose file (interpolation off, so
    ``$labels`` in alert templates stays as written) and read back as JSON.
    """
    text = path.read_text(encoding="utf-8")
    try:
        import yaml  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        pass
    else:
        return yaml.safe_load(text)
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        lines = lines[1:]
    wrapper = tmp_dir / f"parse-{path.name}"
    wrapper.write_text(
        "services: {}\nx-doc:\n" + "".join(f"  {line}\n" for line in lines), encoding="utf-8"
    )
    args = ["-f", str(wrapper), "-p", "yamlparse", "config", "--no-interpolate"]
    result = run_compose(*args, "--format", "json", cwd=tmp_dir)
    assert result.returncode == 0, f"{path} is not valid YAML:\n{result.stderr}"
    return json.loads(result.stdout).get("x-doc")


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("yaml")


def service(stack: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in stack["services"], f"service {name!r} missing from docker-compose.yml"
    svc: dict[str, Any] = stack["services"][name]
    return svc


def environment(stack: dict[str, Any], name: str) -> dict[str, str | None]:
    env: dict[str, str | None] = service(stack, name).get("environment") or {}
    return env


def container_ports(svc: dict[str, Any]) -> set[int]:
    """Ports other containers can reach: ``expose`` plus the targets of ``ports``."""
    ports = {int(str(port).split("/")[0]) for port in svc.get("expose", [])}
    ports |= {int(port["target"]) for port in svc.get("ports", [])}
    return ports


def bind_mount(svc: dict[str, Any], target: str) -> Path:
    """The host path bind-mounted at ``target`` (a file, or a directory above it)."""
    best: tuple[str, str] | None = None
    for volume in svc.get("volumes", []):
        if volume.get("type") != "bind":
            continue
        mount = volume["target"].rstrip("/")
        if (target == mount or target.startswith(mount + "/")) and (
            best is None or len(mount) > len(best[1])
        ):
            best = (volume["source"], mount)
    assert best is not None, f"nothing is mounted at {target}: {svc.get('volumes')}"
    source, mount = best
    return Path(source) / os.path.relpath(target, mount)


def command_flag(svc: dict[str, Any], flag: str) -> str:
    for arg in svc.get("command") or []:
        if arg.startswith(f"{flag}="):
            return str(arg.split("=", 1)[1])
    pytest.fail(f"{flag} is not set in the command {svc.get('command')}")


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    out: dict[str, tuple[str, int]] = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


# ------------------------------------------------------------------ the compose file


@pytest.mark.parametrize("profiles", [(), ("shop",)], ids=["default", "shop"])
def test_compose_config_is_valid(profiles: tuple[str, ...]) -> None:
    args = ["-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    result = run_compose(*args, "config", "-q")
    assert result.returncode == 0, f"docker compose config -q failed:\n{result.stderr}"


def test_every_service_exists(stack: dict[str, Any]) -> None:
    missing = (CORE_SERVICES | SHOP_SERVICES) - set(stack["services"])
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_shop_services_are_behind_the_shop_profile(stack: dict[str, Any]) -> None:
    for name in SHOP_SERVICES:
        svc = service(stack, name)
        assert svc.get("profiles") == ["shop"], name
        argv = [*(svc.get("entrypoint") or []), *(svc.get("command") or [])]
        assert argv == ["python", "-m", "examples.shop.services", name, "--broker", "kafka:9092"]
        assert svc.get("image") == service(stack, "backout").get("image"), "same image as backout"
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in CORE_SERVICES:
        assert not service(stack, name).get("profiles"), f"{name} must start without a profile"
    # `docker compose up -d` (no profile) leaves the shop out.
    default = compose_model()
    assert set(default["services"]) >= CORE_SERVICES
    assert not SHOP_SERVICES & set(default["services"])


def test_backout_has_the_worker_settings(stack: dict[str, Any]) -> None:
    env = environment(stack, "backout")
    for var in (
        "BACKOUT_BROKER",
        "BACKOUT_DATABASE_URL",
        "BACKOUT_SAGAS",
        "BACKOUT_WEB_PORT",
        "BACKOUT_API_TOKEN",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
    ):
        assert env.get(var), f"backout needs {var}"
    assert env["BACKOUT_SAGAS"] == "examples.shop.saga"
    assert env["BACKOUT_WEB_PORT"] == "6066"
    pattern = re.compile(env["BACKOUT_EVENT_TOPIC_PATTERN"] or "")
    assert pattern.fullmatch("orders.events")
    assert not pattern.fullmatch("orders.commands")
    assert service(stack, "backout")["command"] == ["worker"]


def test_backout_broker_is_kafkas_in_network_listener(stack: dict[str, Any]) -> None:
    broker = urlsplit(environment(stack, "backout")["BACKOUT_BROKER"] or "")
    assert broker.scheme == "kafka"
    assert broker.hostname in stack["services"], f"{broker.hostname} is not a compose service"
    assert broker.hostname == "kafka"

    kafka_env = environment(stack, "kafka")
    advertised = listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"] or "")
    bound = listeners(kafka_env["KAFKA_LISTENERS"] or "")
    names = [name for name, address in advertised.items() if address == ("kafka", broker.port)]
    assert names, f"kafka advertises no listener kafka:{broker.port}: {advertised}"
    assert bound[names[0]][1] == broker.port, "the advertised listener must be bound"
    assert broker.port in container_ports(service(stack, "kafka"))
    # Host clients get their own advertised listener on a published port.
    published = {int(port["published"]) for port in service(stack, "kafka").get("ports", [])}
    assert any(host == "localhost" and port in published for host, port in advertised.values())


def test_backout_database_is_the_postgres_service(stack: dict[str, Any]) -> None:
    url = urlsplit(environment(stack, "backout")["BACKOUT_DATABASE_URL"] or "")
    assert url.scheme == "postgresql+asyncpg"
    assert url.hostname == "postgres"
    pg_env = environment(stack, "postgres")
    port = int(pg_env.get("PGPORT") or 5432)
    assert url.port == port
    assert port in container_ports(service(stack, "postgres"))
    assert url.path == f"/{pg_env['POSTGRES_DB']}" == "/backout"
    assert url.username == pg_env.get("POSTGRES_USER", "postgres")
    assert url.password == pg_env["POSTGRES_PASSWORD"]
    assert service(stack, "postgres")["image"].startswith("postgres:16")


def test_backout_traces_go_to_jaeger(stack: dict[str, Any]) -> None:
    endpoint = urlsplit(environment(stack, "backout")["OTEL_EXPORTER_OTLP_ENDPOINT"] or "")
    assert endpoint.hostname == "jaeger"
    jaeger = service(stack, "jaeger")
    assert {endpoint.port, 4317, 4318, 16686} <= container_ports(jaeger)
    assert environment(stack, "jaeger").get("COLLECTOR_OTLP_ENABLED", "true") == "true"


def test_backout_waits_for_healthy_kafka_and_postgres(stack: dict[str, Any]) -> None:
    depends_on = service(stack, "backout")["depends_on"]
    for name in ("kafka", "postgres"):
        assert depends_on[name]["condition"] == "service_healthy", name
        healthcheck = service(stack, name).get("healthcheck") or {}
        assert healthcheck.get("test"), f"{name} needs a healthcheck"
        assert not healthcheck.get("disable"), name
        assert healthcheck["test"][0] in {"CMD", "CMD-SHELL"}, name


def test_backout_image_and_port(stack: dict[str, Any]) -> None:
    backout = service(stack, "backout")
    build = backout["build"]
    assert Path(build["context"]) == REPO
    dockerfile = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
    assert dockerfile.is_file(), f"{dockerfile} is missing"
    text = dockerfile.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"pip install \.", text)
    assert re.search(r'^ENTRYPOINT \["backout"\]', text, re.MULTILINE)
    assert re.search(r'^CMD \["worker"\]', text, re.MULTILINE)
    assert (REPO / ".dockerignore").is_file()
    ports = {(int(p["target"]), str(p.get("published"))) for p in backout.get("ports", [])}
    assert (6066, "6066") in ports, f"port 6066 is not published: {backout.get('ports')}"


def test_api_token_and_signal_key_come_from_the_environment() -> None:
    default = compose_model()
    token = environment(default, "backout")["BACKOUT_API_TOKEN"]
    assert token, "BACKOUT_API_TOKEN needs a placeholder default"
    assert environment(default, "backout").get("BACKOUT_SIGNAL_KEY") is None

    custom = compose_model(BACKOUT_API_TOKEN="s3cret-token", BACKOUT_SIGNAL_KEY="hmac-key")
    assert environment(custom, "backout")["BACKOUT_API_TOKEN"] == "s3cret-token"
    assert environment(custom, "backout")["BACKOUT_SIGNAL_KEY"] == "hmac-key"
    # Alertmanager's webhook credentials are the same token.
    for model, expected in ((default, token), (custom, "s3cret-token")):
        sources = {c["source"] for c in service(model, "alertmanager").get("configs", [])}
        assert "backout_api_token" in sources
        assert model["configs"]["backout_api_token"]["content"] == expected


def test_every_mounted_file_exists(stack: dict[str, Any]) -> None:
    checked = 0
    for name, svc in stack["services"].items():
        for volume in svc.get("volumes", []):
            if volume.get("type") != "bind":
                continue
            source = Path(volume["source"])
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            assert source.resolve().is_relative_to(REPO), f"{name} mounts {source} outside repo"
            checked += 1
    for name, config in (stack.get("configs") or {}).items():
        if "file" in config:
            assert Path(config["file"]).is_file(), f"config {name}: {config['file']} is missing"
    assert checked >= 5, "prometheus, alertmanager and grafana mount their configs"


# ------------------------------------------------------------ the mounted configs


def test_prometheus_scrapes_backout_and_loads_its_rules(
    stack: dict[str, Any], yaml_dir: Path
) -> None:
    prometheus = service(stack, "prometheus")
    config_path = bind_mount(prometheus, command_flag(prometheus, "--config.file"))
    assert config_path == REPO / "deploy" / "prometheus" / "prometheus.yml"
    config = load_yaml(config_path, yaml_dir)

    backout_jobs = [
        job
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        if "backout:6066" in static.get("targets", [])
    ]
    assert backout_jobs, "prometheus does not scrape backout:6066"
    assert backout_jobs[0].get("metrics_path", "/metrics") == "/metrics"
    assert backout_jobs[0].get("scheme", "http") == "http"

    rule_files = config.get("rule_files") or []
    assert rule_files, "prometheus loads no rule file"
    mounted = [bind_mount(prometheus, path) for path in rule_files]
    assert REPO / "deploy" / "prometheus" / "alerts.yml" in mounted
    assert all(path.is_file() for path in mounted)

    targets = [
        target
        for alertmanagers in config["alerting"]["alertmanagers"]
        for static in alertmanagers.get("static_configs", [])
        for target in static.get("targets", [])
    ]
    assert "alertmanager:9093" in targets
    assert 9093 in container_ports(service(stack, "alertmanager"))


def test_example_alert_names_the_deployment(yaml_dir: Path) -> None:
    rules = load_yaml(REPO / "deploy" / "prometheus" / "alerts.yml", yaml_dir)
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    deployment_alerts = [
        rule for rule in alerts if (rule.get("labels") or {}).get("backout") == "rollback"
    ]
    assert deployment_alerts, "no alert is marked for Backout (label backout: rollback)"
    for rule in deployment_alerts:
        for label in ("deployment_id", "service", "version"):
            assert re.search(rf"\b{label}\b", rule["expr"]), f"{rule['alert']} drops {label}"
        assert rule["annotations"].get("summary"), rule["alert"]
        assert rule["annotations"].get("description"), rule["alert"]
    assert any('status=~"5.."' in rule["expr"] for rule in deployment_alerts)


def test_alertmanager_posts_to_backout_with_the_api_token(
    stack: dict[str, Any], yaml_dir: Path
) -> None:
    alertmanager = service(stack, "alertmanager")
    config_path = bind_mount(alertmanager, command_flag(alertmanager, "--config.file"))
    assert config_path == REPO / "deploy" / "alertmanager" / "alertmanager.yml"
    config = load_yaml(config_path, yaml_dir)

    webhooks = {
        receiver["name"]: hook
        for receiver in config["receivers"]
        for hook in receiver.get("webhook_configs", [])
    }
    backout = [name for name, hook in webhooks.items() if hook["url"] == WEBHOOK_URL]
    assert backout, f"no webhook receiver posts to {WEBHOOK_URL}: {webhooks}"
    hook = webhooks[backout[0]]
    authorization = hook["http_config"]["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    assert "credentials" not in authorization, "keep the token out of the config file"
    # The credentials file is the token that compose writes into the container.
    mounts = {c["target"]: c["source"] for c in alertmanager.get("configs", [])}
    assert mounts.get(authorization["credentials_file"]) == "backout_api_token"

    # Alerts that ask for a rollback reach that receiver.
    routes = config["route"].get("routes", [])
    to_backout = [route for route in routes if route.get("receiver") == backout[0]]
    assert to_backout, "no route leads to the Backout webhook"
    matchers = " ".join(to_backout[0].get("matchers", []))
    assert re.search(r'backout\s*=\s*"?rollback"?', matchers)
    assert "deployment_id" in matchers


def test_grafana_is_provisioned(stack: dict[str, Any], yaml_dir: Path) -> None:
    grafana = service(stack, "grafana")
    provisioning = bind_mount(grafana, "/etc/grafana/provisioning")
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml", yaml_dir)
    (prometheus,) = [ds for ds in datasources["datasources"] if ds["type"] == "prometheus"]
    assert urlsplit(prometheus["url"]).hostname == "prometheus"
    assert urlsplit(prometheus["url"]).port in container_ports(service(stack, "prometheus"))

    providers = load_yaml(provisioning / "dashboards" / "backout.yml", yaml_dir)["providers"]
    paths = [bind_mount(grafana, provider["options"]["path"]) for provider in providers]
    assert DASHBOARD.parent in paths, f"no dashboard provider loads {DASHBOARD.parent}"

    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    uids = {
        (item.get("datasource") or {}).get("uid")
        for panel in dashboard["panels"]
        for item in (panel, *panel.get("targets", []))
    }
    assert uids == {prometheus["uid"]}, f"panels must use the provisioned datasource: {uids}"


# ----------------------------------------------------------------- the dashboard

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
# Words that look like metric names but are operators or modifiers.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan"}
)


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) that a PromQL expression refers to."""
    grouped = [label.strip() for group in _GROUPING.findall(expr) for label in group.split(",")]
    labels = {label for label in grouped if label}
    matchers = re.findall(r"\{([^}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr))
    labels |= {m.group(1) for body in matchers for m in re.finditer(r"(\w+)\s*[=!]", body)}
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\{?\w+\}?", "", bare)
    bare = _GROUPING.sub("", bare)
    metrics = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", bare):
        if m.group(0).lower() in _KEYWORDS or bare[m.end() :].lstrip().startswith("("):
            continue  # an operator, a function or an aggregation
        metrics.add(m.group(0))
    return metrics, labels


def base_metric(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        stem = series.removesuffix(suffix)
        if stem != series and METRICS.get(stem, ("",))[0] == "histogram":
            return stem
    return series


def test_promql_names_helper() -> None:
    metrics, labels = promql_names(
        'histogram_quantile(0.95, sum by (le) (rate(x_seconds_bucket{a="b",c!~"d"}'
        "[$__rate_interval]))) / on (job) group_left sum(y) > 1e3"
    )
    assert metrics == {"x_seconds_bucket", "y"}
    assert labels == {"le", "a", "c", "job"}


def test_dashboard_queries_only_backout_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["panels"], "the dashboard has no panels"
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        targets = panel.get("targets", [])
        assert targets, f"panel {panel.get('title')!r} has no query"
        for target in targets:
            metrics, labels = promql_names(target["expr"])
            assert metrics, f"{panel['title']}: {target['expr']} queries no metric"
            allowed_labels = set(TARGET_LABELS)
            for series in metrics:
                base = base_metric(series)
                assert base in METRICS, f"{panel['title']}: unknown metric {series}"
                kind, metric_labels = METRICS[base]
                if kind == "histogram":
                    assert series != base, f"{panel['title']}: use {base}_bucket/_sum/_count"
                    if series.endswith("_bucket"):
                        allowed_labels.add("le")
                allowed_labels |= metric_labels
                queried.add(base)
            unknown = labels - allowed_labels
            assert not unknown, f"{panel['title']}: labels {unknown} not on {metrics}"
    missing = DASHBOARD_MUST_QUERY - queried
    assert not missing, f"the dashboard shows nothing of {sorted(missing)}"
