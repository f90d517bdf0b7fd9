"""Engine benchmarks (not tests): run with ``make bench`` or ``python benchmarks/engine_overhead.py``.

(a) Algorithm overhead on the Fashion-MNIST CNN at batch 1000:
        ratio = engine wall time / ((perturbed ticks + C₀ measurements) × t_forward)
    where t_forward is a bare torch forward pass (cost) of the same model on a batch of the
    same size, timed in the same run, interleaved with the engine so machine noise hits both.
    Goal ≤ 1.15: the algorithm's own work should be nearly free beside the network.
(b) Wall time of ``pmgd train --task parity2 --perturbation rcm --seeds 100`` (engine only).
    Goal ≤ 1 s on 2 cores (the paper: 0.2 s for one run). Beside it, in the same run, the
    **numpy floor**: the same job's per-tick arithmetic as one flat loop of numpy calls (the
    model's cost of θ⁰ and θ⁰ + θ̃ as one batch, C̃, ε and the update written out, the
    evaluation and stopping rule every ``eval_every`` ticks) with no engine, stage, transport
    or node objects around it. It must end on the engine's θ⁰ bit for bit (checked), so it
    does exactly the engine's arithmetic; its time is what any numpy implementation of this
    job needs on the machine, and engine ÷ floor is what the architecture adds.

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
from services.chip.job import summarize  # noqa: E402
from services.engine.engine import Engine  # noqa: E402
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


def flat_parity(cfg: JobConfig) -> tuple[float, np.ndarray, np.ndarray]:
    """The numpy floor of (b): one flat loop, bit-identical to ``Engine(cfg).run()``.

    Only for the configuration it is written for (discrete, R-CM, sum integrator, update
    every tick, one node, no link or noise models); the engine supplies the initial θ⁰, the
    perturbation generator, the input schedule and the prepared batches, which cost nothing
    per tick. Returns (wall seconds, final θ⁰, ticks to solution per run).
    """
    assert (cfg.mode, cfg.perturbation, cfg.resolved_integrator, cfg.tau_theta, cfg.tau_x, cfg.nodes) == \
        ("discrete", "rcm", "sum", 1, 1, 1), "the floor is written for the paper-row parity job"
    engine = Engine(cfg)
    node, stage, model = engine.nodes[0], engine.stage, engine.model
    theta0 = node.theta0.copy()
    s, p = theta0.shape
    both = np.empty((2 * s, p))
    eps = np.empty_like(theta0)
    blocks = np.empty((64, s, p))
    eta, inv_power = cfg.eta, 1.0 / node.perturbation.power
    batches = [stage._prepare(np.array([k])) for k in range(len(stage.train.y))]
    t_sol = np.full(s, -1, dtype=np.int64)
    start = time.perf_counter()
    for t in range(cfg.max_ticks):
        if t % 64 == 0:
            node.perturbation.block(t, 64, 0, p, out=blocks)
        tilde = blocks[t % 64]
        both[:s] = theta0
        np.add(theta0, tilde, out=both[s:])
        cost = model.cost(both, batches[stage.schedule.indices(t)[0]])  # C₀ and C, one batch
        c_tilde = cost[s:] - cost[:s]
        np.multiply(c_tilde[:, None], tilde, out=eps)  # ε = C̃·θ̃/⟨θ̃²⟩, then θ⁰ ← θ⁰ − η·ε
        eps *= inv_power
        eps *= eta
        theta0 -= eps
        if (t + 1) % cfg.eval_every == 0:
            cost, accuracy = model.evaluate(theta0, engine.eval_batch)
            t_sol[(accuracy >= cfg.target_accuracy - 1e-12) & (t_sol < 0)] = t + 1
            if np.all(t_sol >= 0):
                break
    return time.perf_counter() - start, theta0, t_sol


def bench_floor(seeds: int, repeats: int) -> dict:
    """Engine and numpy floor for (b), alternated ``repeats`` times; bit-identity checked."""
    cfg = JobConfig(seeds=seeds)
    engine_s, floor_s = [], []
    for _ in range(repeats):
        engine = Engine(cfg)
        result = engine.run()
        engine_s.append(result.wall_time)
        wall, theta0, t_sol = flat_parity(cfg)
        floor_s.append(wall)
        if not (np.array_equal(theta0, engine.theta0) and np.array_equal(t_sol, result.ticks_to_solution)):
            raise AssertionError("the flat loop left the engine's trajectory: it is not the same arithmetic")
    ticks = result.ticks
    s = summarize(result)
    return {"converged": s["converged"], "median_ticks": s["ticks_to_solution_median"], "ticks_run": ticks,
            "engine_s": min(engine_s), "floor_s": min(floor_s), "engine_us_per_tick": 1e6 * min(engine_s) / ticks,
            "floor_us_per_tick": 1e6 * min(floor_s) / ticks, "ratio": min(engine_s) / min(floor_s),
            "engine_all_s": engine_s, "floor_all_s": floor_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DEFAULT_FMNIST)
    ap.add_argument("--ticks", type=int, default=10, help="engine ticks per interleaved round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="engine/floor alternations for (b); best of them")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"torch {torch.__version__} · numpy {np.__version__}")
    a = bench_overhead(args.data_dir, args.ticks, args.rounds)
    print(f"(a) F-MNIST CNN, batch 1000, {a['source']}, {a['device']}: {a['ticks']} ticks + C₀ = "
          f"{a['forward_passes']} forward passes in {a['engine_s']:.2f} s; bare forward {a['forward_ms']:.2f} ms; "
          f"ratio {a['ratio']:.3f} (goal ≤ 1.15)")
    f = bench_floor(args.seeds, args.repeats)
    print(f"(b) parity2 R-CM --seeds {args.seeds}: {f['engine_all_s'][0]:.2f} s wall (goal ≤ 1 s), "
          f"{f['converged']}/{args.seeds} converged, median {f['median_ticks']} ticks, {f['ticks_run']} ticks run")
    print(f"    engine and numpy floor alternated {args.repeats}×, best: engine {f['engine_s']:.2f} s "
          f"({f['engine_us_per_tick']:.0f} µs/tick), floor {f['floor_s']:.2f} s ({f['floor_us_per_tick']:.0f} µs/tick; "
          f"same θ⁰ bit for bit), engine ÷ floor {f['ratio']:.2f}")
    print(f"    all: engine {', '.join(f'{x:.2f}' for x in f['engine_all_s'])} s; "
          f"floor {', '.join(f'{x:.2f}' for x in f['floor_all_s'])} s")


if __name__ == "__main__":
    main()
