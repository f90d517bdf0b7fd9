"""Jobs the API runs: the controller of their states and a thread per active job that drives an
engine and records what it sees. No HTTP here: what the controller refuses it raises as a
:class:`~.errors.JobError` (``errors.py``), which the routes map to a status.

:class:`Jobs` holds the store and the active runs and is the one way to change a job's
state (the transitions in ``Jobs.ACTIONS``). A :class:`LocalRun` drives the in-process
engine; a :class:`ClusterRun` submits the job to a broadcaster through the cluster client
(``services/cluster/client.py``) and follows its progress. Both write the same series to
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
flags the run checks at every evaluation (local) or commands sent to the broadcaster
(``send_control``).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from pmgd_node.config import JobConfig
from pmgd_node.shell.keys import Keys, load_optional
from services.chip.job import finite_median
from services.cluster.client import fit_to_cluster
from services.evaluator.gradient_angle import angle_degrees

from .errors import EvaluatorFailed, InvalidJob, JobConflict, JobError, JobNotFound
from .scoring import EvaluatorService, score_in_process
from .settings import ApiSettings
from .store import STATES, Store, UnknownJob

if TYPE_CHECKING:
    from .telemetry import Metrics

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
                 evaluator: EvaluatorService | None = None):
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
        try:
            report = self.evaluator.score(self.config, npz, split="test")
        except (EvaluatorFailed, ValueError) as err:  # unreachable, refused, or not JSON
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
        if self.halt == "interrupted" and self.RUNS_ELSEWHERE:
            # It runs on without us: it stays 'running', and our next start follows it again.
            self.store.log(self.id, "the API stopped; the job runs on (followed again when the API starts)")
            return
        runs, diverged = summary.get("runs", self.config.seeds), summary.get("diverged", 0)
        state = self.halt or ("diverged" if diverged and diverged == runs else "finished")
        error = {"interrupted": "the service stopped while the job was active",
                 "diverged": f"every run diverged (cost or weights not finite), the first at tick "
                             f"{min((t for t in summary.get('diverged_at', []) if t >= 0), default=-1)}"}.get(state, "")
        text = f"{state}: {summary.get('converged', 0)}/{runs} runs converged in {summary.get('ticks_run', 0)} ticks"
        if diverged:
            text += f", {diverged}/{runs} diverged"
        self.set_state(state, text, error=error, summary=summary)

    RUNS_ELSEWHERE = False  # does the job go on when this thread is interrupted?

    def execute(self) -> dict:
        raise NotImplementedError


class LocalRun(Run):
    """The job on the in-process engine, in this process."""

    def execute(self) -> dict:
        from services import runtime
        from services.chip.job import summarize
        from services.engine.engine import Engine

        engine = Engine(self.config)  # built here: a checkpoint in the store may restore it first
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
            result = runtime.run(self.config, "local", engine=engine, on_eval=self._on_eval)
        except _Halt:
            self.rec.flush()
            self._checkpoint()
            return summarize(engine.job.result(engine.tick, engine.theta0, 0.0))
        self._checkpoint()
        return summarize(result) | result.details

    def _checkpoint(self) -> None:
        snap = self.engine.snapshot()
        tick = int(snap.pop("tick"))
        data = self.store.save_checkpoint(self.id, tick, snap.pop("theta0"), **snap)
        self._checkpointed = time.monotonic()
        self.held_out(tick, data)

    def _on_eval(self, point, solved: int) -> None:
        values = {"cost": _median(point.cost), "accuracy": _median(point.accuracy), "solved": float(solved)}
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
        self.rec.log_every(lambda: progress_line(point.tick, point.cost, point.accuracy, solved, self.config.seeds))
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

    RUNS_ELSEWHERE = True  # on the broadcaster

    def __init__(self, store: Store, job: dict, control: str, on_flush=None,
                 evaluator: EvaluatorService | None = None, keys: Keys | None = None):
        super().__init__(store, job, on_flush, evaluator)
        self.control, self.keys = control, keys

    def _send(self, command: str) -> None:
        from services.cluster.client import send_control

        send_control(self.control, self.id, command, reason="requested over the API", keys=self.keys)

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
        from services import runtime
        from services.chip.job import summarize
        from services.cluster.client import Cancelled

        self.store.log(self.id, f"submitted to the broadcaster at {self.control}")
        try:
            result = runtime.run(self.config, "cluster", control=self.control, timeout_s=30 * 24 * 3600.0,
                                 job_id=self.id, cancelled=lambda: self.halt == "interrupted",
                                 on_progress=self._on_progress, keys=self.keys)
        except Cancelled:
            return {}
        theta0 = result.details.pop("theta0", None)
        if theta0 is not None:
            self.store.save_checkpoint(self.id, result.ticks, np.asarray(theta0))
        return summarize(result) | result.details

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


class Jobs:
    """The store plus the threads of active jobs; every state change goes through here."""

    ACTIONS = {"start": ("created",), "pause": ("running",), "resume": ("paused", "interrupted"),
               "stop": ("running", "paused", "created", "interrupted")}

    def __init__(self, settings: ApiSettings, metrics: Metrics):
        self.s = settings
        self.evaluator = EvaluatorService(settings.evaluator, settings.evaluator_token) if settings.evaluator else None
        self.keys = load_optional(settings.keys, settings.key_name)  # the cluster's, for the broadcaster
        self.store = Store(settings.db)
        self.metrics = metrics
        self.runs: dict[str, Run] = {}
        self.lock = threading.Lock()
        # A cluster job runs on the broadcaster whatever becomes of us: follow again those we
        # were following (re-submitting by id hands us the live job or its stored result).
        # Local jobs ran here and stay interrupted until resumed.
        following = [j["id"] for j in self.store.list() if j["state"] == "running" and j["engine"] == "cluster"]
        self.store.recover()
        if settings.broadcaster:
            for job_id in following:
                self.act(job_id, "resume")

    @contextlib.contextmanager
    def _known(self, job_id: str) -> Iterator[None]:
        try:
            yield
        except UnknownJob:
            raise JobNotFound(f"no job {job_id!r}") from None

    # --- reads ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        with self._known(job_id):
            return self.store.get(job_id)

    def list_jobs(self, state: str | None = None) -> list[dict]:
        """Every job, oldest first; only those in ``state`` if given (one of ``STATES``)."""
        if state is not None and state not in STATES:
            raise InvalidJob(f"state: must be one of {', '.join(STATES)}; got {state!r}")
        return [j for j in self.store.list() if state is None or j["state"] == state]

    def series(self, job_id: str, since: int = -1, names: set[str] | None = None) -> dict[str, list]:
        """The job's metric series after tick ``since``: all, or those in ``names``."""
        self.get(job_id)
        with self._known(job_id):
            series = self.store.metrics(job_id, since)
        return {k: v for k, v in series.items() if not names or k in names}

    def logs(self, job_id: str, since: int = 0) -> list[dict]:
        self.get(job_id)
        with self._known(job_id):
            return self.store.logs(job_id, since)

    def checkpoint(self, job_id: str) -> tuple[int, bytes]:
        """(tick, .npz bytes) of the job's newest checkpoint."""
        self.get(job_id)
        with self._known(job_id):
            ck = self.store.checkpoint(job_id)
        if ck is None:
            raise JobNotFound(f"job {job_id!r} has no checkpoint yet")
        return ck

    def evaluate(self, job_id: str, split: str = "test", run: int = 0, limit: int = 0) -> dict:
        """Run ``run`` of the newest checkpoint scored on ``split``: by the evaluator service when
        the API has one (its report as is), else in process (plus ``job``, ``tick``, ``split``)."""
        job = self.get(job_id)
        tick, npz = self.checkpoint(job_id)
        config = JobConfig.from_dict(job["config"])
        if self.evaluator is not None:
            return self.evaluator.score(config, npz, split, run, limit)
        return dict(score_in_process(config, npz, split, run, limit), job=job_id, tick=tick, split=split)

    def ping(self) -> None:
        """Raises if the database does not answer."""
        self.store.ping()

    # --- changes -------------------------------------------------------------------------------
    def _config(self, fields: dict, engine: str) -> JobConfig:
        data = dict(fields)
        if self.s.data_dir and not data.get("data_dir"):
            data["data_dir"] = self.s.data_dir
        try:
            config = JobConfig.from_dict(data)
            if config.model:
                self._check_model(config)
            if engine == "cluster" and self.s.broadcaster:
                # Unset nodes: every node the cluster has (the stored config says how many).
                config = JobConfig.from_dict(fit_to_cluster(data, self.s.broadcaster, keys=self.keys))
            return config
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            # ConfigError names the field; the others come from values of the wrong type.
            raise InvalidJob(f"config: {err}") from None
        except RuntimeError as err:  # the broadcaster does not answer
            raise JobConflict(f"engine: {err}") from None

    def _check_model(self, config: JobConfig) -> None:
        """A job's own network must be a file under one of ``model_roots`` (it is code this
        server will run), and it is loaded now, so that one that does not fit answers 422 here."""
        from services.evaluator.user_model import confine_model, load_task

        confine_model(config.model, [r for r in self.s.model_roots.split(os.pathsep) if r])
        load_task(config.model)

    def create(self, fields: dict, engine: str = "local", angle: bool = False, start: bool = False) -> dict:
        """A new job from job-config ``fields`` (validated by ``JobConfig``), started if ``start``;
        a job that cannot start is not left behind."""
        config = self._config(fields, engine)
        if angle and engine == "cluster":
            raise InvalidJob("angle: only the local engine records the gradient angle "
                             "(the gradient estimate G lives on the nodes)")
        job_id = self.store.create(config.to_dict(), engine, {"angle": angle})
        if start:
            try:
                return self.act(job_id, "start")
            except JobError:
                self.store.delete(job_id)  # nothing half-made is left behind
                raise
        return self.get(job_id)

    def _launch(self, job: dict) -> None:
        active = [r for r in self.runs.values() if r.is_alive()]
        if job["engine"] == "cluster":
            if not self.s.broadcaster:
                raise JobConflict("engine: this API has no cluster (start it with --broadcaster ENDPOINT)")
            if any(isinstance(r, ClusterRun) for r in active):
                raise JobConflict("engine: the cluster runs one job at a time and is busy")
            run: Run = ClusterRun(self.store, job, self.s.broadcaster, self.metrics.job_flushed, self.evaluator,
                                  self.keys)
        else:
            if sum(isinstance(r, LocalRun) for r in active) >= self.s.max_local_jobs:
                raise JobConflict(f"engine: {self.s.max_local_jobs} local jobs are running already")
            run = LocalRun(self.store, job, self.metrics.job_flushed, self.evaluator)
        run.set_state("running", "started" if job["state"] == "created" else "resuming")
        self.runs[job["id"]] = run
        run.start()

    def act(self, job_id: str, action: str) -> dict:
        """``action`` (a key of ``ACTIONS``) applied to the job; the job afterwards."""
        with self.lock:
            job = self.get(job_id)
            if job["state"] not in self.ACTIONS[action]:
                raise JobConflict(f"cannot {action} a job that is {job['state']} "
                                  f"(allowed from: {', '.join(self.ACTIONS[action])})")
            run = self.runs.get(job_id)
            alive = run is not None and run.is_alive()
            if action == "start" or (action == "resume" and not alive):
                self._launch(job)
            elif action == "pause":
                run.pause()
            elif action == "resume":
                run.resume()
            elif action == "stop":
                if alive:
                    run.stop()
                else:
                    self.store.set_state(job_id, "stopped")
                    self.store.log(job_id, "stopped")
        if action == "stop" and alive:
            run.join(30)
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        with self.lock:
            job = self.get(job_id)
            if job["state"] in ("running", "paused"):
                raise JobConflict(f"cannot delete a job that is {job['state']}: stop it first")
            self.runs.pop(job_id, None)
            with self._known(job_id):
                self.store.delete(job_id)

    def shutdown(self) -> None:
        """The API is going down: active jobs checkpoint and become ``interrupted``."""
        runs = [r for r in self.runs.values() if r.is_alive()]
        for run in runs:
            run.stop(interrupt=True)
        for run in runs:
            run.join(30)
        self.store.close()

    def count_states(self) -> None:
        counts = dict.fromkeys(STATES, 0)
        for job in self.store.list():
            counts[job["state"]] += 1
        for state, n in counts.items():
            self.metrics.jobs.labels(state).set(n)
