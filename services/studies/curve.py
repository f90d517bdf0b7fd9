"""One long PMGD learning curve beside backprop from the same θ⁰, checkpointed and resumable.

    pmgd curve --config configs/fmnist-rcm.toml --out runs/fmnist-curve --batch 100 --eval-every 2000

Runs the config's first seed on the in-process engine and records the held-out cost and
accuracy every ``eval_every`` perturbed ticks; before it, plain SGD by backpropagation
(:func:`services.evaluator.backprop.train_sgd`, same batch size, same initial θ⁰) records its
curve on the same grid of steps, so the two can be read side by side (one PMGD tick and one
SGD step both see one mini-batch). The first tick at which PMGD reaches the config's
``target_accuracy`` is noted, and the run goes on to ``max_ticks`` so that the whole curve is
seen; a run that diverges stops there and says so.

Everything lives in ``OUT``: ``curve.npz`` (the engine's snapshot and both curves),
``curve.json`` (the curves and a summary, for people and plots) and ``curve.png``. The
checkpoint is written to a temporary file, flushed and renamed over the old one, so a kill at
any instant leaves the previous checkpoint or the new one; its SHA-256 over every array is
checked on load, and a checkpoint of another config is refused. Rerunning the same command
continues from the last checkpoint; the continued run matches an uninterrupted one bit for bit
(the engine's sync restore is exact).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from pmgd_node.config import ConfigError, JobConfig
from services.engine.engine import Engine
from services.state_file import load_state, save_state

STATE = "curve.npz"


@dataclass
class Curve:
    """Held-out cost and accuracy of one learner at a grid of ticks (or SGD steps)."""

    ticks: list[int] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)

    def add(self, tick: int, cost: float, accuracy: float) -> None:
        self.ticks.append(int(tick))
        self.cost.append(float(cost))
        self.accuracy.append(float(accuracy))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_ticks": np.asarray(self.ticks, dtype=np.int64),
                f"{prefix}_cost": np.asarray(self.cost, dtype=np.float64),
                f"{prefix}_accuracy": np.asarray(self.accuracy, dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> Curve:
        return cls([int(v) for v in arrays[f"{prefix}_ticks"]], [float(v) for v in arrays[f"{prefix}_cost"]],
                   [float(v) for v in arrays[f"{prefix}_accuracy"]])

    def first_at(self, target: float | None) -> int | None:
        """The first tick whose accuracy reaches ``target`` (None: never, or no target)."""
        if target is None:
            return None
        return next((t for t, a in zip(self.ticks, self.accuracy) if a >= target), None)

    def as_dict(self) -> dict:
        return {"ticks": self.ticks, "cost": [c if np.isfinite(c) else None for c in self.cost],
                "accuracy": self.accuracy}


@dataclass
class CurveRun:
    """The state of one curve measurement: config, engine, both curves."""

    config: JobConfig
    out: str
    backprop_steps: int
    backprop_lr: float
    device: str | None = None

    def __post_init__(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        self.engine = Engine(self.config.replace(seeds=1), device=self.device)
        self.initial_theta0 = self.engine.theta0.copy()
        self.pmgd, self.backprop = Curve(), Curve()
        self.wall = 0.0  # seconds spent on PMGD ticks and their evaluations, over every resume
        self.diverged_at = -1
        path = os.path.join(self.out, STATE)
        if os.path.exists(path):
            self._resume(load_state(path))

    def _identity(self) -> str:
        """What a checkpoint must share with this run to be continued by it: the config (the
        budget excepted, which may grow) and the backprop baseline's settings."""
        config = {k: v for k, v in self.config.to_dict().items() if k != "max_ticks"}
        return json.dumps({"config": config, "backprop_steps": self.backprop_steps,
                           "backprop_lr": self.backprop_lr}, sort_keys=True)

    @staticmethod
    def _essence(identity: str) -> dict:
        """An identity with the config fields at their defaults left out, so that a field
        added to JobConfig later (at its default) leaves older checkpoints valid."""
        d = json.loads(identity)
        default = JobConfig(task=d["config"].get("task", "parity2")).to_dict()
        d["config"] = {k: v for k, v in d["config"].items() if k in default and v != default[k]}
        return d

    def _resume(self, s: dict[str, np.ndarray]) -> None:
        if self._essence(str(s["identity"])) != self._essence(self._identity()):
            raise ConfigError(os.path.join(self.out, STATE), "holds a curve of another config; use a new --out "
                              "or the same settings", kind="checkpoint")
        self.engine.restore({k[len("engine_"):]: v for k, v in s.items() if k.startswith("engine_")})
        self.pmgd, self.backprop = Curve.from_arrays(s, "pmgd"), Curve.from_arrays(s, "backprop")
        self.wall, self.diverged_at = float(s["wall"]), int(s["diverged_at"])

    def save(self) -> None:
        arrays = {f"engine_{k}": v for k, v in self.engine.snapshot().items()}
        arrays.update(self.pmgd.arrays("pmgd"), **self.backprop.arrays("backprop"), identity=np.array(self._identity()),
                      wall=np.float64(self.wall), diverged_at=np.int64(self.diverged_at))
        save_state(os.path.join(self.out, STATE), arrays)
        _write_json(os.path.join(self.out, "curve.json"), self.summary())

    @property
    def done(self) -> bool:
        return self.engine.tick >= self.config.max_ticks or self.diverged_at >= 0

    def run_backprop(self, log=print) -> None:
        """SGD from the same θ⁰ on the same grid (once; cheap beside the PMGD run)."""
        if self.backprop.ticks or self.backprop_steps <= 0:
            return
        from services.evaluator.backprop import train_sgd

        cfg = self.config
        every = min(cfg.eval_every, self.backprop_steps)
        t0 = time.perf_counter()
        r = train_sgd(self.engine.model, self.engine.train, lr=self.backprop_lr, batch=cfg.batch,
                      steps=self.backprop_steps, seed=cfg.seed, eval_every=every, eval_dataset=self.engine.evalset,
                      stop_when_solved=False, theta0=self.initial_theta0)
        for step, c, a in zip(r.steps, r.cost[:, 0], r.accuracy[:, 0]):
            self.backprop.add(int(step), float(c), float(a))
        log(f"backprop: {self.backprop_steps:,} steps at lr {self.backprop_lr} in {time.perf_counter() - t0:.0f} s, "
            f"held-out accuracy {100 * self.backprop.accuracy[-1]:.2f} %")
        self.save()

    def run_pmgd(self, log=print, stop_after: float | None = None) -> None:
        """PMGD ticks to ``max_ticks`` (or divergence), a checkpoint after every evaluation.

        ``stop_after`` (seconds) ends this call early at an evaluation: the rest resumes later."""
        cfg, engine = self.config, self.engine
        if not self.pmgd.ticks:
            point = engine.evaluate()
            self.pmgd.add(0, point.cost[0], point.accuracy[0])
        started = time.perf_counter()
        while not self.done:
            t0 = time.perf_counter()
            for _ in range(min(cfg.eval_every, cfg.max_ticks - engine.tick)):
                engine.step()
                if engine.stage.diverged:
                    break
            point = engine.evaluate()
            self.pmgd.add(engine.tick, point.cost[0], point.accuracy[0])
            engine.job.record(point, engine.theta0)  # the job's divergence rule and tick
            self.diverged_at = int(engine.job.t_div[0])
            self.wall += time.perf_counter() - t0
            self.save()
            norm, ms = float(np.linalg.norm(engine.theta0)), 1e3 * self.wall / max(engine.tick, 1)
            log(f"tick {engine.tick:>9,}  held-out cost {point.cost[0]:.4f}  accuracy {100 * point.accuracy[0]:.2f} %"
                f"  ‖θ⁰‖ {norm:.2f}  {ms:.1f} ms/tick" + ("  DIVERGED" if self.diverged_at >= 0 else ""))
            if stop_after is not None and time.perf_counter() - started >= stop_after:
                break

    def summary(self) -> dict:
        target = self.config.target_accuracy
        best = int(np.argmax(self.pmgd.accuracy)) if self.pmgd.accuracy else None
        return {
            "config": self.config.to_dict(),
            "ticks_run": self.engine.tick,
            "pmgd_time_s": self.wall,
            "target_accuracy": target,
            "pmgd_first_at_target": self.pmgd.first_at(target),
            "backprop_first_at_target": self.backprop.first_at(target),
            "pmgd_best_accuracy": None if best is None else self.pmgd.accuracy[best],
            "pmgd_best_at": None if best is None else self.pmgd.ticks[best],
            "diverged_at": None if self.diverged_at < 0 else self.diverged_at,
            "backprop_lr": self.backprop_lr,
            "pmgd": self.pmgd.as_dict(),
            "backprop": self.backprop.as_dict(),
        }

    def figure(self) -> str:
        from matplotlib.ticker import NullFormatter

        from services.studies.plots import COLORS, LABELS, figure, save

        cfg = self.config
        title = f"{cfg.task}: PMGD ({LABELS[cfg.perturbation]}, batch {cfg.batch}) beside backprop, same initial θ⁰"
        fig, axes = figure(ncols=2, width=5.5, title=title)
        for ax, key, label in ((axes[0, 0], "accuracy", "held-out accuracy"), (axes[0, 1], "cost", "held-out cost")):
            for name, curve, color in (("PMGD", self.pmgd, COLORS["rcm"]),
                                       ("backprop (SGD)", self.backprop, COLORS["backprop"])):
                # The log axis starts at the first check; the untrained network's value is drawn flat.
                ticks, values = np.asarray(curve.ticks), np.asarray(getattr(curve, key))
                if len(ticks) > 1:
                    ax.plot(ticks[1:], values[1:], marker=".", ms=3, label=name, color=color)
            if self.pmgd.ticks:
                ax.axhline(getattr(self.pmgd, key)[0], color="0.6", ls="--", lw=0.8, label="at tick 0")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # 2×10³, 3×10³, … overlap
            ax.set_xlabel("perturbed ticks (SGD: steps)")
            ax.set_ylabel(label)
        if cfg.target_accuracy is not None:
            axes[0, 0].axhline(cfg.target_accuracy, color="k", ls=":", lw=1,
                               label=f"paper: {100 * cfg.target_accuracy:.1f} %")
        if self.diverged_at >= 0:
            axes[0, 0].axvline(self.diverged_at, color="r", ls="--", lw=1, label="diverged")
        axes[0, 0].legend(fontsize=8)
        return save(fig, self.out, "curve.png")


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="pmgd curve", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="job config (JSON or TOML); its first seed is run")
    ap.add_argument("--out", required=True, help="folder of the checkpoint, curve.json and curve.png (resumes)")
    ap.add_argument("--data-dir", help="overrides the config's data_dir")
    ap.add_argument("--max-ticks", type=int, help="overrides the config's budget")
    ap.add_argument("--batch", type=int, help="overrides the config's batch")
    ap.add_argument("--eval-every", type=int, default=2000, help="ticks between held-out checks (default 2000)")
    ap.add_argument("--eval-samples", type=int, default=0, help="held-out samples per check (default 0: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other job-config field (JSON value), e.g. --set eta=3.5e-4")
    ap.add_argument("--backprop-steps", type=int, default=20_000, help="SGD steps of the baseline (0: none)")
    ap.add_argument("--backprop-lr", type=float, default=0.05)
    ap.add_argument("--stop-after", type=float, help="seconds; stop at the next check (resume later)")
    ap.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    args = ap.parse_args(argv)
    try:
        cfg = JobConfig.load(args.config)
        changes = {"eval_every": args.eval_every, "eval_samples": args.eval_samples}
        for name in ("data_dir", "max_ticks", "batch"):
            if getattr(args, name) is not None:
                changes[name] = getattr(args, name)
        for item in args.overrides:
            name, _, value = item.partition("=")
            try:
                changes[name] = json.loads(value)
            except json.JSONDecodeError:
                changes[name] = value
        cfg = JobConfig.from_dict({**cfg.to_dict(), **changes})
        run = CurveRun(cfg, args.out, args.backprop_steps, args.backprop_lr, device=args.device)
    except (ConfigError, ValueError) as err:
        print(f"pmgd curve: {err}", file=sys.stderr)
        return 2
    print(f"curve of {cfg.task} → {args.out} (from tick {run.engine.tick:,} of {cfg.max_ticks:,})", flush=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    run.run_backprop(log)
    run.run_pmgd(log, stop_after=args.stop_after)
    run.figure()
    s = run.summary()
    print(json.dumps({k: v for k, v in s.items() if k not in ("pmgd", "backprop", "config")}), flush=True)
    return 3 if run.diverged_at >= 0 else 0


if __name__ == "__main__":
    sys.exit(main())
