"""Fuzzing every socket of the broadcaster and of a node with thousands of bad frames.

A process on the network must never crash on what arrives, and every frame it drops must be
counted (the broadcaster by reason in ``status()['dropped']``, a node as the total in its
``Heartbeat.dropped``). The corpus is reproducible (fixed seed): random bytes, random
multi-frame lists and mutations of valid encoded messages of every type (bit flips,
truncation, extra or missing frames, wrong version or type, swapped arrays, huge declared
shapes, bad array specs, wrong field types, array frames of the wrong size), plus valid
messages of the wrong kind for the socket.

The expected counts are not guessed: each frame is run through ``protocol.decode`` here, and
a frame that happens to decode is classified exactly as the receiving code does (ignored, or
counted as ``unexpected``). Frames with side effects that would change the process's state
(a valid Join or Submit to the broadcaster, a valid Assign to a node's control socket) are
left out of the random corpus; the deliberate wrong-but-valid messages are sent on purpose
and checked separately.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from pmgd_node.shell import keys as cluster_keys
from services.cluster.client import run_job, status
from services.cluster.launcher import LocalCluster, _die_with_parent, free_port

SEED = 20_240_611
N_FRAMES = 2000  # per socket
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# --- the corpus ---------------------------------------------------------------------------------

_PARITY2 = JobConfig(task="parity2", nodes=1).to_dict()
_P = 9  # parameters of the 2-2-1 MLP
_NO_PENDING = dict(pending_arrival=np.zeros(0, np.int64), pending_tag=np.zeros(0, np.int64),
                   pending_value=np.zeros((0, 1)))


def _templates(rng: np.random.Generator) -> list[p.Message]:
    a = rng.normal(size=(2, 3))
    pend = dict(pending_arrival=np.array([4, 5]), pending_tag=np.array([3, 4]), pending_value=rng.normal(size=(2, 2)))
    return [
        p.Join("fz-join", pid=1234),
        p.Assign("fzt", 1, 0, 0, 3, 3, 7, 2, {"task": "parity2", "seeds": 2}, a, a * 0.5, **pend),
        p.Control("fzt", "pause", tick=3, reason="x"),
        p.Heartbeat("fz-hb", "fzt", 1, 42, 3),
        p.Checkpoint("fzt", 1, 0, 10, 2, a, a, **pend),
        p.Weights("fzt", 1, 0, 12, a, a),
        p.Weights("fzt", 1, 0, 12, a.astype(np.float32), None),
        p.CostVariation("fzt", 1, 5, 5, np.array([0.25, -0.5]), np.array([5, 5], dtype=np.int64)),
        p.CostVariation("fzt", 1, 5, 5, np.array([0.25, -0.5])),
        p.Submit("fzt-submit", {"task": "parity2", "max_ticks": 10}),
        p.Progress("fzt", True, {"ticks": 10, "cost": [0.5]}),
        p.Status({}),
    ]


def _repack(frames: list[bytes], change) -> list[bytes]:
    header = msgpack.unpackb(frames[0], raw=False)
    change(header)
    return [msgpack.packb(header, use_bin_type=True)] + frames[1:]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _set(key, value):
    def change(h):
        h[key] = value
    return change


def _delete(key):
    return lambda h: h.pop(key, None)


def _flip_bits(rng, frames):
    frames = list(frames)
    k = 0 if rng.random() < 0.75 or len(frames) == 1 else int(rng.integers(1, len(frames)))
    buf = bytearray(frames[k] or b"\x00")
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(len(buf) * 8))
        buf[i // 8] ^= 1 << (i % 8)
    frames[k] = bytes(buf)
    return frames


def _truncate(rng, frames):
    frames = list(frames)
    k = int(rng.integers(len(frames)))
    frames[k] = frames[k][: int(rng.integers(len(frames[k]))) if frames[k] else 0]
    return frames


def _grow_array(rng, frames):  # valid header, array frame of the wrong size
    frames = list(frames)
    if len(frames) == 1:
        return frames + [rng.bytes(8)]
    k = int(rng.integers(1, len(frames)))
    frames[k] = frames[k] + rng.bytes(int(rng.integers(1, 17)))
    return frames


def _extra_frames(rng, frames):
    return list(frames) + [rng.bytes(int(rng.integers(0, 33))) for _ in range(int(rng.integers(1, 4)))]


def _drop_frame(rng, frames):
    if len(frames) == 1:
        return [rng.bytes(int(rng.integers(0, 9)))] + list(frames)  # a stray frame before the header
    k = int(rng.integers(1, len(frames)))
    return list(frames[:k]) + list(frames[k + 1:])


def _wrong_version(rng, frames):
    if rng.random() < 0.15:
        return _repack(frames, _delete("v"))
    return _repack(frames, _set("v", _pick(rng, [0, 2, -1, 255, "1", None, 1.5, [1], {"v": 1}, 1.0, True])))


def _wrong_type(rng, frames):
    if rng.random() < 0.15:
        return _repack(frames, _delete("t"))
    names = list(p.MESSAGES)  # another valid type name over these fields: mostly field/array errors
    return _repack(frames, _set("t", _pick(rng, ["nope", "", 7, None, "JOIN", "joins", ["join"], *names])))


def _swap_arrays(rng, frames):
    if len(frames) >= 3:
        frames = list(frames)
        i, j = rng.choice(np.arange(1, len(frames)), size=2, replace=False)
        frames[i], frames[j] = frames[j], frames[i]
        return frames
    if len(frames) == 2:
        return [frames[1], frames[0]]
    return _repack(frames, lambda h: h.__setitem__("a", list(reversed(h.get("a", []))) + [["<f8", [1]]]))


_HUGE = [[2**31 - 1] * 4, [65536] * 4, [2**30, 2**30], [2**16, 2**16, 2**16, 2**16], [2**31], [1 << 40],
         [10**9, 10**9, 10**9], [2**21, 2**21, 2**22]]


def _huge_shape(rng, frames):
    header = msgpack.unpackb(frames[0], raw=False)
    specs = [i for i, s in enumerate(header.get("a") or []) if s is not None]
    if not specs:
        return _repack(frames, _set("a", [["<f8", _pick(rng, _HUGE)]]))
    k = _pick(rng, specs)
    header["a"][k] = [header["a"][k][0], _pick(rng, _HUGE)]
    out = [msgpack.packb(header, use_bin_type=True)] + list(frames[1:])
    if rng.random() < 0.5:  # an empty array frame: the declared byte count must not wrap around to 0
        idx = 1 + sum(1 for s in header["a"][:k] if s is not None)
        if idx < len(out):
            out[idx] = b""
    return out


_BAD_SPECS = [["<f2", [1]], [">f8", [1]], ["<c16", [1]], ["<f8"], ["<f8", [1], 0], ["<f8", "3"], ["<f8", [-1]],
              ["<f8", [1, 1, 1, 1, 1]], ["<f8", [True]], ["<f8", [1.0]], ["<f8", [None]], 5, "x", {"a": 1},
              [b"<f8", [1]], ["<i8", [2**31]]]


def _bad_spec(rng, frames):
    header = msgpack.unpackb(frames[0], raw=False)
    specs = header.get("a") or []
    roll = rng.random()
    if roll < 0.2 or not specs:
        header["a"] = _pick(rng, [None, {}, "xx", 3, specs + [None], specs[:-1]])
    else:
        k = int(rng.integers(len(specs)))
        if roll < 0.35 and specs[k] is not None:  # same itemsize, other kind: still decodes
            specs[k] = [{"<f8": "<i8", "<i8": "<f8", "<f4": "<f8"}[specs[k][0]], specs[k][1]]
        else:
            specs[k] = _pick(rng, _BAD_SPECS)
    return [msgpack.packb(header, use_bin_type=True)] + list(frames[1:])


_WRONG_VALUES = ["x", "", 1, -1, 0, 2**63, -(2**63), True, False, None, 1.5, float("nan"), [1], {"k": 1}, b"\x00"]


def _field_type(rng, frames):
    header = msgpack.unpackb(frames[0], raw=False)
    keys = [k for k in header if k not in ("v", "t", "a")]
    if not keys:
        return _repack(frames, _set("zz", 1))
    header[_pick(rng, keys)] = _pick(rng, _WRONG_VALUES)
    return [msgpack.packb(header, use_bin_type=True)] + list(frames[1:])


def _drop_field(rng, frames):
    header = msgpack.unpackb(frames[0], raw=False)
    keys = [k for k in header if k not in ("v", "t", "a")]
    if keys:
        del header[_pick(rng, keys)]
    return [msgpack.packb(header, use_bin_type=True)] + list(frames[1:])


def _extra_field(rng, frames):  # unknown keys are ignored: usually still a valid message
    return _repack(frames, _set(_pick(rng, ["zz", "extra", "job2"]), _pick(rng, _WRONG_VALUES)))


def _not_a_map(rng, frames):
    junk = _pick(rng, [[1, 2], 5, "x", None, b"\x00", 1.5, [], True])
    return [msgpack.packb(junk, use_bin_type=True)] + list(frames[1:])


def _bad_msgpack(rng, frames):
    choice = int(rng.integers(6))
    if choice == 0:
        head = msgpack.packb({1: 2, "v": 1, "t": "join"})  # non-string keys
    elif choice == 1:
        head = b"\x91" * 5000 + b"\xc0"  # nested 5000 deep
    elif choice == 2:
        head = b"\xdb\xff\xff\xff\xff" + b"a" * 8  # a str claiming 4 GiB
    elif choice == 3:
        head = b"\xc7\x01\xff\x00"  # a malformed timestamp extension
    elif choice == 4:
        head = frames[0] + rng.bytes(int(rng.integers(1, 9)))  # trailing bytes after the map
    else:
        head = frames[0][: max(1, len(frames[0]) // 2)]
    return [head] + list(frames[1:])


def _bad_command(rng, frames):
    header = msgpack.unpackb(frames[0], raw=False)
    if header.get("t") != "control":
        header = {"v": 1, "t": "control", "job": "fzt", "a": []}
    header["command"] = _pick(rng, ["halt", "", "STOP", "start ", "pause\x00", "resume!"])
    return [msgpack.packb(header, use_bin_type=True)]


def _random_bytes(rng, frames):
    return [rng.bytes(int(rng.integers(0, 65)))]


def _random_frames(rng, frames):
    return [rng.bytes(int(rng.integers(0, 49))) for _ in range(int(rng.integers(2, 7)))]


MUTATORS = [_random_bytes, _random_frames, _flip_bits, _truncate, _grow_array, _extra_frames, _drop_frame,
            _wrong_version, _wrong_type, _swap_arrays, _huge_shape, _bad_spec, _field_type, _drop_field,
            _extra_field, _not_a_map, _bad_msgpack, _bad_command]


def corpus(rng: np.random.Generator, n: int, topic: bool = False) -> list[list[bytes]]:
    """``n`` random or mutated frame lists; ``topic``: as published (mostly a leading topic frame)."""
    templates = [p.encode(m) for m in _templates(rng)]
    out = []
    for _ in range(n):
        frames = _pick(rng, MUTATORS)(rng, _pick(rng, templates))
        assert frames and all(isinstance(f, bytes) for f in frames)
        if topic:
            roll = rng.random()
            if roll < 0.8:
                frames = [p.cost_topic(_pick(rng, ["fzt", "", "other", "x" * 40]))] + frames
            elif roll < 0.9:
                frames = [b"cost/fzt"]  # topic without a message
            # else: no topic frame at all (the SUB prefix filter decides whether it arrives)
        out.append(frames)
    return out


def decoded(frames: list[bytes]) -> p.Message | str:
    """The message, or the ProtocolError reason a receiver counts."""
    try:
        return p.decode(frames)
    except p.ProtocolError as err:
        return err.reason


# What each receiver does with a frame list: the reason it counts, or None (handled or ignored).
# These mirror services/broadcaster/service.py and pmgd_node/shell/process.py.
_BROADCASTER_CONTROL_KINDS = (p.Join, p.Heartbeat, p.Checkpoint, p.Submit, p.Status, p.Control)
_NODE_CONTROL_KINDS = (p.Assign, p.Control, p.CostVariation, p.Heartbeat)
_NODE_COST_KINDS = (p.CostVariation, p.Control)


def _verdict(msg, kinds) -> str | None:
    if isinstance(msg, str):
        return msg
    return None if isinstance(msg, kinds) else "unexpected"


def broadcaster_control_verdict(frames):
    return _verdict(decoded(frames), _BROADCASTER_CONTROL_KINDS)


def broadcaster_weights_verdict(frames):
    return _verdict(decoded(frames), (p.Weights,))


def node_control_verdict(frames):
    return _verdict(decoded(frames), _NODE_CONTROL_KINDS)


def node_cost_verdict(frames):
    if not frames[0].startswith(b"cost/"):
        return None  # filtered out by the SUB socket's subscription: never reaches the node
    if len(frames) == 1:
        return "empty"
    return _verdict(decoded(frames[1:]), _NODE_COST_KINDS)


def split(frames_list, verdict, side_effects=()):
    """(frames to send, Counter of expected drop reasons, how many were left out)."""
    send, expected, left_out = [], collections.Counter(), 0
    for frames in frames_list:
        msg = decoded(frames)
        if isinstance(msg, side_effects):
            left_out += 1
            continue
        reason = verdict(frames)
        if reason is not None:
            expected[reason] += 1
        send.append(frames)
    return send, expected, left_out


# --- helpers ------------------------------------------------------------------------------------

def _wait(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _log_tail(path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")
    except OSError:
        return "(no log)"


def _status_or_none(control: str, keys) -> dict | None:
    try:
        return status(control, timeout_s=1.0, keys=keys)
    except TimeoutError:
        return None


def _send_paced(sock, batches, prefix=(), batch=250, pause=0.02):
    for i in range(0, len(batches), batch):
        for frames in batches[i:i + batch]:
            sock.send_multipart([*prefix, *frames])
        time.sleep(pause)


# --- decode itself --------------------------------------------------------------------------------

def test_decode_raises_only_protocol_error_on_the_corpus():
    rng = np.random.default_rng(SEED)
    reasons = collections.Counter()
    for frames in corpus(rng, 6000) + [f[1:] for f in corpus(rng, 2000, topic=True) if len(f) > 1]:
        msg = decoded(frames)  # anything but a ProtocolError propagates and fails the test
        reasons[msg if isinstance(msg, str) else "valid"] += 1
    # The corpus reaches every check of decode, and a few mutations stay valid.
    assert {"header", "version", "type", "arrays", "truncated", "field", "valid"} <= set(reasons), reasons
    assert reasons["valid"] < 0.2 * sum(reasons.values())


@pytest.mark.parametrize("shape", [[65536] * 4, [2**22, 2**21, 2**21], [2**30] * 4])
def test_declared_shape_whose_byte_count_overflows_int64_is_a_protocol_error(shape):
    # The element count of these shapes is a multiple of 2⁶⁴: in int64 it wraps to 0, so an
    # empty frame must not pass the size check (and then fail to reshape with a bare ValueError).
    header = {"v": 1, "t": "weights", "job": "j", "epoch": 1, "shard": 0, "tick": 0, "a": [["<f8", shape], None]}
    with pytest.raises(p.ProtocolError) as err:
        p.decode([msgpack.packb(header), b""])
    assert err.value.reason == "truncated"


# --- the broadcaster -----------------------------------------------------------------------------

_BAD_SUBMITS = {  # job id → config: each is answered with an error and starts nothing
    "fz-bad-band": {"fm_band": 1},  # not iterable: TypeError in JobConfig
    "fz-bad-task": {"task": None},  # AttributeError in JobConfig
    "fz-bad-field": {"bogus": 1},
    "fz-bad-seeds": {"seeds": 0},
    "fz-bad-async": {"timing": "async"},  # valid config, refused by JobRun
    "fz-bad-nodes": {"nodes": 50},  # more nodes than the 9 parameters of parity2
}


def _broadcaster_wrong_kind() -> tuple[list[list[bytes]], list[list[bytes]]]:
    """Valid messages of a kind the socket does not take (control, weights)."""
    a = np.ones((1, _P))
    to_control = [p.Assign("fzt", 1, 0, 0, _P, _P, 0, 0, _PARITY2, a, a * 0, **_NO_PENDING),
                  p.Weights("fzt", 1, 0, 0, a), p.CostVariation("fzt", 1, 0, 0, np.zeros(1)),
                  p.Progress("fzt", False, {})]
    to_weights = [p.Join("fz-w"), p.Heartbeat("fz-w"), p.Submit("fzt", _PARITY2), p.Status({}),
                  p.Control("fzt", "stop"), p.Checkpoint("fzt", 1, 0, 1, 0, a, a, **_NO_PENDING),
                  p.Assign("fzt", 1, 0, 0, _P, _P, 0, 0, _PARITY2, a, a * 0, **_NO_PENDING),
                  p.CostVariation("fzt", 1, 0, 0, np.zeros(1)), p.Progress("fzt", True, {})]
    ignored_control = [p.Heartbeat("fz-unknown"), p.Control("no-such-job", "stop"), p.Status({}),
                       p.Checkpoint("no-such-job", 1, 0, 1, 0, a, a, **_NO_PENDING)]
    ignored_weights = [p.Weights("no-such-job", 1, 0, 0, a)]
    return ([p.encode(m) for m in to_control * 5 + ignored_control],
            [p.encode(m) for m in to_weights * 5 + ignored_weights])


@pytest.mark.timeout(180)
def test_broadcaster_survives_fuzz_counts_every_bad_frame_and_still_runs_a_job(tmp_path):
    rng = np.random.default_rng(SEED + 1)
    wrong_control, wrong_weights = _broadcaster_wrong_kind()
    control, exp_control, left_out = split(corpus(rng, N_FRAMES) + wrong_control, broadcaster_control_verdict,
                                           side_effects=(p.Join, p.Submit))
    weights, exp_weights, _ = split(corpus(rng, N_FRAMES) + wrong_weights, broadcaster_weights_verdict)
    expected = exp_control + exp_weights
    assert left_out < 0.05 * N_FRAMES and sum(exp_control.values()) > 0.9 * N_FRAMES \
        and sum(exp_weights.values()) > 0.9 * N_FRAMES

    cluster = LocalCluster(nodes=1, log_dir=str(tmp_path))
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    push = ctx.socket(zmq.PUSH)
    try:
        bc = cluster.start_broadcaster()
        ctl = cluster.endpoints["control"]
        for sock, ep in ((dealer, ctl), (push, cluster.endpoints["weights"])):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, 10_000)  # a dead broadcaster fails the test, not hangs it
            cluster_keys.connect(sock, ep, cluster.keys)  # an authorized peer that sends garbage
        up = _wait(lambda: bc.poll() is not None or _status_or_none(ctl, cluster.keys), 60)
        assert bc.poll() is None and up and up["state"] == "idle", _log_tail(tmp_path / "broadcaster.log")
        try:
            for job, config in _BAD_SUBMITS.items():
                dealer.send_multipart(p.encode(p.Submit(job, config)))
            for i in range(0, N_FRAMES, 250):  # both sockets at once, in paced batches
                _send_paced(dealer, control[i:i + 250], batch=250, pause=0)
                _send_paced(push, weights[i:i + 250], batch=250, pause=0.02)
            _send_paced(dealer, control[N_FRAMES:])
            _send_paced(push, weights[N_FRAMES:])
        except zmq.Again:
            pytest.fail(f"the broadcaster stopped taking frames:\n{_log_tail(tmp_path / 'broadcaster.log')}")

        total = sum(expected.values())

        seen = {}

        def counted():  # the PULL and ROUTER frames are handled in their own order: wait for all
            if bc.poll() is not None:
                return True
            seen.update(_status_or_none(ctl, cluster.keys) or {})
            return sum(seen.get("dropped", {}).values()) >= total

        _wait(counted, 30)
        assert bc.poll() is None, _log_tail(tmp_path / "broadcaster.log")
        st = seen
        assert st["dropped"] == dict(expected)
        time.sleep(0.3)  # nothing else trickles in later
        st = status(ctl, keys=cluster.keys)
        assert st["dropped"] == dict(expected)
        assert st["state"] == "idle" and st["job"] is None and st["nodes"] == {}

        answers = {}
        while dealer.poll(100):
            msg = decoded(dealer.recv_multipart())
            if isinstance(msg, p.Progress):
                answers[msg.job] = msg
        for job in _BAD_SUBMITS:
            assert job in answers and answers[job].final and "error" in answers[job].data, (job, answers.get(job))

        node = cluster.start_node()
        result = run_job(JobConfig(max_ticks=200, nodes=1), ctl, timeout_s=120, keys=cluster.keys)
        assert result["runs"] == 1 and 0 < result["ticks_run"] <= 200 and result["epochs"] == 1
        assert result["dropped"] == dict(expected)
        st = status(ctl, keys=cluster.keys)
        assert bc.poll() is None and node.poll() is None
        assert st["state"] == "idle" and st["dropped"] == dict(expected)
        assert st["nodes"]["node-0"]["dropped"] == 0
    finally:
        dealer.close(0)
        push.close(0)
        ctx.term()
        cluster.stop()


# --- a node ---------------------------------------------------------------------------------------

class FakeBroadcaster:
    """The three bound sockets of a broadcaster, driven by the test.

    XPUB rather than PUB: it is a PUB that also reports subscriptions, so the test knows the
    node's SUB is connected and subscribed before it publishes anything. Both sending sockets
    have no high-water mark and the ROUTER is mandatory-routing, so no frame is dropped on
    the way: every frame sent reaches the node (TCP back-pressure paces it).
    """

    def __init__(self, keys_dir: str):
        self.ctx = zmq.Context()
        keys = cluster_keys.load(keys_dir, cluster_keys.SERVER)  # the node talks CurveZMQ, as in a cluster
        self.auth = cluster_keys.guard(self.ctx, keys)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pub = self.ctx.socket(zmq.XPUB)
        self.endpoints = {}
        for name, sock in (("control", self.router), ("weights", self.pull), ("cost", self.pub)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            self.endpoints[name] = f"tcp://127.0.0.1:{free_port()}"
            cluster_keys.bind(sock, self.endpoints[name], keys, "keys")
        self.identity = b""
        self.last_beat: p.Heartbeat | None = None

    def close(self):
        for sock in (self.router, self.pull, self.pub):
            sock.close(0)
        self.auth.stop()
        self.ctx.term()

    def recv_control(self, timeout: float):
        if not self.router.poll(int(timeout * 1000)):
            return None
        frames = self.router.recv_multipart()
        msg = p.decode(frames[1:])  # the node only ever sends valid messages
        if isinstance(msg, p.Heartbeat):
            self.last_beat = msg
        return frames[0], msg

    def to_node(self, msg_or_frames):
        frames = p.encode(msg_or_frames) if isinstance(msg_or_frames, p.Message) else msg_or_frames
        self.router.send_multipart([self.identity, *frames])

    def publish(self, msg: p.Message, topic: str | None = None):
        self.pub.send_multipart([p.cost_topic(topic if topic is not None else msg.job), *p.encode(msg)])

    def weights(self, timeout: float = 10.0) -> p.Weights:
        assert self.pull.poll(int(timeout * 1000)), "no weights from the node"
        return p.decode(self.pull.recv_multipart())

    def wait_dropped(self, expected: int, timeout: float = 20.0, hold: float = 0.8) -> p.Heartbeat:
        """Wait for a heartbeat reporting ``expected`` drops, then check every heartbeat for
        ``hold`` seconds reports exactly that (no late count, no heartbeat that forgets it)."""
        deadline = time.monotonic() + timeout
        while (self.last_beat is None or self.last_beat.dropped != expected) and time.monotonic() < deadline:
            self.recv_control(0.1)
        assert self.last_beat is not None and self.last_beat.dropped == expected, \
            f"node reports {self.last_beat and self.last_beat.dropped} dropped, expected {expected}"
        seen = []
        end = time.monotonic() + hold
        while time.monotonic() < end:
            got = self.recv_control(0.05)
            if got is not None and isinstance(got[1], p.Heartbeat):
                seen.append(got[1].dropped)
        wrong = [d for d in seen if d != expected]
        assert seen and not wrong, f"{len(seen)} heartbeats after reaching {expected}; these differ: {wrong}"
        return self.last_beat


def _bad_assigns(rng) -> list[p.Assign]:
    """Assignments a node must refuse (and count under 'assign'), none of them fatal."""
    th = np.full((1, _P), 0.1)
    g = np.zeros((1, _P))

    def assign(config=_PARITY2, start=0, stop=_P, num_params=_P, theta0=th, gradient=g, **pending):
        return p.Assign("fzbad", 1, 0, start, stop, num_params, 0, 0, config, theta0, gradient,
                        **(pending or _NO_PENDING))

    return [
        assign(config={"task": "parity99"}),
        assign(config={"bogus": 1}),
        assign(config={"fm_band": 1}),  # TypeError inside JobConfig
        assign(config={"task": None}),  # AttributeError inside JobConfig
        assign(config=dict(_PARITY2, seeds=0)),
        assign(config=dict(_PARITY2, seeds=2)),  # θ⁰ has one run
        assign(stop=_P + 1),  # shard outside the parameter vector
        assign(start=-1),
        assign(start=3, stop=3),
        assign(theta0=np.zeros((1, _P - 1))),
        assign(gradient=np.zeros((1, 5))),  # gradient of the wrong shape
        assign(gradient=np.zeros((2, _P))),
        assign(pending_arrival=np.array([0, 0]), pending_tag=np.array([0]), pending_value=np.zeros((2, 1))),
        assign(pending_arrival=np.array([0]), pending_tag=np.array([0]), pending_value=np.zeros((1, 3))),
        assign(pending_arrival=np.array([0]), pending_tag=np.array([0]), pending_value=np.zeros(1)),
        assign(pending_arrival=np.zeros((1, 1), np.int64), pending_tag=np.array([0]),
               pending_value=np.zeros((1, 1))),
    ]


@pytest.mark.timeout(180)
def test_node_survives_fuzz_and_reports_every_bad_frame(tmp_path):
    rng = np.random.default_rng(SEED + 2)
    control, exp_control, left_out = split(corpus(rng, N_FRAMES), node_control_verdict, side_effects=(p.Assign,))
    cost, exp_cost, _ = split(corpus(rng, N_FRAMES, topic=True), node_cost_verdict)
    assert left_out < 0.05 * N_FRAMES and sum(exp_control.values()) > 0.9 * N_FRAMES
    assert sum(exp_cost.values()) > 0.85 * N_FRAMES

    cluster_keys.init(str(tmp_path / "keys"))
    fake = FakeBroadcaster(str(tmp_path / "keys"))
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "node", *(f"--{k}={v}" for k, v in fake.endpoints.items()),
         "--node-id=fz", "--heartbeat-s=0.1", "--broadcaster-timeout-s=600", f"--keys={tmp_path / 'keys'}"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        got = fake.recv_control(60)
        assert got is not None and isinstance(got[1], p.Join) and got[1].node_id == "fz", got
        fake.identity = got[0]
        assert fake.pub.poll(20_000) and fake.pub.recv() == b"\x01cost/"  # the node's subscription

        # 1. Fuzz the control socket (ROUTER → the node's DEALER): counted exactly.
        _send_paced(fake.router, control, prefix=[fake.identity])
        dropped = sum(exp_control.values())
        fake.wait_dropped(dropped)
        assert proc.poll() is None, _log_tail(tmp_path / "node.log")

        # 2. Fuzz the cost socket (PUB → SUB), with and without a topic frame: also exact,
        # because the subscription is in place and nothing on the way drops (see FakeBroadcaster).
        for frames in cost:
            fake.pub.send_multipart(frames)
        dropped += sum(exp_cost.values())
        fake.wait_dropped(dropped)
        assert proc.poll() is None, _log_tail(tmp_path / "node.log")

        # 3. Assignments it cannot take: each refused and counted under 'assign', none fatal.
        bad = _bad_assigns(rng)
        for a in bad:
            fake.to_node(a)
        dropped += len(bad)
        fake.wait_dropped(dropped, hold=0.3)
        # Had one been taken, this C̃ for its tick would be heard (and a bad pending C̃ with it).
        fake.publish(p.CostVariation("fzbad", 1, 0, 0, np.zeros(1)))
        assert not fake.pull.poll(500), "a refused assignment started a job"
        assert proc.poll() is None, _log_tail(tmp_path / "node.log")

        # 4. A valid job, then valid messages that are wrong for it or for the socket.
        theta0 = np.full((1, _P), 0.1)
        fake.to_node(p.Assign("fzjob", 3, 0, 0, _P, _P, 0, 0, _PARITY2, theta0, np.zeros((1, _P)), **_NO_PENDING))
        w = fake.weights()
        assert (w.job, w.epoch, w.tick, w.effective.shape) == ("fzjob", 3, 0, (1, _P)) and w.static is not None
        c = np.array([0.3])
        fake.publish(p.CostVariation("other", 3, 0, 0, c))  # another job: ignored
        fake.publish(p.CostVariation("fzjob", 2, 0, 0, c))  # a stale epoch: ignored
        fake.publish(p.CostVariation("fzjob", 3, 5, 5, c))  # not its tick: ignored
        fake.publish(p.CostVariation("fzjob", 3, 0, 0, np.zeros(2)))  # one value per run expected: 'shape'
        fake.publish(p.Control("other", "pause"))  # another job's control: ignored
        fake.publish(p.Control("fzjob", "pause"), topic="other")  # the topic does not matter, the job does
        fake.publish(p.Control("fzjob", "resume"))
        a = np.ones((1, _P))
        wrong_on_pub = [p.Assign("evil", 1, 0, 0, _P, _P, 0, 0, _PARITY2, a, a * 0, **_NO_PENDING),
                        p.Heartbeat("broadcaster"), p.Join("x"), p.Weights("fzjob", 3, 0, 0, a), p.Status({})]
        for m in wrong_on_pub:  # 'unexpected'; an Assign must not come by PUB
            fake.publish(m, topic="fzjob")
        fake.to_node(p.CostVariation("other", 3, 0, 0, c))  # a resend for another job: ignored
        fake.to_node(p.Control("other", "stop"))
        fake.to_node(p.Heartbeat("broadcaster", "fzjob", 3, 0))
        wrong_on_control = [p.Join("x"), p.Weights("fzjob", 3, 0, 0, a), p.Submit("j", _PARITY2), p.Status({}),
                            p.Progress("fzjob", False, {}), p.Checkpoint("fzjob", 3, 0, 0, 0, a, a, **_NO_PENDING)]
        for m in wrong_on_control:
            fake.to_node(m)
        dropped += 1 + len(wrong_on_pub) + len(wrong_on_control)
        fake.wait_dropped(dropped, hold=0.3)  # every one of them counted before the tick's C̃
        fake.publish(p.CostVariation("fzjob", 3, 0, 0, c))  # the right one: the node moves on to tick 1
        while True:
            w = fake.weights()
            assert (w.job, w.epoch) == ("fzjob", 3), f"the node switched to job {w.job} epoch {w.epoch}"
            if w.tick == 1:
                break
            assert w.tick == 0  # a resend while it waited
        # Every heartbeat (the periodic ones and those asking for a missed C̃) carries the total.
        beat = fake.wait_dropped(dropped)
        assert (beat.job, beat.epoch, beat.tick) == ("fzjob", 3, 1)
        assert proc.poll() is None, _log_tail(tmp_path / "node.log")

        proc.send_signal(signal.SIGTERM)  # and it still leaves cleanly
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        fake.close()
