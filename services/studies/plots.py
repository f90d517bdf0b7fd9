"""Figures of studies, drawn as the paper draws them: medians with quartile bands over seeds."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"tm": "#1f77b4", "cm": "#ff7f0e", "rcm": "#2ca02c", "fm": "#d62728", "backprop": "#7f7f7f",
          "tagged": "#1f77b4", "untagged": "#d62728", "compensated": "#2ca02c"}
LABELS = {"tm": "TM", "cm": "CM", "rcm": "R-CM", "fm": "FM"}
# Overlapping series stay visible: each correlation mode its own marker and line.
STYLES = {"tagged": dict(marker="o", ls="-"), "untagged": dict(marker="s", ls="-"),
          "compensated": dict(marker="^", ls="--", ms=8, mfc="none")}


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.8, title: str = ""):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    if title:
        fig.suptitle(title)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes


def quartiles(values) -> tuple[float, float, float]:
    """(q1, median, q3) of the finite values, NaN when there are none."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return (np.nan, np.nan, np.nan)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return float(q1), float(med), float(q3)


def band(ax, x, ys, label: str, color: str | None = None, **kw) -> None:
    """Median over runs (rows of ``ys``) with the q1–q3 band shaded; ``x`` the common axis."""
    ys = np.asarray(ys, dtype=np.float64)
    q1, med, q3 = np.nanpercentile(ys, [25, 50, 75], axis=0)
    ax.plot(x, med, label=label, color=color, **kw)
    ax.fill_between(x, q1, q3, color=color, alpha=0.2, linewidth=0)


def points(ax, xs, groups, label: str, color: str | None = None, **kw) -> None:
    """Median and q1–q3 error bars of each group of values, at positions ``xs``."""
    stats = np.array([quartiles(g) for g in groups])
    kw = {"marker": "o", **kw}
    ax.errorbar(xs, stats[:, 1], yerr=[stats[:, 1] - stats[:, 0], stats[:, 2] - stats[:, 1]], label=label,
                color=color, capsize=3, **kw)


def log_y(ax, empty: str = "no run converged") -> None:
    """Log y axis when the axes hold positive data; otherwise say why the panel is empty."""
    lo, hi = ax.dataLim.intervaly
    if np.isfinite(lo) and np.isfinite(hi) and hi > 0:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")


def outcome_axes(top, mid, bottom) -> None:
    """Labels of the three panels a sweep draws per column: converged, solution time, angle."""
    top.set_ylabel("runs converged (%)")
    top.set_ylim(-5, 105)
    mid.set_ylabel("ticks to solution (median, q1–q3)")
    log_y(mid)
    bottom.set_ylabel("angle of G to ∇C (degrees)")
    bottom.set_ylim(0, 180)
    bottom.axhline(90, color="grey", lw=0.8, ls=":")  # no information


def save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
