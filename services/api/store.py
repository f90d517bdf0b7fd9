"""Persistence of jobs, their metrics and checkpoints in one SQLite file (no HTTP here).

Tables::

    jobs(id, config JSON, engine, state, error, summary JSON, created, updated)
    metrics(job, tick, name, value)            one row per (tick, series), e.g. cost, accuracy
    checkpoints(job, tick, data BLOB)          θ⁰ as an .npz, newest kept per job

States: created → running ⇄ paused → finished | stopped | failed; a job that was running or
paused when the service died is ``interrupted`` after a restart (``recover``) and resumable.
Every call opens its own short transaction, so the API's worker threads may share a Store.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
import uuid

import numpy as np

STATES = ("created", "running", "paused", "finished", "stopped", "failed", "interrupted")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, config TEXT NOT NULL, engine TEXT NOT NULL, state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '', summary TEXT, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, tick INTEGER NOT NULL,
    name TEXT NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS metrics_job ON metrics(job, name, tick);
CREATE TABLE IF NOT EXISTS checkpoints (
    job TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE, tick INTEGER NOT NULL, data BLOB NOT NULL);
"""


class UnknownJob(KeyError):
    pass


class Store:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def _run(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        self._db.close()

    # --- jobs ----------------------------------------------------------------------------------
    def create(self, config: dict, engine: str) -> str:
        job = uuid.uuid4().hex[:12]
        now = time.time()
        self._run("INSERT INTO jobs VALUES (?, ?, ?, 'created', '', NULL, ?, ?)",
                  (job, json.dumps(config), engine, now, now))
        return job

    def get(self, job: str) -> dict:
        rows = self._run("SELECT id, config, engine, state, error, summary, created, updated FROM jobs WHERE id=?",
                         (job,))
        if not rows:
            raise UnknownJob(job)
        return _job(rows[0])

    def list(self) -> list[dict]:
        return [_job(r) for r in self._run(
            "SELECT id, config, engine, state, error, summary, created, updated FROM jobs ORDER BY created")]

    def set_state(self, job: str, state: str, error: str = "", summary: dict | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}; got {state!r}")
        self.get(job)
        self._run("UPDATE jobs SET state=?, error=?, summary=COALESCE(?, summary), updated=? WHERE id=?",
                  (state, error, None if summary is None else json.dumps(summary), time.time(), job))

    def delete(self, job: str) -> None:
        self.get(job)
        self._run("DELETE FROM jobs WHERE id=?", (job,))

    def recover(self) -> list[str]:
        """After a restart: jobs left running or paused become ``interrupted``; their ids."""
        ids = [r[0] for r in self._run("SELECT id FROM jobs WHERE state IN ('running', 'paused')")]
        for job in ids:
            self.set_state(job, "interrupted", "the service stopped while the job was active")
        return ids

    # --- metrics -------------------------------------------------------------------------------
    def add_metrics(self, job: str, tick: int, values: dict[str, float]) -> None:
        with self._lock:
            self._db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)",
                                 [(job, int(tick), name, float(v)) for name, v in values.items()])

    def metrics(self, job: str, since: int = -1) -> dict[str, list[tuple[int, float]]]:
        """Every series of ``job`` after tick ``since``: name → [(tick, value), …] in tick order."""
        self.get(job)
        series: dict[str, list[tuple[int, float]]] = {}
        for name, tick, value in self._run(
                "SELECT name, tick, value FROM metrics WHERE job=? AND tick>? ORDER BY name, tick, rowid",
                (job, since)):
            series.setdefault(name, []).append((tick, value))
        return series

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, job: str, tick: int, theta0: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, theta0=theta0, tick=np.int64(tick))
        self._run("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)", (job, int(tick), buf.getvalue()))

    def checkpoint(self, job: str) -> tuple[int, bytes] | None:
        """(tick, .npz bytes holding ``theta0`` and ``tick``) of the newest checkpoint, or None."""
        self.get(job)
        rows = self._run("SELECT tick, data FROM checkpoints WHERE job=?", (job,))
        return (rows[0][0], bytes(rows[0][1])) if rows else None


def _job(row: tuple) -> dict:
    job, config, engine, state, error, summary, created, updated = row
    return {"id": job, "config": json.loads(config), "engine": engine, "state": state, "error": error,
            "summary": None if summary is None else json.loads(summary), "created": created, "updated": updated}
