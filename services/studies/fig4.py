"""Study ``fig4`` (paper Fig 4): what the update period τ_θ does to 2-bit parity with R-CM.

Two sweeps, each at mini-batch m = 1 and m = 4 (m = τ_θ/τ_x samples integrated into one
update; all four parity samples when m = 4, i.e. full-batch gradient descent):

* panel ``a``: median solution time (ticks) vs τ_θ at one low, fixed η (``eta_a``);
* panel ``b``: the largest *stable* η vs τ_θ, and the median solution time at that η.

Mini-batch m at update period τ_θ: τ_x = τ_θ/m when m divides τ_θ (one sample per tick, the
paper's setting); for τ_θ < m (m = 4 at τ_θ = 1, 2) the hardware shows ``batch`` = m/τ_θ
samples at once with τ_x = 1, the only way to integrate four samples into one update.

Solved: the mean cost over the four samples reaches ``target_cost`` (paper: 0.01), checked
every ``eval_every`` ticks, within ``max_ticks_a`` / ``max_ticks_b`` ticks. **Stable**: at
least ``stable_fraction`` of the runs are solved (paper: 50 of 100). Max η at τ_θ = the
largest η of the grid that is stable (smaller η may fail too, only by running out of
time). The η grid of panel b is given as ``eta_tau`` = η·τ_θ: the discrete integrator sums
τ_θ ticks of ε, so one update moves θ⁰ by ≈ η·τ_θ·∇C and the stability edge sits at a
roughly constant η·τ_θ; a grid in η·τ_θ probes every τ_θ around its edge.

Rows: one per (panel, m, τ_θ, η, seed) with ``solved``, ``ticks_to_solution`` and the job's
usual columns; ``eta_tau`` = η·τ_θ.
"""

from __future__ import annotations

import numpy as np

from pmgd_node.config import JobConfig

from .sweep import Context, Point, Study


def schedule(minibatch: int, tau_theta: int) -> tuple[int, int]:
    """(τ_x, batch) that integrate ``minibatch`` samples into each update of period τ_θ."""
    if tau_theta >= minibatch:
        if tau_theta % minibatch:
            raise ValueError(f"τ_θ = {tau_theta} is not a multiple of the mini-batch {minibatch}")
        return tau_theta // minibatch, 1
    if minibatch % tau_theta:
        raise ValueError(f"mini-batch {minibatch} is not a multiple of τ_θ = {tau_theta}")
    return 1, minibatch // tau_theta


class Fig4(Study):
    name = "fig4"
    question = ("How do the update period τ_θ and the mini-batch (1 or all 4 samples) change the solution "
                "time of 2-bit parity with R-CM, and the largest stable learning rate? (paper Fig 4)")
    params = {
        "seeds": 50,  # random initialisations per point (paper: 100)
        "seed": 0,
        "perturbation": "rcm",
        "amplitude": 0.1,
        "minibatches": [1, 4],
        "target_cost": 0.01,  # solved: mean cost ≤ this (paper: 0.01)
        "eval_every": 10,
        # panel a: solution time vs τ_θ at a fixed low η
        "tau_thetas_a": [1, 2, 4, 8, 16, 32, 64],
        "eta_a": 0.1,
        "max_ticks_a": 20000,
        # panel b: η grid (as η·τ_θ) per τ_θ; max stable η
        "tau_thetas_b": [1, 4, 16, 64],
        "eta_tau": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
        "max_ticks_b": 10000,
        "stable_fraction": 0.5,
    }

    def _config(self, p: dict, m: int, tau_theta: int, eta: float, max_ticks: int) -> JobConfig:
        tau_x, batch = schedule(m, tau_theta)
        return JobConfig(task="parity2", perturbation=p["perturbation"], amplitude=p["amplitude"], eta=eta,
                         tau_theta=tau_theta, tau_x=tau_x, batch=batch, seed=p["seed"], seeds=p["seeds"],
                         max_ticks=max_ticks, target_accuracy=None, target_cost=p["target_cost"],
                         eval_every=p["eval_every"])

    def points(self, p: dict) -> list[Point]:
        pts = []
        for m in p["minibatches"]:
            for tt in p["tau_thetas_a"]:
                key = {"panel": "a", "minibatch": m, "tau_theta": tt, "eta": p["eta_a"]}
                pts.append(Point(key, self._config(p, m, tt, p["eta_a"], p["max_ticks_a"])))
        for m in p["minibatches"]:
            for tt in p["tau_thetas_b"]:
                for k in p["eta_tau"]:
                    eta = k / tt
                    key = {"panel": "b", "minibatch": m, "tau_theta": tt, "eta": eta}
                    pts.append(Point(key, self._config(p, m, tt, eta, p["max_ticks_b"])))
        return pts

    def run(self, point: Point, p: dict, ctx: Context) -> list[dict]:
        c = point.config
        extra = {"eta_tau": c.eta * c.tau_theta, "tau_x": c.tau_x, "batch": c.batch}
        return [dict(extra, **row) for row in ctx.train(c).rows]

    # --- analysis -------------------------------------------------------------------------------
    @staticmethod
    def _groups(rows: list[dict], panel: str) -> dict[tuple, list[dict]]:
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["panel"] == panel:
                groups.setdefault((int(r["minibatch"]), int(r["tau_theta"]), float(r["eta"])), []).append(r)
        return groups

    @staticmethod
    def _stats(runs: list[dict]) -> dict:
        solved = [int(r["ticks_to_solution"]) for r in runs if _true(r["solved"])]
        q = np.percentile(solved, [25, 50, 75]).tolist() if solved else [None] * 3
        return {"runs": len(runs), "solved": len(solved), "fraction": len(solved) / max(1, len(runs)),
                "median_ticks": q[1], "q1_ticks": q[0], "q3_ticks": q[2]}

    def panel_a(self, rows: list[dict]) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for (m, tt, eta), runs in sorted(self._groups(rows, "a").items()):
            out.setdefault(m, []).append({"tau_theta": tt, "eta": eta, **self._stats(runs)})
        return out

    def panel_b(self, rows: list[dict], p: dict) -> dict[int, list[dict]]:
        """Per mini-batch, per τ_θ: every η tried (fraction solved) and the max stable η."""
        per: dict[tuple[int, int], list[dict]] = {}
        for (m, tt, eta), runs in sorted(self._groups(rows, "b").items()):
            per.setdefault((m, tt), []).append({"eta": eta, **self._stats(runs)})
        out: dict[int, list[dict]] = {}
        for (m, tt), tried in sorted(per.items()):
            stable = [t for t in tried if t["fraction"] >= p["stable_fraction"]]
            best = max(stable, key=lambda t: t["eta"]) if stable else None
            out.setdefault(m, []).append({
                "tau_theta": tt, "max_eta": best["eta"] if best else None,
                "max_eta_tau": best["eta"] * tt if best else None,
                "fraction_at_max_eta": best["fraction"] if best else None,
                "median_ticks_at_max_eta": best["median_ticks"] if best else None,
                "q1_ticks_at_max_eta": best["q1_ticks"] if best else None,
                "q3_ticks_at_max_eta": best["q3_ticks"] if best else None,
                "edge_of_grid": bool(best) and best["eta"] == max(t["eta"] for t in tried),
                "tried": [{"eta": t["eta"], "fraction": round(t["fraction"], 3), "median_ticks": t["median_ticks"]}
                          for t in tried]})
        return out

    def summary(self, rows: list[dict], p: dict) -> dict:
        a = self.panel_a(rows)
        b = self.panel_b(rows, p)
        return {
            "solved_rule": f"mean cost ≤ {p['target_cost']} within the budget; "
                           f"stable: ≥ {p['stable_fraction']:.0%} solved",
            "panel_a": {str(m): [{k: v for k, v in s.items() if k != "eta"} for s in v] for m, v in a.items()},
            "panel_a_eta": p["eta_a"],
            "panel_b": {str(m): v for m, v in b.items()},
        }

    def figures(self, rows: list[dict], p: dict, out: str) -> list[str]:
        from . import plots

        colors = {1: "#1f77b4", 4: "#d62728"}
        figs = []
        a = self.panel_a(rows)
        kind = plots.LABELS.get(p["perturbation"], p["perturbation"])
        if a:
            fig, axes = plots.figure(ncols=2, width=5.2, height=4.2,
                                     title=f"Fig 4a: 2-bit parity, {kind}, "
                                           f"fixed η = {p['eta_a']:g}; solved: mean cost ≤ {p['target_cost']:g} "
                                           f"within {p['max_ticks_a']:,} ticks")
            ax, ax_f = axes[0]
            for m, stats in a.items():
                xs = [s["tau_theta"] for s in stats]
                med = np.array([np.nan if s["median_ticks"] is None else s["median_ticks"] for s in stats], float)
                lo = np.array([np.nan if s["q1_ticks"] is None else s["q1_ticks"] for s in stats], float)
                hi = np.array([np.nan if s["q3_ticks"] is None else s["q3_ticks"] for s in stats], float)
                label = f"mini-batch {m} (τ_θ = {m}·τ_x)" if m > 1 else "mini-batch 1 (τ_x = τ_θ)"
                ax.errorbar(xs, med, yerr=[med - lo, hi - med], marker="o", capsize=3, color=colors.get(m), label=label)
                ax_f.plot(xs, [s["fraction"] for s in stats], marker="o", color=colors.get(m), label=label)
            for axis in (ax, ax_f):
                axis.set_xscale("log", base=2)
                axis.xaxis.set_major_formatter(_plain_formatter())
                axis.set_xlabel("update period τ_θ (ticks)")
                axis.legend(fontsize=8)
            plots.log_y(ax, f"no run solved in {p['max_ticks_a']:,} ticks")
            ax.set_ylabel("solution time (ticks τ_p)")
            ax.set_title("solution time: median, q1–q3 of solved runs", fontsize=10)
            ax_f.set_ylabel(f"fraction of the {p['seeds']} runs solved")
            ax_f.set_ylim(-0.02, 1.02)
            ax_f.axhline(p["stable_fraction"], color="k", linewidth=0.8, linestyle=":")
            ax_f.set_title("runs solved", fontsize=10)
            figs.append(plots.save(fig, out, "fig4a.png"))
        b = self.panel_b(rows, p)
        if b:
            fig, axes = plots.figure(ncols=3, width=4.6, height=4.2,
                                     title=f"Fig 4b: 2-bit parity, {kind}: "
                                           f"largest stable η (≥ {p['stable_fraction']:.0%} of runs reach mean cost "
                                           f"≤ {p['target_cost']:g} in {p['max_ticks_b']:,} ticks)")
            ax_eta, ax_t, ax_f = axes[0]
            for m, stats in b.items():
                xs = [s["tau_theta"] for s in stats]
                eta = [np.nan if s["max_eta"] is None else s["max_eta"] for s in stats]
                med, lo, hi = (np.array([np.nan if s[key] is None else s[key] for s in stats], float)
                               for key in ("median_ticks_at_max_eta", "q1_ticks_at_max_eta", "q3_ticks_at_max_eta"))
                ax_eta.plot(xs, eta, marker="o", color=colors.get(m), label=f"mini-batch {m}")
                for x, s, y in zip(xs, stats, eta):
                    if s["edge_of_grid"]:
                        ax_eta.annotate("top of grid", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
                ax_t.errorbar(xs, med, yerr=[med - lo, hi - med], marker="s", capsize=3, color=colors.get(m),
                              label=f"mini-batch {m}")
                for k, s in enumerate(stats):
                    tried = s["tried"]
                    ax_f.plot([t["eta"] * s["tau_theta"] for t in tried], [t["fraction"] for t in tried],
                              marker="o" if m == 1 else "s", markersize=3, linestyle="-" if m == 1 else "--",
                              color=plt_color(k), label=f"m = {m}, τ_θ = {s['tau_theta']}")
            for ax in (ax_eta, ax_t):
                ax.set_xscale("log", base=2)
                plots.log_y(ax, "no η stable")
                ax.set_xlabel("update period τ_θ (ticks)")
                ax.xaxis.set_major_formatter(_plain_formatter())
                ax.legend(fontsize=8)
            ax_eta.set_ylabel("max stable learning rate η")
            ax_eta.set_title("max stable η", fontsize=10)
            ax_t.set_ylabel("solution time at max η (ticks τ_p)")
            ax_t.set_title("minimum training time: median, q1–q3", fontsize=10)
            ax_f.axhline(p["stable_fraction"], color="k", linewidth=0.8, linestyle=":")
            ax_f.set_xscale("log", base=2)
            ax_f.xaxis.set_major_formatter(_plain_formatter())
            ax_f.set_xlabel("η·τ_θ (update size per unit gradient)")
            ax_f.set_ylabel("fraction of runs solved")
            ax_f.set_ylim(-0.02, 1.02)
            ax_f.set_title("the grid (solid m = 1, dashed m = 4)", fontsize=10)
            ax_f.legend(fontsize=6, ncol=2)
            figs.append(plots.save(fig, out, "fig4b.png"))
        return figs


def plt_color(k: int) -> str:
    return ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"][k % 8]


def _plain_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _true(v) -> bool:
    return v is True or v == "True" or v == 1


STUDIES = {"fig4": Fig4}
