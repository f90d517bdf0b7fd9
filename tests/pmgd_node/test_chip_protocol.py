"""Chip protocol v1 (docs/chip-protocol.md): every message round-trips; every malformed frame
raises ChipProtocolError with its countable reason, so the receiver drops and counts it."""

import dataclasses
import json

import numpy as np
import pytest

from pmgd_node import protocol as p

RNG = np.random.default_rng(0)
THETA = RNG.normal(size=(3, 9))


def _requests():
    return [
        p.ChipHello(1, "job-a"),
        p.ChipHello(2, "job-a", {"task": "parity2", "fm_band": [0.0, 0.5], "target_cost": None}),
        p.ChipCost(3, "job-a", THETA, np.array([3, 1, 0])),
        p.ChipCost(4, "job-a", THETA[:1], np.array([2]), "test", True),
    ]


def _replies():
    return [
        p.ChipInfo(1, "job-a", 9, {"train": 4, "test": 4}, 1, "reference chip"),
        p.ChipCostReply(3, "job-a", np.array([0.25, 0.5, 0.0]), np.array([1.0, 0.5, 0.25])),
        p.ChipCostReply(4, "job-a", np.array([0.25]), np.array([1.0]), RNG.normal(size=(1, 1, 1))),
        p.ChipErrorReply(5, "job-a", "job 'job-a' is unknown here", "unknown_job"),
        p.ChipErrorReply(6, "job-a", "busy calibrating", "busy"),
        p.ChipErrorReply(7, "job-a", "indices out of range"),
    ]


def _same(msg, back):
    assert type(back) is type(msg)
    for f in dataclasses.fields(msg):
        a, b = getattr(msg, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            assert b.dtype == np.dtype(a.dtype).newbyteorder("<") and b.shape == a.shape
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


@pytest.mark.parametrize("msg", _requests(), ids=lambda m: f"{m.OP}-{m.seq}")
def test_requests_round_trip(msg):
    _same(msg, p.decode_chip_request(p.encode_chip(msg)))


@pytest.mark.parametrize("msg", _replies(), ids=lambda m: f"{m.OP}-{m.seq}")
def test_replies_round_trip(msg):
    _same(msg, p.decode_chip_reply(p.encode_chip(msg)))


def test_the_header_is_plain_json_and_arrays_raw_little_endian_frames():
    frames = p.encode_chip(p.ChipCost(9, "j", np.ones((2, 3), dtype=np.float32), np.array([1, 0], dtype=np.int32)))
    header = json.loads(frames[0].decode("utf-8"))
    assert header == {"chip": 1, "op": "cost", "seq": 9, "job": "j", "split": "train", "outputs": False,
                      "arrays": [{"name": "theta", "dtype": "<f8", "shape": [2, 3]},
                                 {"name": "indices", "dtype": "<i8", "shape": [2]}]}
    assert frames[1] == np.ones((2, 3), dtype="<f8").tobytes() and frames[2] == np.array([1, 0], "<i8").tobytes()
    # A chip written from the document alone builds a reply the trainer decodes.
    reply = [json.dumps({"chip": 1, "op": "cost", "seq": 9, "job": "j", "arrays": [
        {"name": "cost", "dtype": "<f8", "shape": [2]}, {"name": "accuracy", "dtype": "<f8", "shape": [2]}]}).encode(),
        np.array([0.5, 0.25]).tobytes(), np.array([1.0, 0.0]).tobytes()]
    back = p.decode_chip_reply(reply)
    assert back.seq == 9 and back.cost.tolist() == [0.5, 0.25] and back.accuracy.tolist() == [1.0, 0.0]


def test_an_error_text_is_cut_to_its_bound_and_nan_never_enters_a_header():
    frames = p.encode_chip(p.ChipErrorReply(1, "j", "x" * (p.CHIP_MAX_TEXT + 100)))
    assert len(p.decode_chip_reply(frames).error) == p.CHIP_MAX_TEXT
    with pytest.raises(ValueError):
        p.encode_chip(p.ChipHello(1, "j", {"eta": float("nan")}))


# --- malformed frames ------------------------------------------------------------------------
def _h(frames) -> dict:
    return json.loads(frames[0])


def _with(frames, drop=(), **changes) -> list[bytes]:
    h = _h(frames)
    h.update(changes)
    for key in drop:
        del h[key]
    return [json.dumps(h).encode()] + list(frames[1:])


def _spec(frames, k, **changes) -> list[bytes]:
    h = _h(frames)
    h["arrays"][k].update(changes)
    return [json.dumps(h).encode()] + list(frames[1:])


COST = p.encode_chip(p.ChipCost(3, "job-a", THETA, np.array([3, 1, 0])))
HELLO = p.encode_chip(p.ChipHello(1, "job-a", {"task": "parity2"}))
REQUEST_CASES = [
    ("no frames", [], "empty"),
    ("message too large", [b"{}", b"x" * p.CHIP_MAX_BYTES], "oversized"),
    ("header too large", [b" " * (p.CHIP_MAX_HEADER_BYTES + 1)], "oversized"),
    ("not utf-8", [b"\xff\xfe{"] + COST[1:], "header"),
    ("not json", [b"{chip: 1"] + COST[1:], "header"),
    ("a json array", [b"[1, 2]"] + COST[1:], "header"),
    ("a duplicate key", [b'{"chip": 1, "chip": 1}'] + COST[1:], "header"),
    ("NaN", [b'{"chip": NaN}'], "header"),
    ("deep nesting", [b"[" * 100_000 + b"]" * 100_000], "header"),
    ("no version", _with(COST, drop=("chip",)), "version"),
    ("version 2", _with(COST, chip=2), "version"),
    ("version true", _with(COST, chip=True), "version"),
    ("version as text", _with(COST, chip="1"), "version"),
    ("unknown op", _with(COST, op="explode"), "op"),
    ("a reply's op", _with(COST, op="error"), "op"),
    ("seq negative", _with(COST, seq=-1), "field"),
    ("seq beyond 2**53", _with(COST, seq=2 ** 53 + 1), "field"),
    ("seq a float", _with(COST, seq=3.0), "field"),
    ("seq a bool", _with(COST, seq=True), "field"),
    ("job empty", _with(COST, job=""), "field"),
    ("job too long", _with(COST, job="j" * (p.CHIP_MAX_JOB + 1)), "field"),
    ("job a number", _with(COST, job=7), "field"),
    ("split unknown", _with(COST, split="valid"), "field"),
    ("outputs not a bool", _with(COST, outputs=1), "field"),
    ("config not an object", _with(HELLO, config=[1]), "field"),
    ("arrays missing", _with(COST, drop=("arrays",)), "arrays"),
    ("arrays not a list", _with(COST, arrays={"theta": 1}), "arrays"),
    ("a spec not an object", _with(COST, arrays=["theta", "indices"]), "arrays"),
    ("an unknown array", _spec(COST, 1, name="labels"), "arrays"),
    ("an array twice", _spec(COST, 1, name="theta", dtype="<f8", shape=[3]), "arrays"),
    ("a required array absent", [json.dumps(_h(COST) | {"arrays": _h(COST)["arrays"][:1]}).encode(), COST[1]],
     "arrays"),
    ("an array on hello", [json.dumps(_h(HELLO) | {"arrays": [{"name": "theta", "dtype": "<f8", "shape": [1]}]})
                           .encode(), b"\0" * 8], "arrays"),
    ("extra frames", COST + [b"extra"], "arrays"),
    ("float32", _spec(COST, 0, dtype="<f4"), "dtype"),
    ("objects", _spec(COST, 0, dtype="|O"), "dtype"),
    ("big-endian", _spec(COST, 0, dtype=">f8"), "dtype"),
    ("theta as integers", _spec(COST, 0, dtype="<i8"), "dtype"),
    ("indices as floats", _spec(COST, 1, dtype="<f8"), "dtype"),
    ("theta 1-d", _spec(COST, 0, shape=[27]), "shape"),
    ("indices 2-d", _spec(COST, 1, shape=[3, 1]), "shape"),
    ("four dimensions", _spec(COST, 0, shape=[1, 3, 9, 1]), "shape"),
    ("a negative size", _spec(COST, 0, shape=[-3, -9]), "shape"),
    ("a size as text", _spec(COST, 0, shape=["3", 9]), "shape"),
    ("a frame missing", COST[:-1], "truncated"),
    ("a frame short by a byte", COST[:-1] + [COST[-1][:-1]], "truncated"),
    ("a shape whose product wraps in int64", _spec(COST, 0, shape=[65536, 65536, 65536]), "truncated"),
    ("no runs", [json.dumps(_h(COST) | {"arrays": [{"name": "theta", "dtype": "<f8", "shape": [0, 9]},
                                                   _h(COST)["arrays"][1]]}).encode(), b"", COST[2]], "bounds"),
    ("no samples", [json.dumps(_h(COST) | {"arrays": [_h(COST)["arrays"][0],
                                                      {"name": "indices", "dtype": "<i8", "shape": [0]}]}).encode(),
                    COST[1], b""], "bounds"),
    ("a negative index", COST[:2] + [np.array([3, -1, 0], "<i8").tobytes()], "bounds"),
]


@pytest.mark.parametrize("frames, reason", [(f, r) for _, f, r in REQUEST_CASES], ids=[c[0] for c in REQUEST_CASES])
def test_malformed_requests_are_refused_with_their_reason(frames, reason):
    with pytest.raises(p.ChipProtocolError) as err:
        p.decode_chip_request(frames)
    assert err.value.reason == reason, err.value
    assert reason in p.CHIP_DROP_REASONS
    assert isinstance(err.value, p.ProtocolError)  # a receiver that counts ProtocolError counts these too


INFO = p.encode_chip(p.ChipInfo(1, "job-a", 9, {"train": 4, "test": 4}, 1, "chip"))
REPLY = p.encode_chip(p.ChipCostReply(3, "job-a", np.array([0.25, 0.5]), np.array([1.0, 0.5]),
                                      np.zeros((2, 4, 1))))
ERROR = p.encode_chip(p.ChipErrorReply(5, "job-a", "no", "busy"))
REPLY_CASES = [
    ("a request's op is no reply", [b'{"chip":1,"op":"explode","seq":1,"job":"j","arrays":[]}'], "op"),
    ("params zero", _with(INFO, params=0), "field"),
    ("params a float", _with(INFO, params=9.0), "field"),
    ("samples without test", _with(INFO, samples={"train": 4}), "field"),
    ("samples negative", _with(INFO, samples={"train": 4, "test": -1}), "field"),
    ("samples a list", _with(INFO, samples=[4, 4]), "field"),
    ("outputs negative", _with(INFO, outputs=-1), "field"),
    ("outputs beyond the bound", _with(INFO, outputs=p.CHIP_MAX_OUTPUTS + 1), "field"),
    ("name missing", _with(INFO, drop=("name",)), "field"),
    ("name too long", _with(INFO, name="n" * (p.CHIP_MAX_NAME + 1)), "field"),
    ("error text missing", _with(ERROR, drop=("error",)), "field"),
    ("error code unknown", _with(ERROR, code="oops"), "field"),
    ("cost missing", [json.dumps(_h(REPLY) | {"arrays": _h(REPLY)["arrays"][1:]}).encode()] + REPLY[2:], "arrays"),
    ("cost as integers", _spec(REPLY, 0, dtype="<i8"), "dtype"),
    ("cost 2-d", _spec(REPLY, 0, shape=[2, 1]), "shape"),
    ("accuracy of other runs", _spec(_spec(REPLY, 1, shape=[1]), 1, shape=[1])[:2] + [REPLY[2][:8], REPLY[3]],
     "shape"),
    ("outputs 2-d", _spec(REPLY, 2, shape=[2, 4]), "shape"),
    ("outputs of other runs", _spec(REPLY, 2, shape=[1, 8, 1]), "shape"),
]


@pytest.mark.parametrize("frames, reason", [(f, r) for _, f, r in REPLY_CASES], ids=[c[0] for c in REPLY_CASES])
def test_malformed_replies_are_refused_with_their_reason(frames, reason):
    with pytest.raises(p.ChipProtocolError) as err:
        p.decode_chip_reply(frames)
    assert err.value.reason == reason, err.value


def test_an_error_reply_without_a_code_is_a_bad_request():
    back = p.decode_chip_reply(_with(ERROR, drop=("code",)))
    assert back.code == "bad_request" and back.error == "no"


def test_unknown_header_keys_are_ignored():
    back = p.decode_chip_request(_with(COST, vendor={"temperature_K": 4.2}))
    assert isinstance(back, p.ChipCost) and back.seq == 3
