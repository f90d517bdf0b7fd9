"""The parameter-node process: the thin I/O shell around :class:`~pmgd_node.node.ParameterNode`.

It joins a broadcaster, receives a shard and the job config, and then, in sync mode, runs
the lock-step loop

    send Weights(t) = θ⁰ + θ̃[t]  (and θ⁰ when it changed)  →  wait for C̃[t]
    offer C̃[t] to the downlink model; close tick t (hear what arrived, update if due)

With the replica uplink (``uplink`` "replica", sync) it sends Digest(t) instead: a checksum of
θ⁰, with θ⁰ itself only when it changed (or the broadcaster asks for it with "resync"); the
broadcaster regenerates θ̃[t] with the same code (docs/cluster.md).

It checkpoints its whole state every ``checkpoint_every`` ticks, heartbeats, re-joins when
the broadcaster goes silent (a restarted broadcaster re-assigns it from its checkpoint),
asks for a C̃ it has waited too long for (PUB/SUB may drop; state comes by request), and
leaves cleanly on a stop, SIGTERM or SIGINT. Every malformed frame is dropped and counted.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

import numpy as np
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .. import protocol as p
from ..config import JobConfig
from ..link import Clock, DelayLine, FateTable, Receiver, node_links
from ..node import ParameterNode
from . import keys as cluster_keys
from .settings import parse, serve


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    """Where the broadcaster listens and how patient a node is (env ``PMGD_*``, flags override)."""

    control: str = "tcp://127.0.0.1:5555"
    weights: str = "tcp://127.0.0.1:5556"
    cost: str = "tcp://127.0.0.1:5557"
    node_id: str = ""
    heartbeat_s: float = 0.5
    broadcaster_timeout_s: float = 3.0  # silence after which the node joins again
    resend_s: float = 0.5  # wait for a C̃ before asking the broadcaster for it directly
    metrics_port: int = 0  # Prometheus /metrics on this port (0 = off)
    metrics_host: str = "127.0.0.1"
    keys: str = ""  # the cluster's key directory (pmgd keys init; "" = no CurveZMQ, loopback only)
    key_name: str = "client"  # this node's key pair in it

    def with_node_id(self) -> NodeSettings:
        """These settings, with a host-and-pid node id when none was given."""
        return self if self.node_id else dataclasses.replace(self, node_id=f"{socket.gethostname()}-{os.getpid()}")


def _pending_arrays(rx: Receiver, runs: int) -> dict[str, np.ndarray]:
    items = rx.line.pending()
    return {
        "pending_arrival": np.array([a for a, _, _ in items], dtype=np.int64),
        "pending_tag": np.array([t for _, t, _ in items], dtype=np.int64),
        "pending_value": np.array([v for _, _, v in items], dtype=np.float64).reshape(len(items), runs),
    }


def _check_assign(a: p.Assign, shape: tuple[int, ...]) -> None:
    """Refuse an assignment whose arrays do not fit the shard (they would fail later, mid-tick)."""
    if a.theta0.dtype.kind != "f":
        raise ValueError(f"theta0 must be float32 or float64, got {a.theta0.dtype}")
    if a.gradient.shape != shape:
        raise ValueError(f"gradient has shape {a.gradient.shape}, expected {shape}")
    n = len(a.pending_arrival)
    if a.pending_arrival.shape != (n,) or a.pending_tag.shape != (n,) or a.pending_value.shape != (n, shape[0]):
        raise ValueError(f"pending C̃ arrays of shapes {a.pending_arrival.shape}, {a.pending_tag.shape}, "
                         f"{a.pending_value.shape} do not match {shape[0]} runs")


class NodeMetrics:
    """The node's Prometheus series (served on ``metrics_port`` when set)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ticks = Counter("pmgd_node_ticks", "ticks this node closed", registry=r)
        self.dropped = Counter("pmgd_node_dropped_frames", "frames dropped, by reason", ["reason"], registry=r)
        for reason in p.DROP_REASONS:  # every series from 0, so rate() sees the first drop
            self.dropped.labels(reason)
        # Sync: one round trip per tick (weights out, forward pass, C̃ back); async: the C̃
        # that arrives after our weights, whatever tick it is for.
        self.cost_wait = Histogram("pmgd_node_cost_wait_seconds", "from sending weights to hearing C̃", registry=r,
                                   buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.5))
        self.resends = Counter("pmgd_node_resend_requests", "C̃ asked for again after resend_s", registry=r)
        self.joins = Counter("pmgd_node_joins", "joins sent to the broadcaster", registry=r)
        self.shard_params = Gauge("pmgd_node_shard_params", "parameters in this node's shard", registry=r)
        self._ticks, self._waits = 0, []  # since the last flush

    def tick(self, wait: float | None) -> None:
        """A tick closed (``wait``: seconds from our weights to its C̃, when one was heard);
        kept until :meth:`flush`, since updating the series costs more than a small tick."""
        self._ticks += 1
        if wait is not None:
            self._waits.append(wait)

    def heard(self, wait: float) -> None:
        """A C̃ heard ``wait`` seconds after our weights went (async: not tied to a tick)."""
        self._waits.append(wait)

    def flush(self) -> None:
        """Bring the tick series up to date (every heartbeat)."""
        if self._ticks:
            self.ticks.inc(self._ticks)
        for wait in self._waits:
            self.cost_wait.observe(wait)
        self._ticks, self._waits = 0, []


class NodeProcess:
    def __init__(self, settings: NodeSettings):
        self.s = settings
        keys = cluster_keys.load_optional(settings.keys, settings.key_name)
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.ROUTING_ID, settings.node_id.encode())
        self.weights = self.ctx.socket(zmq.PUSH)
        self.cost = self.ctx.socket(zmq.SUB)
        self.handshake = cluster_keys.Handshake(self.control, settings.control, keys)
        self._refused = ""  # the handshake failure last logged
        for sock, ep in ((self.control, settings.control), (self.weights, settings.weights),
                         (self.cost, settings.cost)):
            sock.setsockopt(zmq.LINGER, 0)
            cluster_keys.connect(sock, ep, keys)
        self.cost.setsockopt(zmq.SUBSCRIBE, b"cost/")  # every job: late joiners lose nothing (see resend)
        self.dropped: dict[str, int] = {}
        self.metrics = NodeMetrics()
        if settings.metrics_port:
            start_http_server(settings.metrics_port, settings.metrics_host, registry=self.metrics.registry)
        self.running = True
        self._reset_job()

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.metrics.dropped.labels(reason).inc()

    def _join(self) -> None:
        self._send_control(p.Join(self.s.node_id, os.getpid()))
        self.metrics.joins.inc()

    def _reset_job(self) -> None:
        self.job = ""
        self.epoch = 0
        self.node: ParameterNode | None = None
        self.rx: Receiver | None = None
        self.config: JobConfig | None = None
        self.tick = 0
        self.shard = -1
        self.paused = False
        self._static_sent = False
        self.replica = False  # the job's uplink: Digest (True) or Weights
        self.clock: Clock | None = None  # async: this node's own tick clock
        self.uplink = None
        self._up_line = DelayLine()  # async: weights waiting out their uplink delay

    # --- sending -------------------------------------------------------------------------
    def _send(self, sock: zmq.Socket, msg: p.Message) -> None:
        # Never block: with the broadcaster gone a PUSH/DEALER send would wait for it forever.
        # A lost message is recovered by the resend and re-join logic below.
        try:
            sock.send_multipart(p.encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    def _send_control(self, msg: p.Message) -> None:
        self._send(self.control, msg)

    def _send_weights(self) -> None:
        node = self.node
        if self.replica:
            # The broadcaster regenerates θ̃ and holds a replica of our θ⁰: it needs θ⁰ only when
            # it changed, and otherwise a checksum of the θ⁰ we hold now (which also catches a θ⁰
            # changed outside an update; pmgd_node/protocol.py, Digest).
            static = None if self._static_sent else node.theta0
            self._static_sent = True
            self._sent_at = time.monotonic()
            self._send(self.weights, p.Digest(self.job, self.epoch, self.shard, self.tick, p.checksum(node.theta0),
                                              static))
            return
        # Async: always send θ⁰, because the uplink may drop the message that carried a change.
        static = None if self._static_sent and self.clock is None else node.theta0
        msg = p.Weights(self.job, self.epoch, self.shard, self.tick, node.effective_weights(self.tick), static)
        self._static_sent = True
        self._sent_at = time.monotonic()
        if self.clock is None:
            self._send(self.weights, msg)
            return
        delay = self.uplink.fate(self.tick)
        if delay is not None:
            self._up_line.push(self.tick + delay, self.tick, msg)

    def _clock_due(self) -> float:
        """Async: seconds until our next local tick starts."""
        start = self._t0 + self.clock.start(self.tick + 1) * self.config.tick_period
        return start - time.monotonic()

    def _advance_clock(self) -> None:
        """Async: if our tick has ended, close it and send the weights of the next one.

        One tick per pass of the loop, so heartbeats and C̃ are still served when the
        process cannot keep up with τ_p (it then runs late rather than going deaf).
        """
        if self._clock_due() <= 0:
            if self.rx.close_tick(self.tick):
                self._static_sent = False
            self.tick += 1
            self.metrics.tick(None)
            if self.tick % self.config.checkpoint_every == 0:
                self._checkpoint()
            self._send_weights()
            for _, msg in self._up_line.due(self.tick):
                self._send(self.weights, msg)

    def _checkpoint(self) -> None:
        node = self.node
        self._send_control(p.Checkpoint(self.job, self.epoch, self.shard, self.tick, node.updates, node.theta0,
                                        node.gradient, **_pending_arrays(self.rx, self.config.seeds)))

    # --- receiving -----------------------------------------------------------------------
    def _decode(self, frames: list[bytes]) -> p.Message | None:
        try:
            return p.decode(frames)
        except p.ProtocolError as err:
            self._drop(err.reason)
            return None

    def _on_assign(self, a: p.Assign) -> None:
        try:
            config = JobConfig.from_dict(a.config)
            # θ⁰ keeps its wire dtype (float32 for the CNNs), as the engine's nodes do.
            node = ParameterNode(config, a.num_params, a.start, a.stop, np.array(a.theta0))
            _check_assign(a, node.theta0.shape)
            node.restore(a.theta0, a.gradient, a.updates)
        except Exception as err:  # off the wire: never fatal. Besides ValueError, JobConfig raises
            # TypeError/AttributeError for some wrong types (fm_band: 1, task: None).
            self._drop("assign")
            print(f"pmgd node {self.s.node_id}: rejected assignment: {err!r}", file=sys.stderr, flush=True)
            return
        self._reset_job()
        self.job, self.epoch, self.shard, self.tick, self.config = a.job, a.epoch, a.shard, a.tick, config
        self.replica = p.replica_uplink(config)
        self._start_tick = a.tick
        self.node = node
        self.metrics.shard_params.set(a.stop - a.start)
        down, up = node_links(config, a.shard)
        self.rx = Receiver(node, FateTable(down))
        for arrival, tag, value in zip(a.pending_arrival, a.pending_tag, a.pending_value):
            self.rx.line.push(int(arrival), int(tag), np.array(value))
        if config.timing == "async":
            self.clock = Clock(config.seed, a.shard, config.link(a.shard)["drift"])
            self.uplink = FateTable(up)
            self._t0 = time.monotonic() - self.clock.start(self.tick) * config.tick_period
            self._send_weights()
            for _, msg in self._up_line.due(self.tick):
                self._send(self.weights, msg)
            return
        self._send_weights()

    def _on_cost(self, c: p.CostVariation) -> None:
        if c.job != self.job or c.epoch != self.epoch or self.node is None:
            return  # another job or a rolled-back epoch
        if self.clock is not None:  # async: correlate with the tick of the shard that was used
            if c.tags is None or c.tags.shape != (len(c.tags),) or not 0 <= self.shard < len(c.tags) \
                    or c.c_tilde.shape != (self.config.seeds,):
                self._drop("shape")
                return
            tag = int(c.tags[self.shard])
            if not self._start_tick <= tag <= self.tick:
                # Before our (re)start, the C̃ was made with another node's weights for this
                # shard; after our tick it is impossible. Neither is ours to correlate.
                return
            self.rx.offer(c.c_tilde, tag, self.tick, seq=c.seq)
            self.metrics.heard(time.monotonic() - self._sent_at)
            return
        if c.tick != self.tick:
            return  # a duplicate of a tick already closed
        if c.c_tilde.shape != (self.config.seeds,):
            self._drop("shape")
            return
        wait = time.monotonic() - self._sent_at
        rx = self.rx
        if rx.link.ideal and not len(rx.line):
            changed = self.node.receive(c.c_tilde, c.tick)  # what offer + close_tick do on an ideal link
        else:
            rx.offer(c.c_tilde, c.tick, self.tick)
            changed = rx.close_tick(self.tick)
        if changed:
            self._static_sent = False  # θ⁰ changed: the next weights carry it
        self.tick += 1
        self.metrics.tick(wait)
        if self.tick % self.config.checkpoint_every == 0:
            self._checkpoint()
        if not self.paused:
            self._send_weights()

    def _on_control(self, c: p.Control) -> None:
        if c.command == "rejoin":  # a restarted broadcaster re-assigns us from its checkpoint
            self._reset_job()
            self._join()
            return
        if c.job != self.job:
            return
        if c.command == "stop":
            self._reset_job()
        elif c.epoch != self.epoch:
            return  # a pause sent before our latest Assign (PUB and ROUTER do not keep order)
        elif c.command == "pause":
            self.paused = True
        elif c.command in ("resume", "start") and self.paused:
            self.paused = False
            self._send_weights()
        elif c.command == "resync" and self.replica and c.tick == self.tick and not self.paused:
            self._static_sent = False  # the broadcaster's replica of our θ⁰ is off: send it θ⁰
            self._send_weights()

    # What a broadcaster sends a node directly (control) and what it publishes (cost): any
    # other valid message on that socket is dropped and counted as 'unexpected' (an Assign
    # never comes by PUB).
    CONTROL_KINDS = (p.Assign, p.Control, p.CostVariation, p.Heartbeat)
    COST_KINDS = (p.CostVariation, p.Control)

    def _receive(self, frames: list[bytes], kinds: tuple[type, ...]) -> None:
        msg = self._decode(frames)
        if msg is not None and not isinstance(msg, kinds):
            self._drop("unexpected")
            return
        self.handle(msg)

    def _on_control_frames(self, frames: list[bytes]) -> None:
        self._receive(frames, self.CONTROL_KINDS)

    def _on_cost_frames(self, frames: list[bytes]) -> None:
        self._receive(frames[1:], self.COST_KINDS)  # after the topic; none left: 'empty'

    def handle(self, msg: p.Message | None) -> None:
        if isinstance(msg, p.Assign):
            self._on_assign(msg)
        elif isinstance(msg, p.CostVariation):
            self._on_cost(msg)
        elif isinstance(msg, p.Control):
            self._on_control(msg)

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.cost, zmq.POLLIN)
        self._join()
        last_heard = last_beat = time.monotonic()
        self._sent_at = last_heard
        while self.running:
            timeout = self.s.heartbeat_s / 2
            if self.clock is not None and not self.paused:
                timeout = max(0.0, min(timeout, self._clock_due()))
            events = dict(poller.poll(int(timeout * 1000)))
            now = time.monotonic()
            if self.control in events:
                last_heard = now
                _drain(self.control, self._on_control_frames)
            if self.cost in events:
                last_heard = now
                _drain(self.cost, self._on_cost_frames)
            if now - last_beat >= self.s.heartbeat_s:
                self._log_refusal()
                self.metrics.flush()
                self._send_control(p.Heartbeat(self.s.node_id, self.job, self.epoch, self.tick,
                                               sum(self.dropped.values())))
                last_beat = now
            if self.clock is not None and not self.paused:
                self._advance_clock()
            elif self.node is not None and not self.paused and now - self._sent_at > self.s.resend_s:
                # No C̃ for our tick yet: ask for it (the heartbeat carries our tick) and resend
                # the weights in case they were the ones lost.
                self._send_control(p.Heartbeat(self.s.node_id, self.job, self.epoch, self.tick,
                                               sum(self.dropped.values())))
                self.metrics.resends.inc()
                if self.replica:
                    self._static_sent = False  # the lost message may have been the one with θ⁰
                self._send_weights()
            if now - last_heard > self.s.broadcaster_timeout_s:
                print(f"pmgd node {self.s.node_id}: broadcaster silent for {now - last_heard:.1f} s; joining again",
                      flush=True)
                self._reset_job()  # the broadcaster restarts jobs from its checkpoints
                self._join()
                last_heard = now
        self._send_control(p.Control(self.job, "stop", self.tick, reason="node leaving"))
        self.close()
        return 0

    def _log_refusal(self) -> None:
        """Say once why the broadcaster refuses our handshake (ZeroMQ keeps retrying: a key
        authorized later, or a fixed server key, lets us in without a restart)."""
        why = self.handshake.failure()
        if why and why != self._refused:
            print(f"pmgd node {self.s.node_id}: {why}", file=sys.stderr, flush=True)
        self._refused = why

    def close(self) -> None:
        self.handshake.close()
        for sock in (self.control, self.weights, self.cost):
            sock.close(linger=0)
        self.ctx.term()


def _drain(sock: zmq.Socket, handle, most: int = 100) -> None:
    """Hand every message waiting on ``sock`` (at most ``most``) to ``handle``; the socket's
    EVENTS say when it is empty (a receive failing with Again costs more than a small tick)."""
    for _ in range(most):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        handle(frames)
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:
            return


def main(argv: list[str] | None = None) -> int:
    settings = parse(NodeSettings, "PMGD_", "pmgd node", "run one PMGD parameter node", argv)
    try:
        proc = NodeProcess(settings.with_node_id())
    except cluster_keys.KeysError as err:
        raise SystemExit(f"pmgd node: {err}") from None
    print(f"pmgd node {proc.s.node_id}: joining {proc.s.control}", flush=True)
    return serve(proc)
