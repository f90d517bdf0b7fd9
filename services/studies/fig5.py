"""Study ``fig5`` (paper Fig 5b): cost vs epochs on 2-bit parity for TM, CM, R-CM and FM,
against backpropagation at three learning rates.

Every curve sees the data the same way: ``batch`` samples per tick (default 4, the whole
data set, so one tick is one epoch; epochs = ticks × batch / 4 in general) and one
update per tick. The perturbation types share one *effective* learning rate ``eta``, the
step per tick per unit gradient: η itself for the discrete types (τ_θ = τ_x = 1, G = ε of
one tick), and η·τ_θ for analog FM, whose lowpass integrator settles at G = τ_θ·ε, so FM
runs with η = ``eta``/``fm_tau_theta``. FM uses the paper's bandwidth 1/2τ_p (band [0, ½]
cycles per tick) and high-pass extraction τ_hp.

Because E[ε_i] = ∂C/∂θ_i for every type, PMGD at effective η follows, on average, gradient
descent at learning rate η: the backprop curve at lr = ``eta`` (full-batch when batch = 4)
is what the PMGD curves should track, up to perturbation noise. FM's high-pass passes tone
i with in-phase gain Re H(f_i) < 1 (mean ⅔ at τ_hp = 2 over the band), so FM's effective rate
is about a third lower, unless ``fm_gain_correction`` (each node divides its ε by its own
tone's gain, so E[ε] = ∇C for FM too). Backprop runs start from the same θ⁰ as the PMGD runs of
the same seed.

No stopping rule: every run trains for ``epochs`` epochs, so the curves share one axis.
Solved: first check (every ``eval_every`` ticks) at 100 % accuracy (``epochs_to_solution``)
and, separately, at mean cost ≤ 0.01 (``epochs_to_cost``, the paper's Fig 4 rule).

Rows: one per (type, seed), ``type`` one of tm/cm/rcm/fm/backprop and ``eta`` its (effective)
learning rate; ``cost_e{E}`` the mean cost over the four samples after E epochs, at about
``curve_points`` evenly spaced checks (E = 0 is the initial θ⁰).
"""

from __future__ import annotations

import numpy as np

from pmgd_node.config import JobConfig

from .sweep import Context, Point, Study

TYPES = ("tm", "cm", "rcm", "fm")
DATASET = 4  # samples of 2-bit parity


class Fig5(Study):
    name = "fig5"
    question = ("Do the four perturbation types (TM, CM, R-CM, FM) train 2-bit parity equally fast, "
                "and how do they compare with backpropagation? (paper Fig 5b)")
    params = {
        "seeds": 100,
        "seed": 0,
        "types": list(TYPES),
        "batch": 4,  # samples per tick (4 = the whole data set: one tick is one epoch)
        "eta": 1.0,  # effective learning rate per tick (discrete η; FM η·τ_θ)
        "amplitude": 0.1,
        "fm_tau_theta": 4,  # FM lowpass time constant, ticks (FM η = eta / fm_tau_theta)
        "tau_hp": 2.0,  # FM high-pass time constant, ticks
        "fm_band": [0.0, 0.5],  # FM band, cycles per tick (paper: bandwidth 1/2τ_p)
        "fm_gain_correction": False,  # FM: each node divides its ε by its tone's high-pass gain
        "backprop_lrs": [0.5, 1.0, 2.0],
        "epochs": 2000,
        "eval_every": 10,  # ticks between cost checks
        "target_cost": 0.01,
        "curve_points": 50,  # cost_e{E} columns per run (every k-th check)
    }

    def _config(self, p: dict, kind: str) -> JobConfig:
        analog = kind == "fm"
        tau_theta = p["fm_tau_theta"] if analog else 1
        return JobConfig(task="parity2", perturbation=kind, mode="analog" if analog else "discrete",
                         amplitude=p["amplitude"], eta=p["eta"] / tau_theta, tau_theta=tau_theta, tau_x=1,
                         tau_hp=p["tau_hp"], fm_band=tuple(p["fm_band"]), batch=p["batch"], seed=p["seed"],
                         seeds=p["seeds"], max_ticks=self.ticks(p), target_accuracy=None,
                         eval_every=p["eval_every"], fm_gain_correction=analog and p["fm_gain_correction"])

    @staticmethod
    def ticks(p: dict) -> int:
        return max(1, int(round(p["epochs"] * DATASET / p["batch"])))

    def points(self, p: dict) -> list[Point]:
        pts = [Point({"type": kind, "eta": p["eta"]}, self._config(p, kind)) for kind in p["types"]]
        pts += [Point({"type": "backprop", "eta": lr}) for lr in p["backprop_lrs"]]
        return pts

    def run(self, point: Point, p: dict, ctx: Context) -> list[dict]:
        if point.key["type"] == "backprop":
            ticks, cost, acc = self._backprop(point.key["eta"], p)
            base = [{"seed": p["seed"] + r} for r in range(p["seeds"])]
        else:
            trained = ctx.train(point.config)
            ticks = np.array([0] + [t for t, _, _ in trained.history])
            cost = np.array([self._initial_cost(point.config)] + [c for _, c, _ in trained.history], dtype=float)
            acc = np.array([np.full(cost.shape[1], np.nan)] + [a for _, _, a in trained.history], dtype=float)
            base = [{"seed": r["seed"], "final_cost": r["final_cost"], "final_accuracy": r["final_accuracy"]}
                    for r in trained.rows]
        epochs = ticks * p["batch"] / DATASET
        # Columns at every k-th check, about ``curve_points`` of them, always the last one.
        k = max(1, int(np.ceil((len(epochs) - 1) / p["curve_points"])))
        keep = sorted(set(range(0, len(epochs), k)) | {len(epochs) - 1})
        rows = []
        for r, row in enumerate(base):
            solved = np.flatnonzero(acc[:, r] >= 1.0 - 1e-12)
            low = np.flatnonzero(cost[:, r] <= p["target_cost"])
            row.update(epochs_to_solution=float(epochs[solved[0]]) if len(solved) else None,
                       epochs_to_cost=float(epochs[low[0]]) if len(low) else None,
                       final_cost=float(cost[-1, r]), final_accuracy=float(acc[-1, r]))
            row.update({f"cost_e{epochs[i]:g}": float(cost[i, r]) for i in keep})
            rows.append(row)
        return rows

    @staticmethod
    def _initial_cost(config: JobConfig) -> np.ndarray:
        from services.chip.job import initial_parameters
        from services.evaluator.data import load
        from services.evaluator.models import job_model

        model = job_model(config)
        data = load(config.task)
        return model.cost(initial_parameters(model, config), model.prepare(data.x, data.y))

    def _backprop(self, lr: float, p: dict):
        """Exact-gradient SGD from the PMGD runs' θ⁰ (backprop runs in-process on either engine)."""
        from services.chip.job import initial_parameters
        from services.evaluator.backprop import train_sgd
        from services.evaluator.data import load
        from services.evaluator.models import build_model

        config = self._config(p, "rcm")
        model = build_model("parity2", config.network)
        data = load("parity2")
        res = train_sgd(model, data, lr=lr, batch=p["batch"], steps=self.ticks(p), seed=p["seed"],
                        eval_every=p["eval_every"], target_accuracy=1.0, stop_when_solved=False,
                        theta0=initial_parameters(model, config))
        return res.steps, res.cost, res.accuracy

    # --- analysis -------------------------------------------------------------------------------
    def summary(self, rows: list[dict], p: dict) -> dict:
        curves: dict = {}
        for (kind, eta), mine in _by_curve(rows).items():
            sol = [r["epochs_to_solution"] for r in mine if r["epochs_to_solution"] not in (None, "")]
            low = [r["epochs_to_cost"] for r in mine if r["epochs_to_cost"] not in (None, "")]
            q = np.percentile(sol, [25, 50, 75]).tolist() if sol else [None] * 3
            curves[_label(kind, eta, p)] = {
                "type": kind, "eta": eta, "runs": len(mine), "solved": len(sol),
                "median_epochs_to_solution": q[1], "q1": q[0], "q3": q[2],
                "reached_cost": len(low), "median_epochs_to_cost": float(np.median(low)) if low else None,
                "median_final_cost": float(np.median([r["final_cost"] for r in mine]))}
        pm = [c for c in curves.values() if c["type"] in TYPES and c["median_epochs_to_solution"]]
        out = {"epoch": f"ticks × {p['batch']} / {DATASET}", "solved_rule": "100 % accuracy (first check)",
               "curves": curves}
        if pm:
            meds = [c["median_epochs_to_solution"] for c in pm]
            out["pmgd_fastest_to_slowest_ratio"] = max(meds) / min(meds)
            out["within_factor_2"] = max(meds) / min(meds) <= 2.0
        return out

    def figures(self, rows: list[dict], p: dict, out: str) -> list[str]:
        from . import plots

        fig, axes = plots.figure(ncols=2, width=5.6, height=4.4,
                                 title=f"Fig 5b: 2-bit parity, {p['batch']} sample{'s' if p['batch'] > 1 else ''} "
                                       "per tick, one update per tick, "
                                       f"effective η = {p['eta']:g}")
        ax, ax_box = axes[0]
        grey = ["#bbbbbb", "#7f7f7f", "#303030"]
        bp = 0
        stats, labels, colors = [], [], []
        for (kind, eta), mine in _by_curve(rows).items():
            names = [k for k in mine[0] if k.startswith("cost_e")]
            cols = [float(k[len("cost_e"):]) for k in names]
            ys = [[r[k] for k in names] for r in mine]
            label = _label(kind, eta, p)
            if kind == "backprop":
                color = grey[min(bp, 2)]
                bp += 1
                q1, med, q3 = np.nanpercentile(np.asarray(ys, float), [25, 50, 75], axis=0)
                ax.plot(cols, med, linestyle="--", color=color, label=label)
            else:
                color = plots.COLORS.get(kind)
                plots.band(ax, cols, ys, label, color)
            sol = [r["epochs_to_solution"] for r in mine if r["epochs_to_solution"] not in (None, "")]
            stats.append(sol or [np.nan])
            labels.append(f"{label}\n{len(sol)}/{len(mine)}")
            colors.append(color)
        ax.set_yscale("log")
        ax.axhline(p["target_cost"], color="k", linewidth=0.6, linestyle=":")
        ax.set_xlabel(f"epochs (ticks × {p['batch']} / {DATASET})")
        ax.set_ylabel("mean cost over the 4 samples")
        ax.set_title("cost: median and q1–q3 band over seeds (backprop: median)", fontsize=9)
        ax.legend(fontsize=7)
        import matplotlib

        horizontal = ({"orientation": "horizontal"} if tuple(int(v) for v in matplotlib.__version__.split(".")[:2])
                      >= (3, 10) else {"vert": False})
        box = ax_box.boxplot(stats, patch_artist=True, showfliers=True, medianprops={"color": "k"}, **horizontal)
        for patch, c in zip(box["boxes"], colors):
            patch.set_facecolor(c)
            patch.set_alpha(0.5)
        ax_box.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
        if any(np.isfinite(v).any() for v in map(np.asarray, stats)):
            ax_box.set_xscale("log")
            ax_box.xaxis.set_major_formatter(_plain_formatter())
            ax_box.xaxis.set_minor_formatter(_plain_formatter(minor=True))
        ax_box.set_xlabel("epochs to 100 % accuracy (solved runs)")
        ax_box.set_title(f"solution time over {p['seeds']} seeds (n/N solved)", fontsize=9)
        ax_box.invert_yaxis()
        return [plots.save(fig, out, "fig5.png")]


def _plain_formatter(minor: bool = False):
    from matplotlib.ticker import FuncFormatter

    # Minor ticks labelled only at 2, 3 and 5 × 10ᵏ (the rest stay unlabelled).
    def fmt(v, _):
        lead = v / 10 ** np.floor(np.log10(v)) if v > 0 else 0
        return f"{v:g}" if not minor or round(lead) in (2, 3, 5) else ""

    return FuncFormatter(fmt)


def _label(kind: str, eta: float, p: dict) -> str:
    if kind == "backprop":
        return f"backprop lr {eta:g}"
    fm = "FM (analog, gain-corrected)" if p.get("fm_gain_correction") else "FM (analog)"
    return {"tm": "TM", "cm": "CM", "rcm": "R-CM", "fm": fm}.get(kind, kind)


def _by_curve(rows: list[dict]) -> dict[tuple[str, float], list[dict]]:
    out: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        out.setdefault((r["type"], float(r["eta"])), []).append(r)
    return out


STUDIES = {"fig5": Fig5}
