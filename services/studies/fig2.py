"""Study ``fig2`` (paper Fig 2a): how fast the integrated G lines up with the true gradient.

For each perturbation type (TM, CM, R-CM, FM) and each random 3-3-1 network on 3-bit
parity, θ⁰ is frozen and the whole data set is shown at once (``batch`` 8), so the true
gradient ∇C(θ⁰) is fixed; G[t] = Σ_{s≤t} ε[s] (discrete) or the lowpass with τ_θ longer
than the trace (analog FM) is compared with it after every tick:

    angle(t) = arccos( G[t]·∇C / (‖G[t]‖ ‖∇C‖) )        (degrees)

What theory says, P parameters (16 here):

* TM: after t < P ticks only t coordinates are known; at t = P (and every multiple) G is
  ∇C up to the O(A) curvature error: the angle drops to ≈ 0.
* CM: Walsh–Hadamard rows are exactly orthogonal over a code period; for P = 16 the first
  16 ticks already cancel the cross-talk of rows 1…15, so the angle drops near t = 16.
* R-CM: the cross-talk Σ_{s}Σ_{j≠i} g_j s_i[s] s_j[s] is a random walk, so its norm grows as
  √(t (P−1))·‖g‖ against t·‖g‖ of signal:  angle(t) ≈ arctan √((P−1)/t)  (drawn dashed).
* FM: tones are orthogonal over long times, but the high-pass extraction (τ_hp) scales
  tone i by its in-phase gain Re H(f_i), so G → D·∇C with D = diag(Re H(f_i)) and the angle
  levels off at angle(D∇C, ∇C) (column ``angle_limit``, computed per network). With
  ``fm_gain_correction`` every node divides by its own max(Re H(f_i), GAIN_FLOOR), D → 1 for
  every tone above the floor, and the limit is 0°: FM then falls like the others.

One row per (type, seed): ``angle_t{T}`` is the angle after T ticks, T on a logarithmic grid
(``samples_per_decade`` per decade, every integer tick at the start) up to ``ticks``. Wide
rows keep one run per line (as every study's runs.csv) and make the medians a column
operation. With the default band [0, ½] cycles per tick the paper's analog time unit
(½ bandwidth)⁻¹ is one tick, so all four types share the x axis.
"""

from __future__ import annotations

import math

import numpy as np

from pmgd_node.config import JobConfig
from pmgd_node.cost_variation import corrected_gain, highpass_gain
from services.engine.angle_trace import angle_trace

from .sweep import Context, Point, Study

TYPES = ("tm", "cm", "rcm", "fm")


def log_ticks(last: int, per_decade: int, first: int = 1) -> list[int]:
    """Integers from ``first`` to ``last`` spaced ``per_decade`` per decade (all of them where
    the log grid is denser than the integers), always including both ends."""
    if last < first:
        return []
    n = max(2, int(math.ceil(math.log10(last / first) * per_decade)) + 1)
    grid = np.unique(np.round(np.logspace(math.log10(first), math.log10(last), n)).astype(int))
    return sorted(set(int(t) for t in grid) | {first, last})


def sample_ticks(p: dict) -> list[int]:
    """The ticks of the ``angle_t{T}`` columns: the log grid plus every power of two (the TM
    and CM code periods of power-of-two sizes land on them)."""
    powers = {1 << k for k in range(int(p["ticks"]).bit_length()) if 1 << k <= p["ticks"]}
    return sorted(set(log_ticks(p["ticks"], p["samples_per_decade"])) | powers)


class Fig2(Study):
    name = "fig2"
    question = ("How fast does the integrated gradient estimate G turn towards the true gradient, "
                "for each perturbation type (TM, CM, R-CM, FM), with θ⁰ frozen? (paper Fig 2a)")
    params = {
        "seeds": 100,  # random networks per type
        "seed": 0,
        "task": "parity3",
        "network": "3-3-1",
        "types": list(TYPES),
        "ticks": 1000,  # length of each trace, ticks
        "amplitude": 0.01,  # A (small: the O(A) curvature error sets the TM/CM floor)
        "batch": 8,  # samples shown at once: 8 = all of 3-bit parity, the full-data gradient
        "tau_hp": 2.0,  # FM: high-pass time constant of the cost extraction, ticks
        "fm_band": [0.0, 0.5],  # FM: tone band, cycles per tick (paper: bandwidth 1/2τ_p)
        "fm_gain_correction": False,  # FM: each node divides its ε by its tone's high-pass gain
        "samples_per_decade": 24,  # columns angle_t{T} per decade of ticks
    }

    def config(self, p: dict, kind: str) -> JobConfig:
        return JobConfig(task=p["task"], network=p["network"], perturbation=kind,
                         mode="analog" if kind == "fm" else "discrete", amplitude=p["amplitude"],
                         batch=p["batch"], tau_hp=p["tau_hp"], fm_band=tuple(p["fm_band"]), seed=p["seed"],
                         seeds=p["seeds"], target_accuracy=None,
                         fm_gain_correction=kind == "fm" and p["fm_gain_correction"])

    def points(self, p: dict) -> list[Point]:
        return [Point({"type": kind}, self.config(p, kind)) for kind in p["types"]]

    def run(self, point: Point, p: dict, ctx: Context) -> list[dict]:
        # A diagnostic, not training: runs in-process on either engine (θ⁰ frozen, no updates).
        config = point.config
        angles = angle_trace(config, p["ticks"])  # (ticks, S)
        sample = sample_ticks(p)
        limit = self._fm_limit(config) if config.perturbation == "fm" else [None] * config.seeds
        rows = []
        for r in range(config.seeds):
            row = {"seed": config.seed + r, "num_params": _num_params(config), "angle_limit": limit[r]}
            row.update({f"angle_t{t}": float(angles[t - 1, r]) for t in sample})
            rows.append(row)
        return rows

    @staticmethod
    def _fm_limit(config: JobConfig) -> list[float]:
        """Per network: angle(D∇C, ∇C), D = diag(Re H(f_i)), the FM trace's long-time limit
        (corrected: D = diag(Re H(f_i)/max(Re H(f_i), GAIN_FLOOR)), 1 above the floor)."""
        from pmgd_node.perturbation import FrequencyMultiplexed
        from services.chip.job import initial_parameters
        from services.evaluator.data import load
        from services.evaluator.gradient_angle import angle_degrees
        from services.evaluator.models import job_model

        model = job_model(config)
        data = load(config.task)
        if config.batch < len(data.y):
            return [None] * config.seeds  # the limit below is for the full-data gradient only
        grad = model.gradient(initial_parameters(model, config), model.prepare(data.x, data.y))
        fm = FrequencyMultiplexed(model.num_params, config.seed + np.arange(config.seeds), config.amplitude,
                                  config.fm_band)
        gain = highpass_gain(fm.freq, config.tau_hp)
        if config.fm_gain_correction:
            gain = gain / corrected_gain(fm.freq, config.tau_hp)
        return [float(a) for a in angle_degrees(gain * grad, grad)]

    def figures(self, rows: list[dict], p: dict, out: str) -> list[str]:
        from . import plots

        ticks = _ticks_in(rows)
        if not ticks:
            return []
        fig, axes = plots.figure(width=6.4, height=4.4,
                                 title=f"Fig 2a: angle between G and ∇C, {p['task']} ({p['network']}), θ⁰ frozen")
        ax = axes[0, 0]
        for kind in p["types"]:
            mine = [r for r in rows if r["type"] == kind]
            if not mine:
                continue
            ys = [[r[f"angle_t{t}"] for t in ticks] for r in mine]
            label = plots.LABELS.get(kind, kind) + (_fm_note(p) if kind == "fm" else "")
            plots.band(ax, ticks, ys, label, plots.COLORS.get(kind))
            if kind == "fm":
                lim = [r["angle_limit"] for r in mine if r.get("angle_limit") not in (None, "")]
                if lim:
                    what = "gain-corrected high-pass" if p["fm_gain_correction"] else "high-pass gain"
                    ax.axhline(float(np.median(lim)), color=plots.COLORS["fm"], linestyle=":", linewidth=1,
                               label=f"FM limit from the {what} (τ_hp = {p['tau_hp']:g})")
        if "rcm" in p["types"]:
            P = rows[0].get("num_params") or 16
            t = np.asarray(ticks, dtype=np.float64)
            ax.plot(t, np.degrees(np.arctan(np.sqrt((P - 1) / t))), color=plots.COLORS["rcm"], linestyle="--",
                    linewidth=1, label=f"R-CM theory arctan √((P−1)/t), P = {P}")
        ax.set_xscale("log")
        ax.set_xlabel("time t (ticks τ_p; FM: (½ bandwidth)⁻¹ = 1 tick)")
        ax.set_ylabel("angle between G and ∇C (degrees)")
        ax.set_ylim(0, 95)
        ax.set_yticks(range(0, 91, 15))
        ax.legend(fontsize=8, title=f"median, q1–q3 band, {p['seeds']} networks", title_fontsize=8)
        return [plots.save(fig, out, "fig2.png")]

    def summary(self, rows: list[dict], p: dict) -> dict:
        ticks = _ticks_in(rows)
        at = ([t for t in (4, 8, 16, 32, 64, 128, 256, 512, 1024) if t in ticks] + [ticks[-1]]
              or ticks[:: max(1, len(ticks) // 8)])
        out: dict = {"median_angle_deg": {}, "falls_with_time": {}}
        for kind in p["types"]:
            mine = [r for r in rows if r["type"] == kind]
            if not mine:
                continue
            med = {t: float(np.median([r[f"angle_t{t}"] for r in mine])) for t in ticks}
            out["median_angle_deg"][kind] = {str(t): round(med[t], 2) for t in at}
            early = med[ticks[0]]
            late = med[ticks[-1]]
            out["falls_with_time"][kind] = {"first": round(early, 2), "last": round(late, 2), "falls": late < early}
            if kind == "fm":
                lim = [r["angle_limit"] for r in mine if r.get("angle_limit") not in (None, "")]
                if lim:
                    out["fm_limit_deg_median"] = round(float(np.median(lim)), 2)
        if "rcm" in out["median_angle_deg"]:
            P = rows[0].get("num_params") or 16
            out["rcm_theory_deg"] = {str(t): round(math.degrees(math.atan(math.sqrt((P - 1) / t))), 2) for t in at}
        out["all_fall"] = all(v["falls"] for v in out["falls_with_time"].values())
        return out


def _fm_note(p: dict) -> str:
    return " (analog, gain-corrected)" if p.get("fm_gain_correction") else " (analog)"


def _num_params(config: JobConfig) -> int:
    layers = [int(n) for n in config.network.split("-")]
    return sum(a * b + b for a, b in zip(layers[:-1], layers[1:]))


def _ticks_in(rows: list[dict]) -> list[int]:
    if not rows:
        return []
    return sorted(int(k[len("angle_t"):]) for k in rows[0] if k.startswith("angle_t"))


STUDIES = {"fig2": Fig2}
