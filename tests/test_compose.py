"""docker-compose.yml, its GPU override, the Dockerfile and the Prometheus/Grafana wiring,
checked statically (no container engine, no network).

Each check is a function that returns a list of problems, so the same function runs on the
real files (no problems) and on a deliberately broken copy (the problem is caught): every
check is shown able to fail in ``test_checker_catches``.

The pmgd services' commands are parsed with the services' own settings classes through
``pmgd_node.shell.settings.parse``, with the compose environment as the process environment: what
the test sees is what the container gets.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import io
import os
import posixpath
import re
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from pmgd_node.shell import keys as cluster_keys
from pmgd_node.shell import settings as settings_mod
from services.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "dashboards" / "prometheus.yml"
GRAFANA = ROOT / "dashboards" / "grafana"

EXPECTED_SERVICES = {"keys", "api", "broadcaster", "node", "evaluator", "prometheus", "grafana"}
KEYS_SERVICE = "keys"  # the one-shot `pmgd keys init DIR --if-missing` the pmgd services wait for


@dataclasses.dataclass(frozen=True)
class Spec:
    """A pmgd service: its settings class, env prefix, and which fields are what."""

    module: str
    cls: str
    prefix: str
    zmq_binds: tuple[str, ...] = ()  # fields holding ZeroMQ bind endpoints
    http_ports: tuple[tuple[str, str], ...] = ()  # (port field, host field) of HTTP servers
    metrics_port: str = ""  # the port field whose server answers /metrics
    health_path: str = ""  # what the health check asks for
    connects: tuple[tuple[str, str, str], ...] = ()  # (field, service, that service's field)

    def settings_class(self):
        return getattr(importlib.import_module(self.module), self.cls)


PMGD = {
    "api": Spec("services.api.app", "ApiSettings", "PMGD_API_",
                http_ports=(("port", "host"),), metrics_port="port", health_path="/health",
                connects=(("broadcaster", "broadcaster", "control"), ("evaluator", "evaluator", "http_port"))),
    "broadcaster": Spec("services.broadcaster.service", "BroadcasterSettings", "PMGD_BROADCASTER_",
                        zmq_binds=("control", "weights", "cost"),
                        http_ports=(("metrics_port", "metrics_host"),), metrics_port="metrics_port",
                        health_path="/metrics", connects=(("evaluator", "evaluator", "endpoint"),)),
    "node": Spec("pmgd_node.shell.process", "NodeSettings", "PMGD_",
                 http_ports=(("metrics_port", "metrics_host"),), metrics_port="metrics_port",
                 health_path="/metrics",
                 connects=(("control", "broadcaster", "control"), ("weights", "broadcaster", "weights"),
                           ("cost", "broadcaster", "cost"))),
    "evaluator": Spec("services.evaluator.remote", "EvaluatorSettings", "PMGD_EVALUATOR_",
                      zmq_binds=("endpoint",), http_ports=(("http_port", "http_host"),),
                      metrics_port="http_port", health_path="/health"),
}

# Start order (docs/architecture.md §2 topology): a service waits for what it talks to.
EXPECTED_DEPENDS = {"broadcaster": {"evaluator"}, "node": {"broadcaster"}, "api": {"broadcaster"},
                    "prometheus": {"api"}, "grafana": {"prometheus"}}

ALL_INTERFACES = {"0.0.0.0", "*", "::", "[::]"}

GPU_RESERVATION = {"deploy": {"resources": {"reservations": {"devices": [
    {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}}


# --- loading ------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}|\$\$")


def interpolate(value, env: dict | None = None):
    """Compose's ``${VAR:-default}`` interpolation, with ``env`` (default: none set, so every
    default applies and the result does not depend on the machine running the tests)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1)) or (m.group(2) or ""), value)
    return value


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose():
    return interpolate(load_yaml(COMPOSE))


@pytest.fixture(scope="module")
def prometheus():
    return load_yaml(PROMETHEUS)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def parsed_settings(name: str, service: dict):
    """The settings object the container builds from its command and environment."""
    spec = PMGD[name]
    command = service.get("command")
    if not isinstance(command, list):
        raise AssertionError(f"{name}: command must be a list, got {command!r}")
    if command[:2] != ["pmgd", name]:
        raise AssertionError(f"{name}: command must start with ['pmgd', {name!r}], got {command[:2]!r}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMGD_")}
    env.update(environment(service))
    err = io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stderr(err):
        try:
            return settings_mod.parse(spec.settings_class(), spec.prefix, f"pmgd {name}", "", command[2:])
        except SystemExit as exc:
            detail = err.getvalue().strip().splitlines()[-1:] or [str(exc)]
            raise AssertionError(f"{name}: command {command[2:]} does not parse: {detail[0]}") from None


def all_settings(compose: dict) -> dict:
    return {name: parsed_settings(name, compose["services"][name]) for name in PMGD}


def port_of(endpoint: str) -> tuple[str, int]:
    """(host, port) of ``tcp://host:port`` or ``http://host:port/...``."""
    parts = urlsplit(endpoint)
    if not parts.hostname or not parts.port:
        raise ValueError(f"{endpoint!r} names no host and port")
    return parts.hostname if "*" not in parts.netloc else "*", parts.port


def bound_ports(name: str, s) -> dict[int, str]:
    """Port → the settings field that serves it, for one pmgd service."""
    spec = PMGD[name]
    ports = {port_of(getattr(s, f))[1]: f for f in spec.zmq_binds}
    ports.update({getattr(s, f): f for f, _ in spec.http_ports if getattr(s, f)})
    return ports


def container_ports(service: dict) -> set[int]:
    """Container ports a service publishes (``ports``) or exposes (``expose``)."""
    ports = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    for entry in service.get("expose") or []:
        ports.add(int(str(entry).split("/")[0]))
    return ports


def volumes(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume entry."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out.append((entry.get("source", ""), entry["target"], bool(entry.get("read_only"))))
        else:
            parts = entry.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def health_url(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    urls = [t for t in test if isinstance(t, str) and t.startswith("http://")]
    if not urls:
        raise AssertionError(f"health check {test!r} names no http:// URL")
    return urls[-1]


def depends(service: dict) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {k: (v or {}).get("condition", "service_started") for k, v in dep.items()}


def one_shot(service: dict) -> bool:
    """A service that runs once and exits (``restart: "no"``; unquoted, YAML 1.1 reads False)."""
    return service.get("restart") in ("no", False)


def mount_of(service: dict, path: str) -> tuple[str, str, bool] | None:
    """The volume entry ``path`` lies on (the deepest target containing it), or None."""
    hits = [(src, tgt, ro) for src, tgt, ro in volumes(service)
            if path == tgt or path.startswith(tgt.rstrip("/") + "/")]
    return max(hits, key=lambda v: len(v[1])) if hits else None


def keys_command(service: dict) -> argparse.Namespace:
    """The keys service's command, parsed by the ``pmgd`` parser: ``pmgd keys init DIR --if-missing``."""
    command = service.get("command")
    if not isinstance(command, list) or command[:3] != ["pmgd", "keys", "init"]:
        raise AssertionError(f"{KEYS_SERVICE}: command must be a list starting pmgd keys init, got {command!r}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(command[1:])
        except SystemExit:
            detail = err.getvalue().strip().splitlines()[-1:] or ["?"]
            raise AssertionError(f"{KEYS_SERVICE}: command {command[1:]} does not parse: {detail[0]}") from None


def _safely(check):
    """Turn an AssertionError/ValueError raised while reading the files into a problem."""

    def wrapper(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except (AssertionError, ValueError, KeyError, TypeError) as exc:
            return [f"{type(exc).__name__}: {exc}"]

    wrapper.__name__ = check.__name__
    return wrapper


# --- checks (each returns its problems) ---------------------------------------------------

@_safely
def check_services(compose) -> list[str]:
    missing = EXPECTED_SERVICES - set(compose.get("services", {}))
    return [f"missing services: {sorted(missing)}"] if missing else []


@_safely
def check_commands(compose) -> list[str]:
    """Each pmgd command is `pmgd <service> …` and its flags parse with that service's settings."""
    problems = []
    for name in PMGD:
        try:
            parsed_settings(name, compose["services"][name])
        except AssertionError as exc:
            problems.append(str(exc))
    return problems


@_safely
def check_environment(compose) -> list[str]:
    """Every PMGD_* variable a pmgd service gets names a field of its settings."""
    problems = []
    for name, spec in PMGD.items():
        fields = {f.name for f in dataclasses.fields(spec.settings_class())}
        for key in environment(compose["services"][name]):
            if not key.startswith("PMGD_"):
                continue
            field = key[len(spec.prefix):].lower() if key.startswith(spec.prefix) else None
            if field is None and key[len("PMGD_"):].lower() in settings_mod.SHARED:
                field = key[len("PMGD_"):].lower()  # PMGD_KEYS, PMGD_KEY_NAME: every service reads them
            if field not in fields:
                problems.append(f"{name}: {key} is not {spec.prefix}<field> of {spec.cls} ({sorted(fields)})")
    return problems


@_safely
def check_ports(compose) -> list[str]:
    """Published and exposed container ports are exactly the ports the settings bind."""
    problems = []
    for name, s in all_settings(compose).items():
        bound = bound_ports(name, s)
        declared = container_ports(compose["services"][name])
        if set(bound) - declared:
            problems.append(f"{name}: binds {sorted(set(bound) - declared)} but neither exposes nor publishes them")
        if declared - set(bound):
            problems.append(f"{name}: exposes/publishes {sorted(declared - set(bound))}, which nothing binds "
                            f"(binds {bound})")
    return problems


@_safely
def check_listen_hosts(compose) -> list[str]:
    """Servers listen on all interfaces: other containers must reach them."""
    problems = []
    for name, s in all_settings(compose).items():
        spec = PMGD[name]
        for f in spec.zmq_binds:
            host, _ = port_of(getattr(s, f))
            if host not in ALL_INTERFACES:
                problems.append(f"{name}: {f}={getattr(s, f)} binds {host}, unreachable from other containers")
        for port_field, host_field in spec.http_ports:
            if getattr(s, port_field) and getattr(s, host_field) not in ALL_INTERFACES:
                problems.append(f"{name}: {host_field}={getattr(s, host_field)!r} serves {port_field} on "
                                f"one interface only")
    return problems


@_safely
def check_connections(compose) -> list[str]:
    """Every endpoint a service connects to names the serving service and the port it binds."""
    problems = []
    settings = all_settings(compose)
    for name, spec in PMGD.items():
        for field, target, target_field in spec.connects:
            value = getattr(settings[name], field)
            if not value:
                problems.append(f"{name}: {field} is empty; compose runs {target} as its own service")
                continue
            host, port = port_of(value)
            if host != target:
                problems.append(f"{name}: {field}={value} names host {host!r}, not the service {target!r}")
            want = getattr(settings[target], target_field)
            want_port = want if isinstance(want, int) else port_of(want)[1]
            if port != want_port:
                problems.append(f"{name}: {field}={value} uses port {port}, but {target} binds "
                                f"{target_field} on {want_port}")
    return problems


@_safely
def check_healthchecks(compose) -> list[str]:
    """Health checks ask a port the service serves, on the path that service answers."""
    problems = []
    services = compose["services"]
    settings = all_settings(compose)
    for name, service in services.items():
        if one_shot(service):
            continue  # runs once and exits: others wait for its exit, not its health
        url = urlsplit(health_url(service))
        if name in PMGD:
            spec = PMGD[name]
            served = {getattr(settings[name], f) for f, _ in spec.http_ports} - {0}
            if url.path != spec.health_path:
                problems.append(f"{name}: health check asks {url.path}, expected {spec.health_path}")
            if service["healthcheck"]["test"][:2] != ["CMD", "python"]:
                problems.append(f"{name}: health check should run python directly (CMD form)")
        else:
            served = container_ports(service)
        if url.hostname not in ("127.0.0.1", "localhost"):
            problems.append(f"{name}: health check asks {url.hostname}, not the container itself")
        if url.port not in served:
            problems.append(f"{name}: health check asks port {url.port}; the service serves {sorted(served)}")
    return problems


@_safely
def check_depends_on(compose) -> list[str]:
    """depends_on names existing services with health checks (one-shot ones: completed), makes
    no cycle, and keeps the start order evaluator → broadcaster → node, api → prometheus → grafana."""
    problems = []
    services = compose["services"]
    graph = {name: depends(service) for name, service in services.items()}
    for name, deps in graph.items():
        for dep, condition in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep!r}")
            elif one_shot(services[dep]):
                if condition != "service_completed_successfully":
                    problems.append(f"{name}: depends on the one-shot {dep} with {condition}, expected "
                                    f"service_completed_successfully")
            elif condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no health check")
            elif condition != "service_healthy":
                problems.append(f"{name}: depends on {dep} with {condition}, expected service_healthy")
    for name, wanted in EXPECTED_DEPENDS.items():
        if not wanted <= set(graph.get(name, {})):
            problems.append(f"{name}: must wait for {sorted(wanted)}; depends on {sorted(graph.get(name, {}))}")
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done

    def visit(node, path):
        if state.get(node) == 1:
            problems.append("depends_on cycle: " + " → ".join(path[path.index(node):] + [node]))
            return
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for dep in graph[node]:
            visit(dep, path + [node])
        state[node] = 2

    for name in graph:
        visit(name, [])
    return problems


@_safely
def check_storage(compose) -> list[str]:
    """Data sets mount read-only at /data and the services are told so; the broadcaster's state
    dir and the API's database live on declared named volumes."""
    problems = []
    services = compose["services"]
    named = set(compose.get("volumes") or {})
    settings = all_settings(compose)
    for name in ("api", "evaluator"):
        if settings[name].data_dir != "/data":
            problems.append(f"{name}: data_dir is {settings[name].data_dir!r}, expected /data")
        mount = mount_of(services[name], "/data")
        if mount is None or not mount[2]:
            problems.append(f"{name}: /data must be a read-only mount, got {mount}")
        elif mount[0] != "./data":
            problems.append(f"{name}: /data comes from {mount[0]!r}, expected ${{PMGD_DATA:-./data}}")
    for name, path in (("broadcaster", settings["broadcaster"].state_dir),
                       ("api", os.path.dirname(settings["api"].db))):
        mount = mount_of(services[name], path) if path.startswith("/") else None
        if mount is None or mount[0] not in named or mount[2]:
            problems.append(f"{name}: {path!r} must lie on a writable named volume (declared: {sorted(named)}), "
                            f"got {mount}")
    return problems


def zmq_links(name: str, s) -> list[str]:
    """The fields of a pmgd service's ZeroMQ sockets that reach beyond loopback: binds on
    another interface, and connections to a TCP endpoint elsewhere."""
    spec = PMGD[name]
    binds = [f for f in spec.zmq_binds if not cluster_keys.is_loopback(getattr(s, f))]
    connects = [f for f, _, _ in spec.connects
                if str(getattr(s, f)).startswith("tcp://") and not cluster_keys.is_loopback(getattr(s, f))]
    return binds + connects


@_safely
def check_keys(compose, dockerfile: str) -> list[str]:
    """The CurveZMQ keys: the one-shot keys service makes them (idempotently) on a volume; every
    pmgd service with a ZeroMQ socket beyond loopback reads a keys directory (flags or
    environment, through its settings class) that lies on that same volume, mounted read-only,
    and starts after the keys service has completed. The image only holds the empty mount
    point, owned by the services' user (a fresh named volume takes that ownership)."""
    problems = []
    services = compose["services"]
    named = set(compose.get("volumes") or {})
    service = services.get(KEYS_SERVICE)
    if service is None:
        return [f"no {KEYS_SERVICE!r} service: nothing makes the cluster's keys"]
    args = keys_command(service)
    if not args.if_missing:
        problems.append(f"{KEYS_SERVICE}: init without --if-missing fails at the second `up` (the keys exist)")
    if not one_shot(service):
        problems.append(f"{KEYS_SERVICE}: must be one-shot (restart: \"no\"), got restart={service.get('restart')!r}")
    full = services["api"]  # the full image (the node's own target lacks nothing keys needs, but is not it)
    if service.get("image") != full.get("image") or service.get("build") != full.get("build"):
        problems.append(f"{KEYS_SERVICE}: must run the pmgd image {full.get('image')!r} built like the API's")
    made = mount_of(service, args.dir)
    if made is None:
        return problems + [f"{KEYS_SERVICE}: {args.dir} is not on a volume: the keys would die with the container"]
    source, target, read_only = made
    if read_only:
        problems.append(f"{KEYS_SERVICE}: {args.dir} is mounted read-only; it writes the keys there")
    if source not in named and not source.startswith(("/", ".", "~")):
        problems.append(f"{KEYS_SERVICE}: volume {source!r} is neither declared ({sorted(named)}) nor a host path")
    inside = posixpath.relpath(args.dir, target)
    settings = all_settings(compose)
    for name in PMGD:
        links = zmq_links(name, settings[name])
        if not links:
            continue
        keys = settings[name].keys
        if not keys:
            problems.append(f"{name}: ZeroMQ {links} go beyond loopback, but it has no keys directory "
                            f"(PMGD_KEYS or --keys)")
            continue
        mount = mount_of(services[name], keys) if keys.startswith("/") else None
        if mount is None:
            problems.append(f"{name}: keys={keys!r} is not on a volume: the keys would have to be in the image")
            continue
        if not mount[2]:
            problems.append(f"{name}: the keys mount {mount[1]} must be read-only (only {KEYS_SERVICE} writes it)")
        if mount[0] != source or posixpath.relpath(keys, mount[1]) != inside:
            problems.append(f"{name}: keys={keys} on {mount[0]!r}, but {KEYS_SERVICE} makes them in {source!r} "
                            f"at {args.dir}")
        if depends(services[name]).get(KEYS_SERVICE) != "service_completed_successfully":
            problems.append(f"{name}: must wait for {KEYS_SERVICE} (condition: service_completed_successfully)")
    for name, other in services.items():
        if name != KEYS_SERVICE and any(src == source and not ro for src, _, ro in volumes(other)):
            problems.append(f"{name}: mounts the keys ({source!r}) writable; only {KEYS_SERVICE} may")
    lines = [ln.strip() for ln in dockerfile.replace("\\\n", " ").splitlines()]
    if any(re.search(r"(?<![\w-])keys?(?![\w-])", ln) for ln in lines if ln.startswith(("COPY", "ADD"))):
        problems.append("Dockerfile: copies keys into the image")
    if source in named:
        user = next((ln.split()[1] for ln in reversed(lines) if ln.startswith("USER ")), "root")
        owned = any(re.search(rf"\bchown\s+{re.escape(user)}\S*\s.*(?<!\S){re.escape(target)}(?!\S)", ln)
                    for ln in lines if ln.startswith("RUN"))
        if user != "root" and not owned:
            problems.append(f"Dockerfile: {target} must exist and belong to {user} (the volume {source!r} takes the "
                            f"mount point's owner; otherwise {KEYS_SERVICE} cannot write there)")
    return problems


@_safely
def check_nodes(compose) -> list[str]:
    """Nodes are replicas: no fixed name or node id, replicas from PMGD_NODES."""
    problems = []
    node = compose["services"]["node"]
    raw = load_yaml(COMPOSE)["services"]["node"]
    if raw.get("deploy", {}).get("replicas") != "${PMGD_NODES:-2}":
        problems.append(f"node: deploy.replicas should be ${{PMGD_NODES:-2}}, got {raw.get('deploy')}")
    if "container_name" in node or "hostname" in node:
        problems.append("node: a fixed container_name/hostname breaks --scale")
    if parsed_settings("node", node).node_id:
        problems.append("node: a fixed node_id would be shared by every replica")
    if node.get("ports"):
        problems.append("node: published ports clash between replicas")
    return problems


@_safely
def check_scrape_targets(compose, prometheus) -> list[str]:
    """Prometheus scrapes every pmgd service by its compose name, on the port of its /metrics;
    nodes through DNS (one A record per replica)."""
    problems = []
    settings = all_settings(compose)
    services = compose["services"]
    scraped = set()
    for job in prometheus["scrape_configs"]:
        if job.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"{job['job_name']}: metrics_path {job['metrics_path']}")
        targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        for sd in job.get("dns_sd_configs", []):
            if sd.get("type", "SRV") != "A":
                problems.append(f"{job['job_name']}: dns_sd type {sd.get('type')}; compose DNS serves A records")
        for target in targets:
            host, port = target.rsplit(":", 1)
            if host == "localhost" and job["job_name"] == "prometheus":
                continue
            if host not in services:
                problems.append(f"{job['job_name']}: target {target} names no compose service")
                continue
            if host in PMGD:
                want = getattr(settings[host], PMGD[host].metrics_port)
                if int(port) != want:
                    problems.append(f"{job['job_name']}: target {target}, but {host} serves /metrics on {want}")
                scraped.add(host)
        if any(h.startswith("node") for h in targets) and not job.get("dns_sd_configs"):
            problems.append(f"{job['job_name']}: nodes are replicas; find them with dns_sd_configs")
    if set(PMGD) - scraped:
        problems.append(f"not scraped: {sorted(set(PMGD) - scraped)}")
    # pmgd_job_*{job=...}: without honor_labels Prometheus renames the label exported_job.
    api_jobs = [j for j in prometheus["scrape_configs"]
                if any(t.startswith("api:") for sc in j.get("static_configs", []) for t in sc["targets"])]
    if not all(j.get("honor_labels") for j in api_jobs):
        problems.append("the api scrape job needs honor_labels: true (pmgd_job_* carry a `job` label)")
    return problems


@_safely
def check_prometheus_mount(compose) -> list[str]:
    service = compose["services"]["prometheus"]
    config = next((a.split("=", 1)[1] for a in service.get("command", []) if a.startswith("--config.file=")),
                  "/etc/prometheus/prometheus.yml")
    mounts = {tgt: src for src, tgt, _ in volumes(service)}
    if config not in mounts or (ROOT / mounts[config]).resolve() != PROMETHEUS:
        return [f"prometheus: {PROMETHEUS.relative_to(ROOT)} must be mounted at {config}, mounts {mounts}"]
    return []


@_safely
def check_grafana(compose) -> list[str]:
    """The provisioning directory is mounted where Grafana reads it, the dashboards where the
    provider looks, and the data source points at the Prometheus service."""
    problems = []
    service = compose["services"]["grafana"]
    mounts = {tgt: (ROOT / src).resolve() for src, tgt, _ in volumes(service) if src.startswith(".")}
    provisioning = environment(service).get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    if mounts.get(provisioning) != GRAFANA / "provisioning":
        problems.append(f"grafana: provisioning dir must be mounted at {provisioning}, mounts {mounts}")
    for provider in load_yaml(GRAFANA / "provisioning" / "dashboards" / "pmgd.yml")["providers"]:
        path = provider["options"]["path"]
        if mounts.get(path) != GRAFANA / "dashboards":
            problems.append(f"grafana: provider {provider['name']} reads {path}, where the dashboards are not mounted")
    home = environment(service).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        base = next((t for t in mounts if home.startswith(t + "/")), None)
        if base is None or not (mounts[base] / home[len(base) + 1:]).is_file():
            problems.append(f"grafana: home dashboard {home} is not a mounted file")
    prom_port = container_ports(compose["services"]["prometheus"])
    for ds in load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]:
        url = urlsplit(ds["url"])
        if url.hostname != "prometheus" or url.port not in prom_port:
            problems.append(f"grafana: data source {ds['name']} points at {ds['url']}, not prometheus:{prom_port}")
    return problems


@_safely
def check_build(compose, dockerfile: str) -> list[str]:
    """Every pmgd service builds the repository's Dockerfile, which pip-installs the package."""
    problems = []
    for name in PMGD:
        build = compose["services"][name].get("build")
        if not isinstance(build, dict):
            problems.append(f"{name}: build must be a mapping with context and dockerfile, got {build!r}")
            continue
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        if context != ROOT or (context / build.get("dockerfile", "Dockerfile")).resolve() != DOCKERFILE:
            problems.append(f"{name}: build {build} is not this repository's Dockerfile")
    lines = [ln.strip() for ln in dockerfile.replace("\\\n", " ").splitlines()]
    if not any(re.match(r"RUN\b.*\bpip install\s+\.(\s|$)", ln) for ln in lines):
        problems.append("Dockerfile: no `RUN pip install .`")
    copied = " ".join(ln for ln in lines if ln.startswith("COPY"))
    for needed in ("pyproject.toml", "README.md", "pmgd_node", "services"):
        if needed not in copied:
            problems.append(f"Dockerfile: does not COPY {needed}")
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for needed in ("pyproject.toml", "README.md", "pmgd_node", "services"):
        if needed in ignored:
            problems.append(f".dockerignore excludes {needed}")
    if ".venv" not in ignored:
        problems.append(".dockerignore must exclude .venv")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if not re.search(r'^pmgd\s*=\s*"services\.cli:main"', pyproject, re.M):
        problems.append("pyproject.toml: no `pmgd` console script for the commands")
    return problems


@_safely
def check_gpu_override(compose_raw, override) -> list[str]:
    """The override adds the NVIDIA reservation to the evaluator and broadcaster and nothing
    else; the base file reserves no device (it must start without the nvidia runtime)."""
    problems = []
    if set(override) != {"services"}:
        problems.append(f"override has top-level keys {sorted(override)}, expected only services")
    if set(override.get("services", {})) != {"evaluator", "broadcaster"}:
        problems.append(f"override touches {sorted(override.get('services', {}))}, expected evaluator, broadcaster")
    for name, service in override.get("services", {}).items():
        if service != GPU_RESERVATION:
            problems.append(f"override {name}: {service} is not exactly the GPU reservation")
    if "devices" in yaml.safe_dump(compose_raw) or "nvidia" in yaml.safe_dump(compose_raw):
        problems.append("the base compose file reserves devices; hosts without the nvidia runtime fail")
    return problems


# --- tests --------------------------------------------------------------------------------

def test_compose_parses_and_has_the_services(compose):
    assert check_services(compose) == []
    assert set(PMGD) <= EXPECTED_SERVICES


def test_commands_parse_with_the_settings_classes(compose):
    assert check_commands(compose) == []


def test_parsed_settings_are_the_compose_topology(compose):
    s = all_settings(compose)
    assert s["node"].control == "tcp://broadcaster:5555"
    assert s["broadcaster"].evaluator == "tcp://evaluator:5560"
    assert s["api"].evaluator == "http://evaluator:8001"
    assert s["api"].token == "change-me"  # ${PMGD_API_TOKEN:-change-me}, host variable unset
    assert s["evaluator"].token == s["api"].evaluator_token == "change-me"  # the one token the API sends it
    assert (s["broadcaster"].metrics_port, s["node"].metrics_port) == (9101, 9102)
    assert {s[name].keys for name in PMGD} == {"/keys"}  # PMGD_KEYS, read through each settings class
    assert keys_command(compose["services"][KEYS_SERVICE]).dir == "/keys"


def test_environment_names_settings_fields(compose):
    assert check_environment(compose) == []


def test_ports_agree_with_the_settings(compose):
    assert check_ports(compose) == []


def test_servers_listen_on_all_interfaces(compose):
    assert check_listen_hosts(compose) == []


def test_connect_endpoints_name_a_service_and_its_port(compose):
    assert check_connections(compose) == []


def test_healthchecks_ask_served_ports(compose):
    assert check_healthchecks(compose) == []


def test_depends_on_targets_exist_without_cycles(compose):
    assert check_depends_on(compose) == []


def test_storage(compose):
    assert check_storage(compose) == []


def test_keys_on_a_volume(compose):
    assert check_keys(compose, DOCKERFILE.read_text(encoding="utf-8")) == []


def test_nodes_scale(compose):
    assert check_nodes(compose) == []


def test_prometheus_scrapes_every_service(compose, prometheus):
    assert check_scrape_targets(compose, prometheus) == []
    assert check_prometheus_mount(compose) == []


def test_grafana_provisioning_is_mounted(compose):
    assert check_grafana(compose) == []


def test_dockerfile_installs_the_package(compose):
    assert check_build(compose, DOCKERFILE.read_text(encoding="utf-8")) == []


def test_gpu_override_only_adds_the_reservation():
    assert check_gpu_override(load_yaml(COMPOSE), load_yaml(GPU_OVERRIDE)) == []


def test_interpolation():
    assert interpolate("${A:-x}:${B-y}:${C}:$$D", {"A": "1"}) == "1:y::$D"
    assert interpolate({"k": ["${PMGD_NODES:-2}"]}) == {"k": ["2"]}


# Each check, fed a copy of the files with one thing broken, reports it.
def _service(c, name):
    return c["services"][name]


def _remount(c, name, target, entry=None):
    """Drop the volume entry of ``name`` mounted at ``target``; put ``entry`` in its place."""
    service = _service(c, name)
    service["volumes"] = [v for v in service["volumes"] if volumes({"volumes": [v]})[0][1] != target]
    service["volumes"] += [entry] if entry else []


def _replace_flag(c, name, flag, value):
    cmd = _service(c, name)["command"]
    cmd[:] = [a for a in cmd if not a.startswith(flag + "=")] + [f"{flag}={value}"]


MUTATIONS = {
    "bogus flag": (check_commands, lambda c, p: _service(c, "node")["command"].append("--no-such-flag=1"),
                   "--no-such-flag"),
    "wrong command": (check_commands, lambda c, p: _service(c, "api")["command"].__setitem__(1, "node"), "api"),
    "shell-string command": (check_commands, lambda c, p: _service(c, "evaluator").__setitem__(
        "command", "pmgd evaluator"), "list"),
    "unknown env key": (check_environment, lambda c, p: _service(c, "api")["environment"].__setitem__(
        "PMGD_API_TOKN", "x"), "PMGD_API_TOKN"),
    "env key of another service": (check_environment, lambda c, p: _service(c, "evaluator")["environment"]
                                   .__setitem__("PMGD_API_DATA_DIR", "/data"), "PMGD_API_DATA_DIR"),
    "wrong published port": (check_ports, lambda c, p: _service(c, "api").__setitem__("ports", ["8080:8080"]),
                             "8080"),
    "port bound but not exposed": (check_ports, lambda c, p: _replace_flag(c, "broadcaster", "--weights",
                                                                           "tcp://0.0.0.0:6556"), "6556"),
    "metrics off": (check_ports, lambda c, p: _replace_flag(c, "node", "--metrics-port", "0"), "9102"),
    "loopback bind": (check_listen_hosts, lambda c, p: _replace_flag(c, "broadcaster", "--control",
                                                                     "tcp://127.0.0.1:5555"), "127.0.0.1"),
    "loopback http": (check_listen_hosts, lambda c, p: _replace_flag(c, "api", "--host", "127.0.0.1"), "host"),
    "connect wrong port": (check_connections, lambda c, p: _replace_flag(c, "node", "--cost",
                                                                         "tcp://broadcaster:5558"), "5558"),
    "connect wrong host": (check_connections, lambda c, p: _replace_flag(c, "node", "--control",
                                                                         "tcp://api:5555"), "'api'"),
    "api to wrong evaluator port": (check_connections, lambda c, p: _replace_flag(
        c, "api", "--evaluator", "http://evaluator:5560"), "5560"),
    "broadcaster in-process": (check_connections, lambda c, p: _replace_flag(c, "broadcaster", "--evaluator", ""),
                               "empty"),
    "health wrong port": (check_healthchecks, lambda c, p: _service(c, "evaluator")["healthcheck"]["test"]
                          .__setitem__(-1, "http://127.0.0.1:8002/health"), "8002"),
    "health wrong path": (check_healthchecks, lambda c, p: _service(c, "broadcaster")["healthcheck"]["test"]
                          .__setitem__(-1, "http://127.0.0.1:9101/health"), "/health"),
    "grafana health wrong port": (check_healthchecks, lambda c, p: _service(c, "grafana")["healthcheck"]["test"]
                                  .__setitem__(-1, "http://127.0.0.1:3001/api/health"), "3001"),
    "depends_on cycle": (check_depends_on, lambda c, p: _service(c, "evaluator").__setitem__(
        "depends_on", {"node": {"condition": "service_healthy"}}), "cycle"),
    "depends_on unknown": (check_depends_on, lambda c, p: _service(c, "api")["depends_on"].__setitem__(
        "database", {"condition": "service_healthy"}), "database"),
    "depends_on missing order": (check_depends_on, lambda c, p: _service(c, "node").pop("depends_on"), "node"),
    "writable data": (check_storage, lambda c, p: _service(c, "evaluator").__setitem__(
        "volumes", ["./data:/data"]), "read-only"),
    "state not on a volume": (check_storage, lambda c, p: _replace_flag(c, "broadcaster", "--state-dir", "/tmp/s"),
                              "/tmp/s"),
    "wait for a one-shot's health": (check_depends_on, lambda c, p: _service(c, "node")["depends_on"].__setitem__(
        "keys", {"condition": "service_healthy"}), "service_completed_successfully"),
    "no keys service": (check_keys, lambda c, p: c["services"].pop("keys"), "no 'keys' service"),
    "keys init not idempotent": (check_keys, lambda c, p: _service(c, "keys")["command"].remove("--if-missing"),
                                 "--if-missing"),
    "keys service restarts": (check_keys, lambda c, p: _service(c, "keys").__setitem__("restart", "unless-stopped"),
                              "one-shot"),
    "keys made in the container": (check_keys, lambda c, p: _service(c, "keys").pop("volumes"), "not on a volume"),
    "node without keys": (check_keys, lambda c, p: _service(c, "node")["environment"].pop("PMGD_KEYS"),
                          "node: ZeroMQ"),
    "evaluator without keys": (check_keys, lambda c, p: _service(c, "evaluator")["environment"].pop("PMGD_KEYS"),
                               "evaluator: ZeroMQ ['endpoint']"),
    "keys in the image": (check_keys, lambda c, p: _remount(c, "broadcaster", "/keys"), "broadcaster: keys='/keys'"),
    "keys flag off the volume": (check_keys, lambda c, p: _replace_flag(c, "node", "--keys", "/etc/pmgd-keys"),
                                 "/etc/pmgd-keys"),
    "keys writable": (check_keys, lambda c, p: _remount(c, "api", "/keys", "cluster-keys:/keys"), "read-only"),
    "keys of another volume": (check_keys, lambda c, p: _remount(c, "evaluator", "/keys", "api-data:/keys:ro"),
                               "'api-data'"),
    "keys not awaited": (check_keys, lambda c, p: _service(c, "broadcaster")["depends_on"].pop("keys"),
                         "broadcaster: must wait for keys"),
    "fixed node id": (check_nodes, lambda c, p: _service(c, "node")["command"].append("--node-id=n1"), "node_id"),
    "scrape wrong port": (check_scrape_targets, lambda c, p: p["scrape_configs"][1]["static_configs"][0]
                          .__setitem__("targets", ["broadcaster:9102"]), "9102"),
    "scrape unknown host": (check_scrape_targets, lambda c, p: p["scrape_configs"][2]["static_configs"][0]
                            .__setitem__("targets", ["evaluatr:8001"]), "evaluatr"),
    "scrape nodes statically": (check_scrape_targets, lambda c, p: p["scrape_configs"].__setitem__(
        3, {"job_name": "node", "static_configs": [{"targets": ["node:9102"]}]}), "dns_sd"),
    "no honor_labels": (check_scrape_targets, lambda c, p: p["scrape_configs"][0].pop("honor_labels"),
                        "honor_labels"),
    "prometheus config elsewhere": (check_prometheus_mount, lambda c, p: _service(c, "prometheus")["volumes"]
                                    .__setitem__(0, "./dashboards/prometheus.yml:/etc/prom.yml:ro"), "prometheus"),
    "grafana provisioning elsewhere": (check_grafana, lambda c, p: _service(c, "grafana")["volumes"].__setitem__(
        0, "./dashboards/grafana/provisioning:/etc/grafana/prov:ro"), "provisioning"),
    "grafana dashboards elsewhere": (check_grafana, lambda c, p: _service(c, "grafana")["volumes"].__setitem__(
        1, "./dashboards/grafana/dashboards:/var/lib/grafana/dashboards:ro"), "provider"),
    "build elsewhere": (check_build, lambda c, p: _service(c, "node").__setitem__(
        "build", {"context": "./services"}), "node"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_checker_catches(case, compose, prometheus):
    check, mutate, expected = MUTATIONS[case]
    c, p = copy.deepcopy(compose), copy.deepcopy(prometheus)
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    args = {"check_scrape_targets": (c, p), "check_build": (c, dockerfile), "check_keys": (c, dockerfile)}
    baseline = check(*args.get(check.__name__, (c,)))
    assert baseline == [], baseline
    mutate(c, p)
    problems = check(*args.get(check.__name__, (c,)))
    assert problems, f"{check.__name__} missed: {case}"
    assert any(expected in problem for problem in problems), problems


def test_checker_catches_dockerfile_without_install(compose):
    text = DOCKERFILE.read_text(encoding="utf-8")
    broken = re.sub(r"pip install \.", "pip install -r requirements.txt", text)
    assert broken != text
    assert any("pip install ." in problem for problem in check_build(compose, broken))


def test_checker_catches_dockerfile_keys(compose):
    text = DOCKERFILE.read_text(encoding="utf-8")
    unowned = re.sub(r"(chown pmgd:pmgd [^\n]*) /keys", r"\1", text)
    assert unowned != text
    assert any("/keys must exist and belong to pmgd" in problem for problem in check_keys(compose, unowned))
    baked = text.replace("COPY services ./services", "COPY services ./services\nCOPY keys /keys")
    assert any("copies keys" in problem for problem in check_keys(compose, baked))


def test_checker_catches_gpu_override_additions():
    base, override = load_yaml(COMPOSE), load_yaml(GPU_OVERRIDE)
    extra = copy.deepcopy(override)
    extra["services"]["evaluator"]["environment"] = {"PMGD_EVALUATOR_DEVICE": "cuda"}
    assert check_gpu_override(base, extra)
    more = copy.deepcopy(override)
    more["services"]["node"] = copy.deepcopy(GPU_RESERVATION)
    assert check_gpu_override(base, more)
    gpu_base = copy.deepcopy(base)
    gpu_base["services"]["evaluator"]["deploy"] = copy.deepcopy(GPU_RESERVATION["deploy"])
    assert any("base compose" in problem for problem in check_gpu_override(gpu_base, override))
