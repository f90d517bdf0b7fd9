"""CNN runs batched (not a test): the per-run loop against grouped-convolution calls.

``python benchmarks/cnn_batched.py [--batches 100,1000] [--runs 1,4,16] [--per-call 2,4]``

For each model, batch size B and number of runs S, times ``CNN.cost`` of S parameter
vectors on one shared batch (the engine's layout) three ways, alternating call by call so
that machine noise hits all of them alike:

* **loop**: the model's code before runs were batched, one forward pass per run
  (``old_cost`` below, the former ``CNN.cost`` verbatim);
* **batched**: ``CNN.cost`` as it is, k = ``CNN.CPU_IMAGES_PER_CALL // B`` runs per grouped
  call (at least 1, at most S) on the CPU, one run on the plain path;
* **one call**: ``CNN.cost`` with ``runs_per_call = S``, every run in one grouped call;

plus one column per ``--per-call`` value k. Prints a markdown table of the median ms per
call (min in brackets) and loop ÷ each, and the largest relative difference of the costs
from the loop's. Only these ratios, measured side by side in one run, mean anything on a
shared machine; absolute times move by ±50 % between runs. Synthetic images: the cost of a
forward pass does not depend on the pixel values.
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

from services.evaluator import models as M  # noqa: E402


def old_cost(model: M.CNN, theta, batch: M.Batch) -> np.ndarray:
    """``CNN.cost`` before runs were batched: one :meth:`CNN.logits` call per run."""
    F = torch.nn.functional
    t, single = model._theta(theta)
    with torch.inference_mode():
        c = torch.stack(
            [F.cross_entropy(model.logits(t[s], model._x(batch, s)), model._y(batch, s)) for s in range(t.shape[0])]
        )
        c = c.to(torch.float64).cpu().numpy()
    return c[0] if single else c


def batched_cost(model: M.CNN, per_call: int | None):
    def run(theta, batch):
        model.runs_per_call = per_call
        try:
            return model.cost(theta, batch)
        finally:
            model.runs_per_call = None

    return run


def bench(model: M.CNN, size: int, runs: int, reps: int, extra: list[int], rng: np.random.Generator) -> dict:
    x = rng.random((size,) + model.input_shape, dtype=np.float32)
    batch = model.prepare(x, rng.integers(0, model.num_classes, size))
    theta = model.init(rng, runs)
    ways = {"loop": lambda th, b: old_cost(model, th, b), "batched": batched_cost(model, None),
            "one call": batched_cost(model, runs)}
    for k in extra:
        ways[f"k={k}"] = batched_cost(model, k)
    ref = old_cost(model, theta, batch)
    diff = max(float(np.max(np.abs(f(theta, batch) / ref - 1))) for f in ways.values())  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(reps):
        for name, f in ways.items():
            t0 = time.perf_counter()
            f(theta, batch)
            times[name].append(time.perf_counter() - t0)
    per = max(1, min(runs, M.CNN.CPU_IMAGES_PER_CALL // size))
    return {"times": times, "diff": diff, "k": per}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fmnist,cifar10", help="comma-separated: fmnist, cifar10")
    ap.add_argument("--batches", default="100", help="comma-separated batch sizes B")
    ap.add_argument("--runs", default="1,4,16", help="comma-separated numbers of runs S")
    ap.add_argument("--per-call", default="", help="extra columns: comma-separated runs per call k")
    ap.add_argument("--reps", type=int, default=7, help="timed calls of each way (alternating)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadier on a shared machine; 0 keeps torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = [int(v) for v in args.per_call.split(",") if v]
    builders = {"fmnist": M.fmnist_cnn, "cifar10": M.cifar10_cnn}
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {args.reps} alternating calls each; "
          f"CPU_IMAGES_PER_CALL = {M.CNN.CPU_IMAGES_PER_CALL}")
    cols = ["loop", "batched", "one call"] + [f"k={k}" for k in extra]
    print("| model | B | S | k | " + " | ".join(f"{c} ms" for c in cols) + " | "
          + " | ".join(f"loop ÷ {c}" for c in cols[1:]) + " | max rel. diff |")
    print("| --- " * (3 + 2 * len(cols)) + "| --- |")
    rng = np.random.default_rng(0)
    for name in args.models.split(","):
        model = builders[name](device="cpu")
        for size in (int(v) for v in args.batches.split(",")):
            for runs in (int(v) for v in args.runs.split(",")):
                r = bench(model, size, runs, args.reps, extra, rng)
                med = {c: 1e3 * float(np.median(r["times"][c])) for c in cols}
                low = {c: 1e3 * min(r["times"][c]) for c in cols}
                cells = [f"{med[c]:.1f} ({low[c]:.1f})" for c in cols]
                ratios = [f"{med['loop'] / med[c]:.2f}" for c in cols[1:]]
                print(f"| {model.name} | {size} | {runs} | {r['k']} | " + " | ".join(cells) + " | "
                      + " | ".join(ratios) + f" | {r['diff']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
