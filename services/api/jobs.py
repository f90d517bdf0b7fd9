"""Jobs the API runs: a thread per active job that drives an engine and records what it sees.

A :class:`LocalRun` drives the in-process engine; a :class:`ClusterRun` submits the job to a
broadcaster over its control socket and follows its progress. Both write the same series to
the store (``store.py``) at every evaluation, at most every ``FLUSH_S`` seconds in one
transaction:

    cost, accuracy       medians over runs of the evaluation-set cost and accuracy
    c0                   (discrete mode) the held C₀ of the current input, mean over runs
    solved               runs that met the stopping rule
    ticks_per_second     perturbed ticks per wall second since the previous flush
    angle                (local, when asked for) the angle in degrees between the descent
                         step −Δθ⁰ since the previous evaluation and the true gradient
                         ∇C(θ⁰) of the evaluation set there, median over runs
    staleness.<k>, dropped   (cluster) ticks of age of shard k's weights; frames dropped
    heldout_accuracy, heldout_loss   (with an evaluator service) run 0's checkpoint scored by
                         the evaluator on the task's test split, at most one request at a time

and, for local jobs, a checkpoint (θ⁰ plus the state resuming needs) at most every
``CHECKPOINT_S`` seconds and at the end. Cluster checkpoints are the broadcaster's.

Control is cooperative: pause, resume, stop and interrupt (the API shutting down) are
flags the run checks at every evaluation (local) or commands sent to the broadcaster.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

import numpy as np

from pmgd_node.config import JobConfig
from services.chip.job import finite_median
from services.evaluator.gradient_angle import angle_degrees

from .store import Store

FLUSH_S = 0.25
CHECKPOINT_S = 2.0
LOG_S = 2.0
FINAL = ("finished", "diverged", "stopped", "failed", "interrupted")


class _Halt(Exception):
    """Raised inside the engine's callback to end a local run early (stop or interrupt)."""


def _median(values) -> float:
    """Median over the runs whose value is finite; NaN if none is (every run diverged)."""
    m = finite_median(values)
    return float("nan") if m is None else m


def progress_line(tick: int, cost, accuracy, solved: int, runs: int) -> str:
    return (f"tick {tick}: cost {_median(cost):.4g} · acc {100 * _median(accuracy):.1f}% · "
            f"solved {solved}/{runs}")


class _Recorder:
    """Buffers metric points and log lines and writes them to the store in batches."""

    def __init__(self, store: Store, job: str, on_flush: Callable[[dict], None] | None = None):
        self.store, self.job, self.on_flush = store, job, on_flush
        self.points: list[tuple[int, str, float]] = []
        self.latest: dict[str, float] = {}
        self._flushed_at = self._logged_at = time.monotonic()
        self._tick_at_flush: int | None = None

    def add(self, tick: int, values: dict[str, float]) -> None:
        # A series holds numbers: a value that is not finite (every run diverged) is left out.
        values = {k: v for k, v in values.items() if np.isfinite(v)}
        self.points.extend((tick, k, v) for k, v in values.items())
        self.latest.update(values, tick=tick)
        if time.monotonic() - self._flushed_at >= FLUSH_S:
            self.flush()

    def log_every(self, text: Callable[[], str]) -> None:
        if time.monotonic() - self._logged_at >= LOG_S:
            self._logged_at = time.monotonic()
            self.store.log(self.job, text())

    def flush(self) -> None:
        now = time.monotonic()
        if self.points:
            tick = self.points[-1][0]
            if self._tick_at_flush is not None and now > self._flushed_at:
                tps = (tick - self._tick_at_flush) / (now - self._flushed_at)
                self.points.append((tick, "ticks_per_second", tps))
                self.latest["ticks_per_second"] = tps
            self._tick_at_flush = tick
            self.store.add_points(self.job, self.points)
            self.points = []
            if self.on_flush is not None:
                self.on_flush(dict(self.latest))
        self._flushed_at = now


class Run(threading.Thread):
    """One active job. ``state`` follows the store's; the thread ends in a final state."""

    def __init__(self, store: Store, job: dict, on_flush: Callable[[str, dict], None] | None = None,
                 evaluator: str = ""):
        super().__init__(name=f"job-{job['id']}", daemon=True)
        self.evaluator = evaluator
        self._scoring: threading.Thread | None = None
        self.store, self.id = store, job["id"]
        self.config = JobConfig.from_dict(job["config"])
        self.options = job["options"]
        self.rec = _Recorder(store, self.id, None if on_flush is None else lambda d: on_flush(self.id, d))
        self._resume = threading.Event()
        self._resume.set()
        self.halt: str = ""  # "stopped" or "interrupted" once asked to end early

    def held_out(self, tick: int, npz: bytes) -> None:
        """Have the evaluator service score this checkpoint, unless it is still busy with one."""
        if not self.evaluator or (self._scoring is not None and self._scoring.is_alive()):
            return
        self._scoring = threading.Thread(target=self._score, args=(tick, npz), daemon=True)
        self._scoring.start()

    def _score(self, tick: int, npz: bytes) -> None:
        import httpx

        params = {"task": self.config.task, "network": self.config.network, "split": "test",
                  "data_dir": self.config.data_dir}
        try:
            r = httpx.post(self.evaluator.rstrip("/") + "/evaluate/checkpoint", params=params, content=npz, timeout=600)
            r.raise_for_status()
            report = r.json()
        except (httpx.HTTPError, ValueError) as err:
            self.store.log(self.id, f"held-out scoring at tick {tick} failed: {err}")
            return
        values = {"heldout_accuracy": report["accuracy"]}
        if report.get("loss") is not None:
            values["heldout_loss"] = report["loss"]
        self.store.add_metrics(self.id, tick, values)

    def set_state(self, state: str, text: str, **kw) -> None:
        self.store.set_state(self.id, state, **kw)
        self.store.log(self.id, text)

    # --- commands (from the API's request threads) -------------------------------------------
    def pause(self) -> None:
        self._resume.clear()
        self.set_state("paused", "paused")

    def resume(self) -> None:
        self.set_state("running", "resumed")
        self._resume.set()

    def stop(self, interrupt: bool = False) -> None:
        self.halt = "interrupted" if interrupt else "stopped"
        self._resume.set()

    # --- the thread ----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            summary = self.execute()
        except Exception as err:  # the job fails, the service stays up
            self.rec.flush()
            self.set_state("failed", f"failed: {type(err).__name__}: {err}", error=f"{type(err).__name__}: {err}")
            return
        self.rec.flush()
        runs, diverged = summary.get("runs", self.config.seeds), summary.get("diverged", 0)
        state = self.halt or ("diverged" if diverged and diverged == runs else "finished")
        error = {"interrupted": "the service stopped while the job was active",
                 "diverged": f"every run diverged (cost or weights not finite), the first at tick "
                             f"{min((t for t in summary.get('diverged_at', []) if t >= 0), default=-1)}"}.get(state, "")
        text = f"{state}: {summary.get('converged', 0)}/{runs} runs converged in {summary.get('ticks_run', 0)} ticks"
        if diverged:
            text += f", {diverged}/{runs} diverged"
        self.set_state(state, text, error=error, summary=summary)

    def execute(self) -> dict:
        raise NotImplementedError


class LocalRun(Run):
    """The job on the in-process engine, in this process."""

    def execute(self) -> dict:
        from services.chip.job import summarize
        from services.engine.engine import Engine

        engine = Engine(self.config)
        ck = self.store.checkpoint(self.id)
        if ck is not None:
            with np.load(io.BytesIO(ck[1])) as z:
                if "stage" in z:
                    engine.restore(z)
                    self.store.log(self.id, f"resumed from the checkpoint at tick {engine.tick}")
        self.engine = engine
        self._prev = (engine.theta0.copy(), engine.model.gradient(engine.theta0, engine.eval_batch)) \
            if self.options.get("angle") else None
        self._checkpointed = time.monotonic()
        try:
            result = engine.run(on_eval=self._on_eval)
        except _Halt:
            self.rec.flush()
            self._checkpoint()
            return summarize(engine.job.result(engine.tick, engine.theta0, 0.0))
        self._checkpoint()
        return summarize(result)

    def _checkpoint(self) -> None:
        snap = self.engine.snapshot()
        tick = int(snap.pop("tick"))
        data = self.store.save_checkpoint(self.id, tick, snap.pop("theta0"), **snap)
        self._checkpointed = time.monotonic()
        self.held_out(tick, data)

    def _on_eval(self, point, solved: np.ndarray) -> None:
        values = {"cost": _median(point.cost), "accuracy": _median(point.accuracy),
                  "solved": float(solved.sum())}
        held = getattr(self.engine.stage.extractor, "c0", None)
        if held is not None:
            values["c0"] = float(np.mean(held))
        if self._prev is not None:
            theta_prev, grad_prev = self._prev
            engine = self.engine
            theta = engine.theta0
            step = theta_prev - theta
            if np.any(step):
                values["angle"] = float(np.median(angle_degrees(step, grad_prev)))
            self._prev = (theta.copy(), engine.model.gradient(theta, engine.eval_batch))
        self.rec.add(point.tick, values)
        self.rec.log_every(lambda: progress_line(point.tick, point.cost, point.accuracy, int(solved.sum()),
                                                 len(solved)))
        if time.monotonic() - self._checkpointed >= CHECKPOINT_S:
            self._checkpoint()
        if not self._resume.is_set():
            self.rec.flush()
            self._checkpoint()
            self._resume.wait()
        if self.halt:
            raise _Halt()


class ClusterRun(Run):
    """The job on a cluster: submitted to the broadcaster at ``control``; re-attaches by job id."""

    def __init__(self, store: Store, job: dict, control: str, on_flush=None, evaluator: str = ""):
        super().__init__(store, job, on_flush, evaluator)
        self.control = control

    def _send(self, command: str) -> None:
        from services.cluster.client import send_control

        send_control(self.control, self.id, command, reason="requested over the API")

    def pause(self) -> None:
        self._send("pause")
        self.set_state("paused", "paused (the broadcaster rolls back to its last checkpoint on resume)")

    def resume(self) -> None:
        self._send("resume")
        self.set_state("running", "resumed")

    def stop(self, interrupt: bool = False) -> None:
        # Interrupting (the API going down) leaves the broadcaster running the job: a resume
        # re-attaches to it by id. Stopping ends it on the broadcaster, which answers with
        # the summary so far.
        self.halt = "interrupted" if interrupt else "stopped"
        if not interrupt:
            self._send("stop")

    def execute(self) -> dict:
        from services.cluster.client import Cancelled, run_job

        self.store.log(self.id, f"submitted to the broadcaster at {self.control}")
        try:
            summary = run_job(self.config, self.control, self._on_progress, timeout_s=30 * 24 * 3600.0,
                              job_id=self.id, cancelled=lambda: self.halt == "interrupted")
        except Cancelled:
            return {}
        theta0 = summary.pop("theta0", None)
        if theta0 is not None:
            self.store.save_checkpoint(self.id, summary["ticks_run"], np.asarray(theta0))
        return summary

    def _on_progress(self, d: dict) -> None:
        tick = d["tick"]
        values = {"cost": _median(d["cost"]), "accuracy": _median(d["accuracy"]),
                  "solved": float(d["solved"])}
        if d.get("reports"):  # per-tick reports since the last progress message: keep the newest
            last = d["reports"][-1]
            values.update({f"staleness.{k}": float(v) for k, v in enumerate(last["staleness"])},
                          dropped=float(last["dropped"]))
            if last["c0"] is not None:
                values["c0"] = float(last["c0"])
        ck = d.get("checkpoint")
        if ck is not None:
            self.held_out(ck["tick"], self.store.save_checkpoint(self.id, ck["tick"], np.asarray(ck["theta0"])))
        self.rec.add(tick, values)
        self.rec.log_every(lambda: progress_line(tick, d["cost"], d["accuracy"], d["solved"], len(d["cost"])))
