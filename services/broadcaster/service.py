"""The cost-broadcaster service: the chip's output stage on the network (docs/architecture.md §2).

Sockets (all bound; endpoints are settings):

* ROUTER ``control``: nodes join, heartbeat and checkpoint; clients submit jobs and receive
  progress; the broadcaster assigns shards and answers "which C̃ did I miss?" requests.
* PULL ``weights``: every node's effective weights (and θ⁰ when it changed), per tick.
* PUB ``cost``: C̃ per tick on the topic ``cost/<job>``, plus job control (pause, stop).

With ``keys`` (the cluster's key directory, ``pmgd keys init``) every socket is a CurveZMQ
server: only clients whose public key is authorized connect, and every frame is encrypted
(``pmgd_node/shell/keys.py``). Without keys the sockets must stay on loopback.

One job runs at a time (one chip). Nodes that miss their heartbeats for
``heartbeat_timeout_s``, or do not take up an assigned shard within it, are declared lost: a
running job pauses, and once enough nodes are available again every shard restarts from the
job's last checkpoint (see ``job.JobRun``). With ``state_dir`` set, each checkpoint is also
written to disk and a restarted broadcaster resumes the unfinished job from it as soon as the
nodes re-join, under one new epoch: what they queued while it was down (heartbeats, Joins)
starts no further rollback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from collections import OrderedDict

import numpy as np
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from pmgd_node.shell import keys as cluster_keys
from pmgd_node.shell.settings import parse, serve
from services.chip.client import ChipError
from services.chip.job import summarize

from .job import JobRun


@dataclasses.dataclass(frozen=True)
class BroadcasterSettings:
    """Env ``PMGD_BROADCASTER_<FIELD>`` (flags override)."""

    control: str = "tcp://127.0.0.1:5555"
    weights: str = "tcp://127.0.0.1:5556"
    cost: str = "tcp://127.0.0.1:5557"
    heartbeat_timeout_s: float = 2.0
    poll_ms: int = 100
    state_dir: str = ""  # where checkpoints survive a broadcaster restart ("" = memory only)
    device: str = ""  # torch device for CNN forward passes ("" = cuda if available)
    evaluator: str = ""  # `pmgd evaluator` as the chip of every job without its own ("" = in-process)
    metrics_port: int = 0  # Prometheus /metrics on this port (0 = off)
    metrics_host: str = "127.0.0.1"
    keys: str = ""  # the cluster's key directory (env PMGD_KEYS too; "" = no CurveZMQ, loopback only)
    key_name: str = "client"  # our key pair as a client of the evaluator (and of chips beyond loopback)


def _mean(x: np.ndarray) -> float:
    """``float(np.mean(x))``, without np.mean's dispatch cost for the per-tick reports (the same
    value for float64: numpy's pairwise sum, then one division)."""
    if x.dtype == np.float64 and x.size:
        return float(np.add.reduce(x, axis=None)) / x.size
    return float(np.mean(x))


# A forward pass of at most this many images (C₀ and perturbed passes: 2·S·batch) runs on one
# torch thread. Measured on the project's 2-core machine (docs/benchmarks.md, issue 17): the
# CIFAR-10 CNN's tick at batch 1, 4 and 64 took 1.6, 1.5–2.2 and 14.7 ms with one thread
# against 5.4–6.0, 6.1–22 and 32–71 ms with two, whose OpenMP workers spin after every small
# pass and wait on each other whenever another process holds a core.
ONE_THREAD_IMAGES = 128
_torch_default_threads: list[int] = []  # torch's own choice, taken before the first change


def torch_threads(config: JobConfig) -> int | None:
    """Set torch's intra-op threads for ``config``'s forward passes: 1 for small passes, torch's
    default otherwise; returns the count set (None when torch is not loaded: a numpy model)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if not _torch_default_threads:
        _torch_default_threads.append(torch.get_num_threads())
    want = 1 if 2 * config.seeds * config.batch <= ONE_THREAD_IMAGES else _torch_default_threads[0]
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return want


class TickReports:
    """The per-tick reports since the last progress message (docs/cluster.md, Reports).

    A tick only appends the numbers it already holds (its C, held C₀ and C̃ arrays, the gather
    wait, …); the means and the dicts a progress message carries are built when it leaves,
    every ``eval_every`` ticks, off the tick's own path."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: list[tuple] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, tick: int, cost: np.ndarray, c0: np.ndarray | None, c_tilde: np.ndarray, staleness,
            node_ticks: np.ndarray | None, gather_wait_s: float, dropped: int) -> None:
        self._rows.append((tick, cost, c0, c_tilde, staleness, node_ticks, gather_wait_s, dropped))
        if len(self._rows) > 2 * self.capacity:  # trimmed now and then, not every tick
            del self._rows[:-self.capacity]

    def take(self) -> list[dict]:
        """The reports as dicts (the newest ``capacity``), and forget them."""
        rows, self._rows = self._rows[-self.capacity:], []
        means: dict[int, float] = {}  # one held C₀ serves many ticks

        def held(c0):
            if c0 is None:
                return None
            if id(c0) not in means:
                means[id(c0)] = _mean(c0)
            return means[id(c0)]

        return [{"tick": tick, "cost": _mean(cost), "c0": held(c0), "c_tilde": _mean(c_tilde),
                 # staleness: how many ticks old each node's shard was (0 in sync mode)
                 "staleness": staleness if isinstance(staleness, list) else staleness.tolist(),
                 "node_ticks": None if tags is None else tags.tolist(), "gather_wait_s": wait, "dropped": dropped}
                for tick, cost, c0, c_tilde, staleness, tags, wait, dropped in rows]


class BroadcasterMetrics:
    """The broadcaster's Prometheus series (served on ``metrics_port`` when set)."""

    STATES = ("idle", "waiting", "running", "paused")

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ticks = Counter("pmgd_broadcaster_ticks", "perturbed ticks served, all jobs", registry=r)
        self.job_tick = Gauge("pmgd_broadcaster_job_tick", "tick of the current job", registry=r)
        self.cost = Gauge("pmgd_broadcaster_cost", "C of the last perturbed tick, mean over runs", registry=r)
        self.c_tilde = Gauge("pmgd_broadcaster_c_tilde", "C̃ of the last tick, mean over runs", registry=r)
        self.gather_wait = Histogram("pmgd_broadcaster_gather_wait_seconds", "from one C̃ to the next", registry=r,
                                     buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.5))
        self.nodes = Gauge("pmgd_broadcaster_nodes", "nodes alive", registry=r)
        self.heartbeat_age = Gauge("pmgd_broadcaster_node_heartbeat_age_seconds", "since a node was last heard",
                                   ["node"], registry=r)
        self.staleness = Gauge("pmgd_broadcaster_node_staleness_ticks", "age of a shard's weights at the last tick",
                               ["shard"], registry=r)
        self.node_dropped = Gauge("pmgd_broadcaster_node_dropped_frames", "frames a node reports having dropped",
                                  ["node"], registry=r)
        self.dropped = Counter("pmgd_broadcaster_dropped_frames", "frames the broadcaster dropped, by reason",
                               ["reason"], registry=r)
        for reason in p.DROP_REASONS:  # every series from 0, so rate() sees the first drop
            self.dropped.labels(reason)
        self.checkpoints = Counter("pmgd_broadcaster_checkpoints", "job checkpoints completed", registry=r)
        self.state = Gauge("pmgd_broadcaster_state", "1 for the broadcaster's current state", ["state"], registry=r)
        self._labelled: set[str] = set()  # nodes with per-node series

    def tick_batch(self, ticks: int, last_tick: int, cost: float, c_tilde: float, waits: list[float],
                   staleness) -> None:
        """The tick series, for the ticks run since the last call (batched: per tick they cost
        more than the tick's own messaging at small P)."""
        self.ticks.inc(ticks)
        self.job_tick.set(last_tick + 1)
        self.cost.set(cost)
        self.c_tilde.set(c_tilde)
        for wait in waits:
            self.gather_wait.observe(wait)
        for k, age in enumerate(staleness):
            self.staleness.labels(str(k)).set(age)

    def refresh(self, state: str, nodes: dict, now: float) -> None:
        """Per-node and state gauges, every heartbeat check."""
        for s in self.STATES:
            self.state.labels(s).set(float(s == state))
        self.nodes.set(len(nodes))
        for gone in self._labelled - nodes.keys():  # a lost node's series end with it
            self.heartbeat_age.remove(gone)
            self.node_dropped.remove(gone)
        self._labelled = set(nodes)
        for node_id, info in nodes.items():
            self.heartbeat_age.labels(node_id).set(now - info.last_seen)
            self.node_dropped.labels(node_id).set(info.dropped)


@dataclasses.dataclass
class NodeInfo:
    identity: bytes
    last_seen: float
    pid: int = 0  # the process that joined: a Join from another pid is a new process
    shard: int = -1  # shard of the current job, −1 when idle
    dropped: int = 0  # malformed frames the node reports having dropped
    assigned_at: float = 0.0  # when its shard's Assign was sent
    took_up: bool = False  # a heartbeat under the job's epoch came after that Assign


class Broadcaster:
    MAX_REPORTS = 10_000
    def __init__(self, settings: BroadcasterSettings):
        self.s = settings
        keys = cluster_keys.load_optional(settings.keys, cluster_keys.SERVER)
        # our identity towards the evaluator, whose cost hop is one more authenticated link
        self.evaluator_keys = cluster_keys.load_optional(settings.keys if settings.evaluator else "",
                                                         settings.key_name)
        self._client_keys: cluster_keys.Keys | None = None  # towards a job's chip, loaded when first needed
        self.ctx = zmq.Context()
        self.auth = cluster_keys.guard(self.ctx, keys)  # before the first bind: no unchecked peer
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pub = self.ctx.socket(zmq.PUB)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # A node that reconnects under its id takes the id over: after a long partition our
        # side may still hold its old, half-open connection, and without handover ZeroMQ
        # would refuse the new one for ever (only authorized peers get this far).
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        for sock, ep in ((self.router, settings.control), (self.pull, settings.weights), (self.pub, settings.cost)):
            sock.setsockopt(zmq.LINGER, 0)
            cluster_keys.bind(sock, ep, keys, "PMGD_KEYS (or --keys)")
        self.nodes: dict[str, NodeInfo] = {}
        self._asked_to_join: dict[str, float] = {}  # unknown node → when we last answered it "rejoin"
        self.job: JobRun | None = None
        self.client: bytes | None = None
        self.state = "idle"  # idle · waiting (for nodes) · running · paused
        self.pause_reason = ""
        self.held = False  # paused by the client: no node event restarts the job until it resumes
        self._progress_checkpoint = 0  # checkpoints_taken when progress last carried θ⁰
        self.dropped: dict[str, int] = {}
        self.sent: OrderedDict[int, list[bytes]] = OrderedDict()  # recent C̃ frames, for resend requests
        self.running = True
        self.ticks = 0  # ticks served since start, all jobs
        self.saved = 0  # checkpoints written to state_dir
        self._saved_checkpoints = 0  # the job's checkpoints_taken when state_dir was last written
        self.resume_error = ""  # why a checkpoint found on disk at start was refused
        self._reports = TickReports(self.MAX_REPORTS)  # per-tick reports since the last progress message
        self._pending_waits: list[float] = []  # gather waits not yet in the metrics
        self._last_metrics: tuple | None = None  # the newest tick's numbers for the metrics
        self._last_publish = time.monotonic()
        self._next_tick_at = 0.0  # async: when the broadcaster's clock runs the next tick
        self.results: dict[str, dict] = {}  # summaries of finished jobs, by id
        self.metrics = BroadcasterMetrics()
        if settings.metrics_port:
            start_http_server(settings.metrics_port, settings.metrics_host, registry=self.metrics.registry)
        self._resume_from_disk()

    # --- helpers -------------------------------------------------------------------------------
    def _count(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.metrics.dropped.labels(reason).inc()

    def _to(self, identity: bytes, msg: p.Message) -> None:
        self.router.send_multipart([identity] + p.encode(msg), copy=False)

    def _publish(self, msg: p.Message) -> list[bytes]:
        frames = [p.cost_topic(msg.job)] + p.encode(msg)
        self.pub.send_multipart(frames, copy=False)
        return frames

    def _log(self, text: str) -> None:
        print(f"pmgd broadcaster: {text}", flush=True)

    def _chip_keys(self, config: JobConfig) -> cluster_keys.Keys | None:
        """Our keys towards a job's own chip (``config.chip``): the cluster's client pair when the
        chip is beyond loopback (there it must authenticate, docs/chip-protocol.md), none on
        loopback, where a chip may run without keys as any service of one machine may."""
        if not config.chip or not self.s.keys or cluster_keys.is_loopback(config.chip):
            return None
        if self._client_keys is None:
            self._client_keys = cluster_keys.load(self.s.keys, self.s.key_name)
        return self._client_keys

    def _state_path(self) -> str:
        return os.path.join(self.s.state_dir, "job.npz") if self.s.state_dir else ""

    def _resume_from_disk(self) -> None:
        path = self._state_path()
        if path and os.path.isdir(self.s.state_dir):
            for name in os.listdir(self.s.state_dir):
                if name.startswith("result-") and name.endswith(".json"):
                    with open(os.path.join(self.s.state_dir, name), encoding="utf-8") as f:
                        self.results[name[len("result-"):-len(".json")]] = json.load(f)
        if path and os.path.exists(path):
            try:
                job = JobRun.load(path, device=self.s.device or None, evaluator=self.s.evaluator,
                                   evaluator_keys=self.evaluator_keys, chip_keys=self._chip_keys)
            except (ValueError, ChipError) as err:  # damaged, foreign, or its chip does not answer: refused,
                # left on disk for a person to look at
                self.resume_error = str(err)
                self._log(f"refusing to resume: {err}")
                return
            self.job, self.state = job, "waiting"
            self._saved_checkpoints = job.checkpoints_taken
            torch_threads(job.config)
            self._log(f"resuming job {job.id} from its checkpoint at tick {job.checkpoint['tick']}")

    # --- job lifecycle ---------------------------------------------------------------------------
    def status(self) -> dict:
        now = time.monotonic()
        job = self.job
        return {"state": self.state, "pause_reason": self.pause_reason, "resume_error": self.resume_error,
                "dropped": dict(self.dropped),
                "ticks_served": self.ticks, "checkpoints_saved": self.saved,
                "nodes": {k: {"shard": n.shard, "last_seen_s": now - n.last_seen, "dropped": n.dropped}
                          for k, n in self.nodes.items()},
                "job": None if job is None else {"id": job.id, "tick": job.tick, "epoch": job.epoch,
                                                 "checkpoint_tick": job.checkpoint["tick"]},
                "finished": sorted(self.results)}

    def _submit(self, identity: bytes, msg: p.Submit) -> None:
        # Submitting is idempotent by job id: a client that lost its broadcaster (restart)
        # submits again and is attached to the resumed job, or handed its stored result.
        if msg.job in self.results:
            self._to(identity, p.Progress(msg.job, True, self.results[msg.job]))
            return
        if self.job is not None and msg.job == self.job.id:
            self.client = identity
            return
        if self.job is not None:
            self._to(identity, p.Progress(msg.job, True, {"error": f"busy with job {self.job.id}"}))
            return
        try:
            config = JobConfig.from_dict(msg.config)
            job = JobRun(msg.job or uuid.uuid4().hex[:12], config, device=self.s.device or None,
                         evaluator=self.s.evaluator, evaluator_keys=self.evaluator_keys,
                         chip_keys=self._chip_keys(config))
        except Exception as err:  # a config off the wire must never stop the service: besides
            # ConfigError, JobConfig raises TypeError/AttributeError for some wrong types
            # (fm_band: 1, task: None), and JobRun whatever its setup raises.
            self._to(identity, p.Progress(msg.job, True, {"error": str(err) or type(err).__name__}))
            return
        self.job, self.client, self.state = job, identity, "waiting"
        self._saved_checkpoints = job.checkpoints_taken
        torch_threads(config)
        self._log(f"job {job.id}: {config.task} on {config.nodes} node(s), waiting for nodes")
        self._try_start()

    def _try_start(self) -> None:
        """Assign every shard (from the checkpoint) once enough nodes are alive."""
        job = self.job
        if self.held:
            return
        holders = {n.shard for n in self.nodes.values() if n.shard >= 0}
        idle = [n for n in self.nodes.values() if n.shard < 0]
        missing = [k for k in range(len(job.shards)) if k not in holders]
        if self.state == "running" and job.asynchronous:
            # Async keeps ticking with a lost node's last shard; a newcomer takes the shard
            # over from that shard's newest checkpoint, and nobody else restarts.
            for k, node in zip(missing, idle):
                self._assign(node, k, job.reassign(k))
                self._log(f"job {job.id}: shard {k} reassigned to a new node")
            return
        if len(idle) < len(missing):
            return
        for k, node in zip(missing, idle):
            node.shard = k
        self.sent.clear()
        by_shard = {n.shard: n for n in self.nodes.values() if n.shard >= 0}
        for msg in job.assignments():
            self._assign(by_shard[msg.shard], msg.shard, msg)
        # A pause may still be on its way over PUB while these Assigns overtake it on ROUTER:
        # it carries the old epoch, so the nodes ignore it.
        self.state, self.pause_reason = "running", ""
        self._last_publish = self._next_tick_at = time.monotonic()
        self._log(f"job {job.id}: running from tick {job.tick} (epoch {job.epoch})")

    def _assign(self, node: NodeInfo, shard: int, msg: p.Assign) -> None:
        node.shard, node.assigned_at, node.took_up = shard, time.monotonic(), False
        self._to(node.identity, msg)

    def _finish(self) -> None:
        job = self.job
        self._flush_metrics()
        try:
            result = job.result()  # measures θ⁰ when the job has no evaluation yet: on its chip, if any
        except ChipError as err:
            self._fail(str(err))
            return
        job.close()
        summary = summarize(result)
        # wall_time_s counts from the submit (model, data, waiting for nodes); run_wall_time_s
        # from the first assignment, i.e. the ticks themselves (benchmarks/cluster_throughput.py).
        run_wall = None if job.run_started is None else time.perf_counter() - job.run_started
        summary.update(job=job.id, epochs=job.epoch, checkpoints=job.checkpoints_taken, run_wall_time_s=run_wall,
                       dropped=dict(self.dropped), theta0=job.static.tolist(),
                       trail=job.trail.hexdigest() if job.trail_valid else None,
                       uplink="replica" if job.replica else "full", resyncs=[list(r) for r in job.resyncs],
                       uplink_bytes=job.uplink_bytes, uplink_messages=job.uplink_messages,
                       uplink_state_bytes=job.uplink_state_bytes, uplink_state_messages=job.uplink_state_messages,
                       downlink_bytes=job.downlink_bytes, broadcaster_compute_s=job.compute_s,
                       gather_wait_s=job.gather_s)
        self._publish(p.Control(job.id, "stop", job.tick, reason="finished"))
        for n in self.nodes.values():
            if n.shard >= 0:
                self._to(n.identity, p.Control(job.id, "stop", job.tick, reason="finished"))
                n.shard = -1
        self.results[job.id] = summary
        if self.client is not None:
            self._to(self.client, p.Progress(job.id, True, summary))
        path = self._state_path()
        if path:
            result = os.path.join(self.s.state_dir, f"result-{job.id}.json")
            with open(result + ".tmp", "w", encoding="utf-8") as f:
                json.dump(summary, f)
            os.replace(result + ".tmp", result)  # the result is on disk before the checkpoint goes
            if os.path.exists(path):
                os.remove(path)
        self._log(f"job {job.id}: finished at tick {job.tick}, {summary['converged']}/{summary['runs']} converged")
        self.job, self.client, self.state, self.held = None, None, "idle", False

    def _fail(self, reason: str) -> None:
        """Abandon the job: tell the nodes and the client why."""
        job = self.job
        job.close()
        self._log(f"job {job.id}: failed: {reason}")
        self._publish(p.Control(job.id, "stop", job.tick, reason=reason))
        for n in self.nodes.values():
            n.shard = -1
        if self.client is not None:
            self._to(self.client, p.Progress(job.id, True, {"error": reason}))
        self.job, self.client, self.state, self.held = None, None, "idle", False

    def _lose(self, node_id: str, why: str) -> None:
        info = self.nodes.pop(node_id)
        self._log(f"node {node_id} lost ({why})")
        if self.job is not None and info.shard >= 0 and self.state == "running" and self.job.asynchronous:
            self._log(f"job {self.job.id}: shard {info.shard} runs on its last weights until a node takes it over")
        elif self.job is not None and info.shard >= 0 and self.state == "running":
            self.state, self.pause_reason = "paused", f"node {node_id} (shard {info.shard}) lost: {why}"
            self._publish(p.Control(self.job.id, "pause", self.job.tick, self.pause_reason, self.job.epoch))
            self._log(f"job {self.job.id}: paused at tick {self.job.tick}, waiting for a node")
        if self.job is not None and self.state in ("paused", "waiting"):
            self._try_start()

    # --- message handlers ------------------------------------------------------------------------
    def _on_control(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self._count("empty")
            return
        identity = frames[0]
        try:
            msg = p.decode(frames[1:])
        except p.ProtocolError as err:
            self._count(err.reason)
            return
        now = time.monotonic()
        if isinstance(msg, p.Join):
            self._asked_to_join.pop(msg.node_id, None)
            old = self.nodes.get(msg.node_id)
            if old is not None and old.shard >= 0 and self.job is not None:
                if msg.pid == old.pid and not old.took_up:
                    # The same process, and it has not yet heard its Assign: the Join left before
                    # the Assign arrived (queued while we were down, or the answer to a "rejoin"
                    # sent before the Assign), and the Assign replaces all of its state, so
                    # nothing was lost. Not taking the shard up in time still loses it (run).
                    self._log(f"node {msg.node_id}: join from before its assignment ignored")
                    return
                self._lose(msg.node_id, "re-joined")  # it lost its state: treat as a replacement
            self.nodes[msg.node_id] = NodeInfo(identity, now, msg.pid)
            self._log(f"node {msg.node_id} joined ({len(self.nodes)} alive)")
            if self.job is not None and (self.state in ("waiting", "paused") or self.job.asynchronous):
                self._try_start()
        elif isinstance(msg, p.Heartbeat):
            info = self.nodes.get(msg.node_id)
            if info is None:
                # After our restart a node's queued heartbeats arrive in a burst: ask it once per
                # heartbeat timeout, not once each (a Join lost on the way is asked for again).
                if now - self._asked_to_join.get(msg.node_id, -np.inf) > self.s.heartbeat_timeout_s:
                    self._asked_to_join[msg.node_id] = now
                    self._to(identity, p.Control(msg.job, "rejoin", reason="unknown node: join first"))
                return
            info.last_seen = now
            info.dropped = msg.dropped
            if self.job is not None and msg.job == self.job.id and msg.epoch == self.job.epoch:
                info.took_up = True
                frames_c = self.sent.get(msg.tick)
                if frames_c is not None:  # it missed this C̃ on PUB/SUB: send it directly
                    self.router.send_multipart([identity] + frames_c[1:], copy=False)
            self._to(identity, p.Heartbeat("broadcaster", self.job.id if self.job else "",
                                           self.job.epoch if self.job else 0, self.job.tick if self.job else 0))
        elif isinstance(msg, p.Checkpoint):
            if self.job is not None and msg.job == self.job.id:
                self.job.on_checkpoint(msg)
                self._save_new_checkpoint()
        elif isinstance(msg, p.Submit):
            self._submit(identity, msg)
        elif isinstance(msg, p.Status):
            self._to(identity, p.Status(self.status()))
        elif isinstance(msg, p.Control):
            # From a node: it is leaving. From a client: stop the job.
            node_id = next((k for k, v in self.nodes.items() if v.identity == identity), None)
            if node_id is not None:
                self._lose(node_id, msg.reason or "left")
            elif self.job is not None and msg.job == self.job.id:
                self._client_command(msg.command)
        else:
            self._count("unexpected")

    def _client_command(self, command: str) -> None:
        """stop ends the job (the client gets the summary so far); pause holds it; resume
        restarts every shard from the last checkpoint under a new epoch, as after a lost node."""
        job = self.job
        if command == "stop":
            job.finished = True
            self._finish()
        elif command == "pause" and not self.held:
            self.held = True
            if self.state == "running":
                self.state, self.pause_reason = "paused", "paused by the client"
                self._publish(p.Control(job.id, "pause", job.tick, self.pause_reason, job.epoch))
            self._log(f"job {job.id}: paused by the client at tick {job.tick}")
        elif command == "resume" and self.held:
            self.held = False
            self._log(f"job {job.id}: resumed by the client from the checkpoint at tick {job.checkpoint['tick']}")
            self._try_start()
        else:
            self._count("unexpected")

    def _save_new_checkpoint(self) -> None:
        """Persist every checkpoint the job completes, whether the last shard's state or the
        broadcaster's own boundary (``advance``) completed it."""
        job = self.job
        if job is None or job.checkpoints_taken == self._saved_checkpoints:
            return
        self._saved_checkpoints = job.checkpoints_taken
        self.metrics.checkpoints.inc()
        if self._state_path():
            os.makedirs(self.s.state_dir, exist_ok=True)
            job.save(self._state_path())
            self.saved += 1

    def _on_weights(self, frames: list[bytes]) -> None:
        try:
            msg = p.decode(frames)
        except p.ProtocolError as err:
            self._count(err.reason)
            return
        if not isinstance(msg, (p.Weights, p.Digest)):
            self._count("unexpected")
            return
        job = self.job
        if job is None or msg.job != job.id or self.state != "running":
            return
        size = sum(map(len, frames))
        job.uplink_bytes += size
        job.uplink_messages += 1
        if msg.static is not None:  # a θ⁰ shard: an update, a (re)start or a resync
            job.uplink_state_bytes += size
            job.uplink_state_messages += 1
        if isinstance(msg, p.Digest):
            refused = job.on_digest(msg)
            if refused == "resync":
                self._resync(msg.shard)
                return
        else:
            refused = job.on_weights(msg)
        if refused:
            self._count(refused)
        if job.asynchronous:
            return  # async: the broadcaster's own clock runs the ticks (see run)
        while self.job is not None and self.job.ready and self.state == "running":
            self._step()

    def _resync(self, shard: int) -> None:
        """The replica of a shard's θ⁰ disagrees with its node's checksum: ask the node for its θ⁰
        (a Control "resync" for this tick), or stop the job once it keeps disagreeing."""
        job = self.job
        node_id = next((k for k, n in self.nodes.items() if n.shard == shard), None)
        if job.resync_streak[shard] > job.MAX_RESYNCS or node_id is None:
            self._fail(f"shard {shard} (node {node_id}): its θ⁰ checksum at tick {job.tick} disagrees with the "
                       f"broadcaster's replica {int(job.resync_streak[shard])} times in a row, θ⁰ resent each "
                       "time: a node whose θ⁰ keeps changing outside its updates or does not arrive intact "
                       "(run the job with uplink 'full' to train on whatever it sends)")
            return
        self._log(f"job {job.id}: shard {shard} (node {node_id}) at tick {job.tick}: θ⁰ checksum disagrees with "
                  "the replica; asking for its θ⁰")
        self._to(self.nodes[node_id].identity, p.Control(job.id, "resync", job.tick, "θ⁰ checksum", job.epoch))

    def _step(self) -> None:
        """Run one tick of the job: evaluate if due, publish C̃, report; finish when done."""
        job = self.job
        now = time.monotonic()
        started = time.perf_counter()
        try:
            cost, point = job.advance()
        except ChipError as err:  # the chip stopped answering (after its retries) or refused a request
            self._fail(str(err))
            return
        job.compute_s += time.perf_counter() - started
        self._save_new_checkpoint()
        if cost is not None:
            frames = self.sent[cost.tick] = self._publish(cost)
            job.downlink_bytes += sum(map(len, frames))
            if len(self.sent) > 64:
                self.sent.popitem(last=False)
            self.ticks += 1
            stage = job.stage
            wait = now - self._last_publish
            job.gather_s += wait
            staleness = job.staleness(cost.tick)
            self._reports.add(cost.tick, stage.last_cost, getattr(stage.extractor, "c0", None), cost.c_tilde,
                              staleness, cost.tags, wait, self.total_dropped())
            self._pending_waits.append(wait)
            self._last_metrics = (cost.tick, stage.last_cost, cost.c_tilde, staleness)
            self._last_publish = time.monotonic()
        if point is not None and self.client is not None:
            data = {"tick": point.tick, "c0": point.c0_measurements, "cost": point.cost.tolist(),
                    "accuracy": point.accuracy.tolist(), "solved": int((job.t_sol >= 0).sum()),
                    "reports": self._reports.take(),
                    # so far: seconds in advance and waiting for shards (benchmarks/cluster_scale.py)
                    "broadcaster_compute_s": job.compute_s, "gather_wait_s": job.gather_s}
            if job.checkpoints_taken != self._progress_checkpoint:  # θ⁰ of a new checkpoint, once
                self._progress_checkpoint = job.checkpoints_taken
                ck = job.checkpoint
                data["checkpoint"] = {"tick": int(ck["tick"]), "theta0": np.concatenate(
                    [st["theta0"] for st in ck["shards"]], axis=-1).tolist()}
            self._to(self.client, p.Progress(job.id, False, data))
            self._flush_metrics()
        if cost is None:
            self._finish()

    def _flush_metrics(self) -> None:
        """The tick series of the ticks run since the last flush (every progress message and
        every heartbeat check, not every tick)."""
        if self._last_metrics is None:
            return
        tick, cost, c_tilde, staleness = self._last_metrics
        self.metrics.tick_batch(len(self._pending_waits), tick, _mean(cost), _mean(c_tilde), self._pending_waits,
                                staleness)
        self._pending_waits, self._last_metrics = [], None

    def total_dropped(self) -> int:
        """Malformed frames dropped by the broadcaster and (as reported) by every node."""
        return sum(self.dropped.values()) + sum(n.dropped for n in self.nodes.values())

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        self._log(f"control {self.s.control} · weights {self.s.weights} · cost {self.s.cost}")
        last_check = time.monotonic()
        while self.running:
            timeout = self.s.poll_ms
            job = self.job
            clocked = job is not None and job.asynchronous and self.state == "running"
            if clocked:
                timeout = max(0, min(timeout, int((self._next_tick_at - time.monotonic()) * 1000)))
            events = dict(poller.poll(timeout))
            if self.pull in events:
                # Zero-copy: a shard's arrays are read straight from ZeroMQ's buffers into the
                # job's θ⁰ + θ̃ (one copy, not two).
                _drain(self.pull, self._on_weights, copy=False)
            if self.router in events:
                _drain(self.router, self._on_control)
            now = time.monotonic()
            if clocked and self.job is job and self.state == "running" and now >= self._next_tick_at:
                # Async: tick on our own clock with the newest shard of every node (once each
                # has sent one). Falling behind does not make us burst to catch up.
                if job.ready:
                    self._step()
                self._next_tick_at = max(self._next_tick_at + job.config.tick_period, now)
            if now - last_check > self.s.heartbeat_timeout_s / 4:
                last_check = now
                for node_id, info in list(self.nodes.items()):
                    if now - info.last_seen > self.s.heartbeat_timeout_s:
                        self._lose(node_id, f"no heartbeat for {self.s.heartbeat_timeout_s:g} s")
                    elif info.shard >= 0 and not info.took_up and now - info.assigned_at > self.s.heartbeat_timeout_s:
                        # e.g. it restarted under the same pid (a container's) and its Join was
                        # taken for one from before the Assign: it never runs the shard.
                        self._lose(node_id, f"shard {info.shard} not taken up within {self.s.heartbeat_timeout_s:g} s")
                self._asked_to_join = {k: t for k, t in self._asked_to_join.items()
                                       if now - t <= self.s.heartbeat_timeout_s}
                self._flush_metrics()
                self.metrics.refresh(self.state, self.nodes, now)
        self.close()
        return 0

    def close(self) -> None:
        for sock in (self.router, self.pull, self.pub):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def _drain(sock: zmq.Socket, handle, copy: bool = True, most: int = 1000) -> None:
    """Hand every message waiting on ``sock`` (at most ``most``) to ``handle``. The socket's
    EVENTS say when it is empty: a receive that fails with Again would cost more than the
    message it did not get."""
    for _ in range(most):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return
        handle(frames)
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:
            return


def main(argv: list[str] | None = None) -> int:
    settings = parse(BroadcasterSettings, "PMGD_BROADCASTER_", "pmgd broadcaster", "run the PMGD cost-broadcaster",
                     argv)
    try:
        broadcaster = Broadcaster(settings)
    except cluster_keys.KeysError as err:
        raise SystemExit(f"pmgd broadcaster: {err}") from None
    return serve(broadcaster)


if __name__ == "__main__":
    sys.exit(main())
