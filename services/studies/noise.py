"""Noise study: cost read-out noise, weight-update noise and device-to-device variation.

The imperfections of ``pmgd_node/imperfections.py`` (seeded, on both engines), each swept
alone for every perturbation type on 2-bit parity, batch 4, tagged, no link effects.
Expectations: cost noise σ_c adds σ_c·θ̃_i/⟨θ̃²⟩ ≈ σ_c/A of noise to every ε_i (so its scale
is set by the amplitude A: σ_c ≪ A·|∇C| is harmless); update noise is a random walk of θ⁰
of σ_u per update that the descent must outpace; device variation scales parameter i's step
by a_i²·u_i, a per-parameter learning rate that leaves the descent direction in the same
half-space as long as the gains stay positive, so training survives large σ_d.
"""

from __future__ import annotations

import numpy as np

from pmgd_node.config import JobConfig

from . import plots
from .links import BASE, train_and_angle
from .sweep import Point, Study

UNITS = {"cost_noise": "cost noise σ_c", "update_noise": "update noise σ_u",
         "device_variation": "device variation σ_d (gains 1 ± σ_d)"}


class Noise(Study):
    name = "noise"
    question = ("How much cost noise, weight-update noise and device-to-device variation can PMGD training "
                "tolerate, for each perturbation type?")

    def __init__(self):
        self.params = {"task": "parity2", "model": "", "seeds": 20, "max_ticks": 20_000, "batch": 4,
                       "angle_ticks": 2000,
                       "perturbations": ["tm", "cm", "rcm", "fm"], "seed": 0,
                       "cost_noise": [0.0, 0.001, 0.003, 0.01, 0.03],
                       "update_noise": [0.0, 0.001, 0.003, 0.01, 0.03],
                       "device_variation": [0.0, 0.1, 0.3, 0.5, 1.0]}

    def points(self, p):
        out = []
        for imperfection in UNITS:
            for value in p[imperfection]:
                for kind in p["perturbations"]:
                    config = JobConfig(**BASE[kind], task=p["task"], model=p["model"], seeds=p["seeds"],
                                       max_ticks=p["max_ticks"], batch=p["batch"], seed=p["seed"],
                                       **{imperfection: value})
                    out.append(Point({"imperfection": imperfection, "level": value, "perturbation": kind}, config))
        return out

    def run(self, point, p, ctx):
        return train_and_angle(point, p, ctx)

    def _select(self, rows, imperfection, kind):
        levels = sorted({r["level"] for r in rows if r["imperfection"] == imperfection})
        sel = [[r for r in rows if r["imperfection"] == imperfection and r["perturbation"] == kind and r["level"] == v]
               for v in levels]
        return levels, sel

    def summary(self, rows, p):
        out = {}
        for imperfection in UNITS:
            for kind in p["perturbations"]:
                levels, sel = self._select(rows, imperfection, kind)
                out[f"{imperfection}/{kind}"] = [
                    {"level": v, "converged": float(np.mean([r["solved"] for r in g])) if g else None,
                     "median_ticks": plots.quartiles([r["ticks_to_solution"] for r in g if r["solved"]])[1],
                     "median_angle_deg": plots.quartiles([r["angle_deg"] for r in g])[1]}
                    for v, g in zip(levels, sel)]
        return out

    def figures(self, rows, p, out):
        fig, axes = plots.figure(ncols=3, nrows=3, width=4.4, height=3.2,
                                 title=f"Imperfections, 2-bit parity, batch {p['batch']}, {p['seeds']} seeds per point")
        for col, imperfection in enumerate(UNITS):
            top, mid, bottom = axes[:, col]
            for kind in p["perturbations"]:
                levels, sel = self._select(rows, imperfection, kind)
                if not levels:
                    continue
                color, label = plots.COLORS[kind], plots.LABELS[kind]
                x = [max(v, 1e-4) for v in levels] if imperfection != "device_variation" else levels
                top.plot(x, [100 * np.mean([r["solved"] for r in g]) if g else np.nan for g in sel], marker="o",
                         color=color, label=label)
                plots.points(mid, x, [[r["ticks_to_solution"] for r in g if r["solved"]] for g in sel], label, color)
                plots.points(bottom, x, [[r["angle_deg"] for r in g] for g in sel], label, color)
            plots.outcome_axes(top, mid, bottom)
            for ax in (top, mid, bottom):
                if imperfection != "device_variation":
                    ax.set_xscale("log")
                zero = " (0 drawn at 10⁻⁴)" if imperfection != "device_variation" else ""
                ax.set_xlabel(UNITS[imperfection] + zero)
                ax.legend(fontsize=7)
            top.set_title(UNITS[imperfection])
        return [plots.save(fig, out, "noise.png")]


STUDIES = {"noise": Noise}
