"""Transfer study: train on the chip, or train a simulation and deploy it to the chip?

The paper argues that training on the device itself avoids the loss seen when weights trained
on an imperfect simulation are deployed to real hardware. This study measures it on the
reference chip (examples/reference_chip.py, its own process, spoken to over the chip
protocol): an analog device whose every parameter has a gain ``g_i = 1 + σ·N(0, 1)`` and an
offset ``o_i = r·σ·N(0, 1)`` (r = ``offset_ratio``) the trainer does not know, so it computes
with ``g ⊙ θ + o``. For each variation level σ and each of ``devices`` chips (device d has its
own draw of g and o), the same initial θ⁰ of ``seeds`` runs is trained two ways:

* **deployed**: backprop (full-batch gradient descent) on the ideal model to the stopping rule,
  then θ written to the chip and scored there;
* **in the loop**: PMGD whose every cost is measured on the chip, scored there too.

Both stop at the same rule (accuracy ``target_accuracy`` and cost ≤ ``target_cost``), backprop
on the ideal model, PMGD on the chip. What to expect: the deployed weights lose accuracy as σ
grows, since ``C(g ⊙ θ + o) ≠ C(θ)``; PMGD measures ``C(g ⊙ (θ⁰ + θ̃) + o)`` itself, and its
estimate of ``∂C/∂θ_i`` is ``g_i`` times the device's own slope, so it descends the cost the
chip has — even where a gain is negative — and is limited only by what the device can
represent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import numpy as np

from pmgd_node.config import JobConfig

from . import plots
from .sweep import Point, Study, param_error

# The reference chip: the repository's example (it imports nothing of the project).
CHIP_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "reference_chip.py")


class ReferenceChip:
    """One reference-chip process on a free loopback port, stopped on exit (a context manager)."""

    def __init__(self, script: str, task: str, seed: int, gain: float, offset: float, read_noise: float = 0.0):
        from services.cluster.launcher import free_port

        if not os.path.isfile(script):
            raise param_error("chip_script", f"no reference chip at {script!r}")
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.args = [sys.executable, script, "--task", task, "--endpoint", self.endpoint, "--seed", str(seed),
                     "--gain-variation", repr(gain), "--offset-variation", repr(offset),
                     "--read-noise", repr(read_noise)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ReferenceChip:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()  # its one "ready" line, or why it stopped
        if self.proc.poll() is not None or "reference chip" not in line:
            rest = self.proc.stdout.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"the reference chip did not start: {(line + rest).strip()[-500:]}")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class Transfer(Study):
    name = "transfer"
    question = ("Does training on the chip itself (PMGD in the loop) keep the accuracy that weights trained by "
                "backprop on an ideal model lose when deployed to a chip with device variation?")

    def __init__(self):
        self.params = {"task": "parity2", "levels": [0.0, 0.1, 0.2, 0.4, 0.8, 1.6], "offset_ratio": 0.5,
                       "read_noise": 0.0, "devices": 5, "seeds": 4, "seed": 0, "perturbation": "rcm",
                       "eta": 0.5, "amplitude": 0.1, "max_ticks": 20_000, "eval_every": 10,
                       "target_accuracy": 1.0, "target_cost": 0.01,
                       "backprop_lr": 2.0, "backprop_steps": 50_000, "chip_script": CHIP_SCRIPT}

    def points(self, p):
        if not p["task"].startswith("parity"):
            raise param_error("task", f"the reference chip runs parity2 … parity8; got {p['task']!r}")
        if p["devices"] < 1 or any(not 0 <= v <= 10 for v in p["levels"]):
            raise param_error("levels", "devices must be ≥ 1 and every level σ in [0, 10]")
        out = []
        for level in p["levels"]:
            for d in range(p["devices"]):
                config = JobConfig(task=p["task"], perturbation=p["perturbation"], eta=p["eta"],
                                   amplitude=p["amplitude"], seeds=p["seeds"], seed=p["seed"] + d * p["seeds"],
                                   max_ticks=p["max_ticks"], eval_every=p["eval_every"],
                                   target_accuracy=p["target_accuracy"], target_cost=p["target_cost"])
                out.append(Point({"variation": level, "device": d}, config))
        return out

    def run(self, point, p, ctx):
        from services.chip.client import ChipClient
        from services.chip.job import initial_parameters
        from services.evaluator.backprop import train_sgd
        from services.evaluator.data import job_data
        from services.evaluator.models import job_model

        level, device = point.key["variation"], point.key["device"]
        config = point.config
        model, data = job_model(config), job_data(config)
        theta0 = initial_parameters(model, config)
        started = time.perf_counter()
        sgd = train_sgd(model, data, p["backprop_lr"], len(data), p["backprop_steps"], theta0=theta0,
                        eval_every=10, target_accuracy=p["target_accuracy"], target_cost=p["target_cost"],
                        stop_when_solved=True)
        backprop_s = time.perf_counter() - started
        ideal_cost, ideal_acc = model.evaluate(sgd.theta, model.prepare(data.x, data.y))
        with ReferenceChip(p["chip_script"], p["task"], seed=10_000 + 100 * p["seed"] + device, gain=level,
                           offset=p["offset_ratio"] * level, read_noise=p["read_noise"]) as chip:
            client = ChipClient(chip.endpoint, "deploy-" + uuid.uuid4().hex[:8], config,
                                timeout_s=config.chip_timeout, retries=config.chip_retries)
            try:
                chip_cost, chip_acc = client.evaluate(sgd.theta, np.arange(len(data)), "train")
            finally:
                client.close()
            trained = ctx.train(config.replace(chip=chip.endpoint))
        rows = []
        for r, row in enumerate(trained.rows):
            rows.append({
                "seed": row["seed"],
                "pmgd_solved": row["solved"], "pmgd_ticks": row["ticks_to_solution"],
                "pmgd_ticks_run": row["ticks_run"],
                "pmgd_chip_cost": row["final_cost"], "pmgd_chip_accuracy": row["final_accuracy"],
                "backprop_solved": bool(sgd.solved[r]), "backprop_steps": int(sgd.solved_step[r]),
                "backprop_ideal_cost": float(ideal_cost[r]), "backprop_ideal_accuracy": float(ideal_acc[r]),
                "backprop_chip_cost": float(chip_cost[r]), "backprop_chip_accuracy": float(chip_acc[r]),
                "backprop_s": backprop_s / len(trained.rows),
            })
        return rows

    def _by_level(self, rows, column):
        levels = sorted({r["variation"] for r in rows})
        return levels, [np.array([float(r[column]) for r in rows if r["variation"] == v]) for v in levels]

    def summary(self, rows, p):
        out = {}
        for arm, column in (("deployed", "backprop_chip_accuracy"), ("in_the_loop", "pmgd_chip_accuracy")):
            levels, values = self._by_level(rows, column)
            out[arm] = [{"variation": v, "runs": len(a), "accuracy_mean": float(a.mean()),
                         "accuracy_median": float(np.median(a)), "perfect": int((a >= 1.0 - 1e-12).sum())}
                        for v, a in zip(levels, values)]
        levels, solved = self._by_level(rows, "pmgd_solved")
        out["in_the_loop_solved"] = {str(v): int(s.sum()) for v, s in zip(levels, solved)}
        return out

    def figures(self, rows, p, out):
        fig, axes = plots.figure(ncols=2, width=5.2, height=4.4,
                                 title=f"{p['task']} on the reference chip: gain 1 + σ·N(0,1), offset "
                                       f"{p['offset_ratio']:g}·σ·N(0,1) per parameter; {p['devices']} devices × "
                                       f"{p['seeds']} runs per σ")
        arms = (("backprop", "backprop on the ideal model, deployed", "tab:red", -0.12),
                ("pmgd", "PMGD on the chip (in the loop)", "tab:blue", 0.12))
        for ax, what, label_y in ((axes[0][0], "accuracy", "accuracy measured on the chip (%)"),
                                  (axes[0][1], "cost", "cost measured on the chip")):
            for arm, label, color, shift in arms:
                levels, values = self._by_level(rows, f"{arm}_chip_{what}")
                x = np.arange(len(levels))
                scale = 100 if what == "accuracy" else 1
                for i, a in enumerate(values):  # every run, spread sideways so equal values stay visible
                    ax.scatter(np.full(len(a), x[i] + shift) + np.linspace(-0.05, 0.05, len(a)), scale * a, s=8,
                               color=color, alpha=0.35, lw=0)
                centre = [a.mean() if what == "accuracy" else np.median(a) for a in values]
                ax.plot(x + shift, scale * np.array(centre), marker="o", color=color,
                        label=label + (" (mean)" if what == "accuracy" else " (median)"))
            ax.set_xticks(np.arange(len(levels)), [f"{v:g}" for v in levels])
            ax.set_xlabel("device variation σ")
            ax.set_ylabel(label_y)
            if what == "accuracy":
                ax.set_ylim(0, 105)
            else:
                ax.set_yscale("log")
                ax.axhline(p["target_cost"], color="k", lw=0.8, ls="--",
                           label=f"stopping rule C ≤ {p['target_cost']:g}")
            ax.legend(fontsize=8, loc="lower left" if what == "accuracy" else "upper left")
        return [plots.save(fig, out, "transfer.png")]


STUDIES = {"transfer": Transfer}
