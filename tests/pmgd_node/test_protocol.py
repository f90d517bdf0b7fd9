"""Wire protocol: every message round-trips; every malformed frame raises ProtocolError."""

import dataclasses

import msgpack
import numpy as np
import pytest

from pmgd_node import protocol as p

RNG = np.random.default_rng(0)


def _examples():
    arr = RNG.normal(size=(3, 4))
    pend = dict(pending_arrival=np.array([5, 6]), pending_tag=np.array([3, 4]), pending_value=RNG.normal(size=(2, 3)))
    return [
        p.Join("node-a", pid=123),
        p.Assign("job1", 2, 1, 4, 8, 9, 100, 7, {"task": "parity2", "seeds": 3}, arr, arr * 2, **pend),
        p.Control("job1", "pause", tick=17, reason="node 1 lost"),
        p.Heartbeat("node-a", "job1", 1, 42),
        p.Checkpoint("job1", 1, 0, 200, 9, arr, arr, **pend),
        p.Weights("job1", 1, 0, 12, arr, None),
        p.Weights("job1", 1, 0, 12, arr.astype(np.float32), arr),
        p.CostVariation("job1", 3, 99, 98, np.array([0.1, -0.2, 0.0])),
        p.CostVariation("job1", 3, 99, 98, np.array([0.1]), np.array([5, 7], dtype=np.int64)),
        p.Submit("job2", {"task": "parity2", "fm_band": [0.0, 0.5]}),
        p.Progress("job2", True, {"ticks": 10, "cost": [0.5, 0.25]}),
        p.Status({"state": "running", "nodes": {"a": 1}}),
    ]


@pytest.mark.parametrize("msg", _examples(), ids=lambda m: m.TYPE)
def test_round_trip(msg):
    back = p.decode(p.encode(msg))
    assert type(back) is type(msg)
    for f in dataclasses.fields(msg):
        a, b = getattr(msg, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


def _header(frames):
    return msgpack.unpackb(frames[0], raw=False)


def _with_header(frames, **changes):
    h = _header(frames)
    h.update(changes)
    return [msgpack.packb(h, use_bin_type=True)] + frames[1:]


@pytest.mark.parametrize("msg", _examples(), ids=lambda m: m.TYPE)
def test_malformed_frames_raise_protocol_error(msg):
    frames = p.encode(msg)
    bad = [
        ([], "empty"),
        ([b"\xc1garbage"] + frames[1:], "header"),
        ([msgpack.packb([1, 2])] + frames[1:], "header"),
        (_with_header(frames, v=2), "version"),
        (_with_header(frames, t="nope"), "type"),
        (_with_header(frames, a="x"), "arrays"),
        (frames + [b"extra"], "arrays"),
    ]
    if len(frames) > 1:
        bad.append((frames[:-1], "truncated"))
        bad.append((frames[:-1] + [frames[-1][:-1]], "truncated"))
    fields = [f for f in dataclasses.fields(msg) if f.name not in msg.ARRAYS]
    first = fields[0]
    bad.append((_with_header(frames, **{first.name: 3.5}), "field"))
    if first.default is dataclasses.MISSING and first.default_factory is dataclasses.MISSING:
        h = _header(frames)
        del h[first.name]
        bad.append(([msgpack.packb(h, use_bin_type=True)] + frames[1:], "field"))
    for frames_bad, reason in bad:
        with pytest.raises(p.ProtocolError) as err:
            p.decode(frames_bad)
        assert err.value.reason == reason, (reason, err.value)


def test_oversized_and_bad_dtype_and_bad_command():
    with pytest.raises(p.ProtocolError, match="oversized"):
        p.decode([b"x" * (p.MAX_MESSAGE_BYTES + 1)])
    frames = p.encode(p.Weights("j", 0, 0, 0, np.zeros((1, 2))))
    h = _header(frames)
    h["a"][0][0] = "|O"
    with pytest.raises(p.ProtocolError, match="arrays"):
        p.decode([msgpack.packb(h)] + frames[1:])
    with pytest.raises(p.ProtocolError, match="command"):
        p.decode(p.encode(p.Control("j", "explode")))
    with pytest.raises(TypeError, match="dtype"):
        p.encode(p.Weights("j", 0, 0, 0, np.zeros((1, 2), dtype=np.complex64)))


@pytest.mark.parametrize("value", [2 ** 62, -(2 ** 62), p.MAX_INT + 1])
def test_an_integer_field_beyond_the_bound_is_refused_at_decode(value):
    """A tick (or epoch, shard, count) that would pin state for ever never becomes a message."""
    frames = p.encode(p.Weights("j", 0, 0, 0, np.zeros((1, 2))))
    for field in ("tick", "epoch", "shard"):
        with pytest.raises(p.ProtocolError, match="2\\*\\*53") as err:
            p.decode([msgpack.packb(_header(frames) | {field: value})] + frames[1:])
        assert err.value.reason == "field"
    assert p.decode([msgpack.packb(_header(frames) | {"tick": p.MAX_INT})] + frames[1:]).tick == p.MAX_INT
