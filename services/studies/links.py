"""Link studies: what broadcast delay, jitter, loss and clock drift do to PMGD training.

Each study sweeps one link field (``delay``, ``jitter``, ``drop``, ``drift``) for every
perturbation type and correlation mode on 2-bit parity, batch 4 (the whole data set every
tick, so the link is the only new source of error). A point trains ``seeds`` networks
(solution time, converged fraction) and measures the gradient estimate's angle to the true
gradient after ``angle_ticks`` ticks with θ⁰ frozen under the same link (the estimator alone).

Analytic expectations drawn beside the measurements:

* **tagged delay d** (C̃ carries its tick): every correlation is right but d ticks stale, so
  training is stale-gradient descent: it slows gracefully while η·d stays small.
* **untagged delay d**: the node correlates C̃[t−d] with θ̃[t]. For R-CM the codes of
  different ticks are independent, so E[ε] = 0 and training fails for d ≥ 1. For FM,
  ⟨sin(2πf(t−d)+φ)·sin(2πft+φ)⟩ = ½cos 2πf·d: parameter i's estimate is scaled by
  cos 2πf_i·d (negative for some i); with the analog high-pass H in the loop the factor is
  Re(H(2πf_i)·e^{−i2πf_i d}). A node that knows d correlates with θ̃[t−d] (``compensation``)
  and recovers the undelayed estimate exactly, d ticks later.
* **drop p** (tagged): a lost C̃ is a lost tick, so solution time grows by 1/(1−p).
* **jitter**: tagged jitter is a random staleness; untagged jitter is a random mis-correlation.
* **drift** (async clocks at rates 1 ± drift): shards run ahead or behind; tagged C̃ still
  correlate with the right perturbation.
"""

from __future__ import annotations

import numpy as np

from pmgd_node.config import JobConfig
from services.engine.angle_trace import angle_trace
from services.evaluator.gradient_angle import angle_degrees

from . import plots
from .sweep import Point, Study

# Per type: settings that train 2-2-1 parity on the full data each tick (batch 4).
BASE = {
    "tm": dict(perturbation="tm", eta=0.5),
    "cm": dict(perturbation="cm", eta=0.5),
    "rcm": dict(perturbation="rcm", eta=0.5),
    "fm": dict(perturbation="fm", mode="analog", eta=0.1, tau_theta=20),
}
UNITS = {"delay": "broadcast delay d (ticks of τ_p)", "jitter": "jitter spread (ticks of τ_p)",
         "drop": "drop probability p", "drift": "clock drift (rates 1 ± drift)"}


def train_and_angle(point: Point, p: dict, ctx) -> list[dict]:
    """A point's training rows, each with ``angle_deg``: the estimator alone, θ⁰ frozen under
    the same job (links, imperfections), the angle of G to ∇C after ``angle_ticks`` ticks."""
    rows = ctx.train(point.config).rows
    for row, angle in zip(rows, angle_trace(point.config, p["angle_ticks"])[-1]):
        row["angle_deg"] = float(angle)
    return rows


class LinkStudy(Study):
    field = "delay"
    values: list = [0, 1, 2, 4, 8]
    correlations = ["tagged", "untagged"]

    def __init__(self):
        self.params = {"task": "parity2", "model": "", "seeds": 20, "max_ticks": 20_000, "batch": 4,
                       "angle_ticks": 2000,
                       "perturbations": ["tm", "cm", "rcm", "fm"], "values": list(self.values),
                       "correlations": list(self.correlations), "compensate_fm": True, "seed": 0}

    def config(self, p: dict, perturbation: str, correlation: str, value) -> JobConfig | None:
        base = dict(BASE[perturbation], task=p["task"], model=p["model"], network="", seeds=p["seeds"],
                    max_ticks=p["max_ticks"], batch=p["batch"], seed=p["seed"])
        link = {self.field: value}
        if correlation == "compensated":  # FM only: the node knows the delay
            correlation, link["compensation"] = "untagged", value
        if self.field == "drift":
            if base.get("mode") == "analog":
                return None  # async clocks are modelled for discrete mode only
            link.update(timing="async")
        return JobConfig(**base, correlation=correlation, **link)

    def points(self, p: dict) -> list[Point]:
        out = []
        for kind in p["perturbations"]:
            correlations = list(p["correlations"])
            if kind == "fm" and p["compensate_fm"] and self.field == "delay":
                correlations.append("compensated")
            for corr in correlations:
                for value in p["values"]:
                    config = self.config(p, kind, corr, value)
                    if config is not None:
                        out.append(Point({"perturbation": kind, "correlation": corr, self.field: value}, config))
        return out

    def run(self, point: Point, p: dict, ctx) -> list[dict]:
        rows = train_and_angle(point, p, ctx)
        if self.field == "delay" and point.key["perturbation"] == "fm":
            predicted, ideal = self._fm_prediction(point.config)
            for row, a, b in zip(rows, predicted, ideal):
                row["predicted_angle_deg"], row["ideal_angle_deg"] = float(a), float(b)
        return rows

    @staticmethod
    def _fm_prediction(config: JobConfig) -> tuple[np.ndarray, np.ndarray]:
        """Predicted angles of the FM estimate to ∇C under an effective delay d = delay − compensation.

        Parameter i's tone at ω_i = 2πf_i passes the high-pass H(ω) = α(1 − e^{−iω})/(1 − αe^{−iω})
        and reaches the node d ticks late, so E[G_i] ∝ Re(H(ω_i)·e^{−iω_i d})·∂C/∂θ_i. Returns
        (with the high-pass, ideal extraction H = 1, i.e. cos 2πf_i·d), each (S,).
        """
        from services.engine.engine import Engine

        engine = Engine(config.replace(delay=0, compensation=0, eta=0.0, max_ticks=1))
        engine.step()  # presents the input the frozen trace sees
        true_grad = engine.model.gradient(engine.theta0, engine.stage.batch)
        omega = 2 * np.pi * engine.transport.nodes[0].perturbation.freq
        d = config.delay - config.compensation if config.correlation == "untagged" else 0
        alpha = config.tau_hp / (config.tau_hp + 1.0)
        z = np.exp(-1j * omega)
        h = alpha * (1 - z) / (1 - alpha * z)
        return (angle_degrees(np.real(h * np.exp(-1j * omega * d)) * true_grad, true_grad),
                angle_degrees(np.cos(omega * d) * true_grad, true_grad))

    # --- results ---------------------------------------------------------------------------------
    def _groups(self, rows, kind, corr, column, solved_only=False):
        values = sorted({r[self.field] for r in rows})
        groups = []
        for v in values:
            sel = [r for r in rows if r["perturbation"] == kind and r["correlation"] == corr and r[self.field] == v]
            groups.append([r[column] for r in sel if r["solved"] or not solved_only] if sel else [])
        return values, groups

    def summary(self, rows, p):
        out = {}
        for kind in p["perturbations"]:
            for corr in sorted({r["correlation"] for r in rows if r["perturbation"] == kind}):
                values, solved = self._groups(rows, kind, corr, "solved")
                _, ticks = self._groups(rows, kind, corr, "ticks_to_solution", solved_only=True)
                _, angle = self._groups(rows, kind, corr, "angle_deg")
                out[f"{kind}/{corr}"] = [{self.field: v, "converged": float(np.mean(s)) if s else None,
                                          "median_ticks": plots.quartiles(t)[1] if t else None,
                                          "median_angle_deg": plots.quartiles(a)[1] if a else None}
                                         for v, s, t, a in zip(values, solved, ticks, angle)]
        return out

    def figures(self, rows, p, out):
        kinds = [k for k in p["perturbations"] if any(r["perturbation"] == k for r in rows)]
        if not kinds:
            return []
        fig, axes = plots.figure(ncols=len(kinds), nrows=3, width=4.0, height=3.2,
                                 title=f"2-bit parity, batch {p['batch']}, {p['seeds']} seeds per point: "
                                       f"{self.field} ({self.name} study)")
        for col, kind in enumerate(kinds):
            top, mid, bottom = axes[0, col], axes[1, col], axes[2, col]
            for corr in sorted({r["correlation"] for r in rows if r["perturbation"] == kind}):
                color, style = plots.COLORS.get(corr), plots.STYLES.get(corr, {})
                values, solved = self._groups(rows, kind, corr, "solved")
                _, ticks = self._groups(rows, kind, corr, "ticks_to_solution", solved_only=True)
                _, angle = self._groups(rows, kind, corr, "angle_deg")
                top.plot(values, [100 * np.mean(s) if s else np.nan for s in solved], color=color, label=corr, **style)
                plots.points(mid, values, ticks, corr, color, **style)
                plots.points(bottom, values, angle, corr, color, **style)
                if self.field == "drop" and corr == "tagged":
                    base = plots.quartiles(ticks[0])[1] if values and values[0] == 0 else np.nan
                    mid.plot(values, [base / (1 - v) for v in values], "k--", lw=1, label="T₀/(1−p)")
                if self.field == "delay" and kind == "fm" and corr == "untagged":
                    for column, ls, label in (("predicted_angle_deg", ":", "predicted: Re(H·e^{−iωd})"),
                                              ("ideal_angle_deg", "-.", "ideal extraction: cos 2πf·d")):
                        _, pred = self._groups(rows, kind, corr, column)
                        if any(pred):
                            bottom.plot(values, [plots.quartiles(g)[1] for g in pred], ls=ls, color="k", lw=1.2,
                                        label=label)
            top.set_title(plots.LABELS.get(kind, kind))
            plots.outcome_axes(top, mid, bottom)
            for ax in (top, mid, bottom):
                ax.set_xlabel(UNITS[self.field])
                ax.legend(fontsize=7)
        return [plots.save(fig, out, f"{self.name}.png")]


class Latency(LinkStudy):
    name = "latency"
    question = ("How does the C̃ broadcast delay change training and the gradient estimate, with tagged and "
                "untagged correlation, for each perturbation type (and FM with phase compensation)?")
    field, values = "delay", [0, 1, 2, 4, 8]


class Jitter(LinkStudy):
    name = "jitter"
    question = "How does random extra delay (jitter) of the C̃ broadcast change training, tagged and untagged?"
    field, values = "jitter", [0, 1, 2, 4, 8]


class Drop(LinkStudy):
    name = "drop"
    question = "How does losing C̃ messages (probability p) slow training?"
    field, values = "drop", [0.0, 0.1, 0.3, 0.5, 0.7]
    correlations = ["tagged"]


class Drift(LinkStudy):
    name = "drift"
    question = "How do node clocks running at different rates (async timing) change training?"
    field, values = "drift", [0.0, 0.01, 0.05, 0.1, 0.2]
    correlations = ["tagged", "untagged"]


STUDIES = {"latency": Latency, "jitter": Jitter, "drop": Drop, "drift": Drift}
