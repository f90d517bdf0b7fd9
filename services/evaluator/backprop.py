"""Plain SGD by backpropagation: the baseline PMGD is compared against.

Each step draws a mini-batch (epoch-wise shuffled, without replacement; the same index
sequence for every run, so runs differ only in their initialisation) and applies
``θ ← θ − lr · ∇C_batch(θ)`` with the model's exact gradient. Every ``eval_every`` steps
the cost and accuracy over the evaluation set are recorded; a run is *solved* at the first
evaluation where its accuracy reaches ``target_accuracy`` (and, if given, its cost is at
most ``target_cost``; the paper's parity criterion is a mean cost of 0.01).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Dataset
from .models import Batch, Model

__all__ = ["SGDResult", "train_sgd", "evaluate_dataset"]


@dataclass(frozen=True, eq=False)
class SGDResult:
    """Learning curves of S runs.

    ``steps`` (E,) are the step counts at which ``cost`` and ``accuracy`` (E, S) were
    measured (step 0 is the initialisation). ``solved_step`` (S,) is the first such step
    meeting the target, −1 if never; ``theta`` (S, P) are the final parameters.
    """

    steps: np.ndarray
    cost: np.ndarray
    accuracy: np.ndarray
    solved_step: np.ndarray
    theta: np.ndarray

    @property
    def solved(self) -> np.ndarray:
        return self.solved_step >= 0


def _chunks(model: Model, dataset: Dataset, chunk: int) -> list[tuple[Batch, int]]:
    n = len(dataset)
    return [
        (model.prepare(dataset.x[i : i + chunk], dataset.y[i : i + chunk]), min(chunk, n - i))
        for i in range(0, n, chunk)
    ]


def evaluate_dataset(model: Model, theta, chunks: list[tuple[Batch, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Sample-weighted mean cost and accuracy (S,) over prepared chunks of a dataset."""
    total = sum(n for _, n in chunks)
    cost = 0.0
    acc = 0.0
    for batch, n in chunks:
        c, a = model.evaluate(theta, batch)
        cost = cost + np.asarray(c, dtype=np.float64) * (n / total)
        acc = acc + np.asarray(a, dtype=np.float64) * (n / total)
    return cost, acc


def train_sgd(
    model: Model,
    dataset: Dataset,
    lr: float,
    batch: int,
    steps: int,
    seed: int = 0,
    eval_every: int = 100,
    runs: int = 1,
    target_accuracy: float = 1.0,
    target_cost: float | None = None,
    eval_dataset: Dataset | None = None,
    eval_chunk: int = 10_000,
    stop_when_solved: bool = True,
    theta0: np.ndarray | None = None,
) -> SGDResult:
    """Train ``runs`` independent initialisations (seeded by ``seed``) with mini-batch SGD.

    ``eval_dataset`` defaults to the training set. With ``stop_when_solved`` training ends
    at the first evaluation at which every run has met the target.
    """
    if lr <= 0 or batch < 1 or steps < 0 or eval_every < 1 or runs < 1:
        raise ValueError("train_sgd: need lr > 0, batch >= 1, steps >= 0, eval_every >= 1, runs >= 1")
    rng = np.random.default_rng(seed)
    theta = np.array(model.init(rng, runs) if theta0 is None else theta0, dtype=model.dtype, copy=True)
    if theta.ndim != 2 or theta.shape[1] != model.num_params:
        raise ValueError(f"train_sgd: theta0 must be (runs, {model.num_params}), got {theta.shape}")
    runs = theta.shape[0]
    chunks = _chunks(model, eval_dataset if eval_dataset is not None else dataset, eval_chunk)
    n = len(dataset)
    batch = min(batch, n)
    # Full-batch training re-uses one prepared batch instead of converting it every step.
    full = model.prepare(dataset.x, dataset.y) if batch == n else None

    steps_log, cost_log, acc_log = [], [], []
    solved_step = np.full(runs, -1, dtype=np.int64)

    def record(step: int) -> bool:
        c, a = evaluate_dataset(model, theta, chunks)
        steps_log.append(step)
        cost_log.append(c)
        acc_log.append(a)
        ok = a >= target_accuracy
        if target_cost is not None:
            ok &= c <= target_cost
        solved_step[(solved_step < 0) & ok] = step
        return bool(np.all(solved_step >= 0))

    done = record(0)
    order = rng.permutation(n)
    pos = 0
    for step in range(1, steps + 1):
        if done and stop_when_solved:
            break
        if full is not None:
            b = full
        else:
            if pos + batch > n:
                order = rng.permutation(n)
                pos = 0
            idx = order[pos : pos + batch]
            pos += batch
            b = model.prepare(dataset.x[idx], dataset.y[idx])
        theta -= lr * model.gradient(theta, b)
        if step % eval_every == 0 or step == steps:
            done = record(step)

    return SGDResult(
        steps=np.asarray(steps_log, dtype=np.int64),
        cost=np.asarray(cost_log, dtype=np.float64).reshape(len(steps_log), runs),
        accuracy=np.asarray(acc_log, dtype=np.float64).reshape(len(steps_log), runs),
        solved_step=solved_step,
        theta=theta,
    )
