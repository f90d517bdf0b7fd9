"""The REST API through real HTTP against `pmgd api` (uvicorn) processes, with a real SQLite file."""

import io
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from waiting import wait_for  # tests/services/api/waiting.py (the test directory is on sys.path)

from pmgd_node.config import JobConfig
from services.api.jobs import FINAL
from services.cluster.launcher import LocalCluster, free_port
from services.engine.engine import Engine
from services.evaluator.gradient_angle import angle_degrees


class Api:
    """A `pmgd api` process and a tiny client for it."""

    def __init__(self, db, *flags: str, token: str = ""):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.token = token
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "api", f"--port={port}", f"--db={db}",
                                      *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.call("GET", "/health")
                return
            except urllib.error.URLError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the API did not come up"
                time.sleep(0.1)

    def call(self, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None):
        """(status, decoded body); an HTTP error status is returned, not raised."""
        headers = {"content-type": "application/json"}
        token = self.token if token is None else token
        if token:
            headers["authorization"] = f"Bearer {token}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, ctype, payload = r.status, r.headers.get("content-type", ""), r.read()
        except urllib.error.HTTPError as err:
            status, ctype, payload = err.code, err.headers.get("content-type", ""), err.read()
        if ctype.startswith("application/json"):
            return status, json.loads(payload)
        return status, payload

    def ok(self, method: str, path: str, body=None, expect: int = 200):
        status, data = self.call(method, path, body)
        assert status == expect, (status, data)
        return data

    def wait_state(self, job: str, states, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.ok("GET", f"/jobs/{job}")
            if got["state"] in states:
                return got
            time.sleep(0.05)
        raise AssertionError(f"job {job} did not reach {states}; it is {got['state']}")

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def api(tmp_path):
    server = Api(tmp_path / "pmgd.sqlite")
    yield server
    if server.proc.poll() is None:
        server.stop()


def _parity2():
    from services.evaluator.data import parity

    d = parity(2)
    return d.x, d.y


def _theta(data: bytes) -> np.ndarray:
    with np.load(io.BytesIO(data)) as z:
        return np.array(z["theta0"])


def _checkpoint_tick(api: Api, job: str) -> int | None:
    status, data = api.call("GET", f"/jobs/{job}/checkpoint")
    if status != 200:
        return None
    with np.load(io.BytesIO(data)) as z:
        return int(z["tick"])


def test_local_job_lifecycle_and_result_match_the_engine(api):
    config = JobConfig(seeds=4, max_ticks=2000, seed=3)
    job = api.ok("POST", "/jobs", {"config": config.to_dict(), "angle": True}, expect=201)
    assert job["state"] == "created" and job["engine"] == "local" and job["options"] == {"angle": True}
    assert [j["id"] for j in api.ok("GET", "/jobs")] == [job["id"]]
    assert api.call("GET", f"/jobs/{job['id']}/checkpoint")[0] == 404  # nothing trained yet
    api.ok("POST", f"/jobs/{job['id']}/start")
    done = api.wait_state(job["id"], FINAL)
    assert done["state"] == "finished" and done["tick"] == 2000
    reference = Engine(config)
    angles, prev = [], [reference.theta0.copy(), reference.model.gradient(reference.theta0, reference.eval_batch)]

    def angle(point, solved):  # the angle series' definition, recomputed on the reference engine
        step = prev[0] - reference.theta0
        if np.any(step):
            angles.append([point.tick, float(np.median(angle_degrees(step, prev[1])))])
        prev[:] = reference.theta0.copy(), reference.model.gradient(reference.theta0, reference.eval_batch)

    result = reference.run(on_eval=angle)
    assert done["summary"]["ticks_to_solution"] == result.ticks_to_solution.tolist()
    np.testing.assert_array_equal(_theta(api.ok("GET", f"/jobs/{job['id']}/checkpoint")), reference.theta0)
    series = api.ok("GET", f"/jobs/{job['id']}/metrics")["series"]
    assert [t for t, _ in series["cost"]] == [p.tick for p in result.history]  # every evaluation
    assert [v for _, v in series["accuracy"]] == [float(np.median(p.accuracy)) for p in result.history]
    # The step −Δθ⁰ between evaluations against ∇C at the earlier one, median over runs: the
    # series is exactly that, and the steps descend, on the whole, below 90° (one sample per
    # tick, so each step is far from the full-data gradient: median 77.5° over the series with
    # OPENBLAS_CORETYPE=Haswell and =Prescott and under ±1-ulp sigmoid noise alike).
    assert series["angle"] == angles
    assert np.median([v for _, v in angles]) < 85
    assert len(series["c0"]) == len(series["cost"]) and all(v > 0 for _, v in series["c0"])
    late = api.ok("GET", f"/jobs/{job['id']}/metrics?since=1990&names=cost")["series"]
    assert late == {"cost": [[2000, series["cost"][-1][1]]]}
    report = api.ok("POST", f"/jobs/{job['id']}/evaluate", {"split": "train", "run": 1})  # in-process scoring
    assert report["accuracy"] == result.final_accuracy[1] and report["samples"] == 4 and report["device"] == "cpu"
    assert np.sum(report["confusion"]) == 4 and report["tick"] == 2000
    assert api.call("POST", f"/jobs/{job['id']}/evaluate", {"run": 4})[0] == 422  # 4 runs: 0…3
    lines = [entry["text"] for entry in api.ok("GET", f"/jobs/{job['id']}/logs")["lines"]]
    assert lines[0] == "created" and lines[1] == "started" and lines[-1].startswith("finished:")
    assert api.call("POST", f"/jobs/{job['id']}/pause")[0] == 409  # finished jobs do not pause
    assert api.call("DELETE", f"/jobs/{job['id']}")[0] == 204
    assert api.call("GET", f"/jobs/{job['id']}")[0] == 404


def test_pause_resume_and_stop_a_local_job(api):
    config = JobConfig(seeds=2, max_ticks=10_000_000, target_accuracy=None)
    job = api.ok("POST", "/jobs", {"config": config.to_dict(), "start": True}, expect=201)["id"]
    assert api.wait_state(job, ["running"])

    def tick() -> int:
        return api.ok("GET", f"/jobs/{job}")["tick"]

    def parked() -> int:
        """The run parks at its next evaluation after writing its metrics and a checkpoint
        there: the job's tick, once the checkpoint's tick is the job's tick (else 0)."""
        t = tick()
        return t if t and _checkpoint_tick(api, job) == t else 0

    paused = api.ok("POST", f"/jobs/{job}/pause")
    assert paused["state"] == "paused"
    first = wait_for(parked, 30, "the paused run to park at an evaluation with its checkpoint")
    time.sleep(0.6)  # a window, not a wait: nothing may advance while the job is paused
    assert tick() == first and _checkpoint_tick(api, job) == first
    assert api.call("DELETE", f"/jobs/{job}")[0] == 409  # not while active
    assert api.ok("POST", f"/jobs/{job}/resume")["state"] == "running"
    wait_for(lambda: tick() > first, 30, f"the resumed job to pass tick {first}")
    stopped = api.ok("POST", f"/jobs/{job}/stop")
    assert stopped["state"] == "stopped" and stopped["summary"]["ticks_run"] >= first
    assert api.call("POST", f"/jobs/{job}/resume")[0] == 409


@pytest.mark.parametrize("body, field", [
    ({"config": {"task": "parity99"}}, "task"),
    ({"config": {"seeds": 0}}, "seeds"),
    ({"config": {"seeds": "many"}}, "seeds"),
    ({"config": {"eta": -1}}, "eta"),
    ({"config": {"perturbation": "xx"}}, "perturbation"),
    ({"config": {"fm_band": 1}}, "fm_band"),
    ({"config": {"no_such_field": 1}}, "no_such_field"),
    ({"config": {}, "engine": "gpu"}, "engine"),
    ({"config": {}, "engine": "cluster", "angle": True}, "angle"),
    ({"config": {}, "start": "soon"}, "start"),
    ({}, "config"),
    ({"config": {}, "extra": 1}, "extra"),
])
def test_invalid_jobs_are_rejected_with_4xx_naming_the_field(api, body, field):
    status, data = api.call("POST", "/jobs", body)
    assert 400 <= status < 500, (status, data)
    assert field in json.dumps(data["detail"]), data
    assert api.ok("GET", "/jobs") == []  # nothing half-made


def test_bad_requests_answer_4xx(api):
    assert api.call("POST", "/jobs", raw=b"{not json")[0] == 422
    assert api.call("GET", "/jobs/nope")[0] == 404
    assert api.call("POST", "/jobs/nope/start")[0] == 404
    assert api.call("GET", "/jobs?state=melted")[0] == 422
    job = api.ok("POST", "/jobs", {"config": {}}, expect=201)["id"]
    assert api.call("GET", f"/jobs/{job}/metrics?since=x")[0] == 422
    status, data = api.call("POST", "/jobs", {"config": {}, "engine": "cluster", "start": True})
    assert status == 409 and "cluster" in data["detail"]  # this API has no broadcaster
    assert [j["id"] for j in api.ok("GET", "/jobs")] == [job]


def test_token_guards_mutations_but_not_reads(tmp_path):
    server = Api(tmp_path / "t.sqlite", "--token=s3cret", token="s3cret")
    try:
        body = {"config": {"max_ticks": 10}}
        for token in ("", "wrong"):
            status, data = server.call("POST", "/jobs", body, token=token)
            assert status == 401 and "authorization" in data["detail"]
        job = server.ok("POST", "/jobs", body, expect=201)["id"]
        assert server.call("POST", f"/jobs/{job}/start", token="wrong")[0] == 401
        assert server.call("DELETE", f"/jobs/{job}", token="")[0] == 401
        assert server.call("GET", f"/jobs/{job}", token="")[0] == 200  # reads stay open
        assert server.call("GET", "/jobs", token="")[0] == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_api_restart_mid_job_keeps_the_job_and_resumes_it_exactly(tmp_path):
    """Killed (SIGKILL) and stopped (SIGTERM) mid-job: the job, its metrics and checkpoint
    survive, it is 'interrupted', and resuming finishes it with the engine's exact θ⁰."""
    db = tmp_path / "pmgd.sqlite"
    config = JobConfig(seeds=8, max_ticks=60_000, target_accuracy=None, seed=11)
    server = Api(db)
    job = server.ok("POST", "/jobs", {"config": config.to_dict(), "start": True}, expect=201)["id"]
    wait_for(lambda: _checkpoint_tick(server, job), 60, "a checkpoint on disk")
    before = server.ok("GET", f"/jobs/{job}/metrics")["series"]
    assert before["cost"] and server.ok("GET", f"/jobs/{job}")["state"] == "running"
    server.proc.kill()
    server.proc.wait()

    server = Api(db)
    got = server.ok("GET", f"/jobs/{job}")
    assert got["state"] == "interrupted" and "stopped" in got["error"]
    after = server.ok("GET", f"/jobs/{job}/metrics")["series"]
    assert after["cost"][: len(before["cost"])] == before["cost"]
    reached = got["tick"]  # the killed run's newest metrics, at or after its checkpoint
    assert server.ok("POST", f"/jobs/{job}/resume")["state"] == "running"

    def logs() -> list[str]:
        return [e["text"] for e in server.ok("GET", f"/jobs/{job}/logs")["lines"]]

    wait_for(lambda: any(text.startswith("resumed from the checkpoint") for text in logs()), 60,
             "the resumed run to load its checkpoint")
    wait_for(lambda: server.ok("GET", f"/jobs/{job}")["tick"] > reached, 60,
             f"the resumed run to pass tick {reached}, where the killed one got to")
    assert server.stop() == 0  # a graceful stop checkpoints the job and marks it interrupted
    server = Api(db)
    assert server.ok("GET", f"/jobs/{job}")["state"] == "interrupted"
    lines = logs()
    assert lines[-1].startswith("interrupted: 0/8 runs converged")  # the run itself ended, not recover()
    server.ok("POST", f"/jobs/{job}/resume")
    done = server.wait_state(job, FINAL, timeout_s=120)
    assert done["state"] == "finished" and done["tick"] == config.max_ticks
    assert sum(text.startswith("resumed from the checkpoint") for text in logs()) == 2
    reference = Engine(config)
    reference.run()
    np.testing.assert_array_equal(_theta(server.ok("GET", f"/jobs/{job}/checkpoint")), reference.theta0)
    server.stop()


@pytest.mark.slow
def test_cluster_job_lifecycle_over_rest_and_remote_scoring(tmp_path):
    with LocalCluster(2, api=True, api_db=str(tmp_path / "c.sqlite"), remote_evaluator=True) as cluster:
        cluster.wait_ready()
        api = Api.__new__(Api)
        api.url, api.token = cluster.api_url, ""
        wait_for(lambda: len(api.ok("GET", "/cluster")["nodes"]) >= 2, 30, "two nodes to join")
        config = JobConfig(nodes=2, seeds=2, max_ticks=10_000_000, target_accuracy=None, checkpoint_every=100)
        job = api.ok("POST", "/jobs", {"config": config.to_dict(), "engine": "cluster", "start": True},
                     expect=201)["id"]
        assert api.call("POST", "/jobs", {"config": config.to_dict(), "engine": "cluster", "start": True})[0] == 409
        wait_for(lambda: api.ok("GET", f"/jobs/{job}")["tick"] >= 300, 30, "the job to pass tick 300")
        assert api.ok("POST", f"/jobs/{job}/pause")["state"] == "paused"
        wait_for(lambda: api.ok("GET", "/cluster")["state"] == "paused", 30, "the broadcaster to pause")
        assert api.ok("POST", f"/jobs/{job}/resume")["state"] == "running"
        wait_for(lambda: api.ok("GET", "/cluster")["state"] == "running", 30, "the broadcaster to resume")
        stopped = api.ok("POST", f"/jobs/{job}/stop")
        assert stopped["state"] == "stopped" and stopped["summary"]["ticks_run"] >= 300
        assert api.ok("GET", "/cluster")["state"] == "idle"
        heldout = api.ok("GET", f"/jobs/{job}/metrics?names=heldout_accuracy")["series"]["heldout_accuracy"]
        assert heldout and all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for _, v in heldout)  # scored by the evaluator
        data = api.ok("GET", f"/jobs/{job}/checkpoint")
        assert int(np.load(io.BytesIO(data))["tick"]) == stopped["summary"]["ticks_run"]
        report = api.ok("POST", f"/jobs/{job}/evaluate", {"split": "train", "run": 1})  # by the evaluator service
        assert report["device"] == "cpu" and report["num_params"] == 9 and report["images_per_second"] > 0
        model = Engine(config).model
        batch = model.prepare(*_parity2())
        assert report["accuracy"] == model.accuracy(_theta(data)[1:2], batch)[0]


@pytest.mark.slow
def test_a_restarted_api_follows_its_cluster_job_again_and_loses_nothing(tmp_path):
    """The API stopped mid-job (the broadcaster runs on) and started again: it re-attaches to
    the job by itself, which ends finished on the engine's exact θ⁰."""
    db = tmp_path / "c.sqlite"
    with LocalCluster(2) as cluster:
        cluster.wait_ready()
        flags = (f"--broadcaster={cluster.endpoints['control']}", f"--keys={cluster.keys_dir}")
        server = Api(db, *flags)
        config = JobConfig(nodes=2, seeds=2, max_ticks=8000, target_accuracy=None, seed=12)
        job = server.ok("POST", "/jobs", {"config": config.to_dict(), "engine": "cluster", "start": True},
                        expect=201)["id"]
        wait_for(lambda: server.ok("GET", f"/jobs/{job}")["tick"] >= 500, 60, "the job to pass tick 500")
        assert server.stop() == 0
        server = Api(db, *flags)
        done = server.wait_state(job, FINAL, timeout_s=120)
        assert done["state"] == "finished" and done["tick"] == config.max_ticks, done
        reference = Engine(config)
        reference.run()
        np.testing.assert_array_equal(_theta(server.ok("GET", f"/jobs/{job}/checkpoint")), reference.theta0)
        server.stop()


def test_a_diverging_local_job_ends_diverged_and_still_serves_its_metrics(api, tmp_path):
    """It ends ``diverged`` with the tick in its summary and error; its metrics still serve (JSON has
    no NaN: values that are not finite are left out of the series)."""
    from services.evaluator.data import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, n_train=200, n_test=50, seed=0)
    config = JobConfig(task="fmnist", data_dir=str(tmp_path), batch=10, amplitude=0.01, eta=1e3, max_ticks=500,
                       eval_every=1, target_accuracy=None, seeds=2)
    job = api.ok("POST", "/jobs", {"config": config.to_dict()}, expect=201)["id"]
    api.ok("POST", f"/jobs/{job}/start")
    done = api.wait_state(job, FINAL, timeout_s=120)
    assert done["state"] == "diverged", done
    summary = done["summary"]
    assert summary["diverged"] == 2 and min(summary["diverged_at"]) > 0
    assert max(summary["diverged_at"]) <= summary["ticks_run"] <= max(summary["diverged_at"]) + 1 < 500
    assert "diverged" in done["error"] and f"tick {min(summary['diverged_at'])}" in done["error"]
    series = api.ok("GET", f"/jobs/{job}/metrics")["series"]
    # Evaluated every tick: the points before the blow-up are there, the NaN after it is not.
    assert 0 < len(series["cost"]) < summary["ticks_run"] and all(v == v for _, v in series["cost"])
    assert api.ok("GET", "/jobs?state=diverged")[0]["id"] == job
    lines = [line["text"] for line in api.ok("GET", f"/jobs/{job}/logs")["lines"]]
    assert lines[-1].startswith("diverged: 0/2 runs converged") and lines[-1].endswith("2/2 diverged")


def test_openapi_describes_every_job_config_field_with_its_type_and_range(api):
    import dataclasses

    from pmgd_node.config import BOUNDS, JobConfig

    spec = api.ok("GET", "/openapi.json")
    config = spec["components"]["schemas"]["JobCreate"]["properties"]["config"]
    props = config["properties"]
    assert set(props) == {f.name for f in dataclasses.fields(JobConfig)}
    assert all(p["description"] for p in props.values()) and config["additionalProperties"] is False
    assert props["eta"] | {} == {"type": "number", "minimum": 0.0, "maximum": 1e6, "default": 0.5,
                                 "description": props["eta"]["description"]}
    assert props["tau_theta"]["type"] == "integer" and props["tau_theta"]["minimum"] == 1
    assert props["max_ticks"]["maximum"] == BOUNDS["max_ticks"].hi
    assert props["perturbation"]["enum"] == ["tm", "cm", "rcm", "fm"]
    assert props["c_tilde_limit"]["anyOf"][1] == {"type": "null"}
    # The documented range is the enforced one: just past it, the API answers 422 naming the field.
    status, body = api.call("POST", "/jobs", {"config": {"max_ticks": BOUNDS["max_ticks"].hi + 1}})
    assert status == 422 and "max_ticks" in json.dumps(body)
