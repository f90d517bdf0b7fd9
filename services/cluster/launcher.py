"""The local launcher: a whole cluster as processes on loopback (``pmgd up``).

It starts the broadcaster, N parameter nodes and optionally the evaluator and the REST API
with exactly the commands the compose file runs (``pmgd broadcaster``, ``pmgd node``,
``pmgd evaluator``, ``pmgd api``), on free loopback ports, and stops them all:
SIGTERM first, SIGKILL after a grace period. Children also get SIGTERM from the kernel if
the launcher itself dies (PR_SET_PDEATHSIG), so no process outlives it. ``say`` hears each
step as it happens (``pmgd up`` prints them: the processes take seconds to come up).

Every ZeroMQ link of the cluster is authenticated and encrypted (CurveZMQ) with the keys in
``keys``: by default fresh ones in a temporary directory that goes with the cluster
(``cluster.keys_dir``; ``cluster.keys`` is the client key pair for talking to it); a
directory without keys gets them made (``pmgd keys init``); ``keys=""`` runs without.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from pmgd_node.shell import keys as cluster_keys

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class LocalCluster:
    """Broadcaster + ``nodes`` node processes; a context manager that always cleans up."""

    def __init__(self, nodes: int, host: str = "127.0.0.1", state_dir: str = "", heartbeat_timeout_s: float = 2.0,
                 log_dir: str = "", env: dict | None = None, remote_evaluator: bool = False, api: bool = False,
                 api_db: str = "pmgd.sqlite", metrics: bool = False, say: Callable[[str], None] | None = None,
                 keys: str | None = None):
        self.say = say or (lambda text: None)
        self._own_keys = keys is None
        self.keys_dir = tempfile.mkdtemp(prefix="pmgd-keys-") if keys is None else keys
        if self.keys_dir:
            cluster_keys.init(self.keys_dir, if_missing=True)
        self.keys = cluster_keys.load_optional(self.keys_dir)
        ports = [free_port() for _ in range(3)]
        self.host = host
        self.endpoints = {name: f"tcp://{host}:{port}" for name, port in zip(("control", "weights", "cost"), ports)}
        if remote_evaluator:
            self.endpoints["evaluator"] = f"tcp://{host}:{free_port()}"
            self.evaluator_url = f"http://{host}:{free_port()}"
        self.api_url = f"http://{host}:{free_port()}" if api else ""
        self.api_db = api_db
        self.metrics = metrics
        # service name → its Prometheus endpoint (nodes get theirs as they start)
        self.metrics_urls: dict[str, str] = {}
        if metrics:
            self.metrics_urls["broadcaster"] = f"http://{host}:{free_port()}/metrics"
            if remote_evaluator:
                self.metrics_urls["evaluator"] = self.evaluator_url + "/metrics"
        if api:
            self.metrics_urls["api"] = self.api_url + "/metrics"
        self.evaluator: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.num_nodes = nodes
        self.state_dir = state_dir
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.log_dir = log_dir
        self.env = {**os.environ, "PMGD_KEYS": self.keys_dir, **(env or {})}
        self.broadcaster: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self._logs: list = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        out = subprocess.DEVNULL
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, name + ".log"), "ab")
            self._logs.append(out)
        return subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=self.env, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def _endpoint_flags(self) -> list[str]:
        return [f"--{k}={v}" for k, v in self.endpoints.items() if k != "evaluator"]

    def _metrics_flags(self, name: str) -> list[str]:
        if not self.metrics:
            return []
        url = self.metrics_urls.setdefault(name, f"http://{self.host}:{free_port()}/metrics")
        return [f"--metrics-host={self.host}", f"--metrics-port={url.rsplit(':', 1)[1].split('/')[0]}"]

    def start_broadcaster(self) -> subprocess.Popen:
        args = ["broadcaster", *self._endpoint_flags(), f"--heartbeat-timeout-s={self.heartbeat_timeout_s}"]
        if "evaluator" in self.endpoints:
            args.append(f"--evaluator={self.endpoints['evaluator']}")
        if self.state_dir:
            args.append(f"--state-dir={self.state_dir}")
        self.broadcaster = self._spawn(args + self._metrics_flags("broadcaster"), "broadcaster")
        return self.broadcaster

    def start_node(self, node_id: str | None = None) -> subprocess.Popen:
        node_id = node_id or f"node-{len(self.nodes)}"
        proc = self._spawn(["node", *self._endpoint_flags(), f"--node-id={node_id}",
                            f"--heartbeat-s={self.heartbeat_timeout_s / 4:g}",
                            f"--broadcaster-timeout-s={self.heartbeat_timeout_s * 1.5:g}",
                            *self._metrics_flags(node_id)], node_id)
        self.nodes.append(proc)
        return proc

    def start(self) -> LocalCluster:
        if "evaluator" in self.endpoints:
            self.say("starting the evaluator…")
            self.evaluator = self._spawn(["evaluator", f"--endpoint={self.endpoints['evaluator']}",
                                          f"--http-host={self.host}",
                                          f"--http-port={self.evaluator_url.rsplit(':', 1)[1]}"], "evaluator")
        self.say("starting the broadcaster…")
        self.start_broadcaster()
        for k in range(self.num_nodes):
            self.say(f"starting node {k + 1}/{self.num_nodes}…")
            self.start_node()
        if self.api_url:
            self.say("starting the API…")
            args = ["api", f"--host={self.host}", f"--port={self.api_url.rsplit(':', 1)[1]}", f"--db={self.api_db}",
                    f"--broadcaster={self.endpoints['control']}"]
            if "evaluator" in self.endpoints:
                args.append(f"--evaluator={self.evaluator_url}")
            self.api = self._spawn(args, "api")
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until every node has joined the broadcaster and the API (when started)
        answers /health; raise if a process died. A job submitted after this finds all the
        nodes (a job that does not set ``nodes`` takes those connected: client.fit_to_cluster)."""
        import urllib.request

        from .client import status

        deadline = time.monotonic() + timeout_s
        self.say(f"waiting for {self.num_nodes} node(s) to join…")
        joined = -1
        while joined < self.num_nodes:
            self._check_alive(deadline, f"{self.num_nodes} nodes to join the broadcaster", timeout_s)
            try:
                now = len(status(self.endpoints["control"], timeout_s=1.0, keys=self.keys)["nodes"])
            except TimeoutError:
                continue  # the broadcaster is still starting
            if now != joined:
                joined = now
                self.say(f"{joined}/{self.num_nodes} nodes joined")
            time.sleep(0.1)
        if self.api_url:
            self.say("waiting for the API…")
        while self.api_url:
            self._check_alive(deadline, f"the API at {self.api_url}", timeout_s)
            try:
                urllib.request.urlopen(self.api_url + "/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)

    def _check_alive(self, deadline: float, waiting_for: str, timeout_s: float) -> None:
        dead = [p.args for p in self.processes() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"cluster process exited early: {dead[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {waiting_for}")

    def processes(self) -> list[subprocess.Popen]:
        return [p for p in [self.api, self.evaluator, self.broadcaster, *self.nodes] if p is not None]

    def stop(self, grace_s: float = 5.0) -> None:
        procs = [p for p in self.processes() if p.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()
        if self._own_keys:
            shutil.rmtree(self.keys_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
