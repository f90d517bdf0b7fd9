"""The Grafana dashboards ask only for series the services export.

Static: every PromQL expression in every dashboard (panel targets and template variables)
is reduced to the metric names it reads, and each must be in the metrics contract below;
every dashboard is well-formed Grafana JSON (title, uid, schema, the provisioned data source,
panels with titles, units and grid positions).

Live (slow): a real local cluster (api, broadcaster, two nodes, remote evaluator, all with
/metrics on), a short cluster job, a local job with the gradient angle on, and one
evaluation; then every metric name the dashboards query must appear in the scraped text.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards" / "grafana" / "dashboards"
DATASOURCES = ROOT / "dashboards" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
EXPECTED_DASHBOARDS = {"training.json", "nodes.json", "evaluator.json"}

# The metrics contract: every series a dashboard may query (counters with their _total).
CONTRACT = {
    "broadcaster": {
        "pmgd_broadcaster_ticks_total", "pmgd_broadcaster_job_tick", "pmgd_broadcaster_cost",
        "pmgd_broadcaster_c_tilde", "pmgd_broadcaster_gather_wait_seconds", "pmgd_broadcaster_nodes",
        "pmgd_broadcaster_node_heartbeat_age_seconds", "pmgd_broadcaster_node_staleness_ticks",
        "pmgd_broadcaster_node_dropped_frames", "pmgd_broadcaster_dropped_frames_total",
        "pmgd_broadcaster_checkpoints_total", "pmgd_broadcaster_state",
    },
    "node": {
        "pmgd_node_ticks_total", "pmgd_node_dropped_frames_total", "pmgd_node_cost_wait_seconds",
        "pmgd_node_resend_requests_total", "pmgd_node_joins_total", "pmgd_node_shard_params",
    },
    "api": {
        "pmgd_api_requests_total", "pmgd_api_request_seconds", "pmgd_api_jobs", "pmgd_job_tick",
        "pmgd_job_cost", "pmgd_job_accuracy", "pmgd_job_ticks_per_second", "pmgd_job_gradient_angle_degrees",
    },
    "evaluator": {
        "pmgd_evaluator_requests_total", "pmgd_evaluator_images_total", "pmgd_evaluator_images_per_second",
        "pmgd_evaluator_eval_seconds", "pmgd_evaluator_cost_requests_total", "pmgd_evaluator_device_info",
    },
}
METRICS = set().union(*CONTRACT.values())

# --- PromQL → metric names ----------------------------------------------------------------

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log10", "log2", "minute", "month", "predict_linear", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
            "unless", "inf", "nan"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_HIST_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads.

    Drops, in order: string literals, Grafana variables ($job, ${x}, $__rate_interval),
    label matchers {...}, ranges and subqueries [...], label lists after by/without/on/
    ignoring/group_left/group_right, durations after offset, and numbers; what remains are
    identifiers, of which functions (called), aggregations and keywords are not metrics.
    """
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', " ", expr)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" \1 ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    s = re.sub(r"(?<![A-Za-z0-9_:])(0[xX][0-9a-fA-F]+|\d+(\.\d*)?([eE][+-]?\d+)?)((ms|s|m|h|d|w|y)\b)?", " ", s)
    names = set()
    for match in _IDENT.finditer(s):
        word = match.group(0)
        called = s[match.end():].lstrip().startswith("(")
        if word in KEYWORDS or word in AGGREGATIONS or (called and word in FUNCTIONS):
            continue
        if called:
            raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
        names.add(word)
    return names


def label_values_metric(query: str) -> set[str]:
    """Metric names in a Grafana template query: label_values(metric, label), or PromQL."""
    m = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*\w+\s*\)\s*", query)
    if m:
        return metric_names(m.group(1))
    if re.fullmatch(r"\s*label_names\(\s*\)\s*", query):
        return set()
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", query)
    return metric_names(m.group(1) if m else query)


def base_name(name: str) -> str:
    return _HIST_SUFFIX.sub("", name) if _HIST_SUFFIX.sub("", name) in METRICS else name


# --- dashboards ---------------------------------------------------------------------------

def load_dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASHBOARDS.glob("*.json"))}


def all_panels(dashboard: dict):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every PromQL expression: panel targets and query template variables."""
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel.get('title')!r} {target.get('refId')}", target.get("expr", "")))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            out.append((f"variable {var.get('name')}", "label_values:" + query))
    return out


def queried_metrics(dashboard: dict) -> dict[str, str]:
    """Metric name → first place it is queried."""
    names = {}
    for where, expr in expressions(dashboard):
        found = label_values_metric(expr[len("label_values:"):]) if expr.startswith("label_values:") \
            else metric_names(expr)
        for name in found:
            names.setdefault(name, where)
    return names


def dashboard_problems(dashboard: dict, datasource_uid: str) -> list[str]:
    problems = []
    for key in ("title", "uid"):
        if not dashboard.get(key):
            problems.append(f"no {key}")
    if not 36 <= dashboard.get("schemaVersion", 0) <= 41:
        problems.append(f"schemaVersion {dashboard.get('schemaVersion')}")
    if "id" in dashboard and dashboard["id"] is not None:
        problems.append("a provisioned dashboard must not carry a database id")
    panels = list(all_panels(dashboard))
    if not panels:
        problems.append("no panels")
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids):
        problems.append(f"duplicate panel ids {ids}")
    for panel in panels:
        title = panel.get("title")
        if not title:
            problems.append(f"panel {panel.get('id')} has no title")
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")) or grid["x"] + grid["w"] > 24:
            problems.append(f"panel {title!r}: gridPos {grid}")
        if panel.get("type") == "row":
            continue
        if panel.get("type") not in ("timeseries", "stat", "gauge", "bargauge", "table", "text"):
            problems.append(f"panel {title!r}: type {panel.get('type')}")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"panel {title!r} has no unit")
        if not panel.get("targets"):
            problems.append(f"panel {title!r} has no targets")
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if not isinstance(ds, dict) or ds.get("uid") != datasource_uid or ds.get("type") != "prometheus":
                problems.append(f"panel {title!r}: data source {ds}, expected uid {datasource_uid}")
        refs = [t.get("refId") for t in panel.get("targets", [])]
        if len(set(refs)) != len(refs) or not all(refs):
            problems.append(f"panel {title!r}: refIds {refs}")
        if not all(t.get("expr") for t in panel.get("targets", [])):
            problems.append(f"panel {title!r}: a target without expr")
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query" and (var.get("datasource") or {}).get("uid") != datasource_uid:
            problems.append(f"variable {var.get('name')}: data source {var.get('datasource')}")
    overlaps = _overlaps([p for p in panels if p in dashboard.get("panels", [])])
    if overlaps:
        problems.append(f"overlapping panels: {overlaps}")
    return problems


def _overlaps(panels: list[dict]) -> list[tuple[str, str]]:
    cells = {}
    out = []
    for panel in panels:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells and (cells[(x, y)], panel["title"]) not in out:
                    out.append((cells[(x, y)], panel["title"]))
                cells[(x, y)] = panel["title"]
    return out


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    sources = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    (prom,) = [s for s in sources if s["type"] == "prometheus"]
    return prom["uid"]


# --- static tests -------------------------------------------------------------------------

def test_extractor():
    assert metric_names('histogram_quantile(0.99, sum by (instance, le) '
                        '(rate(pmgd_node_cost_wait_seconds_bucket{job=~"$job"}[$__rate_interval])))') == {
        "pmgd_node_cost_wait_seconds_bucket"}
    assert metric_names("rate(a_sum[5m]) / rate(a_count[5m]) > bool 0 and on (x) b offset 1h") == {
        "a_sum", "a_count", "b"}
    assert metric_names('sum without (reason) (x{reason="by (y)"}) or vector(1)') == {"x"}
    assert metric_names("topk(3, up) unless ignoring(a, b) group_left(c) d * 1e3") == {"up", "d"}
    assert metric_names("x[5m:30s]") == {"x"}
    assert metric_names("1-cost_a+0x1F*2e-3-b") == {"cost_a", "b"}
    assert label_values_metric("label_values(pmgd_job_tick, job)") == {"pmgd_job_tick"}
    with pytest.raises(ValueError):
        metric_names("ratee(x[1m])")  # a misspelled function is not taken for a metric


def test_the_expected_dashboards_exist():
    assert set(load_dashboards()) == EXPECTED_DASHBOARDS


@pytest.mark.parametrize("name", sorted(EXPECTED_DASHBOARDS))
def test_dashboard_is_valid_grafana_json(name, datasource_uid):
    assert dashboard_problems(load_dashboards()[name], datasource_uid) == []


def test_uids_are_unique():
    uids = [d["uid"] for d in load_dashboards().values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", sorted(EXPECTED_DASHBOARDS))
def test_dashboard_queries_only_contract_metrics(name):
    queried = queried_metrics(load_dashboards()[name])
    assert queried
    unknown = {n: where for n, where in queried.items() if base_name(n) not in METRICS}
    assert unknown == {}


def test_dashboards_cover_every_service():
    queried = {base_name(n) for d in load_dashboards().values() for n in queried_metrics(d)}
    for service, names in CONTRACT.items():
        assert queried & names, f"no dashboard shows {service}"


def test_checks_can_fail(datasource_uid):
    board = load_dashboards()["nodes.json"]
    broken = json.loads(json.dumps(board))
    panel = next(p for p in broken["panels"] if p["type"] != "row")
    panel["targets"][0]["expr"] = "rate(pmgd_node_tick_total[1m])"
    del panel["fieldConfig"]["defaults"]["unit"]
    panel["datasource"] = {"type": "prometheus", "uid": "other"}
    del broken["uid"]
    assert "pmgd_node_tick_total" in {n for n in queried_metrics(broken) if base_name(n) not in METRICS}
    problems = dashboard_problems(broken, datasource_uid)
    assert any("no unit" in p for p in problems)
    assert any("no uid" in p for p in problems)
    assert any("data source" in p for p in problems)
    assert base_name("pmgd_node_cost_wait_seconds_bucket") == "pmgd_node_cost_wait_seconds"
    assert base_name("pmgd_node_ticks_bucket") not in METRICS


# --- live: the real services' /metrics ----------------------------------------------------

def _http(method: str, url: str, body: dict | None = None, token: str = "", timeout: float = 30.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text and resp.headers.get_content_type() == "application/json" else text


def scraped_names(text: str) -> set[str]:
    """Metric names of the samples in a Prometheus text exposition."""
    return {m.group(1) for m in re.finditer(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{|\s)", text, re.M)}


def _wait_up(urls: list[str], cluster, timeout_s: float = 60.0) -> None:
    """Until every URL answers (processes take a while to import torch and bind)."""
    deadline = time.monotonic() + timeout_s
    for url in urls:
        while True:
            dead = [p.args for p in cluster.processes() if p.poll() is not None]
            assert not dead, f"cluster process exited: {dead[0]}"
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{url} did not answer within {timeout_s:g} s"
                time.sleep(0.1)


def _scrape_all(urls: dict[str, str], into: dict[str, set[str]]) -> None:
    for service, url in urls.items():
        into.setdefault(service, set()).update(scraped_names(_http("GET", url)))


@pytest.mark.slow
def test_dashboards_query_series_the_services_export(tmp_path):
    import inspect

    from services.cluster.launcher import LocalCluster

    token = "dash-test-token"
    kwargs = {"api": True, "remote_evaluator": True, "metrics": True, "log_dir": str(tmp_path / "logs"),
              "env": {"PMGD_API_TOKEN": token}}
    if "api_db" in inspect.signature(LocalCluster).parameters:
        kwargs["api_db"] = str(tmp_path / "pmgd.sqlite")
    exported: dict[str, set[str]] = {}
    with LocalCluster(2, **kwargs) as cluster:
        api = cluster.api_url.rstrip("/")
        urls = cluster.metrics_urls
        _wait_up([f"{api}/health", *urls.values()], cluster)
        assert {"api", "broadcaster", "evaluator"} <= set(urls), urls
        assert any(name.startswith("node") for name in urls), urls
        config = {"task": "parity2", "max_ticks": 400, "seeds": 2, "nodes": 2}
        jobs = [_http("POST", f"{api}/jobs", {"config": config, "engine": "cluster", "start": True, "angle": False},
                      token=token),
                _http("POST", f"{api}/jobs", {"config": config, "engine": "local", "start": True, "angle": True},
                      token=token)]
        # Scrape while the jobs run too: per-job and per-shard series may go once a job ends.
        deadline = time.monotonic() + 180
        pending = {job["id"] for job in jobs}
        while pending:
            _scrape_all(urls, exported)
            for job_id in sorted(pending):
                state = _http("GET", f"{api}/jobs/{job_id}")["state"]
                assert state not in ("failed", "stopped", "interrupted"), (job_id, state)
                if state == "finished":
                    pending.discard(job_id)
            assert time.monotonic() < deadline, f"jobs {pending} not finished after 180 s"
            time.sleep(0.2)
        evaluator = urls["evaluator"].rsplit("/metrics", 1)[0]
        _http("POST", f"{evaluator}/evaluate", {"task": "parity2", "theta": [0.0] * 9, "split": "train"})
        _scrape_all(urls, exported)

    every = set().union(*exported.values())
    queried = {n: where for d in load_dashboards().values() for n, where in queried_metrics(d).items()}
    missing = {n: where for n, where in queried.items() if n not in every}
    assert missing == {}, f"queried but not exported: {missing}"
    # Each contract series comes from the service the contract says.
    for service, names in CONTRACT.items():
        got = set().union(*(v for k, v in exported.items() if k == service or k.startswith(service)))
        absent = {n for n in names if not ({n, n + "_bucket", n + "_count"} & got)}
        assert absent == set(), f"{service} does not export {absent}"
