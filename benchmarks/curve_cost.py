"""What CurveZMQ costs one message (not a test): ``python benchmarks/curve_cost.py``.

One PUSH → PULL pair on loopback TCP in this process, plain and with CURVE (the cluster's
links: ``pmgd_node/shell/keys.py``), side by side in one run, for the message sizes the
cluster sends: a C̃ frame (100 B), a P = 9 shard's weights, and the weights of a
P = 26,154 CNN shard (θ⁰ + θ̃ and θ⁰, float64: 418 kB) and of a larger one. Each size
alternates plain and CURVE ``--repeats`` times and reports medians of the wall and CPU time
per message (send and receive both here, so the CPU covers encryption and decryption).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import zmq

SIZES = {"C̃ frame": 100, "P = 9 shard": 2 * 8 * 9, "P = 26,154 shard": 2 * 8 * 26_154, "2 MB": 2 << 20}


def per_message(ctx: zmq.Context, curve: bool, size: int, count: int) -> tuple[float, float]:
    """(wall, CPU) seconds per message of ``count`` sent one at a time, each received before the next."""
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        pull.curve_server, pull.curve_publickey, pull.curve_secretkey = True, server_public, server_secret
        push.curve_publickey, push.curve_secretkey = zmq.curve_keypair()
        push.curve_serverkey = server_public
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    payload = os.urandom(size)
    push.send(payload)
    pull.recv()  # connected and, with CURVE, past the handshake
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        push.send(payload, copy=False)
        pull.recv(copy=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    push.close(0)
    pull.close(0)
    return wall / count, cpu / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bytes-per-round", type=int, default=50 << 20, help="bytes sent per size and round")
    args = ap.parse_args()
    ctx = zmq.Context()
    print(f"libzmq {zmq.zmq_version()}, pyzmq {zmq.__version__}, CURVE {'yes' if zmq.has('curve') else 'no'}\n")
    print("| message | bytes | plain µs/msg (CPU) | CURVE µs/msg (CPU) | CURVE ÷ plain (wall) | CURVE MB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, size in SIZES.items():
        count = max(200, min(20_000, args.bytes_per_round // size))
        plain, curve = [], []
        for _ in range(args.repeats):
            plain.append(per_message(ctx, False, size, count))
            curve.append(per_message(ctx, True, size, count))
        pw, pc = (statistics.median(x) * 1e6 for x in zip(*plain))
        cw, cc = (statistics.median(x) * 1e6 for x in zip(*curve))
        print(f"| {name} | {size:,} | {pw:,.1f} ({pc:,.1f}) | {cw:,.1f} ({cc:,.1f}) | {cw / pw:.1f} | "
              f"{size / cw:,.0f} |", flush=True)
    ctx.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
