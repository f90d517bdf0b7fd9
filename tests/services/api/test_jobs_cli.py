"""`pmgd jobs` against a real `pmgd api` process over HTTP."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from waiting import wait_for  # tests/services/api/waiting.py (the test directory is on sys.path)

from services.cluster.launcher import free_port

pytestmark = pytest.mark.slow  # each test talks to a real API process

# Neither the API nor the client may pick up a token or URL from the caller's environment.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PMGD_API_")}


def start_api(tmp_path, *flags):
    port = free_port()
    log = open(tmp_path / f"api-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "api", "--host=127.0.0.1", f"--port={port}",
                             f"--db={tmp_path}/pmgd-{port}.sqlite", *flags],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"pmgd api exited with {proc.returncode}:\n{(tmp_path / f'api-{port}.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r) == {"status": "ok"}:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("pmgd api did not answer /health within 60 s")
        time.sleep(0.1)
    return proc, url, log


def stop_api(proc, log):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    proc, url, log = start_api(tmp)
    yield url
    stop_api(proc, log)


@pytest.fixture(scope="module")
def secured_api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    proc, url, log = start_api(tmp, "--token=secret")
    yield url
    stop_api(proc, log)


def jobs(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "services.cli", "jobs", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV if env is None else env)


def show(url, job_id) -> dict:
    r = jobs("--api", url, "show", job_id, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def write_config(tmp_path, name="job.json", **fields):
    path = tmp_path / name
    path.write_text(json.dumps(fields))
    return str(path)


def test_submit_ls_follow_logs_show(api, tmp_path):
    config = write_config(tmp_path, task="parity2", seeds=2, max_ticks=3000)
    r = jobs("--api", api, "submit", config)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", job_id), r.stdout  # only the id on stdout: scripts capture it

    r = jobs("--api", api, "ls")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if job_id in line)
    assert "parity2" in row and "local" in row

    try:  # --follow returns once the job has ended: the deadline is the subprocess's timeout
        r = jobs("--api", api, "logs", job_id, "--follow", "--interval", "0.2", timeout=120)  # --api after it
    except subprocess.TimeoutExpired:
        pytest.fail(f"logs --follow did not return within 120 s; the job is {show(api, job_id)['state']}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "created" in lines[0] and "started" in r.stdout
    assert re.search(r"finished: \d/2 runs converged in \d+ ticks", lines[-1]), r.stdout

    job = show(api, job_id)
    assert job["id"] == job_id and job["state"] == "finished" and job["engine"] == "local"
    assert job["config"]["seeds"] == 2 and job["config"]["max_ticks"] == 3000
    assert job["summary"]["runs"] == 2 and job["summary"]["ticks_run"] <= 3000

    r = jobs("--api", api, "show", job_id)  # the table form
    assert r.returncode == 0, r.stderr
    assert "finished" in r.stdout and "final_cost_median" in r.stdout and "seeds=2" in r.stdout

    r = jobs("--api", api, "logs", job_id)  # without --follow: what is there, at once
    assert r.returncode == 0 and r.stdout == "\n".join(lines) + "\n"


def test_pause_resume_stop_a_long_job(api, tmp_path):
    # No stopping rule and a budget of hours: it runs until stopped.
    config = write_config(tmp_path, task="parity3", seeds=1, max_ticks=50_000_000, target_accuracy=None)
    r = jobs("--api", api, "submit", config, "--no-start")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert show(api, job_id)["state"] == "created"
    try:
        assert jobs("--api", api, "start", job_id).stdout.strip() == f"job {job_id}: running"
        wait_for(lambda: show(api, job_id)["tick"] >= 100, 60, "the job to pass tick 100", interval=0.2)
        r = jobs("--api", api, "pause", job_id)
        assert r.returncode == 0 and r.stdout.strip() == f"job {job_id}: paused", r.stderr
        r = jobs("--api", api, "resume", job_id)
        assert r.returncode == 0 and r.stdout.strip() == f"job {job_id}: running", r.stderr
    finally:
        r = jobs("--api", api, "stop", job_id)
    assert r.returncode == 0 and r.stdout.strip() == f"job {job_id}: stopped", r.stderr
    job = show(api, job_id)
    assert job["state"] == "stopped" and job["summary"]["ticks_run"] >= 100

    # A stopped job cannot be stopped again: the API's 409 message, exit 1.
    r = jobs("--api", api, "stop", job_id)
    assert r.returncode == 1 and "cannot stop a job that is stopped" in r.stderr and "HTTP 409" in r.stderr
    # --follow on a job that already ended prints its lines and returns at once.
    r = jobs("--api", api, "logs", job_id, "-f", timeout=30)
    assert r.returncode == 0 and r.stdout.splitlines()[-1].endswith("ticks") and "stopped" in r.stdout
    r = jobs("--api", api, "rm", job_id)
    assert r.returncode == 0, r.stderr
    r = jobs("--api", api, "show", job_id)
    assert r.returncode == 1 and f"no job '{job_id}'" in r.stderr and "HTTP 404" in r.stderr


@pytest.mark.parametrize("name,text,fragment", [
    ("bad.json", '{"task": "parity2", "eta": -1}', "job config field 'eta'"),
    ("bad.toml", 'task = "parity2"\nlearning_rate = 0.1\n', "job config field 'learning_rate': unknown field"),
    ("typo.json", '{"task": "parity2",}', "typo.json"),
    ("missing.json", None, "missing.json"),
])
def test_bad_config_file_exits_2_naming_the_field(api, tmp_path, name, text, fragment):
    if text is not None:
        (tmp_path / name).write_text(text)
    before = len(json.loads(jobs("--api", api, "ls", "--json").stdout))
    r = jobs("--api", api, "submit", str(tmp_path / name))
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert r.stdout == ""
    assert len(json.loads(jobs("--api", api, "ls", "--json").stdout)) == before  # nothing was submitted


def test_unreachable_api_is_named(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    r = jobs("--api", url, "ls", timeout=30)
    assert r.returncode == 1 and f"cannot reach the API at {url}" in r.stderr, r.stderr


def test_token_is_required_by_a_secured_api(secured_api, tmp_path):
    config = write_config(tmp_path, task="parity2", max_ticks=200)
    r = jobs("--api", secured_api, "submit", config, "--no-start")
    assert r.returncode == 1 and "authorization" in r.stderr and "HTTP 401" in r.stderr, r.stderr
    r = jobs("--api", secured_api, "--token", "wrong", "submit", config, "--no-start")
    assert r.returncode == 1 and "HTTP 401" in r.stderr
    r = jobs("--api", secured_api, "--token", "secret", "submit", config, "--no-start")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    # Reads are open; the environment supplies the URL and the token too.
    env = dict(ENV, PMGD_API_URL=secured_api, PMGD_API_TOKEN="secret")
    r = jobs("ls", env=env)
    assert r.returncode == 0 and job_id in r.stdout
    r = jobs("stop", job_id, env=env)
    assert r.returncode == 0 and r.stdout.strip() == f"job {job_id}: stopped", r.stderr
