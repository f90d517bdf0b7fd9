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
Weights         node → broadcaster (PUSH/PULL)    θ⁰ + θ̃[tick] of a shard, θ⁰ when it changed (uplink "full")
Digest          node → broadcaster (PUSH/PULL)    tick and θ⁰ checksum of a shard, θ⁰ when it changed (uplink "replica")
CostVariation   broadcaster → nodes (PUB/SUB)     C̃ per run, its tick and sequence, per-node tags
Submit          client → broadcaster (ROUTER)     a job config to run
Progress        broadcaster → client (ROUTER)     an evaluation point, or the final result
Status          client ↔ broadcaster (ROUTER)     ask (empty data) / answer: state, nodes, drops
==============  ===============================  ==========================================

**The chip protocol** (second half of this module, docs/chip-protocol.md): trainer ↔ chip,
the forward passes of a job run by a device (or by ``pmgd evaluator``). Its header is a UTF-8
JSON object instead of msgpack, so that a chip needs only pyzmq, numpy and the standard
library; its arrays travel as raw little-endian frames as here. The trainer (a DEALER,
:mod:`services.chip.client`) encodes :class:`ChipHello` and :class:`ChipCost` and decodes the
replies with :func:`decode_chip_reply`; a chip (a ROUTER) decodes with
:func:`decode_chip_request` and answers :class:`ChipInfo`, :class:`ChipCostReply` or
:class:`ChipErrorReply`. Every malformed frame raises :class:`ChipProtocolError`, a
:class:`ProtocolError` whose ``reason`` is one of :data:`CHIP_DROP_REASONS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
    # resync: the broadcaster's replica of the shard's θ⁰ disagrees with the node's checksum at
    # ``tick``: send that tick's Digest again, with θ⁰.
    COMMANDS: ClassVar[tuple[str, ...]] = ("start", "pause", "resume", "stop", "rejoin", "resync")
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
class Digest(Message):
    """The replica uplink (sync timing, job field ``uplink`` "replica"; docs/cluster.md): shard
    ``shard`` is at tick ``tick`` and its θ⁰ has :func:`checksum` ``checksum``.

    The broadcaster holds a replica of every shard's θ⁰ and regenerates θ̃[tick] itself (a pure
    function of seed, index and tick), so between updates this is all a node sends: a header
    whose size does not depend on P. ``static`` is θ⁰ itself, (S, n), sent when it changed (an
    update), on the first tick of an assignment and when the broadcaster asks for it (a resync)."""

    TYPE: ClassVar[str] = "digest"
    ARRAYS: ClassVar[tuple[str, ...]] = ("static",)
    job: str
    epoch: int
    shard: int
    tick: int
    checksum: str
    static: np.ndarray | None = None


def checksum(theta0: np.ndarray) -> str:
    """The first 64 bits of SHA-1 over θ⁰'s bytes in C order, as 16 hex digits: a
    :class:`Digest`'s checksum of a shard's θ⁰. Both ends compute it over the same dtype and
    shape, the node's (S, n) array. (Integrity, not authenticity: CurveZMQ does that.)"""
    return hashlib.sha1(np.ascontiguousarray(theta0)).hexdigest()[:16]


def replica_uplink(config) -> bool:
    """Whether a job's nodes send :class:`Digest` (the replica uplink) rather than
    :class:`Weights`: ``uplink`` "replica" in sync timing. Async jobs always send their
    weights: a node's message may be delayed or dropped on the uplink model, and the newest
    shard the broadcaster holds must carry its own θ⁰ (docs/cluster.md)."""
    return config.uplink == "replica" and config.timing == "sync"


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


MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Join, Assign, Control, Heartbeat, Checkpoint, Weights, Digest, CostVariation, Submit,
                        Progress, Status)
}
_FIELD_TYPES = {int: int, str: str, dict: dict, bool: bool}
_NP_DTYPES = {name: np.dtype(name) for name in _DTYPES}


def cost_topic(job: str) -> bytes:
    return f"cost/{job}".encode()


class _Plan:
    """What encode and decode need to know of one message class, worked out once (hot path)."""

    def __init__(self, cls: type[Message]):
        self.cls = cls
        self.arrays = cls.ARRAYS
        fields = dataclasses.fields(cls)
        # (name, is array) in field order: the header keys come out in the same order.
        self.fields = tuple((f.name, f.name in cls.ARRAYS) for f in fields)
        # What decode checks, in field order: (name, kind, required); kind None for an array
        # (required: it may not be None), else the type a header field must have.
        self.checks = tuple((f.name, None if f.name in cls.ARRAYS else _FIELD_TYPES[_base_type(f.type)],
                             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                            for f in fields)
        # An absent optional header field takes its default (a fresh one from a factory).
        self.defaults = {f.name: (f.default, f.default_factory) for f in fields
                         if f.name not in cls.ARRAYS and (f.default is not dataclasses.MISSING
                                                          or f.default_factory is not dataclasses.MISSING)}

    def make(self, values: dict[str, Any]) -> Message:
        """The message of these (checked, complete) field values. The frozen dataclass's
        ``__init__`` assigns field by field through ``object.__setattr__``; its instance dict
        takes them at once (the same object, for a fraction of the per-message cost)."""
        msg = object.__new__(self.cls)
        msg.__dict__.update(values)
        return msg


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
    """Parse the frames of one message; raise :class:`ProtocolError` on anything malformed.

    Frames may be ``bytes`` or any buffer (a ZeroMQ ``Frame`` received without a copy): the
    arrays are then read-only views of the received buffers, never copied here."""
    if not frames:
        raise ProtocolError("empty")
    total = sum(map(len, frames))
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError("oversized", f"{total} bytes > {MAX_MESSAGE_BYTES}")
    n = len(frames[0])
    try:
        # Every length the header claims is bounded by its own size (an element takes a byte at
        # least), so a small frame cannot make msgpack allocate a huge list, while a result whose
        # θ⁰ holds 10⁶ numbers (a Progress) still decodes (a fixed 2¹⁶ refused it).
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, max_bin_len=n, max_str_len=n,
                                 max_array_len=n, max_map_len=n)
    except Exception as err:  # msgpack raises several unrelated exception types
        raise ProtocolError("header", f"not msgpack: {type(err).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header", "not a map")
    if header.get("v") != VERSION:
        raise ProtocolError("version", f"got {header.get('v')!r}, speak {VERSION}")
    kind = header.get("t")
    plan = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if plan is None:
        raise ProtocolError("type", f"unknown message type {header.get('t')!r}")
    cls = plan.cls
    specs = header.get("a")
    if not isinstance(specs, list) or len(specs) != len(plan.arrays):
        raise ProtocolError("arrays", f"{cls.TYPE} carries {len(plan.arrays)} array specs")
    values: dict[str, Any] = {}
    frame = 1
    for name, spec in zip(plan.arrays, specs):
        if spec is None:
            values[name] = None
            continue
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in _DTYPES and isinstance(spec[1], list)
                and len(spec[1]) <= 4 and _sizes(spec[1])):
            raise ProtocolError("arrays", f"bad spec for {cls.TYPE}.{name}: {spec!r}")
        if frame >= len(frames):
            raise ProtocolError("truncated", f"{cls.TYPE}.{name} frame missing")
        dtype = _NP_DTYPES[spec[0]]
        count = math.prod(spec[1])  # exact: an int64 product can wrap around (65536⁴ → 0)
        if count * dtype.itemsize != len(frames[frame]):
            raise ProtocolError("truncated", f"{cls.TYPE}.{name}: {len(frames[frame])} bytes for shape {spec[1]}")
        values[name] = np.frombuffer(frames[frame], dtype=dtype).reshape(spec[1])
        frame += 1
    if frame != len(frames):
        raise ProtocolError("arrays", f"{len(frames) - frame} extra frames")
    for name, kind, required in plan.checks:
        if kind is None:
            if required and values[name] is None:
                raise ProtocolError("arrays", f"{cls.TYPE}.{name} is required")
            continue
        if name not in header:
            if required:
                raise ProtocolError("field", f"{cls.TYPE}.{name} missing")
            default, factory = plan.defaults[name]
            values[name] = default if factory is dataclasses.MISSING else factory()
            continue
        value = header[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError("field", f"{cls.TYPE}.{name} must be {kind.__name__}, got {type(value).__name__}")
        if kind is int and not -MAX_INT <= value <= MAX_INT:
            raise ProtocolError("field", f"{cls.TYPE}.{name} must be within ±2**53, got {value}")
        values[name] = value
    if cls is Control and values["command"] not in Control.COMMANDS:
        raise ProtocolError("field", f"control.command must be one of {', '.join(Control.COMMANDS)}")
    return plan.make(values)


def _sizes(shape: list) -> bool:
    """Every entry of an array spec's shape is a plain int in [0, 2³¹)."""
    for d in shape:
        if not (isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31):
            return False
    return True


def _base_type(annotation: str) -> type:
    # Annotations are strings (``from __future__ import annotations``): map the few we use.
    return {"int": int, "str": str, "dict": dict, "bool": bool}[annotation]


_BY_TYPE: dict[str, _Plan] = {name: _plan(cls) for name, cls in MESSAGES.items()}


# ================================================================================================
# The chip protocol v1 (docs/chip-protocol.md): trainer (DEALER) ↔ chip (ROUTER).
#
# A message is [header] [array 0] [array 1] …: the header a UTF-8 JSON object
#     {"chip": 1, "op": …, "seq": n, "job": "…", <op fields>…,
#      "arrays": [{"name": …, "dtype": "<f8" | "<i8", "shape": […]}, …]}
# and one frame per listed array, in that order, holding its raw little-endian bytes (C order).
# ================================================================================================

CHIP_VERSION = 1
CHIP_MAX_BYTES = 256 * 1024 * 1024  # whole message, header and arrays (as MAX_MESSAGE_BYTES)
CHIP_MAX_HEADER_BYTES = 1 << 20  # the JSON header alone (a hello carries the job config)
CHIP_MAX_RUNS = 100_000  # S: rows of θ (JobConfig.seeds ≤ 100,000)
CHIP_MAX_SAMPLES = 1_000_000  # B: indices of one request
CHIP_MAX_OUTPUTS = 1 << 16  # O: outputs per sample
CHIP_MAX_JOB = 256  # characters of a job id
CHIP_MAX_NAME = 256  # characters of a chip's name
CHIP_MAX_TEXT = 4096  # characters of an error text
CHIP_SPLITS = ("train", "test")
# unknown_job: the chip holds nothing for this job (it restarted): say hello, then ask again.
# busy: a passing condition; the same request may succeed when sent again.
# bad_request: the request cannot succeed (wrong width, index out of range…): never retried.
CHIP_ERROR_CODES = ("unknown_job", "busy", "bad_request")
# Why a receiver drops a chip frame: a ChipProtocolError's reason, or (trainer side) a valid
# reply it cannot use: "stale" (a seq it no longer waits for), "unexpected" (another op or job
# than it asked, or a reply whose run count does not match the request).
CHIP_DROP_REASONS = ("empty", "oversized", "header", "version", "op", "field", "arrays", "dtype", "shape",
                     "truncated", "bounds", "stale", "unexpected")
_CHIP_DTYPES = {"<f8": np.dtype("<f8"), "<i8": np.dtype("<i8")}


class ChipProtocolError(ProtocolError):
    """A frame that is not a valid chip-protocol message; ``reason`` is in CHIP_DROP_REASONS."""


@dataclass(frozen=True)
class ChipHello:
    """Trainer → chip: who are you? ``config`` (optional) is the job's config as a dict."""

    OP: ClassVar[str] = "hello"
    seq: int
    job: str
    config: dict | None = None


@dataclass(frozen=True)
class ChipCost:
    """Trainer → chip: C and accuracy of every run on the samples ``indices`` of ``split``.

    ``theta`` (S, P) float64: the effective weights θ⁰ + θ̃ of each run; ``indices`` (B,) int64;
    ``outputs`` asks for the network outputs (S, B, O) too.
    """

    OP: ClassVar[str] = "cost"
    seq: int
    job: str
    theta: np.ndarray
    indices: np.ndarray
    split: str = "train"
    outputs: bool = False


@dataclass(frozen=True)
class ChipInfo:
    """Chip → trainer, the answer to :class:`ChipHello`: parameter count P, samples per split
    ({"train": N, "test": M}), outputs per sample O and a name."""

    OP: ClassVar[str] = "hello"
    seq: int
    job: str
    params: int
    samples: dict
    outputs: int
    name: str


@dataclass(frozen=True)
class ChipCostReply:
    """Chip → trainer, the answer to :class:`ChipCost`: ``cost`` (S,) and ``accuracy`` (S,)
    float64, ``outputs`` (S, B, O) float64 when asked for."""

    OP: ClassVar[str] = "cost"
    seq: int
    job: str
    cost: np.ndarray
    accuracy: np.ndarray
    outputs: np.ndarray | None = None


@dataclass(frozen=True)
class ChipErrorReply:
    """Chip → trainer: the request ``seq`` failed; ``code`` in CHIP_ERROR_CODES says whether to
    say hello again (unknown_job), send it again (busy) or give up (bad_request)."""

    OP: ClassVar[str] = "error"
    seq: int
    job: str
    error: str
    code: str = "bad_request"


ChipRequest = ChipHello | ChipCost
ChipReply = ChipInfo | ChipCostReply | ChipErrorReply


def _chip_array(value: Any, dtype: str, where: str) -> np.ndarray:
    arr = np.ascontiguousarray(value, dtype=_CHIP_DTYPES[dtype])
    if arr.ndim == 0:
        raise ValueError(f"{where}: must be an array, got a scalar")
    return arr


def encode_chip(msg: ChipRequest | ChipReply) -> list[bytes]:
    """The frames of one chip-protocol message (header, then one frame per array).

    Arrays are converted to the wire dtypes (θ, costs and outputs "<f8", indices "<i8");
    a value the header cannot carry (NaN in a config) raises ValueError.
    """
    header: dict[str, Any] = {"chip": CHIP_VERSION, "op": msg.OP, "seq": msg.seq, "job": msg.job}
    arrays: list[tuple[str, np.ndarray]] = []
    if isinstance(msg, ChipHello):
        if msg.config is not None:
            header["config"] = msg.config
    elif isinstance(msg, ChipCost):
        header.update(split=msg.split, outputs=bool(msg.outputs))
        arrays = [("theta", _chip_array(msg.theta, "<f8", "cost.theta")),
                  ("indices", _chip_array(msg.indices, "<i8", "cost.indices"))]
    elif isinstance(msg, ChipInfo):
        header.update(params=msg.params, samples=dict(msg.samples), outputs=msg.outputs, name=msg.name)
    elif isinstance(msg, ChipCostReply):
        arrays = [("cost", _chip_array(msg.cost, "<f8", "cost.cost")),
                  ("accuracy", _chip_array(msg.accuracy, "<f8", "cost.accuracy"))]
        if msg.outputs is not None:
            arrays.append(("outputs", _chip_array(msg.outputs, "<f8", "cost.outputs")))
    elif isinstance(msg, ChipErrorReply):
        header.update(error=msg.error[:CHIP_MAX_TEXT], code=msg.code)
    else:
        raise TypeError(f"not a chip-protocol message: {type(msg).__name__}")
    header["arrays"] = [{"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)} for name, arr in arrays]
    text = json.dumps(header, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return [text.encode("utf-8")] + [arr.tobytes() for _, arr in arrays]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _chip_frames(frames: list[bytes], ops: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]):
    """Header and arrays of one message whose op is in ``ops`` (op → (required, optional)
    array names); every check the protocol makes on any message, before the op's own ones."""
    if not frames:
        raise ChipProtocolError("empty", "no frames")
    total = sum(len(f) for f in frames)
    if total > CHIP_MAX_BYTES:
        raise ChipProtocolError("oversized", f"{total} bytes > {CHIP_MAX_BYTES}")
    if len(frames[0]) > CHIP_MAX_HEADER_BYTES:
        raise ChipProtocolError("oversized", f"header of {len(frames[0])} bytes > {CHIP_MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(frames[0]).decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ChipProtocolError("header", f"not a UTF-8 JSON object: {type(err).__name__}: {err}") from None
    if not isinstance(header, dict):
        raise ChipProtocolError("header", f"not a JSON object but a {type(header).__name__}")
    if header.get("chip") != CHIP_VERSION or type(header.get("chip")) is not int:
        raise ChipProtocolError("version", f"chip {header.get('chip')!r}, this receiver speaks {CHIP_VERSION}")
    op = header.get("op")
    if not isinstance(op, str) or op not in ops:
        raise ChipProtocolError("op", f"op {op!r} is not one of {', '.join(ops)}")
    seq = header.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_INT:
        raise ChipProtocolError("field", f"{op}.seq must be an integer in [0, 2**53], got {seq!r}")
    job = header.get("job")
    if not isinstance(job, str) or not 1 <= len(job) <= CHIP_MAX_JOB:
        raise ChipProtocolError("field", f"{op}.job must be a string of 1 to {CHIP_MAX_JOB} characters")
    specs = header.get("arrays")
    if not isinstance(specs, list):
        raise ChipProtocolError("arrays", f"{op}.arrays must be a list of {{name, dtype, shape}}")
    required, optional = ops[op]
    arrays: dict[str, np.ndarray] = {}
    if len(frames) < 1 + len(specs):
        raise ChipProtocolError("truncated", f"{op}: {len(specs)} arrays listed, {len(frames) - 1} frames")
    if len(frames) > 1 + len(specs):
        raise ChipProtocolError("arrays", f"{op}: {len(frames) - 1 - len(specs)} extra frames")
    for k, spec in enumerate(specs):
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("shape"), list)
                and "dtype" in spec):
            raise ChipProtocolError("arrays", f"{op}.arrays[{k}] must be an object with name, dtype and shape")
        name, shape = spec["name"], spec["shape"]
        if name not in required + optional:
            raise ChipProtocolError("arrays", f"{op} carries no array {name[:64]!r}")
        if name in arrays:
            raise ChipProtocolError("arrays", f"{op}.{name} listed twice")
        if spec["dtype"] not in _CHIP_DTYPES:
            raise ChipProtocolError("dtype", f"{op}.{name}: dtype {spec['dtype']!r} is not '<f8' or '<i8'")
        if not (1 <= len(shape) <= 3 and all(type(d) is int and 0 <= d <= MAX_INT for d in shape)):
            raise ChipProtocolError("shape", f"{op}.{name}: shape {shape!r} is not 1 to 3 sizes ≥ 0")
        dtype = _CHIP_DTYPES[spec["dtype"]]
        size = math.prod(shape) * dtype.itemsize  # exact: Python integers never wrap
        if size != len(frames[1 + k]):
            raise ChipProtocolError("truncated", f"{op}.{name}: {len(frames[1 + k])} bytes for shape {shape} "
                                                 f"{spec['dtype']} ({size} bytes)")
        arrays[name] = np.frombuffer(frames[1 + k], dtype=dtype).reshape(shape)
    missing = [n for n in required if n not in arrays]
    if missing:
        raise ChipProtocolError("arrays", f"{op} needs the array(s) {', '.join(missing)}")
    return header, op, seq, job, arrays


def _want(arr: np.ndarray, where: str, dtype: str, ndim: int) -> None:
    if arr.dtype.str != dtype:
        raise ChipProtocolError("dtype", f"{where} must be {dtype}, got {arr.dtype.str}")
    if arr.ndim != ndim:
        raise ChipProtocolError("shape", f"{where} must have {ndim} dimension(s), got shape {list(arr.shape)}")


def _count(header: dict, where: str, lo: int, hi: int = MAX_INT) -> int:
    value = header.get(where.rpartition(".")[2])
    if type(value) is not int or not lo <= value <= hi:
        raise ChipProtocolError("field", f"{where} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _text(header: dict, where: str, most: int, default: str | None = None) -> str:
    value = header.get(where.rpartition(".")[2], default)
    if not isinstance(value, str) or len(value) > most:
        raise ChipProtocolError("field", f"{where} must be a string of at most {most} characters")
    return value


def decode_chip_request(frames: list[bytes]) -> ChipRequest:
    """Parse one request a chip receives (its ROUTER's identity frame removed); raise
    :class:`ChipProtocolError` on anything malformed: the chip drops the frame and counts it."""
    header, op, seq, job, arrays = _chip_frames(frames, {"hello": ((), ()), "cost": (("theta", "indices"), ())})
    if op == "hello":
        config = header.get("config")
        if config is not None and not isinstance(config, dict):
            raise ChipProtocolError("field", f"hello.config must be a JSON object, got {type(config).__name__}")
        return ChipHello(seq, job, config)
    theta, indices = arrays["theta"], arrays["indices"]
    _want(theta, "cost.theta", "<f8", 2)
    _want(indices, "cost.indices", "<i8", 1)
    S, P = theta.shape
    if not (1 <= S <= CHIP_MAX_RUNS and P >= 1):
        raise ChipProtocolError("bounds", f"cost.theta must be (S, P) with 1 ≤ S ≤ {CHIP_MAX_RUNS}, P ≥ 1; "
                                          f"got {list(theta.shape)}")
    if not 1 <= len(indices) <= CHIP_MAX_SAMPLES:
        raise ChipProtocolError("bounds", f"cost.indices must hold 1 to {CHIP_MAX_SAMPLES} samples, got {len(indices)}")
    if indices.min() < 0:
        raise ChipProtocolError("bounds", f"cost.indices must be ≥ 0, got {int(indices.min())}")
    split = header.get("split", "train")
    if split not in CHIP_SPLITS:
        raise ChipProtocolError("field", f"cost.split must be one of {', '.join(CHIP_SPLITS)}, got {split!r}")
    outputs = header.get("outputs", False)
    if type(outputs) is not bool:
        raise ChipProtocolError("field", f"cost.outputs must be true or false, got {outputs!r}")
    return ChipCost(seq, job, theta, indices, split, outputs)


def decode_chip_reply(frames: list[bytes]) -> ChipReply:
    """Parse one reply the trainer receives; raise :class:`ChipProtocolError` on anything
    malformed (the trainer drops it, counts it, and keeps waiting for a good one)."""
    header, op, seq, job, arrays = _chip_frames(
        frames, {"hello": ((), ()), "cost": (("cost", "accuracy"), ("outputs",)), "error": ((), ())})
    if op == "hello":
        samples = header.get("samples")
        if not (isinstance(samples, dict) and set(samples) == set(CHIP_SPLITS)
                and all(type(v) is int and 0 <= v <= MAX_INT for v in samples.values())):
            raise ChipProtocolError("field", "hello.samples must be {\"train\": N, \"test\": M}, counts ≥ 0")
        outputs = _count(header, "hello.outputs", 0, CHIP_MAX_OUTPUTS)
        return ChipInfo(seq, job, _count(header, "hello.params", 1), dict(samples), outputs,
                        _text(header, "hello.name", CHIP_MAX_NAME))
    if op == "error":
        code = header.get("code", "bad_request")
        if code not in CHIP_ERROR_CODES:
            raise ChipProtocolError("field", f"error.code must be one of {', '.join(CHIP_ERROR_CODES)}, got {code!r}")
        return ChipErrorReply(seq, job, _text(header, "error.error", CHIP_MAX_TEXT), code)
    cost, accuracy, outputs = arrays["cost"], arrays["accuracy"], arrays.get("outputs")
    _want(cost, "cost.cost", "<f8", 1)
    _want(accuracy, "cost.accuracy", "<f8", 1)
    if not 1 <= len(cost) <= CHIP_MAX_RUNS or accuracy.shape != cost.shape:
        raise ChipProtocolError("shape", f"cost.cost and cost.accuracy must both be (S,), 1 ≤ S ≤ {CHIP_MAX_RUNS}; "
                                         f"got {list(cost.shape)} and {list(accuracy.shape)}")
    if outputs is not None:
        _want(outputs, "cost.outputs", "<f8", 3)
        if outputs.shape[0] != len(cost) or outputs.shape[2] > CHIP_MAX_OUTPUTS:
            raise ChipProtocolError("shape", f"cost.outputs must be (S, B, O) with S = {len(cost)}, "
                                             f"O ≤ {CHIP_MAX_OUTPUTS}; got {list(outputs.shape)}")
    return ChipCostReply(seq, job, cost, accuracy, outputs)
