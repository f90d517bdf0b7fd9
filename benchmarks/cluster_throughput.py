"""Cluster throughput benchmark (issue 3, not a test): ``python benchmarks/cluster_throughput.py``.

Sync lock-step ticks per second of a local cluster (``LocalCluster``: one broadcaster and N
node processes on loopback TCP) for N = 1, 2, 4, 8 at two network sizes:

* P = 9:      task parity2, network 2-2-1;
* P = 26,154: task cifar10, network cnn-cifar10, on generated fake CIFAR-10 batches written
  to a temporary ``data_dir`` (batch 1, so the forward passes stay cheap).

Each figure is divided by a **raw pyzmq lock-step loop** run in the same session with the
same processes and payload: one "broadcaster" process binding PULL + PUB and N "node"
processes connecting PUSH + SUB (this very file, started with ``--raw-role``). Per tick every
raw node sends the bytes the cluster node sends, its shard's θ⁰ + θ̃ and θ⁰ (float64,
S × shard length each: with τ_θ = 1 θ⁰ changes every tick, so the cluster node sends both),
as two raw frames; the raw broadcaster waits for all N, then publishes an 8·S-byte frame
(C̃) on one topic; each node waits for it before sending the next tick. Goal: ratio ≥ 0.7.

Each row runs once per job uplink (``--uplink full,replica``, docs/cluster.md): the full uplink
against the raw loop above, the replica against a raw loop of one frame per node (θ⁰ alone:
τ_θ = 1 updates θ⁰ every tick, so a replica node sends its θ⁰ every tick); the broadcaster's
compute then includes regenerating θ̃ for every shard.

The baseline is **pure messaging**: it does none of the work the cluster does per tick. To
show where a gap comes from, the same run also reports

* the CPU time per tick of every process (user + system, all threads, from /proc for the
  cluster, ``time.process_time`` in the raw processes), over the measured ticks;
* the tick compute, timed in-process in a warm loop: (i) the broadcaster's
  ``JobRun.advance`` (input schedule, C₀ and perturbed forward passes, θ⁰ hash) and (ii) one
  node's tick (θ̃, ε, update) for the largest shard; ``compute share`` is the fraction of
  the cluster's tick they make up, and ``ideal = 1 / (1/raw + broadcaster + node compute)``
  is what the cluster would reach if its protocol and bookkeeping cost nothing beyond the raw
  loop's messaging (lock-step: the compute does not overlap the messaging).

Cluster ticks/s is the steady state between two progress points the broadcaster sends: the
first after ``--warmup`` ticks and the final one (``eval_every`` = warm-up, so the few
evaluations on ``eval_samples`` = 2 samples are included and cost little). One short job
first warms every process. Each table row alternates (compute, cluster, raw) ``--repeats``
times on one LocalCluster and reports medians.

The cluster runs as deployed, its links authenticated and encrypted with CurveZMQ (fresh
keys per LocalCluster). ``--plain`` also runs, in the same rounds, a second cluster without
keys and reports what CURVE costs (cluster ticks/s without ÷ with); the raw loop is plain.

Run small: ``--nodes 1,2 --sizes 9 --ticks-small 500``. ``--cluster-env OMP_NUM_THREADS=1``
gives the cluster processes (and the in-process compute timing) one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
sys.path.insert(0, ROOT)

SIZES = {9: ("parity2", "2-2-1"), 26154: ("cifar10", "cnn-cifar10")}
_HELLO = b"h"  # raw node → broadcaster before the start (a 1-byte frame: never a payload)


# ------------------------------------------------------------------------------------ raw loop
def raw_node(pull: str, pub: str, frame_bytes: int, frames: int, total: int, warmup: int) -> dict:
    """A raw node: PUSH ``frames`` frames of ``frame_bytes`` bytes, wait for C̃ on SUB, repeat.

    Returns the process's CPU seconds (all its threads) over the measured ticks."""
    import zmq

    ctx = zmq.Context()
    push, sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"c")  # C̃ of a tick
    sub.setsockopt(zmq.SUBSCRIBE, b"go")  # the start signal
    for sock, ep in ((push, pull), (sub, pub)):
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(ep)
    payload = [os.urandom(frame_bytes) for _ in range(frames)]
    while not sub.poll(50):  # PUB/SUB joins late: say hello until the start signal comes through
        push.send(_HELLO)
    while sub.recv_multipart()[0] != b"go":
        pass
    cpu0 = time.process_time()
    for tick in range(total):
        if tick == warmup:
            cpu0 = time.process_time()
        push.send_multipart(payload)
        while sub.recv_multipart()[0] != b"c":
            pass  # a start signal still in flight
    cpu = time.process_time() - cpu0
    push.close()
    sub.close()
    ctx.term()
    return {"cpu_s": cpu}


def raw_broadcaster(pull_ep: str, pub_ep: str, nodes: int, seeds: int, total: int, warmup: int) -> dict:
    """The raw broadcaster: collect one payload per node, publish C̃, repeat; time the steady part."""
    import zmq

    ctx = zmq.Context()
    pull, pub = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
    for sock, ep in ((pull, pull_ep), (pub, pub_ep)):
        sock.setsockopt(zmq.LINGER, 1000)
        sock.bind(ep)
    cost = [b"c", os.urandom(8 * seeds)]
    got = 0
    while got < nodes:  # start: repeat the start signal until every node's tick-0 payload is in
        pub.send_multipart([b"go"])
        while pull.poll(20):
            frames = pull.recv_multipart()
            got += frames != [_HELLO]
    pub.send_multipart(cost)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for tick in range(1, total):
        got = 0
        while got < nodes:
            got += pull.recv_multipart() != [_HELLO]
        pub.send_multipart(cost)
        if tick == warmup - 1:
            t0, cpu0 = time.perf_counter(), time.process_time()
    t1, cpu1 = time.perf_counter(), time.process_time()
    pull.close()
    pub.close()
    ctx.term()
    return {"ticks": total - warmup, "seconds": t1 - t0, "ticks_per_s": (total - warmup) / (t1 - t0),
            "broadcaster_cpu_s": cpu1 - cpu0}


def run_raw(nodes: int, seeds: int, shard: int, ticks: int, warmup: int, frames: int = 2) -> dict:
    """One raw measurement: N node subprocesses (this file, ``--raw-role node``) + a broadcaster one;
    each node sends ``frames`` frames of a float64 shard per tick."""
    from services.cluster.launcher import free_port

    pull, pub = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    total = warmup + ticks
    common = [sys.executable, os.path.abspath(__file__), "--raw-role"]
    bcast = subprocess.Popen(common + ["broadcaster", pull, pub, str(nodes), str(seeds), str(total), str(warmup)],
                             stdout=subprocess.PIPE, text=True)
    node_args = ["node", pull, pub, str(8 * seeds * shard), str(frames), str(total), str(warmup)]
    workers = [subprocess.Popen(common + node_args, stdout=subprocess.PIPE, text=True) for _ in range(nodes)]
    try:
        out, _ = bcast.communicate(timeout=300)
        node_outs = [w.communicate(timeout=30)[0] for w in workers]
    finally:
        for proc in (bcast, *workers):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if bcast.returncode != 0 or any(w.returncode != 0 for w in workers):
        raise RuntimeError(f"raw loop failed (exit codes {[q.returncode for q in (bcast, *workers)]})")
    result = json.loads(out.strip().splitlines()[-1])
    result["nodes_cpu_s"] = sum(json.loads(o.strip().splitlines()[-1])["cpu_s"] for o in node_outs)
    return result


# ------------------------------------------------------------------------------------ cluster
def job_config(P: int, nodes: int, seeds: int, max_ticks: int, eval_every: int, data_dir: str, uplink: str = "full"):
    from pmgd_node.config import JobConfig

    task, network = SIZES[P]
    extra = {} if P == 9 else {"amplitude": 0.01, "eta": 1e-3, "data_dir": data_dir, "eval_samples": 2}
    return JobConfig(task=task, network=network, seeds=seeds, nodes=nodes, batch=1, max_ticks=max_ticks,
                     target_accuracy=None, eval_every=eval_every, uplink=uplink, **extra)


def run_cluster(cluster, P: int, nodes: int, seeds: int, ticks: int, warmup: int, data_dir: str,
                uplink: str = "full") -> dict:
    """One job on a running cluster; ticks/s between the progress point at ``warmup`` and the end."""
    from services.cluster.client import run_job

    points: list[tuple[int, float, list[float]]] = []
    pids = [proc.pid for proc in cluster.processes()]  # the broadcaster first

    def on_progress(d: dict) -> None:
        if not points:
            points.append((d["tick"], time.perf_counter(), [process_cpu(pid) for pid in pids]))

    config = job_config(P, nodes, seeds, warmup + ticks, warmup, data_dir, uplink)
    summary = run_job(config, cluster.endpoints["control"], on_progress, timeout_s=1800, keys=cluster.keys)
    t_end = time.perf_counter()  # the final result leaves right after the last evaluation
    cpu_end = [process_cpu(pid) for pid in pids]
    (t_first, s_first, cpu_first) = points[0]
    if summary["epochs"] != 1:
        print(f"warning: the job was re-assigned ({summary['epochs']} epochs): this measure includes a rollback")
    cpu = [b - a for a, b in zip(cpu_first, cpu_end)]
    return {"ticks": summary["ticks_run"] - t_first, "seconds": t_end - s_first,
            "ticks_per_s": (summary["ticks_run"] - t_first) / (t_end - s_first),
            "broadcaster_cpu_s": cpu[0], "nodes_cpu_s": sum(cpu[1:]),
            "run_wall_time_s": summary.get("run_wall_time_s"), "wall_time_s": summary["wall_time_s"],
            "epochs": summary["epochs"], "dropped": summary["dropped"], "uplink": summary.get("uplink"),
            "uplink_bytes": summary.get("uplink_bytes")}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------- compute share
def tick_compute(P: int, nodes: int, seeds: int, data_dir: str, ticks: int, uplink: str = "full") -> dict:
    """Seconds per tick of the broadcaster's ``JobRun.advance`` and of one node's tick, in-process."""
    import numpy as np

    from pmgd_node.link import FateTable, Receiver, node_links
    from pmgd_node.node import ParameterNode
    from services.broadcaster.job import JobRun
    from services.broadcaster.service import torch_threads

    config = job_config(P, nodes, seeds, 10**9, 10**9, data_dir, uplink)
    job = JobRun("compute", config)
    threads = torch_threads(config)  # the torch threads the broadcaster gives this job's passes
    shards = range(len(job.shards))
    job.assignments()
    job.effective[...] = job.static
    for _ in range(min(20, ticks)):  # warm-up: first batches, torch's first calls
        job.have.update(shards)
        job.advance()
    t0 = time.perf_counter()
    for _ in range(ticks):
        job.have.update(shards)
        job.advance()
    t_broadcaster = (time.perf_counter() - t0) / ticks

    a, b = job.shards[0]  # the largest shard (the first P mod N shards hold one more)
    node = ParameterNode(config, job.num_params, a, b, job.static[:, a:b])
    rx = Receiver(node, FateTable(node_links(config, 0)[0]))  # as pmgd_node.shell.process builds it
    c = np.full(seeds, 1e-3)
    n_ticks = max(ticks, 1000)
    for t in range(-20, n_ticks):
        if t == 0:
            t0 = time.perf_counter()
        tick = t + 20
        node.effective_weights(tick)
        rx.offer(c, tick, tick)
        rx.close_tick(tick)
    t_node = (time.perf_counter() - t0) / n_ticks
    return {"broadcaster_s": t_broadcaster, "node_s": t_node, "c0_per_tick": job.stage.c0_measurements / job.tick,
            "torch_threads": threads}


# ------------------------------------------------------------------------------------ driver
def measure(P: int, N: int, seeds: int, ticks: int, warmup: int, repeats: int, data_dir: str,
            cluster_env: dict | None = None, plain: bool = False, uplink: str = "full") -> dict:
    """One table row: ``repeats`` rounds of (in-process compute, cluster job, [cluster job
    without keys,] raw loop); medians."""
    import contextlib

    import numpy as np

    from pmgd_node.sharding import shard_ranges
    from services.cluster.launcher import LocalCluster

    shard = shard_ranges(P, N)[0][1]  # the largest shard
    load_before = os.getloadavg()[0]
    compute, cl, cl_plain, raw = [], [], [], []
    # A long heartbeat timeout: the broadcaster is deaf while it builds a job (torch import,
    # data); with the default 2 s the nodes could re-join during the warm-up job.
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(LocalCluster(N, heartbeat_timeout_s=10.0, env=cluster_env))
        bare = stack.enter_context(LocalCluster(N, heartbeat_timeout_s=10.0, env=cluster_env, keys="")) \
            if plain else None
        for c in (cluster, bare) if plain else (cluster,):
            run_cluster(c, P, N, seeds, max(10, warmup), 5, data_dir)  # every process warm
        for _ in range(repeats):
            compute.append(tick_compute(P, N, seeds, data_dir, min(ticks, 500), uplink))
            cl.append(run_cluster(cluster, P, N, seeds, ticks, warmup, data_dir, uplink))
            if plain:
                cl_plain.append(run_cluster(bare, P, N, seeds, ticks, warmup, data_dir, uplink))
            # τ_θ = 1 updates θ⁰ every tick: the full uplink sends θ⁰ + θ̃ and θ⁰, the replica θ⁰
            raw.append(run_raw(N, seeds, shard, ticks, warmup, frames=2 if uplink == "full" else 1))
    med = lambda xs: float(np.median(xs))  # noqa: E731
    c_rate, r_rate = med([m["ticks_per_s"] for m in cl]), med([m["ticks_per_s"] for m in raw])
    t_b, t_n = med([c["broadcaster_s"] for c in compute]), med([c["node_s"] for c in compute])
    ideal = 1.0 / (1.0 / r_rate + t_b + t_n)
    per_tick = lambda ms, key: 1e6 * med([m[key] / m["ticks"] for m in ms])  # noqa: E731
    return {"P": P, "task": SIZES[P][0], "nodes": N, "uplink": uplink, "seeds": seeds, "ticks": ticks,
            "warmup": warmup, "repeats": repeats,
            "payload_bytes_per_node": (2 if uplink == "full" else 1) * 8 * seeds * shard,
            "cluster_ticks_per_s": c_rate, "raw_ticks_per_s": r_rate, "ratio": c_rate / r_rate,
            "cluster_cpu_us": [per_tick(cl, "broadcaster_cpu_s"), per_tick(cl, "nodes_cpu_s")],
            "raw_cpu_us": [per_tick(raw, "broadcaster_cpu_s"), per_tick(raw, "nodes_cpu_s")],
            "broadcaster_compute_ms": 1e3 * t_b, "node_compute_ms": 1e3 * t_n,
            "compute_share": c_rate * (t_b + t_n), "ideal_ticks_per_s": ideal, "ratio_to_ideal": c_rate / ideal,
            "plain_ticks_per_s": med([m["ticks_per_s"] for m in cl_plain]) if plain else None,
            "plain_cpu_us": [per_tick(cl_plain, "broadcaster_cpu_s"), per_tick(cl_plain, "nodes_cpu_s")]
            if plain else None,
            "cluster_env": cluster_env or {}, "load_before": load_before, "cluster": cl, "cluster_plain": cl_plain,
            "raw": raw, "compute": compute}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--raw-role"]:
        role, args = argv[1], argv[2:]
        fn = raw_node if role == "node" else raw_broadcaster
        print(json.dumps(fn(args[0], args[1], *map(int, args[2:]))), flush=True)
        return 0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,2,4,8", help="comma-separated node counts")
    ap.add_argument("--sizes", default="9,26154", help="comma-separated P: 9 (parity2 2-2-1), 26154 (cifar10 CNN)")
    ap.add_argument("--ticks-small", type=int, default=2000, help="measured ticks at P = 9")
    ap.add_argument("--ticks-large", type=int, default=300, help="measured ticks at P = 26,154")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up ticks (default: ticks / 10, at least 10)")
    ap.add_argument("--seeds", type=int, default=1, help="runs S side by side (payload: 8·S bytes per parameter)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate cluster and raw this many times; report medians")
    ap.add_argument("--cluster-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the cluster processes, e.g. OMP_NUM_THREADS=1 (repeatable)")
    ap.add_argument("--uplink", default="full,replica",
                    help="comma-separated job uplinks to measure, each against its own raw payload (full: θ⁰ + θ̃ "
                         "and θ⁰, replica: θ⁰, as τ_θ = 1 updates every tick)")
    ap.add_argument("--plain", action="store_true",
                    help="also run a cluster without CurveZMQ keys in the same rounds: the cost of CURVE")
    ap.add_argument("--json", default=os.path.join(ROOT, "out", "cluster_throughput.json"))
    args = ap.parse_args(argv)
    cluster_env = dict(kv.split("=", 1) for kv in args.cluster_env)

    import numpy as np
    import torch

    from services.evaluator.data import write_fake_cifar10

    node_counts = [int(n) for n in args.nodes.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    for P in sizes:
        if P not in SIZES:
            ap.error(f"--sizes: {P} is not one of {', '.join(map(str, SIZES))}")
    cores = os.cpu_count() or 1
    print(f"machine: {platform.node()} · {platform.processor() or platform.machine()} · {cores} cores · "
          f"python {platform.python_version()} · torch {torch.__version__} · numpy {np.__version__}")
    if cluster_env:
        print(f"cluster processes' extra environment: {cluster_env}")
        if "OMP_NUM_THREADS" in cluster_env:  # time the in-process forward passes the same way
            torch.set_num_threads(int(cluster_env["OMP_NUM_THREADS"]))
    if max(node_counts) + 1 > cores:
        print(f"note: N + 1 processes > {cores} cores from N = {cores} on: the cluster and the raw loop "
              "are both oversubscribed there (their ratio is still measured side by side)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pmgd-bench-") as data_dir:
        if 26154 in sizes:
            write_fake_cifar10(data_dir)
        for P in sizes:
            ticks = args.ticks_small if P == 9 else args.ticks_large
            warmup = args.warmup or max(10, ticks // 10)
            for N, uplink in ((n, u) for n in node_counts for u in args.uplink.split(",")):
                rows.append(measure(P, N, args.seeds, ticks, warmup, args.repeats, data_dir, cluster_env,
                                    args.plain, uplink))
                r = rows[-1]
                print(f"P={P:>6} N={N} {uplink:>7}: cluster {r['cluster_ticks_per_s']:8.1f}/s  "
                      f"raw {r['raw_ticks_per_s']:8.1f}/s  "
                      f"ratio {r['ratio']:.2f}  (CPU µs/tick cluster {r['cluster_cpu_us'][0]:.0f} + "
                      f"{r['cluster_cpu_us'][1]:.0f}, raw {r['raw_cpu_us'][0]:.0f} + {r['raw_cpu_us'][1]:.0f}; "
                      f"compute ms/tick {r['broadcaster_compute_ms']:.3f} + {r['node_compute_ms']:.3f}; "
                      f"ideal {r['ideal_ticks_per_s']:.1f}/s; load {r['load_before']:.2f})", flush=True)
    print()
    print("| P | N | uplink | cluster ticks/s | raw ticks/s | ratio | CPU µs/tick, cluster (bcast + nodes) "
          "| CPU µs/tick, raw (bcast + nodes) | compute ms/tick (bcast + node) | compute share | ideal ticks/s "
          "| cluster ÷ ideal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['P']:,} | {r['nodes']} | {r['uplink']} | {r['cluster_ticks_per_s']:,.0f} | "
              f"{r['raw_ticks_per_s']:,.0f} | "
              f"{r['ratio']:.2f} | {r['cluster_cpu_us'][0]:,.0f} + {r['cluster_cpu_us'][1]:,.0f} | "
              f"{r['raw_cpu_us'][0]:,.0f} + {r['raw_cpu_us'][1]:,.0f} | "
              f"{r['broadcaster_compute_ms']:.3f} + {r['node_compute_ms']:.3f} | {100 * r['compute_share']:.0f} % | "
              f"{r['ideal_ticks_per_s']:,.0f} | {r['ratio_to_ideal']:.2f} |")
    if args.plain:
        print("\nThe cost of CurveZMQ (the same rounds, one cluster with keys and one without):\n")
        print("| P | N | ticks/s without keys | ticks/s with keys | without ÷ with "
              "| CPU µs/tick without (bcast + nodes) | with (bcast + nodes) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['P']:,} | {r['nodes']} | {r['plain_ticks_per_s']:,.0f} | {r['cluster_ticks_per_s']:,.0f} | "
                  f"{r['plain_ticks_per_s'] / r['cluster_ticks_per_s']:.2f} | "
                  f"{r['plain_cpu_us'][0]:,.0f} + {r['plain_cpu_us'][1]:,.0f} | "
                  f"{r['cluster_cpu_us'][0]:,.0f} + {r['cluster_cpu_us'][1]:,.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"machine": {"node": platform.node(), "cores": cores, "python": platform.python_version(),
                               "torch": torch.__version__, "numpy": np.__version__},
                   "args": vars(args), "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
