"""A cluster across three hosts through a network partition.

Three network namespaces stand for three machines: A runs the broadcaster, B and C one node
each. A holds a bridge (the "switch"); B, C and the root namespace (where this test's client
runs) each have a veth link into it, with addresses from one private /24. The broadcaster
binds its three sockets to A's address on that /24, so it needs the cluster's keys: each
host gets only the files it needs, as docs/deploy.md ("Nodes on other hosts") describes.

The partition is B's cable pulled at the switch (``ip link set <A's end> down``), then
plugged back in. The services run with their default settings (broadcaster heartbeat
timeout 2 s; node heartbeat 0.5 s, broadcaster timeout 3 s).

- sync: the job pauses naming B's node, B re-joins after the link is back, every shard
  restarts from the last checkpoint, and the job ends bit-identical to the engine;
- async: the job ticks on through the cut with B's last shard, B takes its shard over again
  after the link is back, and the job runs every tick to its end.

Each test prints what it measured (``pytest -s``): detection (cut → node declared lost),
resume (link back → running again / shard taken over) and, for sync, the ticks replayed.
Needs root and ``ip netns``; skipped otherwise. No traffic leaves the namespaces made here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_cluster import _assert_identical  # the test directory is on sys.path

from pmgd_node.config import JobConfig
from pmgd_node.shell import keys as cluster_keys
from services.cluster.client import run_job, status
from services.cluster.launcher import _die_with_parent

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PORTS = {"control": 5555, "weights": 5556, "cost": 5557}  # A is a fresh namespace: the usual ports are free
# How long the link stays cut at least (seconds): by default until node-b has noticed the
# silence (about 3.5 s); longer to measure long partitions, e.g. PMGD_PARTITION_CUT_S=30.
CUT_S = float(os.environ.get("PMGD_PARTITION_CUT_S", "0"))
# With PMGD_PARTITION_BLACKHOLE=1 the neighbour (ARP) entries between A and B, C are pinned:
# nothing then tells TCP that the far side is unreachable while the link is down (as on a
# path that drops silently), and its retransmission interval doubles throughout the cut.
BLACKHOLE = os.environ.get("PMGD_PARTITION_BLACKHOLE", "") not in ("", "0")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _why_no_netns() -> str:
    """'' when this process may build namespaces and veth links, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and veth links)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"pmgdprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not available here: {made.stderr.strip()}"
    try:
        link = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if link.returncode != 0:
            return f"cannot make a bridge in a network namespace: {link.stderr.strip()}"
        veth = _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1", check=False)
        if veth.returncode != 0:
            return f"cannot make veth links: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """Namespaces left by an earlier run of this test that was killed (its pid is gone)."""
    listed = _ip("netns", "list", check=False).stdout
    for name in re.findall(r"^(pmgdp(\d+)[a-z]?[abc])\b", listed, re.M):
        if not _alive(int(name[1])):
            _ip("netns", "del", name[0], check=False)


class Hosts:
    """Namespaces A (with the bridge), B and C, and a veth from the root namespace into A.

    ``tag`` (one letter) tells apart the hosts of two clusters up at once; ``blackhole`` pins
    the neighbour entries (see BLACKHOLE).
    """

    def __init__(self, tag: str = "", blackhole: bool = BLACKHOLE):
        pid = os.getpid()
        self.ns = {h: f"pmgdp{pid}{tag}{h}" for h in "abc"}
        self.host_link = f"pmgdp{pid}{tag}h"  # the root namespace's end of its link into A
        self.blackhole = blackhole
        used = _ip("-4", "route", "show", "table", "all", check=False).stdout
        third = next(k for k in [pid % 250 + 1, *range(1, 255)] if f"10.231.{k}." not in used)
        self.net = f"10.231.{third}"
        self.addr = {"a": f"{self.net}.1", "b": f"{self.net}.2", "c": f"{self.net}.3", "root": f"{self.net}.254"}

    def up(self) -> Hosts:
        _remove_stale()
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        a = self.ns["a"]
        _ip("-n", a, "link", "add", "br0", "type", "bridge")
        _ip("-n", a, "addr", "add", f"{self.addr['a']}/24", "dev", "br0")
        _ip("-n", a, "link", "set", "br0", "up")
        for h in "bc":  # A's end is the switch port "to-b"; B's end is its "eth0"
            _ip("-n", a, "link", "add", f"to-{h}", "type", "veth", "peer", "name", "eth0", "netns", self.ns[h])
            _ip("-n", a, "link", "set", f"to-{h}", "master", "br0", "up")
            _ip("-n", self.ns[h], "addr", "add", f"{self.addr[h]}/24", "dev", "eth0")
            _ip("-n", self.ns[h], "link", "set", "eth0", "up")
        _ip("link", "add", self.host_link, "type", "veth", "peer", "name", "to-root", "netns", a)
        _ip("-n", a, "link", "set", "to-root", "master", "br0", "up")
        _ip("addr", "add", f"{self.addr['root']}/24", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")
        if self.blackhole:
            a_mac = self._mac("a", "br0")
            for h in "bc":
                _ip("-n", a, "neigh", "replace", self.addr[h], "lladdr", self._mac(h, "eth0"), "nud", "permanent",
                    "dev", "br0")
                _ip("-n", self.ns[h], "neigh", "replace", self.addr["a"], "lladdr", a_mac, "nud", "permanent",
                    "dev", "eth0")
        return self

    def _mac(self, h: str, dev: str) -> str:
        return re.search(r"link/ether (\S+)", _ip("-n", self.ns[h], "link", "show", dev).stdout)[1]

    def cut(self, h: str) -> None:
        _ip("-n", self.ns["a"], "link", "set", f"to-{h}", "down")

    def restore(self, h: str) -> None:
        _ip("-n", self.ns["a"], "link", "set", f"to-{h}", "up")

    def sysctl(self, h: str, setting: str) -> None:
        """Set a per-namespace sysctl (net.ipv4.tcp_*) on host ``h`` only."""
        proc = subprocess.run(["ip", "netns", "exec", self.ns[h], "sysctl", "-qw", setting], capture_output=True,
                              text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sysctl -w {setting} on {h}: {proc.stderr.strip()}")

    def tcp(self, h: str, port: int) -> list[str]:
        """Host ``h``'s TCP sockets to A's ``port`` as ``ss`` lists them (state, local address, …)."""
        out = subprocess.run(["ip", "netns", "exec", self.ns[h], "ss", "-Htna", "dst", f"{self.addr['a']}:{port}"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [line for line in out.splitlines() if line.strip()]

    def down(self) -> None:
        for ns in self.ns.values():  # a namespace's veth ends go with it, and so do their peers
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.host_link, check=False)


class Service:
    """One service process in a namespace; its output lines are timestamped as they come."""

    def __init__(self, hosts: Hosts, host: str, args: list[str], env: dict, log_path: str):
        self.lines: list[tuple[float, str]] = []
        self.log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(["ip", "netns", "exec", hosts.ns[host], sys.executable, "-m", "services.cli",
                                      *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, preexec_fn=_die_with_parent)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            self.log.write(line)
            self.log.flush()

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, re.Match] | None:
        """The first output line at or after ``after`` that matches ``pattern``."""
        for at, line in list(self.lines):
            if at >= after and (m := re.search(pattern, line)):
                return at, m
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        self.log.close()


class Cluster:
    """The broadcaster on A, node-b on B, node-c on C, each with only its share of the keys."""

    def __init__(self, hosts: Hosts, tmp: str):
        self.hosts, self.tmp = hosts, tmp
        keys = os.path.join(tmp, "keys-a")  # the broadcaster host's: made there, never copied whole
        cluster_keys.init(keys)
        self.dirs = {"a": keys}
        for h in "bc":  # a client pair per node host, and server.key; the secrets of A stay on A
            cluster_keys.add(keys, f"host-{h}")
            self.dirs[h] = os.path.join(tmp, f"keys-{h}")
            os.makedirs(self.dirs[h], mode=0o700)
            for name in ("server.key", f"host-{h}.key", f"host-{h}.key_secret"):
                shutil.copy2(os.path.join(keys, name), self.dirs[h])
        self.keys = cluster_keys.load(keys)  # this test's client: the default client pair
        self.endpoints = {k: f"tcp://{hosts.addr['a']}:{port}" for k, port in PORTS.items()}
        self.control = self.endpoints["control"]
        self.services: dict[str, Service] = {}

    def _env(self, h: str, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PMGD_")}
        return {**env, "PMGD_KEYS": self.dirs[h], "PYTHONUNBUFFERED": "1", **extra}

    def start(self) -> Cluster:
        flags = [f"--{k}={v}" for k, v in self.endpoints.items()]
        self.services["broadcaster"] = Service(self.hosts, "a", ["broadcaster", *flags], self._env("a"),
                                               os.path.join(self.tmp, "broadcaster.log"))
        for h in "bc":
            self.services[f"node-{h}"] = Service(self.hosts, h, ["node", *flags, f"--node-id=node-{h}"],
                                                 self._env(h, PMGD_KEY_NAME=f"host-{h}"),
                                                 os.path.join(self.tmp, f"node-{h}.log"))
        return self

    def status(self) -> dict:
        return status(self.control, timeout_s=2.0, keys=self.keys)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def joined():
            for name, svc in self.services.items():
                if svc.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early: {self.tail(name)}")
            try:
                return len(self.status()["nodes"]) == 2
            except TimeoutError:
                return False

        _wait_for(joined, timeout_s, "both nodes to join the broadcaster across the bridge")

    def tail(self, name: str, lines: int = 15) -> str:
        return "\n".join(line for _, line in self.services[name].lines[-lines:])

    def stop(self) -> None:
        for svc in self.services.values():
            svc.stop()


def _wait_for(predicate, timeout_s: float, what: str, every: float = 0.05) -> float:
    """Poll until ``predicate()``; the monotonic time it first held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _run_in_thread(config: JobConfig, cluster: Cluster, reports: list) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def go():
        try:
            box["summary"] = run_job(config, cluster.control, lambda d: reports.extend(d["reports"]), timeout_s=180,
                                     keys=cluster.keys)
        except Exception as err:  # noqa: BLE001 - reported by the test
            box["error"] = repr(err)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, box


def _cluster_up(hosts: Hosts, tmp: str, prepare=None):
    """Bring ``hosts`` up (then ``prepare(hosts)``), start the cluster on them, yield it."""
    why = _why_no_netns()
    if why:
        pytest.skip(why)
    cluster = None
    try:
        hosts.up()
        if prepare is not None:
            prepare(hosts)
        cluster = Cluster(hosts, tmp).start()
        cluster.wait_ready()
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        hosts.down()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from _cluster_up(Hosts(), str(tmp_path_factory.mktemp("partition")))


def _job_tick(cluster: Cluster) -> int:
    job = cluster.status()["job"]
    return -1 if job is None else job["tick"]


def test_sync_job_pauses_on_a_partition_and_resumes_bit_identical(cluster, record_property):
    config = JobConfig(nodes=2, seeds=2, max_ticks=8000, target_accuracy=None, checkpoint_every=200,
                       eval_every=50, seed=21)
    broadcaster, node_b = cluster.services["broadcaster"], cluster.services["node-b"]
    reports: list = []
    thread, box = _run_in_thread(config, cluster, reports)
    cut_at = restored_at = None
    try:
        _wait_for(lambda: _job_tick(cluster) >= 1500, 60, "the job to pass tick 1500")
        cluster.hosts.cut("b")
        cut_at = time.monotonic()
        _wait_for(lambda: cluster.status()["state"] == "paused", 15, "the job to pause")
        st = cluster.status()
        assert "node-b" in st["pause_reason"] and "lost" in st["pause_reason"], st["pause_reason"]
        assert set(st["nodes"]) == {"node-c"}, st["nodes"]  # B is lost; C is still there
        # The partition outlasts node-b's patience too: it gives up on the broadcaster and
        # queues a Join, as a node on the far side of a real partition would.
        _wait_for(lambda: node_b.first(r"broadcaster silent", after=cut_at), 15, "node-b to notice the silence")
        paused_tick = _job_tick(cluster)
        time.sleep(max(0.5, cut_at + CUT_S - time.monotonic()))
        assert _job_tick(cluster) == paused_tick and cluster.status()["state"] == "paused"  # nothing ticks
        cluster.hosts.restore("b")
        restored_at = time.monotonic()
        _wait_for(lambda: broadcaster.first(r"running from tick", after=restored_at), 30,
                  "the job to resume once the link is back")
        resumed_tick = int(broadcaster.first(r"running from tick (\d+)", after=restored_at)[1][1])
        # Running again is not yet ticking: the first tick needs node-b's weights, which come
        # over another TCP connection than its Join.
        ticking_at = _wait_for(lambda: _job_tick(cluster) > resumed_tick, 60, "the resumed job to tick")
        thread.join(180)
    finally:
        if restored_at is None and cut_at is not None:
            cluster.hosts.restore("b")
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert summary["epochs"] == 2, summary["epochs"]  # one resume, no rollback storm
    _assert_identical(summary, config)

    lost = broadcaster.first(r"node node-b lost", after=cut_at)
    paused = broadcaster.first(r"paused at tick (\d+)", after=cut_at)
    resumed = broadcaster.first(r"running from tick (\d+) \(epoch (\d+)\)", after=restored_at)
    figures = {"detection_s": round(lost[0] - cut_at, 2), "resume_s": round(resumed[0] - restored_at, 2),
               "paused_at_tick": int(paused[1][1]), "resumed_from_tick": int(resumed[1][1]),
               "ticks_replayed": int(paused[1][1]) - int(resumed[1][1]),
               "ticking_s": round(ticking_at - restored_at, 2),
               "cut_s": round(restored_at - cut_at, 2)}
    print(f"\npartition, sync: {figures}")
    record_property("partition_sync", figures)
    assert 0 <= figures["ticks_replayed"] <= config.checkpoint_every * 2, figures
    assert figures["resumed_from_tick"] % config.checkpoint_every == 0, figures


def test_async_job_runs_on_through_a_partition(cluster, record_property):
    period = 0.003  # a longer cut gets a longer job, so that it outlasts the takeover (TCP may be slow to notice)
    config = JobConfig(nodes=2, seeds=2, timing="async", tick_period=period, max_ticks=3000 + int(2 * CUT_S / period),
                       target_accuracy=None, checkpoint_every=100, eval_every=50, seed=22)
    broadcaster, node_b = cluster.services["broadcaster"], cluster.services["node-b"]
    reports: list = []
    thread, box = _run_in_thread(config, cluster, reports)
    cut_at = restored_at = None
    try:
        _wait_for(lambda: _job_tick(cluster) >= 600, 60, "the job to pass tick 600")
        assert cluster.status()["nodes"]["node-b"]["shard"] >= 0
        cluster.hosts.cut("b")
        cut_at = time.monotonic()
        tick_at_cut = _job_tick(cluster)
        _wait_for(lambda: "node-b" not in cluster.status()["nodes"], 15, "node-b to be lost")
        st = cluster.status()
        assert st["state"] == "running", st  # async does not stop for a lost node
        _wait_for(lambda: node_b.first(r"broadcaster silent", after=cut_at), 15, "node-b to notice the silence")
        time.sleep(max(0.0, cut_at + CUT_S - time.monotonic()))
        st_late = cluster.status()
        assert st_late["state"] == "running" and st_late["job"]["tick"] > st["job"]["tick"] > tick_at_cut, \
            (tick_at_cut, st["job"], st_late["job"])  # it ticks on through the cut
        tick_at_restore = st_late["job"]["tick"]
        cluster.hosts.restore("b")
        restored_at = time.monotonic()
        _wait_for(lambda: broadcaster.first(r"shard \d+ reassigned", after=restored_at), 30,
                  "node-b to take its shard over again")
        thread.join(180)
    finally:
        if restored_at is None and cut_at is not None:
            cluster.hosts.restore("b")
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert summary["ticks_run"] == config.max_ticks and summary["epochs"] == 1, summary
    assert [r["tick"] for r in reports] == list(range(config.max_ticks))  # every tick once, none skipped
    assert np.all(np.isfinite(np.array(summary["theta0"])))

    lost = broadcaster.first(r"node node-b lost", after=cut_at)
    taken = broadcaster.first(r"shard \d+ reassigned", after=restored_at)
    figures = {"detection_s": round(lost[0] - cut_at, 2), "takeover_s": round(taken[0] - restored_at, 2),
               "cut_s": round(restored_at - cut_at, 2), "ticks_during_cut": tick_at_restore - tick_at_cut}
    print(f"\npartition, async: {figures}")
    record_property("partition_async", figures)


# A cut that outlasts the node's own TCP: B gives up on its unacknowledged data after
# net.ipv4.tcp_retries2 retransmissions (a per-namespace sysctl; 15 by default, about 15 min).
# With 3 the kernel's limit is (2⁴ − 1) × 200 ms = 3 s from the first unacknowledged segment,
# checked when the retransmission timer fires (0.2, 0.6, 1.4, 3.0 s, …), counted from the
# first heartbeat sent into the cut: B drops its control connection 3.5–4.5 s into the cut
# (measured), ZeroMQ reconnects, and the reconnect's SYNs are lost until the link is back.
# A 12 s cut is three times that: B has given up, and asked to join again, well before.
SHORT_RETRIES2 = 3
LONG_CUT_S = 12.0
TAKEN_BACK_S = 20.0  # link back → running again: the next SYN retransmit, handshake, Join, Assign (~3 s)


@pytest.fixture
def impatient_cluster(tmp_path):
    """Its own hosts: silent drop on the cut, and B's TCP gives up after SHORT_RETRIES2."""
    yield from _cluster_up(Hosts(tag="r", blackhole=True), str(tmp_path),
                           prepare=lambda hosts: hosts.sysctl("b", f"net.ipv4.tcp_retries2={SHORT_RETRIES2}"))


def _local_ports(lines: list[str], state: str) -> set[str]:
    return {line.split()[3] for line in lines if line.split()[0] == state}


def test_node_is_taken_back_after_a_cut_that_outlasts_its_tcp(impatient_cluster, record_property):
    """The broadcaster still holds B's old control connection (half-open: nothing it sends
    there is pending, so its side never times out) when B reconnects under the same routing
    id; without ROUTER_HANDOVER ZeroMQ refuses the new connection for ever and B keeps saying
    "broadcaster silent … joining again"."""
    cluster = impatient_cluster
    hosts, control = cluster.hosts, PORTS["control"]
    config = JobConfig(nodes=2, seeds=2, max_ticks=2500, target_accuracy=None, checkpoint_every=200,
                       eval_every=50, seed=23)
    broadcaster, node_b = cluster.services["broadcaster"], cluster.services["node-b"]
    reports: list = []
    thread, box = _run_in_thread(config, cluster, reports)
    cut_at = restored_at = None
    try:
        _wait_for(lambda: _job_tick(cluster) >= 600, 60, "the job to pass tick 600")
        old = _local_ports(hosts.tcp("b", control), "ESTAB")
        assert len(old) == 1, hosts.tcp("b", control)  # node-b's control connection
        hosts.cut("b")
        cut_at = time.monotonic()
        _wait_for(lambda: cluster.status()["state"] == "paused", 15, "the job to pause")
        assert "node-b" in cluster.status()["pause_reason"]
        paused_tick = _job_tick(cluster)
        # B's TCP gives up: the old control connection is gone (ETIMEDOUT), not merely quiet.
        gave_up_at = _wait_for(lambda: not old & _local_ports(hosts.tcp("b", control), "ESTAB"), LONG_CUT_S + 10,
                               "node-b's TCP to give up its control connection", every=0.2)
        time.sleep(max(0.0, cut_at + LONG_CUT_S - time.monotonic()))
        assert _job_tick(cluster) == paused_tick and cluster.status()["state"] == "paused"
        hosts.restore("b")
        restored_at = time.monotonic()
        try:
            _wait_for(lambda: broadcaster.first(r"running from tick", after=restored_at), TAKEN_BACK_S,
                      "node-b to be taken back and the job to resume once the link is back")
        except AssertionError as err:
            raise AssertionError(f"{err}\nnode-b:\n{cluster.tail('node-b')}\nbroadcaster:\n"
                                 f"{cluster.tail('broadcaster')}\nB's control sockets: "
                                 f"{hosts.tcp('b', control)}") from None
        resumed_tick = int(broadcaster.first(r"running from tick (\d+)", after=restored_at)[1][1])
        ticking_at = _wait_for(lambda: _job_tick(cluster) > resumed_tick, 60, "the resumed job to tick")
        thread.join(180)
    finally:
        if restored_at is None and cut_at is not None:
            hosts.restore("b")
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert summary["epochs"] == 2, summary["epochs"]  # one resume
    _assert_identical(summary, config)

    joined = broadcaster.first(r"node node-b joined", after=restored_at)
    resumed = broadcaster.first(r"running from tick (\d+)", after=restored_at)
    figures = {"gave_up_s": round(gave_up_at - cut_at, 2), "cut_s": round(restored_at - cut_at, 2),
               "rejoined_s": round(joined[0] - restored_at, 2), "resume_s": round(resumed[0] - restored_at, 2),
               "ticking_s": round(ticking_at - restored_at, 2),
               "rejoin_attempts": sum(1 for at, line in node_b.lines if at >= cut_at and "joining again" in line)}
    print(f"\npartition outlasting TCP, sync: {figures}")
    record_property("partition_outlasting_tcp", figures)
