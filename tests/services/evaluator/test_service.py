"""`pmgd evaluator` as a process: HTTP inference service beside the ZeroMQ cost hop.

Every test talks to a real ``python -m services.cli evaluator`` subprocess over loopback
(urllib for HTTP, ChipClient for the cost hop); nothing is mocked.
"""

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmgd_node.config import JobConfig
from services.api.errors import EvaluatorFailed
from services.api.scoring import EvaluatorService
from services.chip.client import ChipClient
from services.cluster.launcher import free_port
from services.evaluator import data as D
from services.evaluator import models as M
from services.evaluator.backprop import train_sgd
from services.evaluator.service import MAX_BODY
from services.http_edge import AUTH_DETAIL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
XOR_BIPOLAR = [20.0, 20.0, 20.0, 20.0, 20.0, -20.0, 20.0, -20.0, -10.0]  # see test_inference.py
METRICS = ("pmgd_evaluator_requests_total", "pmgd_evaluator_images_total", "pmgd_evaluator_images_per_second",
           "pmgd_evaluator_eval_seconds", "pmgd_evaluator_cost_requests_total", "pmgd_evaluator_device_info")
N_TEST = 24  # CIFAR-10-format test split size


class Evaluator:
    """One ``pmgd evaluator`` process on free loopback ports; output kept in a log file."""

    def __init__(self, log_path, *flags, http_port=None):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.http_port = free_port() if http_port is None else http_port
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the device the test expects: cpu
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "evaluator", f"--endpoint={self.endpoint}",
             f"--http-port={self.http_port}", *flags],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.http_port}"

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_http(self, timeout_s=30.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"evaluator exited with {self.proc.returncode}:\n{self.output()}"
            try:
                return get(self.url + "/health")
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"no /health within {timeout_s} s:\n{self.output()}")

    def stop(self, timeout_s=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def request(url, body=None, content_type="application/json", method=None, token=""):
    """(status, parsed JSON or text) of one HTTP request, with ``Authorization: Bearer <token>``
    when ``token`` is set; 4xx/5xx are returned, not raised."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, raw, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in ctype else raw.decode())


def get(url):
    status, body = request(url)
    assert status == 200, body
    return body


def post_checkpoint(base, npz, **params):
    return request(f"{base}/evaluate/checkpoint?{urllib.parse.urlencode(params)}", npz, "application/octet-stream")


def npz_like_the_store(theta0, tick):
    buf = io.BytesIO()
    np.savez(buf, theta0=theta0, tick=np.int64(tick))  # services/api/store.py: Store.save_checkpoint
    return buf.getvalue()


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    D.write_fake_cifar10(root, n_per_batch=N_TEST, seed=5)
    return root


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory, cifar_dir):
    ev = Evaluator(tmp_path_factory.mktemp("ev") / "evaluator.log", f"--data-dir={cifar_dir}")
    ev.data_dir = str(cifar_dir)
    ev.wait_http()
    yield ev
    assert ev.stop() == 0, ev.output()


@pytest.mark.slow
def test_scores_a_cifar10_checkpoint_on_the_test_split_and_reports_its_device(evaluator, cifar_dir):
    model = M.build_model("cifar10", "", device="cpu")
    theta0 = model.init(np.random.default_rng(11), 2)  # (S, P): two runs, as a multi-seed job stores them
    status, r = post_checkpoint(evaluator.url, npz_like_the_store(theta0, 1234), task="cifar10", split="test", run=1)
    assert status == 200, r
    assert (r["task"], r["network"], r["split"], r["num_params"]) == ("cifar10", "cnn-cifar10", "test", 26154)
    assert r["run"] == 1 and r["tick"] == 1234 and r["samples"] == N_TEST
    conf = np.array(r["confusion"])
    test = D.load_cifar10(cifar_dir, "test")
    assert conf.shape == (10, 10) and conf.sum() == N_TEST
    np.testing.assert_array_equal(conf.sum(axis=1), np.bincount(test.y, minlength=10))
    assert len(r["per_class_accuracy"]) == 10 and r["accuracy"] == np.trace(conf) / N_TEST
    assert r["images_per_second"] > 0 and r["seconds"] > 0
    health = get(evaluator.url + "/health")
    assert r["device"] == health["device"] == "cpu" and health["status"] == "ok" and health["cuda"] is False
    # the very numbers the in-process model gives on the same data
    batch = model.prepare(test.x, test.y)
    assert r["accuracy"] == float(model.accuracy(theta0[1], batch))
    assert r["loss"] == pytest.approx(float(model.cost(theta0[1], batch)), rel=1e-5)
    # the same checkpoint as base64 in the JSON body, data_dir named explicitly; run 0 differs
    body = {"task": "cifar10", "data_dir": str(cifar_dir), "run": 0,
            "checkpoint": base64.b64encode(npz_like_the_store(theta0, 1234)).decode()}
    status, r0 = request(evaluator.url + "/evaluate", body)
    assert status == 200, r0
    assert r0["loss"] == pytest.approx(float(model.cost(theta0[0], batch)), rel=1e-5) and r0["loss"] != r["loss"]
    # limit: only the first N samples
    status, r5 = request(evaluator.url + "/evaluate", dict(body, limit=5))
    assert status == 200 and r5["samples"] == 5 and np.array(r5["confusion"]).sum() == 5


def test_parity2_with_a_solving_theta_scores_100_percent(evaluator):
    status, r = request(evaluator.url + "/evaluate", {"task": "parity2", "theta": XOR_BIPOLAR})
    assert status == 200, r
    assert r["accuracy"] == 1.0 and r["confusion"] == [[2, 0], [0, 2]] and r["per_class_accuracy"] == [1.0, 1.0]
    assert r["network"] == "2-2-1" and r["num_params"] == 9 and r["device"] == "cpu" and r["tick"] is None
    # a θ found by backprop, sent as a checkpoint of its (S, P) runs
    result = train_sgd(M.build_model("parity2"), D.parity(2), lr=5.0, batch=4, steps=3000, seed=0, runs=8)
    solved = int(np.flatnonzero(result.solved)[0])
    status, r = post_checkpoint(evaluator.url, npz_like_the_store(result.theta, 3000), task="parity2", run=solved)
    assert status == 200, r
    assert r["accuracy"] == 1.0 and r["tick"] == 3000
    # A stalled run really is scored below 100 %: 7 of the 8 runs solve, run 5 stalls, the same
    # with OPENBLAS_CORETYPE=Haswell and =Prescott and under ±1-ulp sigmoid noise.
    unsolved = np.flatnonzero(~result.solved)
    assert unsolved.size
    status, r = post_checkpoint(evaluator.url, npz_like_the_store(result.theta, 3000), task="parity2",
                                run=int(unsolved[0]))
    assert status == 200 and r["accuracy"] < 1.0


def _bad_requests(empty_dir):
    ok = npz_like_the_store(np.zeros((2, 9)), 5)
    b64 = base64.b64encode(ok).decode()
    json_cases = [
        ({"task": "parity2", "theta": [0.0] * 5}, "theta", "9"),
        ({"task": "parity2", "theta": [0.0] * 9, "checkpoint": b64}, "theta", "exactly one"),
        ({"task": "parity2"}, "theta", "exactly one"),
        ({"task": "mnist", "theta": [0.0] * 9}, "task", "parity2..parity12, fmnist, cifar10"),
        ({"task": "parity2", "split": "valid", "theta": [0.0] * 9}, "split", "test, train"),
        ({"task": "parity2", "network": "3-3-1", "theta": [0.0] * 9}, "network", "2 inputs"),
        ({"task": "cifar10", "data_dir": str(empty_dir), "theta": [0.0] * 26154}, "data_dir", "missing file"),
        ({"task": "parity2", "checkpoint": "%%% not base64"}, "checkpoint", "base64"),
        ({"task": "parity2", "checkpoint": b64, "run": 2}, "run", "[0, 1]"),
        ({"task": "parity2", "theta": [0.0] * 9, "limit": -1}, "limit", "≥ 0"),
        ({"task": "parity2", "theta": [0.0] * 9, "init_scale": -1}, "init_scale", "> 0"),
        ({"task": "parity2", "theta": ["a"] * 9}, "theta", "float"),
        ({"task": "parity2", "theta": [0.0] * 9, "tehta": 1}, "tehta", "Extra"),
        ({"theta": [0.0] * 9}, "task", "required"),
        ({"task": "cifar10", "theta": [0.0] * 9}, "theta", "26154"),
    ]
    raw_cases = [
        (b"", {"task": "parity2"}, "checkpoint", "empty"),
        (b"junk", {"task": "parity2"}, "checkpoint", ".npz"),
        (ok, {"task": "parity2", "run": 5}, "run", "[0, 1]"),
        (ok, {"task": "parity2", "run": "abc"}, "run", "integer"),
        (ok, {"task": "parity2", "split": "dev"}, "split", "test, train"),
        (ok, {"split": "test"}, "task", "required"),
        (ok, {"task": "cifar10"}, "theta", "26154"),  # the service's --data-dir holds the data
    ]
    return json_cases, raw_cases


def test_bad_inputs_are_4xx_naming_the_field_never_5xx(evaluator, tmp_path):
    empty = os.path.join(evaluator.data_dir, "empty")  # inside the data directory it serves
    os.makedirs(empty, exist_ok=True)
    json_cases, raw_cases = _bad_requests(empty)
    seen = []
    for body, field, fragment in json_cases:
        seen.append((request(evaluator.url + "/evaluate", body), field, fragment, body))
    for blob, params, field, fragment in raw_cases:
        seen.append((post_checkpoint(evaluator.url, blob, **params), field, fragment, params))
    # transport-level garbage
    seen.append((request(evaluator.url + "/evaluate", b"{not json"), "body", "JSON", "malformed"))
    seen.append((request(evaluator.url + "/evaluate", b"[1, 2]"), "body", "dict", "array body"))
    seen.append((request(evaluator.url + "/evaluate", b'{"task": "parity2", "theta": [NaN,0,0,0,0,0,0,0,0]}'),
                 "theta", "finite", "NaN"))
    for (status, body), field, fragment, case in seen:
        text = json.dumps(body, ensure_ascii=False)
        assert 400 <= status < 500, (case, status, text)
        assert field in text and fragment in text, (case, text)
    # a directory outside the ones the evaluator was started with is refused before any read
    for outside in (str(tmp_path), "/etc", evaluator.data_dir + "/../..", "x" * 256):
        status, body = request(evaluator.url + "/evaluate", {"task": "cifar10", "data_dir": outside,
                                                             "theta": [0.0] * 26154})
        assert status == 403 and body["field"] == "data_dir" and "outside" in body["detail"], (outside, body)
    # inside it, the missing data set is a 404 carrying the loader's message (what is missing,
    # where to get it), and an unreadable path a 404 too, never a 500
    status, body = request(evaluator.url + "/evaluate", {"task": "cifar10", "data_dir": empty, "theta": [0.0] * 26154})
    assert status == 404 and body["field"] == "data_dir" and "cifar-10-python.tar.gz" in body["detail"]
    status, body = request(evaluator.url + "/evaluate", {"task": "cifar10", "data_dir": os.path.join(empty, "x" * 256),
                                                         "theta": [0.0] * 26154})
    assert status == 404 and body["field"] == "data_dir", body
    # a θ whose loss overflows is still an answer (loss null), not a server error
    status, body = request(evaluator.url + "/evaluate", {"task": "cifar10", "theta": [1e38] * 26154, "limit": 2})
    assert status == 200 and body["samples"] == 2, body


def test_metrics_export_every_series(evaluator):
    def scrape():
        text = get(evaluator.url + "/metrics")
        return {s.name + str(sorted(s.labels.items())): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}, text

    before, _ = scrape()
    assert request(evaluator.url + "/evaluate", {"task": "parity3", "theta": [0.0] * 16})[0] == 200
    assert request(evaluator.url + "/evaluate", {"task": "parity3", "theta": [0.0] * 3})[0] == 422
    remote = ChipClient(evaluator.endpoint, "metrics-job", JobConfig(), timeout_s=30)
    try:
        remote.hello()  # the job's model and data: a hello, not a cost request
        for _ in range(3):
            assert remote.cost(np.zeros((2, 9)), np.array([0, 1])).shape == (2,)
    finally:
        remote.close()
    after, text = scrape()
    for name in METRICS:
        assert name in text, name
    ok = "pmgd_evaluator_requests_total[('endpoint', '/evaluate'), ('status', '200')]"
    bad = "pmgd_evaluator_requests_total[('endpoint', '/evaluate'), ('status', '422')]"
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    images = "pmgd_evaluator_images_total[]"
    assert after[images] == before[images] + 8  # parity3: 8 samples
    assert after["pmgd_evaluator_cost_requests_total[]"] == before["pmgd_evaluator_cost_requests_total[]"] + 3
    assert after["pmgd_evaluator_eval_seconds_count[]"] == before["pmgd_evaluator_eval_seconds_count[]"] + 1
    assert after["pmgd_evaluator_images_per_second[]"] > 0
    assert after["pmgd_evaluator_device_info[('device', 'cpu')]"] == 1


@pytest.mark.slow
def test_sigterm_stops_both_servers_and_exits_0(tmp_path):
    ev = Evaluator(tmp_path / "ev.log")
    ev.wait_http()
    remote = ChipClient(ev.endpoint, "j", JobConfig(), timeout_s=30)
    try:
        assert remote.cost(np.zeros((1, 9)), np.array([0])).shape == (1,)  # the cost hop is up too
    finally:
        remote.close()
    ev.proc.send_signal(signal.SIGTERM)
    assert ev.proc.wait(30) == 0, ev.output()  # a liveness bound, not a timing claim
    ev.stop()
    # nothing listens on either port any more
    for port in (ev.http_port, int(ev.endpoint.rsplit(":", 1)[1])):
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))


@pytest.mark.slow
def test_taken_http_port_warns_and_keeps_serving_the_cost_hop(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        ev = Evaluator(tmp_path / "ev.log", http_port=taken.getsockname()[1])
        try:
            remote = ChipClient(ev.endpoint, "j", JobConfig(), timeout_s=30)
            try:
                assert remote.cost(np.zeros((3, 9)), np.array([1, 2])).shape == (3,)
            finally:
                remote.close()
            assert "WARNING: cannot bind the HTTP inference service" in ev.output()
        finally:
            assert ev.stop() == 0, ev.output()


@pytest.mark.slow
def test_with_a_token_the_posts_need_it_before_any_body_is_read(tmp_path):
    token = "s3cret"
    ev = Evaluator(tmp_path / "evaluator.log", f"--token={token}")
    try:
        ev.wait_http()  # /health stays open, and so does /metrics (Prometheus scrapes it)
        assert "pmgd_evaluator_requests_total" in get(ev.url + "/metrics")
        parity = {"task": "parity2", "theta": XOR_BIPOLAR}
        npz = npz_like_the_store(np.array([XOR_BIPOLAR]), 7)
        for sent in ("", "wrong", token + "x"):
            for status, body in (request(ev.url + "/evaluate", parity, token=sent),
                                 request(ev.url + "/evaluate", b"{not json", token=sent),  # never parsed: 401, not 422
                                 request(ev.url + "/evaluate/checkpoint?task=parity2", npz, "application/octet-stream",
                                         token=sent)):
                assert (status, body) == (401, {"detail": AUTH_DETAIL}), (sent, status, body)
        status, body = request(ev.url + "/evaluate", parity, token=token)
        assert status == 200 and body["accuracy"] == 1.0, body
        status, body = request(ev.url + "/evaluate/checkpoint?task=parity2", npz, "application/octet-stream",
                               token=token)
        assert status == 200 and body["tick"] == 7, body
        assert request(ev.url + "/evaluate", b"{not json", token=token)[0] == 422  # with it, the body is read

        # A body larger than any checkpoint a job can have: refused on its declared length, unread.
        conn = http.client.HTTPConnection("127.0.0.1", ev.http_port, timeout=30)
        for sent, expect in (("", 401), (token, 413)):
            conn.putrequest("POST", "/evaluate/checkpoint?task=parity2")
            conn.putheader("Content-Length", str(MAX_BODY + 1))
            conn.putheader("Authorization", f"Bearer {sent}")
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == expect, (sent, r.status)
            assert json.loads(r.read())["detail"] in (AUTH_DETAIL, f"request body: at most {MAX_BODY:,} bytes")
            conn.close()

        # The API's side: it sends its evaluator_token; without the right one the scoring fails
        # as the API's own fault (no status: a 502 to its client), not as the client's 401.
        config = JobConfig(task="parity2")
        assert EvaluatorService(ev.url, token).score(config, npz)["accuracy"] == 1.0
        for sent in ("", "wrong"):
            with pytest.raises(EvaluatorFailed, match="evaluator_token") as err:
                EvaluatorService(ev.url, sent).score(config, npz)
            assert err.value.status is None
    finally:
        assert ev.stop() == 0, ev.output()
