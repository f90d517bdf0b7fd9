"""The built-in dashboard in a real browser (headless Chromium) against a real `pmgd api`.

Chromium runs with ``--virtual-time-budget``: page timers run in virtual time, which does
not advance while a fetch is pending, so the page's one-second polls of the API all
complete within the budget and ``--dump-dom`` returns the DOM after several of them. The
page reports what it drew on each plot's <svg> (``data-series``, ``data-points``) and sets
``<body data-ready="1">`` after its first successful metrics render.

The controls and the new-job form are driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: NUL-separated JSON on fds 3 and 4), so no websocket client
is needed. Chromium is required, not optional: `make test` installs it (Debian: ``apt-get install
chromium``); set ``CHROMIUM`` to use another binary.
"""

import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser

import pytest

from services.cluster.launcher import LocalCluster, free_port

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PMGD_API_")}
MAX_DRAWN = 1500  # dashboard.js thins a series to this many points when drawing


def require_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"chromium not found at {CHROMIUM}: the dashboard test needs a headless Chromium "
                    "(Debian/Ubuntu: apt-get install chromium; or set CHROMIUM=/path/to/chrome)")


def chromium(url: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    require_chromium()
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=8000",
           *extra, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"chromium exited with {r.returncode}:\n{r.stderr[-3000:]}"
    return r


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, tmp_path):
        require_chromium()
        to_chrome_r, self._out = os.pipe()
        self._in, from_chrome_w = os.pipe()

        def wire_fds():  # in the child: its fd 3 reads our commands, its fd 4 writes the replies
            read, write = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-cdp'}",
                                      "--remote-debugging-pipe", "about:blank"],
                                     preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=open(tmp_path / "chromium.log", "wb"))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.session = ""

    def send(self, method: str, params: dict | None = None, timeout_s: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self._in], [], [], left)[0], f"no reply to {method}"
                chunk = os.read(self._in, 1 << 20)
                assert chunk, f"chromium closed the DevTools pipe (exit {self.proc.poll()})"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # anything else is an event
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        assert "exceptionDetails" not in r, f"{expression}: {r['exceptionDetails']}"
        return r["result"].get("value")

    def wait(self, expression: str, timeout_s: float = 60):
        deadline = time.monotonic() + timeout_s
        # The page may still be loading: a throwing expression counts as not yet.
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while not (value := self.eval(guarded)):
            assert time.monotonic() < deadline, f"timed out waiting for: {expression}"
            time.sleep(0.1)
        return value

    def close(self) -> None:
        self.session = ""
        try:
            self.send("Browser.close", timeout_s=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)


class Dom(HTMLParser):
    """The attributes of every element with an id, of <body>, and the job-list rows."""

    def __init__(self, html: str):
        super().__init__()
        self.by_id: dict[str, dict] = {}
        self.body: dict = {}
        self.rows: dict[str, dict] = {}
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.by_id[a["id"]] = a
        if tag == "body":
            self.body = a
        if tag == "tr" and "data-id" in a:
            self.rows[a["data-id"]] = a

    def handle_data(self, data):
        self.text.append(data)


class Api:
    def __init__(self, tmp_path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "api.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "api", "--host=127.0.0.1",
                                      f"--port={self.port}", f"--db={tmp_path}/pmgd.sqlite", *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"pmgd api exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.get("/health") == {"status": "ok"}:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "pmgd api did not answer /health within 60 s"
            time.sleep(0.1)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.load(r)

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def wait_for_series(self, job_id: str, names: tuple[str, ...], timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            series = self.get(f"/jobs/{job_id}/metrics")["series"]
            if all(series.get(n) for n in names):
                return
            job = self.get(f"/jobs/{job_id}")
            assert job["state"] in ("running", "finished"), f"job {job['state']}: {job['error']}"
            assert time.monotonic() < deadline, f"no {names} points after {timeout_s} s: {list(series)}"
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def plot(dom: Dom, name: str) -> tuple[int, int]:
    svg = dom.by_id[f"plot-{name}"]
    return int(svg["data-series"]), int(svg["data-points"])


def render(api: Api, job_id: str, tmp_path) -> Dom:
    r = chromium(f"{api.url}/dashboard?job={job_id}", tmp_path, "--dump-dom")
    dom = Dom(r.stdout)
    assert dom.body.get("data-ready") == "1", f"the page never rendered metrics:\n{r.stdout[:3000]}"
    return dom


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_dashboard_plots_a_local_job_live(tmp_path):
    api = Api(tmp_path)
    try:
        job = api.post("/jobs", {"config": {"task": "parity2", "seeds": 4, "max_ticks": 20000},
                                 "engine": "local", "start": True, "angle": True})
        api.wait_for_series(job["id"], ("cost", "accuracy", "angle"))
        ended_before = api.get(f"/jobs/{job['id']}")["state"] == "finished"
        started = time.monotonic()
        dom = render(api, job["id"], tmp_path)
        browser_s = time.monotonic() - started
        series = api.get(f"/jobs/{job['id']}/metrics")["series"]

        for name, key in (("cost", "cost"), ("accuracy", "accuracy"), ("angle", "angle")):
            n_series, n_points = plot(dom, name)
            assert n_series == 1, name
            # Real data, at most what the API holds now (the job may have been running).
            assert 0 < n_points <= min(len(series[key]), MAX_DRAWN), (name, n_points, len(series[key]))
            if ended_before:  # the job had ended: the page drew all of it
                assert n_points == min(len(series[key]), MAX_DRAWN), (name, n_points, len(series[key]))
        assert plot(dom, "staleness") == (0, 0)  # a local job runs in lock-step: no shards
        assert "lock-step" in "".join(dom.text)
        assert "selected" in dom.rows[job["id"]].get("class", "")
        print(f"chromium --dump-dom: {browser_s:.1f} s; points drawn {[plot(dom, n) for n in ('cost', 'angle')]}")

        shot = tmp_path / "dashboard.png"
        chromium(f"{api.url}/dashboard?job={job['id']}", tmp_path, f"--screenshot={shot}",
                 "--window-size=1400,1000", "--hide-scrollbars")
        assert png_size(shot) == (1400, 1000) and shot.stat().st_size > 20_000
    finally:
        api.close()


def test_dashboard_plots_per_shard_staleness_of_a_cluster_job(tmp_path):
    with LocalCluster(2) as cluster:
        cluster.wait_ready()
        api = Api(tmp_path, f"--broadcaster={cluster.endpoints['control']}", f"--keys={cluster.keys_dir}")
        try:
            config = {"task": "parity2", "seeds": 4, "max_ticks": 3000, "nodes": 2, "timing": "async",
                      "tick_period": 0.001, "drift": 0.05, "delay": 2}
            job = api.post("/jobs", {"config": config, "engine": "cluster", "start": True})
            api.wait_for_series(job["id"], ("cost", "staleness.0", "staleness.1"))
            dom = render(api, job["id"], tmp_path)
            assert plot(dom, "cost")[1] > 0 and plot(dom, "accuracy")[1] > 0
            n_series, n_points = plot(dom, "staleness")
            assert n_series == 2 and n_points >= 2  # one line per shard
            assert plot(dom, "angle") == (0, 0)
            text = "".join(dom.text)
            assert "not recorded for this job" in text and "2 nodes" in text  # the cluster pill
        finally:
            api.close()


def test_dashboard_new_job_form_token_and_controls(tmp_path):
    api = Api(tmp_path, "--token=secret")
    browser = DevTools(tmp_path)
    try:
        browser.open(f"{api.url}/dashboard")
        browser.wait("!document.querySelector('#jobs-empty').hidden")  # loaded: no jobs yet
        submit = """(() => { const f = document.querySelector('#new-job');
            f.task.value = 'parity4'; f.seeds.value = '2'; f.max_ticks.value = '5000000';
            f.requestSubmit(); })()"""
        browser.eval(submit)
        # Without the token the API answers 401 and the form says so.
        msg = browser.wait("(m => m.includes('authorization') && m)(document.querySelector('#form-msg').textContent)")
        assert "token" in msg and api.get("/jobs") == []
        browser.eval("(t => { t.value = 'secret'; t.dispatchEvent(new Event('input')); })"
                     "(document.querySelector('#token'))")
        browser.eval(submit)
        job_id = browser.wait("new URLSearchParams(location.search).get('job')")  # the new job is selected
        job = api.get(f"/jobs/{job_id}")
        assert job["config"]["task"] == "parity4" and job["config"]["seeds"] == 2 and job["engine"] == "local"
        assert browser.eval("localStorage.getItem('pmgd.token')") == "secret"

        def enabled():
            return browser.eval("[...document.querySelectorAll('.controls button')]"
                                ".filter(b => !b.disabled).map(b => b.dataset.action).join(',')")

        def click_and_wait(action, state, buttons):
            browser.eval(f"document.querySelector('[data-action={action}]').click()")
            browser.wait(f"document.querySelector('#job-state').textContent === '{state}'")
            assert api.get(f"/jobs/{job_id}")["state"] == state
            browser.wait(f"[...document.querySelectorAll('.controls button')].filter(b => !b.disabled)"
                         f".map(b => b.dataset.action).join(',') === '{buttons}'")

        browser.wait("document.body.dataset.ready === '1' "
                     "&& document.querySelector('#job-state').textContent === 'running'")
        assert enabled() == "pause,stop"
        browser.wait("Number(document.querySelector('#plot-cost').dataset.points) > 0")
        click_and_wait("pause", "paused", "resume,stop")
        click_and_wait("resume", "running", "pause,stop")
        click_and_wait("stop", "stopped", "delete")
        browser.eval("window.confirm = () => true")  # the page asks before deleting
        browser.eval("document.querySelector('[data-action=delete]').click()")
        browser.wait("!document.querySelector('#no-selection').hidden")
        assert api.get("/jobs") == []
    finally:
        browser.close()
        api.close()
