"""CNN settings study: which η, A and stabilisers keep a Fashion-MNIST PMGD run learning.

Short runs of the reference CNN (R-CM, τ_θ = τ_x = 1) at a batch a CPU affords, around the
authors' settings mapped to this project's convention (η = 10/P ≈ 7×10⁻⁴, A = 0.1/√P ≈
8.3×10⁻⁴): one group of points varies η, one A, one the stabilisers (label smoothing of
the cross-entropy, a local weight decay λ, a clip of C̃). Each point records its held-out
accuracy every ``eval_every`` ticks and the tick at which it diverged, if it did.

What to expect: PMGD's estimate G = C̃·θ̃/A² has E[G] = ∇C but a variance of about ‖∇C‖²
in every one of the P directions, so each update adds η²P‖∇C‖² to ‖θ⁰‖² on top of the
descent. Large η learns faster until that noise, and the sharpening it causes, throws the
run out of its basin (a sudden jump of ‖θ⁰‖, then a non-finite cost); small η is stable but
slow. A changes little while it stays in the range where the cost is locally linear.
"""

from __future__ import annotations

import numpy as np

from pmgd_node.config import JobConfig

from . import plots
from .sweep import Point, Study

GROUPS = {"eta": "learning rate η", "amplitude": "amplitude A", "stabiliser": "stabiliser (η, A fixed)"}
SYMBOLS = {"eta": "η", "amplitude": "A"}
# name → job-config fields of each stabiliser setting (on top of the base η and A).
# The base point (η, A, smoothing 0.01 of the study's parameters) is the η group's; every panel
# of the figure shows it for reference.
STABILISERS = {
    "none": {"label_smoothing": 0.0},
    "smoothing, λ 0.05": {"label_smoothing": 0.01, "weight_decay": 0.05},
    "smoothing, C̃ clip 0.002": {"label_smoothing": 0.01, "c_tilde_limit": 0.002},
}


class CNNSettings(Study):
    name = "cnn"
    question = ("Which learning rate η, amplitude A and stabilisers (label smoothing, weight decay, a C̃ clip) "
                "keep PMGD on the Fashion-MNIST CNN learning, at a batch this CPU affords?")

    def __init__(self):
        self.params = {"task": "fmnist", "data_dir": "../shared/data/fashion-mnist", "batch": 100,
                       "max_ticks": 20_000, "eval_every": 2000, "eval_samples": 1000, "seeds": 1, "seed": 0,
                       "eta": 7e-4, "amplitude": 8.3e-4, "label_smoothing": 0.01,
                       "etas": [3.5e-4, 7e-4, 1.4e-3], "amplitudes": [4e-4, 1.7e-3],
                       "stabilisers": ["none", "smoothing, λ 0.05", "smoothing, C̃ clip 0.002"]}

    def config(self, p: dict, **changes) -> JobConfig:
        fields = dict(task=p["task"], data_dir=p["data_dir"], batch=p["batch"], max_ticks=p["max_ticks"],
                      eval_every=p["eval_every"], eval_samples=p["eval_samples"], seeds=p["seeds"], seed=p["seed"],
                      eta=p["eta"], amplitude=p["amplitude"], label_smoothing=p["label_smoothing"],
                      target_accuracy=None)
        return JobConfig(**{**fields, **changes})

    def points(self, p):
        out = [Point({"group": "eta", "value": str(v)}, self.config(p, eta=v)) for v in p["etas"]]
        out += [Point({"group": "amplitude", "value": str(v)}, self.config(p, amplitude=v)) for v in p["amplitudes"]]
        for name in p["stabilisers"]:
            if name not in STABILISERS:
                from .sweep import param_error

                raise param_error("stabilisers", f"each must be one of {', '.join(STABILISERS)}; got {name!r}")
            out.append(Point({"group": "stabiliser", "value": name}, self.config(p, **STABILISERS[name])))
        return out

    def run(self, point, p, ctx):
        trained = ctx.train(point.config)
        ticks = [int(t) for t, _, _ in trained.history]
        for r, row in enumerate(trained.rows):
            acc = [float(a[r]) for _, _, a in trained.history]
            finite = [a if np.isfinite(c[r]) else np.nan for (_, c, _), a in zip(trained.history, acc)]
            best = int(np.nanargmax(finite)) if np.isfinite(finite).any() else None
            if row["diverged_at"] >= 0:
                row["final_accuracy"] = None  # the argmax of non-finite logits says nothing
            row.update(eta=point.config.eta, amplitude=point.config.amplitude,
                       best_accuracy=None if best is None else finite[best],
                       best_at=None if best is None else ticks[best],
                       curve_ticks=" ".join(map(str, ticks)), curve_accuracy=" ".join(f"{a:.4f}" for a in acc))
        return trained.rows

    @staticmethod
    def _curve(row) -> tuple[np.ndarray, np.ndarray]:
        ticks = np.array([int(v) for v in str(row["curve_ticks"]).split()], dtype=float)
        acc = np.array([float(v) for v in str(row["curve_accuracy"]).split()], dtype=float)
        return ticks, acc

    def summary(self, rows, p):
        out = {}
        for group in GROUPS:
            sel = [r for r in rows if r["group"] == group]
            out[group] = [{"value": r["value"], "seed": r["seed"], "final_accuracy": r["final_accuracy"],
                           "best_accuracy": r["best_accuracy"], "best_at": r["best_at"],
                           "diverged_at": None if r["diverged_at"] < 0 else r["diverged_at"]} for r in sel]
        return out

    def figures(self, rows, p, out):
        fig, axes = plots.figure(ncols=3, width=4.6, height=4.6,
                                 title=f"Fashion-MNIST CNN, R-CM, batch {p['batch']}: held-out accuracy "
                                       f"({p['eval_samples'] or 'all'} test images)")
        cmap = plots.plt.get_cmap("viridis")
        base = [r for r in rows if r["group"] == "eta" and float(r["value"]) == p["eta"]]
        for ax, group in zip(axes[0], GROUPS):
            sel = [r for r in rows if r["group"] == group]
            if group != "eta":
                sel = base + sel
            for i, row in enumerate(sel):
                ticks, acc = self._curve(row)
                if group != "eta" and row in base:
                    label = f"base: η = {p['eta']}, A = {p['amplitude']}, smoothing {p['label_smoothing']}"
                elif group == "stabiliser":
                    label = row["value"]
                else:
                    label = f"{SYMBOLS[group]} = {row['value']}"
                if row["diverged_at"] >= 0:
                    label += f" (diverged at {row['diverged_at']:,})"
                elif row["best_accuracy"] is not None and acc[-1] < row["best_accuracy"] - 0.2:
                    label += f" (fell to {100 * acc[-1]:.0f} % after {row['best_at']:,}; finite)"
                ax.plot(ticks, 100 * acc, marker="o", ms=3, color=cmap(i / max(len(sel) - 1, 1)), label=label)
            ax.set_title(GROUPS[group], fontsize=10)
            ax.xaxis.set_major_formatter(plots.plt.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
            ax.set_xlabel("perturbed ticks")
            ax.set_ylabel("held-out accuracy (%)")
            ax.set_ylim(0, 100)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17))  # below: the curves fill the axes
        return [plots.save(fig, out, "cnn_settings.png")]


STUDIES = {"cnn": CNNSettings}
