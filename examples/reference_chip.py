#!/usr/bin/env python3
"""A reference chip for the PMGD chip protocol v1 (docs/chip-protocol.md): an analog device
that runs an n-bit parity MLP, with imperfections the trainer does not know.

Standalone on purpose: numpy, pyzmq and the standard library only, nothing of the project, so
that it shows what a chip needs and nothing more::

    python examples/reference_chip.py --task parity2 --endpoint tcp://127.0.0.1:5570
    pmgd train --task parity2 --chip tcp://127.0.0.1:5570

The device. Network N-N-1 for ``parityN``: sigmoid hidden and output units,
``y = σ(W₂ σ(W₁ x + b₁) + b₂)``; the flat parameters θ (P = N·N + N + N + 1) laid out layer by
layer, each layer W[out, in] row-major then b[out]. Data: all 2ᴺ inputs in binary counting
order (most significant bit first), bit b presented as 2b − 1 ∈ {−1, +1}, target t = parity of
the ones; sample i is the i-th code, in both splits ("train" and "test" are the same set).

    cost      C = (1/B) Σ_b (y_b − t_b)²  (+ read noise)        accuracy = mean_b [(y_b > ½) = t_b]

Imperfections, all drawn from ``--seed`` (the device's identity), none known to the trainer:

    θ_device = g ⊙ θ + o         g_i = 1 + σ_g·N(0, 1)  (--gain-variation σ_g)
                                 o_i = σ_o·N(0, 1)      (--offset-variation σ_o)
    o ← o + σ_d·N(0, 1) per cost request                (--drift σ_d: a random walk)
    C_measured = C + σ_r·N(0, 1) per run and request     (--read-noise σ_r; accuracy is noiseless)

With every σ zero the chip computes exactly the project's MLP cost (to float rounding).

Protocol. The chip binds a ROUTER; each request is [peer] [JSON header] [array frames…]. It
answers ``hello`` (with its P, samples per split, outputs per sample and name) and ``cost``; a
``cost`` for a job that has not said hello is answered with the error code ``unknown_job``, so
a trainer that finds the chip restarted introduces the job again. Malformed frames are
dropped and counted (printed at exit). With ``--keys DIR`` the socket is a CurveZMQ server
with the project's key layout (``DIR/server.key_secret``, clients in ``DIR/authorized/``);
keys are required to bind beyond loopback. Prints one line when ready; SIGTERM or SIGINT ends
it cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections import OrderedDict
from urllib.parse import urlsplit

import numpy as np
import zmq

VERSION = 1
MAX_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1 << 20
MAX_RUNS = 100_000
MAX_SAMPLES = 1_000_000
MAX_INT = 1 << 53
MAX_JOBS = 64  # jobs remembered (hello'd) at once; the oldest is forgotten first
DTYPES = {"<f8": np.dtype("<f8"), "<i8": np.dtype("<i8")}


class Malformed(ValueError):
    """A frame that is not a valid request: dropped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class Refused(ValueError):
    """A valid request the chip cannot serve: answered with an error of ``code``."""

    def __init__(self, code: str, text: str):
        self.code = code
        super().__init__(text)


# --- the protocol -----------------------------------------------------------------------------
def _unique(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def decode_request(frames: list[bytes]) -> tuple[dict, dict]:
    """The header and arrays of one request; :class:`Malformed` for anything off-spec."""
    if not frames:
        raise Malformed("empty", "no frames")
    if sum(len(f) for f in frames) > MAX_BYTES or len(frames[0]) > MAX_HEADER_BYTES:
        raise Malformed("oversized", "message or header too large")
    try:
        header = json.loads(frames[0].decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise Malformed("header", f"not UTF-8 JSON: {err}") from None
    if not isinstance(header, dict):
        raise Malformed("header", "not a JSON object")
    if type(header.get("chip")) is not int or header["chip"] != VERSION:
        raise Malformed("version", f"chip {header.get('chip')!r}")
    op = header.get("op")
    if op not in ("hello", "cost"):
        raise Malformed("op", f"op {op!r}")
    if type(header.get("seq")) is not int or not 0 <= header["seq"] <= MAX_INT:
        raise Malformed("field", "seq")
    if not isinstance(header.get("job"), str) or not 1 <= len(header["job"]) <= 256:
        raise Malformed("field", "job")
    specs = header.get("arrays")
    if not isinstance(specs, list):
        raise Malformed("arrays", "arrays is not a list")
    if len(frames) < 1 + len(specs):
        raise Malformed("truncated", "fewer frames than arrays")
    if len(frames) > 1 + len(specs):
        raise Malformed("arrays", "extra frames")
    allowed = ("theta", "indices") if op == "cost" else ()
    arrays: dict[str, np.ndarray] = {}
    for k, spec in enumerate(specs):
        if not (isinstance(spec, dict) and spec.get("name") in allowed and isinstance(spec.get("shape"), list)
                and spec["name"] not in arrays and "dtype" in spec):
            raise Malformed("arrays", f"arrays[{k}]")
        if spec["dtype"] not in DTYPES:
            raise Malformed("dtype", f"{spec['name']}: {spec['dtype']!r}")
        shape = spec["shape"]
        if not (1 <= len(shape) <= 3 and all(type(d) is int and 0 <= d <= MAX_INT for d in shape)):
            raise Malformed("shape", f"{spec['name']}: {shape!r}")
        dtype = DTYPES[spec["dtype"]]
        if math.prod(shape) * dtype.itemsize != len(frames[1 + k]):
            raise Malformed("truncated", f"{spec['name']}: {len(frames[1 + k])} bytes for {shape}")
        arrays[spec["name"]] = np.frombuffer(frames[1 + k], dtype=dtype).reshape(shape)
    if op == "hello":
        if header.get("config") is not None and not isinstance(header["config"], dict):
            raise Malformed("field", "config")
        return header, arrays
    if set(arrays) != {"theta", "indices"}:
        raise Malformed("arrays", "cost needs theta and indices")
    theta, indices = arrays["theta"], arrays["indices"]
    if theta.dtype.str != "<f8" or indices.dtype.str != "<i8":
        raise Malformed("dtype", "theta must be <f8, indices <i8")
    if theta.ndim != 2 or indices.ndim != 1:
        raise Malformed("shape", "theta must be (S, P), indices (B,)")
    if not (1 <= theta.shape[0] <= MAX_RUNS and theta.shape[1] >= 1 and 1 <= len(indices) <= MAX_SAMPLES
            and indices.min() >= 0):
        raise Malformed("bounds", f"theta {list(theta.shape)}, {len(indices)} indices")
    if header.get("split", "train") not in ("train", "test"):
        raise Malformed("field", "split")
    if type(header.get("outputs", False)) is not bool:
        raise Malformed("field", "outputs")
    return header, arrays


def encode_reply(header: dict, arrays: list[tuple[str, np.ndarray]] = ()) -> list[bytes]:
    arrays = [(name, np.ascontiguousarray(a, dtype="<f8")) for name, a in arrays]
    header = dict(header, chip=VERSION, arrays=[{"name": n, "dtype": "<f8", "shape": list(a.shape)}
                                                 for n, a in arrays])
    return [json.dumps(header, separators=(",", ":")).encode("utf-8")] + [a.tobytes() for _, a in arrays]


# --- the device -------------------------------------------------------------------------------
class ParityDevice:
    """An N-N-1 sigmoid MLP for n-bit parity on imperfect analog hardware (module docstring)."""

    def __init__(self, bits: int, seed: int, gain: float, offset: float, read_noise: float, drift: float):
        self.bits = bits
        self.layers = (bits, bits, 1)
        self.P = bits * bits + bits + bits + 1
        codes = np.arange(2 ** bits)
        b = (codes[:, None] >> np.arange(bits - 1, -1, -1)) & 1
        self.x = 2.0 * b.astype(np.float64) - 1.0  # (N_samples, bits)
        self.t = (b.sum(axis=1) % 2).astype(np.float64)
        rng = np.random.default_rng(seed)  # the device's identity: its mismatch and its noise
        self.gain = 1.0 + gain * rng.standard_normal(self.P)
        self.offset = offset * rng.standard_normal(self.P)
        self.read_noise, self.drift = read_noise, drift
        self.noise = np.random.default_rng([seed, 1])
        self.name = f"reference chip parity{bits} (seed {seed})"

    def outputs(self, theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """y (S, B) of the device for the runs θ (S, P) on samples ``idx``."""
        w = self.gain * theta + self.offset  # what the device's analog weights hold
        a = np.broadcast_to(self.x[idx].T, (len(w), self.bits, len(idx)))  # (S, in, B)
        off = 0
        for n_in, n_out in zip(self.layers[:-1], self.layers[1:]):
            W = w[:, off:off + n_out * n_in].reshape(-1, n_out, n_in)
            b = w[:, off + n_out * n_in:off + n_out * n_in + n_out, None]
            off += n_out * n_in + n_out
            a = 1.0 / (1.0 + np.exp(np.minimum(-(W @ a + b), 700.0)))
        return a[:, 0, :]

    def cost(self, theta: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.drift:
            self.offset = self.offset + self.drift * self.noise.standard_normal(self.P)
        y = self.outputs(theta, idx)
        t = self.t[idx]
        cost = ((y - t) ** 2).mean(axis=1)
        if self.read_noise:
            cost = cost + self.read_noise * self.noise.standard_normal(len(cost))
        accuracy = ((y > 0.5) == (t > 0.5)).mean(axis=1)
        return cost, accuracy, y


class Chip:
    def __init__(self, device: ParityDevice, task: str):
        self.device, self.task = device, task
        self.jobs: OrderedDict[str, bool] = OrderedDict()
        self.dropped: dict[str, int] = {}
        self.answered = 0

    def answer(self, header: dict, arrays: dict) -> list[bytes]:
        reply = {"op": header["op"], "seq": header["seq"], "job": header["job"]}
        try:
            if header["op"] == "hello":
                task = (header.get("config") or {}).get("task")
                if isinstance(task, str) and task.startswith("parity") and task != self.task:
                    raise Refused("bad_request", f"this chip runs {self.task}; the job is {task}")
                self.jobs.pop(header["job"], None)
                self.jobs[header["job"]] = True
                while len(self.jobs) > MAX_JOBS:
                    self.jobs.popitem(last=False)
                n = len(self.device.t)
                return encode_reply(dict(reply, params=self.device.P, samples={"train": n, "test": n}, outputs=1,
                                         name=self.device.name))
            if header["job"] not in self.jobs:
                raise Refused("unknown_job", f"job {header['job']!r} has not said hello to this chip")
            theta, idx = arrays["theta"], arrays["indices"]
            if theta.shape[1] != self.device.P:
                raise Refused("bad_request", f"theta has {theta.shape[1]} parameters per run; this chip has "
                                             f"P={self.device.P}")
            if idx.max() >= len(self.device.t):
                raise Refused("bad_request", f"indices must lie in [0, {len(self.device.t)})")
            cost, accuracy, y = self.device.cost(theta, idx)
            out = [("cost", cost), ("accuracy", accuracy)]
            if header.get("outputs", False):
                out.append(("outputs", y[:, :, None]))
            return encode_reply(reply, out)
        except Refused as err:
            return encode_reply({"op": "error", "seq": header["seq"], "job": header["job"], "error": str(err),
                                 "code": err.code})


# --- the process ------------------------------------------------------------------------------
def _is_loopback(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(endpoint).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _secure(ctx: zmq.Context, sock: zmq.Socket, keys: str):
    """CurveZMQ server with the project's key directory: our pair in server.key_secret, the
    clients we accept in authorized/*.key (pyzmq's zmq.auth does the ZAP handshake)."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    secret_file = os.path.join(keys, "server.key_secret")
    authorized = os.path.join(keys, "authorized")
    if not os.path.isfile(secret_file) or not os.path.isdir(authorized):
        raise SystemExit(f"reference chip: {keys} needs server.key_secret and authorized/ "
                         "(make it with `pmgd keys init DIR`)")
    public, secret = zmq.auth.load_certificate(secret_file)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=authorized)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A reference chip (chip protocol v1): an imperfect analog "
                                             "device running an n-bit parity MLP.")
    ap.add_argument("--task", default="parity2", help="parity2 … parity8 (default parity2)")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5570", help="where to bind the ROUTER")
    ap.add_argument("--keys", default="", metavar="DIR", help="CurveZMQ key directory (needed beyond loopback)")
    ap.add_argument("--seed", type=int, default=0, help="the device's identity: its mismatch and noise")
    ap.add_argument("--gain-variation", type=float, default=0.0, help="σ_g of the per-parameter gain 1 + σ_g·N(0,1)")
    ap.add_argument("--offset-variation", type=float, default=0.0, help="σ_o of the per-parameter offset")
    ap.add_argument("--read-noise", type=float, default=0.0, help="σ_r of the noise on every measured cost")
    ap.add_argument("--drift", type=float, default=0.0, help="σ_d of the offsets' random walk per request")
    args = ap.parse_args(argv)
    if not (args.task.startswith("parity") and args.task[6:].isdigit() and 2 <= int(args.task[6:]) <= 8):
        ap.error(f"--task must be parity2 … parity8, got {args.task!r}")
    for name in ("gain_variation", "offset_variation", "read_noise", "drift"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0.0 <= value <= 10.0):
            ap.error(f"--{name.replace('_', '-')} must be in [0, 10], got {value}")
    if not 0 <= args.seed < 2 ** 63:
        ap.error(f"--seed must be in [0, 2**63), got {args.seed}")
    if not args.keys and not _is_loopback(args.endpoint):
        ap.error(f"{args.endpoint} is reachable beyond this machine: give --keys DIR (CurveZMQ)")
    device = ParityDevice(int(args.task[6:]), args.seed, args.gain_variation, args.offset_variation,
                          args.read_noise, args.drift)
    chip = Chip(device, args.task)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    auth = _secure(ctx, sock, args.keys) if args.keys else None
    try:
        sock.bind(args.endpoint)
    except zmq.ZMQError as err:
        raise SystemExit(f"reference chip: cannot bind {args.endpoint}: {err}") from None
    running = [True]

    def stop(signum, frame):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"reference chip: {args.task}, P={device.P}, {len(device.t)} samples, seed {args.seed}, on "
          f"{args.endpoint}{' (CurveZMQ)' if auth else ''}: ready", flush=True)
    while running[0]:
        try:
            if not sock.poll(200):
                continue
            frames = sock.recv_multipart()
        except zmq.ZMQError as err:  # EINTR when a signal lands mid-call: the loop checks running
            if err.errno == zmq.EINTR:
                continue
            raise
        try:
            header, arrays = decode_request(frames[1:])
        except Malformed as err:
            chip.dropped[err.reason] = chip.dropped.get(err.reason, 0) + 1
            continue
        sock.send_multipart([frames[0]] + chip.answer(header, arrays), copy=False)
        chip.answered += 1
    sock.close(linger=0)
    if auth is not None:
        auth.stop()
    ctx.term()
    print(f"reference chip: stopped after {chip.answered} answers; dropped {chip.dropped or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
