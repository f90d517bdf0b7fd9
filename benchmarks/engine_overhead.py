"""Engine benchmarks (not tests): run with ``make bench`` or ``python benchmarks/engine_overhead.py``.

(a) Algorithm overhead on the Fashion-MNIST CNN at batch 1000:
        ratio = engine wall time / ((perturbed ticks + C₀ measurements) × t_forward)
    where t_forward is a bare torch forward pass (cost) of the same model on a batch of the
    same size, timed in the same run, interleaved with the engine so machine noise hits both.
    Goal ≤ 1.15: the algorithm's own work should be nearly free beside the network.
(b) Wall time of ``pmgd train --task parity2 --perturbation rcm --seeds 100`` (engine only).
    Goal ≤ 1 s on 2 cores (the paper: 0.2 s for one run).

Uses the real Fashion-MNIST files when present (``--data-dir``, default ../shared/data/fashion-mnist),
else synthetic images of the same shape (the forward-pass cost does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pmgd_node.config import JobConfig  # noqa: E402
from services.engine.engine import Engine, summarize  # noqa: E402
from services.evaluator.data import Dataset, DatasetError, load  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FMNIST = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "fashion-mnist"))


def fmnist_data(data_dir: str) -> tuple[Dataset, str]:
    try:
        return load("fmnist", data_dir, "train"), "real Fashion-MNIST"
    except DatasetError:
        rng = np.random.default_rng(0)
        x = rng.random((10_000, 1, 28, 28), dtype=np.float32)
        return Dataset(x, rng.integers(0, 10, 10_000), 10, "synthetic"), "synthetic 28×28"


def bench_overhead(data_dir: str, ticks: int, rounds: int) -> dict:
    train, source = fmnist_data(data_dir)
    cfg = JobConfig(task="fmnist", batch=1000, amplitude=0.01, eta=1e-4, max_ticks=10**9,
                    target_accuracy=None, eval_samples=1000, data_dir=data_dir)
    engine = Engine(cfg, train=train, evalset=train)
    model = engine.model
    theta = engine.theta0
    fixed = model.prepare(train.x[:1000], train.y[:1000])
    engine.step()  # warm-up: first batch, first C₀, perturbation block
    model.cost(theta, fixed)
    eng_time = fwd_time = 0.0
    evals = 0
    for _ in range(rounds):
        c0_before, t0 = engine.stage.c0_measurements, time.perf_counter()
        for _ in range(ticks):
            engine.step()
        eng_time += time.perf_counter() - t0
        n = ticks + engine.stage.c0_measurements - c0_before
        evals += n
        t0 = time.perf_counter()
        for _ in range(n):
            model.cost(theta, fixed)
        fwd_time += time.perf_counter() - t0
    per_fwd = fwd_time / evals
    return {"source": source, "device": str(model.device), "ticks": ticks * rounds, "forward_passes": evals,
            "engine_s": eng_time, "forward_ms": 1e3 * per_fwd, "ratio": eng_time / (evals * per_fwd)}


def bench_parity(seeds: int) -> dict:
    cfg = JobConfig(seeds=seeds)
    t0 = time.perf_counter()
    result = Engine(cfg).run()
    wall = time.perf_counter() - t0
    s = summarize(result)
    return {"wall_s": wall, "converged": s["converged"], "median_ticks": s["ticks_to_solution_median"],
            "ticks_run": result.ticks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_FMNIST)
    ap.add_argument("--ticks", type=int, default=10, help="engine ticks per interleaved round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"torch {torch.__version__} · numpy {np.__version__}")
    a = bench_overhead(args.data_dir, args.ticks, args.rounds)
    print(f"(a) F-MNIST CNN, batch 1000, {a['source']}, {a['device']}: {a['ticks']} ticks + C₀ = "
          f"{a['forward_passes']} forward passes in {a['engine_s']:.2f} s; bare forward {a['forward_ms']:.2f} ms; "
          f"ratio {a['ratio']:.3f} (goal ≤ 1.15)")
    b = bench_parity(args.seeds)
    print(f"(b) parity2 R-CM --seeds {args.seeds}: {b['wall_s']:.2f} s wall (goal ≤ 1 s), "
          f"{b['converged']}/{args.seeds} converged, median {b['median_ticks']} ticks, {b['ticks_run']} ticks run")


if __name__ == "__main__":
    main()
