"""The PMGD wire protocol: every message between nodes, broadcaster and clients (docs/architecture.md §4).

A message is a list of ZeroMQ frames::

    [header] [array 0] [array 1] …        (PUB/SUB adds a leading topic frame: b"cost/<job>")

The header is a msgpack map ``{"v": VERSION, "t": <type name>, <fields>…, "a": [[dtype,
shape], …]}``; each array travels as its raw little-endian bytes in its own frame, never
pickled. :func:`decode` checks everything (version, type, each field's type, every array's
dtype, shape and byte count, total size) and raises :class:`ProtocolError` naming what was
wrong, so a receiver drops and counts a bad frame and carries on.

Messages (``→`` direction, socket):

==============  ===============================  ==========================================
Join            node → broadcaster (ROUTER)       a node offers itself (again after a restart)
Assign          broadcaster → node (ROUTER)       shard, job config, θ⁰/G/in-flight C̃ to start from
Control         broadcaster → node / client       start, pause, resume, stop, rejoin (with the tick)
Heartbeat       node ↔ broadcaster (ROUTER)       liveness; carries the sender's tick
Checkpoint      node → broadcaster (ROUTER)       the shard's full state at a tick boundary
Weights         node → broadcaster (PUSH/PULL)    θ⁰ + θ̃[tick] of a shard, θ⁰ when it changed
CostVariation   broadcaster → nodes (PUB/SUB)     C̃ per run, its tick and sequence, per-node tags
Submit          client → broadcaster (ROUTER)     a job config to run
Progress        broadcaster → client (ROUTER)     an evaluation point, or the final result
Status          client ↔ broadcaster (ROUTER)     ask (empty data) / answer: state, nodes, drops
CostRequest     broadcaster → evaluator (ROUTER)  the remote evaluator hop: θ of every run, sample indices
CostReply       evaluator → broadcaster           C per run, or an error
==============  ===============================  ==========================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np

VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a (1000 runs × 26,154 params) float64 shard fits
# Every integer field (ticks, epochs, shards, counts) lies within ±MAX_INT: far beyond any job
# (max_ticks ≤ 10¹²), and a value that would pin state for ever (a tick of 2⁶²) never decodes.
MAX_INT = 1 << 53
_DTYPES = ("<f8", "<f4", "<i8")


# Why a receiver drops a frame: a ProtocolError's reason, or a valid message it cannot use
# (unexpected kind on that socket, arrays of the wrong shape, an assignment it cannot take).
DROP_REASONS = ("arrays", "empty", "field", "header", "oversized", "truncated", "type", "version",
                "unexpected", "shape", "assign")


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason  # a short, countable label: "version", "truncated", …
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    ARRAYS: ClassVar[tuple[str, ...]] = ()  # fields carried as raw frames (None allowed)


@dataclass(frozen=True)
class Join(Message):
    TYPE: ClassVar[str] = "join"
    node_id: str
    pid: int = 0


@dataclass(frozen=True)
class Assign(Message):
    """Start (or restart from a checkpoint) the shard [start, stop) of job ``job`` at ``tick``.

    ``epoch`` counts assignments of the job: messages of an older epoch are ignored, so a
    rollback after a fault never mixes with ticks from before it. ``pending_*`` are C̃
    values that were in flight on the node's downlink at ``tick`` (arrival, tag, C̃ rows).
    """

    TYPE: ClassVar[str] = "assign"
    ARRAYS: ClassVar[tuple[str, ...]] = ("theta0", "gradient", "pending_arrival", "pending_tag", "pending_value")
    job: str
    epoch: int
    shard: int
    start: int
    stop: int
    num_params: int
    tick: int
    updates: int
    config: dict
    theta0: np.ndarray
    gradient: np.ndarray
    pending_arrival: np.ndarray
    pending_tag: np.ndarray
    pending_value: np.ndarray


@dataclass(frozen=True)
class Control(Message):
    TYPE: ClassVar[str] = "control"
    # rejoin: the broadcaster does not know the sender (it restarted): join again.
    COMMANDS: ClassVar[tuple[str, ...]] = ("start", "pause", "resume", "stop", "rejoin")
    job: str
    command: str
    tick: int = 0
    reason: str = ""
    epoch: int = 0  # pause/resume apply to this epoch only: an Assign may overtake them


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    node_id: str
    job: str = ""
    epoch: int = 0
    tick: int = 0
    dropped: int = 0  # frames the sender has dropped as malformed so far


@dataclass(frozen=True)
class Checkpoint(Message):
    """The whole state of one shard at the start of tick ``tick`` (before its weights go out)."""

    TYPE: ClassVar[str] = "checkpoint"
    ARRAYS: ClassVar[tuple[str, ...]] = ("theta0", "gradient", "pending_arrival", "pending_tag", "pending_value")
    job: str
    epoch: int
    shard: int
    tick: int
    updates: int
    theta0: np.ndarray
    gradient: np.ndarray
    pending_arrival: np.ndarray
    pending_tag: np.ndarray
    pending_value: np.ndarray


@dataclass(frozen=True)
class Weights(Message):
    """θ⁰ + θ̃[tick] of one shard, (S, n); ``static`` is θ⁰ itself, sent only when it changed."""

    TYPE: ClassVar[str] = "weights"
    ARRAYS: ClassVar[tuple[str, ...]] = ("effective", "static")
    job: str
    epoch: int
    shard: int
    tick: int
    effective: np.ndarray
    static: np.ndarray | None = None


@dataclass(frozen=True)
class CostVariation(Message):
    """C̃ of broadcaster tick ``tick``, one value per run (S,).

    ``tags`` (async mode) holds, per shard, the node tick of the weights the broadcaster
    used, so tagged nodes correlate C̃ with the perturbation that produced it.
    """

    TYPE: ClassVar[str] = "cost"
    ARRAYS: ClassVar[tuple[str, ...]] = ("c_tilde", "tags")
    job: str
    epoch: int
    seq: int
    tick: int
    c_tilde: np.ndarray
    tags: np.ndarray | None = None


@dataclass(frozen=True)
class Submit(Message):
    TYPE: ClassVar[str] = "submit"
    job: str
    config: dict


@dataclass(frozen=True)
class Progress(Message):
    """An evaluation point (``final`` False) or the job's result (``final`` True) as plain data."""

    TYPE: ClassVar[str] = "progress"
    job: str
    final: bool
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Status(Message):
    TYPE: ClassVar[str] = "status"
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CostRequest(Message):
    """Broadcaster → remote evaluator: C(θ) of each run on the training samples ``indices``."""

    TYPE: ClassVar[str] = "cost_request"
    ARRAYS: ClassVar[tuple[str, ...]] = ("theta", "indices")
    job: str
    seq: int
    config: dict
    theta: np.ndarray
    indices: np.ndarray


@dataclass(frozen=True)
class CostReply(Message):
    TYPE: ClassVar[str] = "cost_reply"
    ARRAYS: ClassVar[tuple[str, ...]] = ("cost",)
    job: str
    seq: int
    cost: np.ndarray | None = None
    error: str = ""


MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Join, Assign, Control, Heartbeat, Checkpoint, Weights, CostVariation, Submit, Progress,
                        Status, CostRequest, CostReply)
}
_FIELD_TYPES = {int: int, str: str, dict: dict, bool: bool}
_NP_DTYPES = {name: np.dtype(name) for name in _DTYPES}


def cost_topic(job: str) -> bytes:
    return f"cost/{job}".encode()


class _Plan:
    """What encode and decode need to know of one message class, worked out once (hot path)."""

    def __init__(self, cls: type[Message]):
        self.arrays = cls.ARRAYS
        # (name, is array) in field order: the header keys come out in the same order.
        self.fields = tuple((f.name, f.name in cls.ARRAYS) for f in dataclasses.fields(cls))
        # What decode checks, in field order: (name, kind, required); kind None for an array
        # (required: it may not be None), else the type a header field must have.
        self.checks = tuple((f.name, None if f.name in cls.ARRAYS else _FIELD_TYPES[_base_type(f.type)],
                             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                            for f in dataclasses.fields(cls))


_PLANS: dict[type, _Plan] = {}


def _plan(cls: type[Message]) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _Plan(cls)
    return plan


def _wire_array(value: Any, where: str) -> np.ndarray:
    """``value`` as a C-contiguous little-endian array of one of the wire dtypes (at least 1-d)."""
    if type(value) is np.ndarray and value.ndim and value.flags.c_contiguous and value.dtype.str in _DTYPES:
        return value  # the common case, already in wire form
    arr = np.ascontiguousarray(value)
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    if arr.dtype.str not in _DTYPES:
        raise TypeError(f"{where}: dtype {arr.dtype} is not one of {_DTYPES}")
    return arr


def encode(msg: Message) -> list[bytes]:
    """The frames of ``msg``: header then one raw frame per array field that is not None."""
    header: dict[str, Any] = {"v": VERSION, "t": msg.TYPE}
    frames: list[bytes] = [b""]
    specs = []
    for name, is_array in _plan(type(msg)).fields:
        value = getattr(msg, name)
        if is_array:
            if value is None:
                specs.append(None)
                continue
            arr = _wire_array(value, f"{msg.TYPE}.{name}")
            specs.append([arr.dtype.str, list(arr.shape)])
            frames.append(arr.tobytes())
        else:
            header[name] = value
    header["a"] = specs
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def decode(frames: list[bytes]) -> Message:
    """Parse the frames of one message; raise :class:`ProtocolError` on anything malformed."""
    if not frames:
        raise ProtocolError("empty")
    total = sum(len(f) for f in frames)
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"{total} bytes > {MAX_MESSAGE_BYTES}")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, max_bin_len=1 << 16,
                                 max_str_len=1 << 16, max_array_len=1 << 16, max_map_len=1 << 16)
    except Exception as err:  # msgpack raises several unrelated exception types
        raise ProtocolError("header", f"not msgpack: {type(err).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header", "not a map")
    if header.get("v") != VERSION:
        raise ProtocolError("version", f"got {header.get('v')!r}, speak {VERSION}")
    cls = MESSAGES.get(header.get("t")) if isinstance(header.get("t"), str) else None
    if cls is None:
        raise ProtocolError("type", f"unknown message type {header.get('t')!r}")
    specs = header.get("a")
    if not isinstance(specs, list) or len(specs) != len(cls.ARRAYS):
        raise ProtocolError("arrays", f"{cls.TYPE} carries {len(cls.ARRAYS)} array specs")
    plan = _plan(cls)
    kwargs: dict[str, Any] = {}
    frame = 1
    for name, spec in zip(plan.arrays, specs):
        if spec is None:
            kwargs[name] = None
            continue
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in _DTYPES and isinstance(spec[1], list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in spec[1])
                and len(spec[1]) <= 4):
            raise ProtocolError("arrays", f"bad spec for {cls.TYPE}.{name}: {spec!r}")
        if frame >= len(frames):
            raise ProtocolError("truncated", f"{cls.TYPE}.{name} frame missing")
        dtype = _NP_DTYPES[spec[0]]
        count = math.prod(spec[1])  # exact: an int64 product can wrap around (65536⁴ → 0)
        if count * dtype.itemsize != len(frames[frame]):
            raise ProtocolError("truncated", f"{cls.TYPE}.{name}: {len(frames[frame])} bytes for shape {spec[1]}")
        kwargs[name] = np.frombuffer(frames[frame], dtype=dtype).reshape(spec[1])
        frame += 1
    if frame != len(frames):
        raise ProtocolError("arrays", f"{len(frames) - frame} extra frames")
    for name, kind, required in plan.checks:
        if kind is None:
            if required and kwargs[name] is None:
                raise ProtocolError("arrays", f"{cls.TYPE}.{name} is required")
            continue
        if name not in header:
            if required:
                raise ProtocolError("field", f"{cls.TYPE}.{name} missing")
            continue
        value = header[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError("field", f"{cls.TYPE}.{name} must be {kind.__name__}, got {type(value).__name__}")
        if kind is int and not -MAX_INT <= value <= MAX_INT:
            raise ProtocolError("field", f"{cls.TYPE}.{name} must be within ±2**53, got {value}")
        kwargs[name] = value
    msg = cls(**kwargs)
    if cls is Control and msg.command not in Control.COMMANDS:
        raise ProtocolError("field", f"control.command must be one of {', '.join(Control.COMMANDS)}")
    return msg


def _base_type(annotation: str) -> type:
    # Annotations are strings (``from __future__ import annotations``): map the few we use.
    return {"int": int, "str": str, "dict": dict, "bool": bool}[annotation]
