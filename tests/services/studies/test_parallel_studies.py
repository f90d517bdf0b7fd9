"""Studies in parallel: ``pmgd study --workers N`` (local worker processes) and ``--scheduler``
(Dask) write the files the in-process runner writes, resume after an interruption, and lose or
duplicate no point when a Dask worker dies mid-point."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from pmgd_node.config import ConfigError
from services import studies
from services.cli import main
from services.studies import dask_executor, ports
from services.studies.sweep import resolve_params, run_study
from services.studies.workers import TaskError, WorkerPool, cores

# A small latency study: 10 points (R-CM and FM, tagged/untagged/compensated, delays 0 and 2).
LATENCY = ["--set", "values=[0,2]", "--set", 'perturbations=["rcm","fm"]', "--seeds", "2",
           "--set", "max_ticks=400", "--set", "angle_ticks=40", "--quiet"]
# Four points of ≈1.5 s each (C-M under heavy C̃ loss never solves: every point runs max_ticks),
# long enough to interrupt a run, or kill a worker, while a point runs.
SLOW_POINTS = {"values": [0.5, 0.6, 0.7, 0.8], "perturbations": ["cm"], "seeds": 2, "max_ticks": 12_000,
               "angle_ticks": 400}
FILES = ("runs.csv", "summary.json")


def _same_files(a, b, figure: str) -> None:
    for name in (*FILES, figure):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _entries(out) -> list[dict]:
    return [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]


def _slow_args(out) -> list[str]:
    return ["study", "drop", "--out", str(out), "--quiet",
            *[x for k, v in SLOW_POINTS.items() for x in ("--set", f"{k}={json.dumps(v)}")]]


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory):
    """The SLOW_POINTS study run in this process (``--workers 1``): what every executor must write."""
    out = tmp_path_factory.mktemp("reference")
    assert main([*_slow_args(out), "--workers", "1"]) == 0
    return out


@pytest.mark.slow
def test_workers_and_a_local_dask_cluster_write_the_files_of_one_process(tmp_path):
    one, two, dask = tmp_path / "one", tmp_path / "two", tmp_path / "dask"
    assert main(["study", "latency", "--out", str(one), *LATENCY, "--workers", "1"]) == 0
    assert main(["study", "latency", "--out", str(two), *LATENCY, "--workers", "2"]) == 0
    assert main(["study", "latency", "--out", str(dask), *LATENCY, "--workers", "2", "--scheduler", "local"]) == 0
    for out in (two, dask):
        _same_files(one, out, "latency.png")
        # The log too, in the points' order, bar the wall times.
        assert [(e["key"], e["rows"]) for e in _entries(out)] == [(e["key"], e["rows"]) for e in _entries(one)]
    assert len(_entries(one)) == 10


@pytest.mark.slow
def test_an_interrupted_run_with_workers_resumes(tmp_path, slow_reference):
    """Ctrl-C on ``pmgd study --workers 2`` while points run: the finished points stay on disk,
    the workers go, and the same command finishes the study with the files of one process."""
    import psutil

    out = tmp_path / "study"
    args = [*_slow_args(out), "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())",
                             *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "points.jsonl").exists() or \
            not (out / "points.jsonl").read_text().strip():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert len(workers) == 2
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    before = {json.dumps(e["key"]): e["wall_s"] for e in _entries(out)}
    assert 1 <= len(before) < 4  # interrupted while points ran

    assert main(args) == 0
    _same_files(slow_reference, out, "drop.png")
    after = _entries(out)
    assert [e["key"] for e in after] == [e["key"] for e in _entries(slow_reference)]
    assert all(e["wall_s"] == before[json.dumps(e["key"])] for e in after if json.dumps(e["key"]) in before)


@pytest.mark.slow
def test_a_dask_worker_killed_mid_point_loses_and_duplicates_nothing(tmp_path, slow_reference):
    """A real local Dask cluster (a scheduler and two worker processes): SIGKILL one worker while
    it runs a point; Dask reruns that point on a worker, and the study writes every point once."""
    from distributed import Client, LocalCluster

    out = tmp_path / "study"
    study = studies.get("drop")
    params = resolve_params(study, SLOW_POINTS)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        done: list = []
        runner = threading.Thread(target=lambda: done.append(run_study(study, params, str(out), progress=False,
                                                                       scheduler=cluster.scheduler_address)))
        runner.start()
        killed = None
        deadline = time.monotonic() + 45
        while killed is None and time.monotonic() < deadline:
            running = client.run(lambda dask_worker: [ts.key for ts in dask_worker.state.executing])
            busy = [(addr, keys[0]) for addr, keys in running.items() if keys]
            if busy:
                addr, key = busy[0]
                time.sleep(0.3)  # well inside the point (≈1.5 s once the worker's imports are done)
                if key in client.run(lambda dask_worker: [ts.key for ts in dask_worker.state.executing],
                                     workers=[addr])[addr]:
                    pid = client.run(os.getpid, workers=[addr])[addr]
                    os.kill(pid, signal.SIGKILL)
                    killed = key
            time.sleep(0.05)
        runner.join(timeout=120)
        assert killed is not None and not runner.is_alive() and done
        # The killed point was handed to a worker again (its first worker is gone).
        assert sum(1 for msg in cluster.scheduler.story(killed) if msg[2] == "processing") >= 2
    _same_files(slow_reference, out, "drop.png")
    entries = _entries(out)
    assert [e["key"] for e in entries] == [e["key"] for e in _entries(slow_reference)]  # each point once


def test_a_worker_pool_gives_each_worker_its_share_of_the_cores_and_names_failures():
    import torch

    with WorkerPool(2) as pool:
        threads = dict(pool.run(os.getenv, [("OMP_NUM_THREADS",), ("OPENBLAS_NUM_THREADS",)]))
        assert threads == {0: str(max(1, cores() // 2)), 1: str(max(1, cores() // 2))}
        assert [n for _, n in pool.run(torch.get_num_threads, [(), ()])] == [max(1, cores() // 2)] * 2
        with pytest.raises(TaskError, match="the bad one failed: JSONDecodeError"):
            list(pool.run(json.loads, [("{",)], ["the bad one"]))
        with pytest.raises(ConfigError, match="'seeds'.*the point"):
            list(pool.run(resolve_params, [(studies.get("drop"), {"seeds": "many"})], ["the point"]))
        with pytest.raises(TaskError, match="died with exit code 3"):
            list(pool.run(os._exit, [(3,)]))


def test_port_blocks_are_disjoint_and_never_hand_out_their_claim():
    a, b = ports.PortBlock(), ports.PortBlock()
    try:
        assert a.first != b.first and {a.first, b.first} <= set(range(ports.BASE, 32_768, ports.SPAN))
        given = [a.free_port() for _ in range(ports.SPAN)]
        assert all(a.first < p < a.first + ports.SPAN for p in given)
        # No port comes round before the block's others have: ports another program holds are
        # skipped, so the cycle may be a little shorter than SPAN − 1, never shorter than half.
        half = ports.SPAN // 2
        assert len(set(given[:half])) == half
    finally:
        a.close()
        b.close()


def test_bad_parallel_options_name_the_option(tmp_path, capsys):
    for extra, name in ((["--workers", "0"], "workers"), (["--point-resources", "GPU"], "point-resources"),
                        (["--point-resources", "GPU=1"], "point-resources"),
                        (["--scheduler", "tcp://10.1.2.3:8786"], "scheduler"),
                        (["--scheduler", "tls://127.0.0.1:8786"], "scheduler-security"),
                        (["--scheduler", "tls://127.0.0.1:8786", "--scheduler-security", str(tmp_path)],
                         "scheduler-security"),
                        (["--scheduler", "nonsense"], "scheduler")):
        with pytest.raises(SystemExit) as exc:
            main(["study", "drop", "--out", str(tmp_path / "x"), "--set", "values=[0.0]", *extra, "--quiet"])
        assert exc.value.code == 2 and f"'{name}'" in capsys.readouterr().err, extra


def test_only_loopback_may_go_without_tls():
    plain = dask_executor.security_from("")
    assert dask_executor.check_address("127.0.0.1:8786", plain) == "tcp://127.0.0.1:8786"
    assert dask_executor.check_address("tcp://localhost:8786", plain) == "tcp://localhost:8786"
    for address in ("tcp://192.168.1.5:8786", "tcp://scheduler.lab:8786"):
        with pytest.raises(ConfigError, match="not on loopback"):
            dask_executor.check_address(address, plain)


def _certificates(folder, name: str) -> None:
    """A CA of its own and a certificate it signed: ca.pem, cert.pem, key.pem (docs/studies.md)."""
    folder.mkdir()

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}-ca",
        "-keyout", "ca-key.pem", "-out", "ca.pem")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", "key.pem", "-out", "cert.csr")
    ssl("x509", "-req", "-in", "cert.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
        "-out", "cert.pem")


@pytest.mark.slow
def test_a_tls_dask_cluster_refuses_strangers_and_runs_points(tmp_path):
    """``--scheduler-security DIR``: the cluster speaks TLS and accepts only peers whose
    certificate its CA signed; a client without one, or with another CA's, is refused."""
    from distributed import Client, Security

    _certificates(tmp_path / "ours", "pmgd")
    _certificates(tmp_path / "theirs", "stranger")
    study = studies.get("drop")
    params = resolve_params(study, {"values": [0.0], "perturbations": ["tm"], "seeds": 2, "max_ticks": 400,
                                    "angle_ticks": 40})
    executor = dask_executor.DaskExecutor(study, params, "local", workers=1, security=str(tmp_path / "ours"))
    try:
        address = executor.cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        ours, theirs = tmp_path / "ours", tmp_path / "theirs"
        # A Dask client that trusts our CA but holds a certificate another CA signed: refused.
        stranger = Security(require_encryption=True, tls_ca_file=str(ours / "ca.pem"),
                            tls_client_cert=str(theirs / "cert.pem"), tls_client_key=str(theirs / "key.pem"))
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=stranger, timeout=3)
        # A TLS client with no certificate at all: the scheduler ends the handshake (an alert, not
        # the silence of a server waiting for the client's first message).
        context = ssl.create_default_context(cafile=str(ours / "ca.pem"))
        context.check_hostname = False
        host, port = address.removeprefix("tls://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw, pytest.raises(ssl.SSLError):
            with context.wrap_socket(raw) as tls:
                tls.recv(1)
        got = list(executor.run([(0, study.points(params)[0])]))
    finally:
        executor.close()
    from services.studies.executor import InProcess

    with InProcess(study, params) as here:
        assert [e["rows"] for e in got] == [e["rows"] for e in here.run([(0, study.points(params)[0])])]
