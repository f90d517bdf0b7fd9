"""Persistence of jobs, their metrics and checkpoints in one SQLite file (no HTTP here).

Tables::

    jobs(id, config JSON, engine, options JSON, state, error, summary JSON, tick, created, updated)
    metrics(job, tick, name, value)            one row per (tick, series), e.g. cost, accuracy
    checkpoints(job, tick, data BLOB)          θ⁰ (and resume state) as an .npz, newest per job
    events(job, seq, time, text)               the job's log: state changes, progress lines

States: created → running ⇄ paused → finished | diverged | stopped | failed (diverged: every
run's cost or weights stopped being finite, see services.chip.job.diverged); a job that was running or
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

STATES = ("created", "running", "paused", "finished", "diverged", "stopped", "failed", "interrupted")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, config TEXT NOT NULL, engine TEXT NOT NULL, options TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL, error TEXT NOT NULL DEFAULT '', summary TEXT, tick INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, tick INTEGER NOT NULL,
    name TEXT NOT NULL, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    job TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE, tick INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE, seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events(job, seq);
"""
_COLUMNS = "id, config, engine, options, state, error, summary, tick, created, updated"


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
        # One point per (job, series, tick): a job replayed from a checkpoint writes its ticks
        # again and the newest value stands. A file of an older version may hold duplicates
        # (and the old non-unique index): keep each point's newest row, then index uniquely.
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name='metrics_point'").fetchall():
            self._db.executescript("""
                BEGIN;
                DELETE FROM metrics WHERE rowid NOT IN (SELECT MAX(rowid) FROM metrics GROUP BY job, name, tick);
                DROP INDEX IF EXISTS metrics_job;
                CREATE UNIQUE INDEX metrics_point ON metrics(job, name, tick);
                COMMIT;""")

    def _run(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        self._db.close()

    def ping(self) -> None:
        """Raises (sqlite3.Error) if the database does not answer."""
        self._run("SELECT 1")

    # --- jobs ----------------------------------------------------------------------------------
    def create(self, config: dict, engine: str, options: dict | None = None) -> str:
        job = uuid.uuid4().hex[:12]
        now = time.time()
        self._run(f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, 'created', '', NULL, 0, ?, ?)",
                  (job, json.dumps(config), engine, json.dumps(options or {}), now, now))
        self.log(job, "created")
        return job

    def get(self, job: str) -> dict:
        rows = self._run(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job,))
        if not rows:
            raise UnknownJob(job)
        return _job(rows[0])

    def list(self) -> list[dict]:
        return [_job(r) for r in self._run(f"SELECT {_COLUMNS} FROM jobs ORDER BY created, rowid")]

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
            self.log(job, "interrupted: the service stopped while the job was active (resume continues it)")
        return ids

    # --- the job's log -------------------------------------------------------------------------
    def log(self, job: str, text: str) -> None:
        self._run("INSERT INTO events (job, time, text) VALUES (?, ?, ?)", (job, time.time(), text))

    def logs(self, job: str, since: int = 0) -> list[dict]:
        """Log lines of ``job`` with seq > ``since``, oldest first."""
        self.get(job)
        return [{"seq": seq, "time": t, "text": text} for seq, t, text in self._run(
            "SELECT seq, time, text FROM events WHERE job=? AND seq>? ORDER BY seq", (job, since))]

    # --- metrics -------------------------------------------------------------------------------
    def add_metrics(self, job: str, tick: int, values: dict[str, float]) -> None:
        self.add_points(job, [(tick, name, v) for name, v in values.items()])

    def add_points(self, job: str, points: list[tuple[int, str, float]]) -> None:
        """Add (tick, series, value) points in one transaction (a point written again, by a
        replay, replaces the old one); the job's tick follows the newest."""
        if not points:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)",
                                 [(job, int(t), name, float(v)) for t, name, v in points])
            self._db.execute("UPDATE jobs SET tick=MAX(tick, ?) WHERE id=?", (max(int(t) for t, _, _ in points), job))
            self._db.execute("COMMIT")

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
    def save_checkpoint(self, job: str, tick: int, theta0: np.ndarray, **extra: np.ndarray) -> bytes:
        """θ⁰ at ``tick``, plus whatever else the runner needs to resume (``extra`` arrays);
        returns the stored .npz bytes."""
        buf = io.BytesIO()
        np.savez(buf, theta0=theta0, tick=np.int64(tick), **extra)
        self._run("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)", (job, int(tick), buf.getvalue()))
        return buf.getvalue()

    def checkpoint(self, job: str) -> tuple[int, bytes] | None:
        """(tick, .npz bytes holding ``theta0`` and ``tick``) of the newest checkpoint, or None."""
        self.get(job)
        rows = self._run("SELECT tick, data FROM checkpoints WHERE job=?", (job,))
        return (rows[0][0], bytes(rows[0][1])) if rows else None


def _job(row: tuple) -> dict:
    job, config, engine, options, state, error, summary, tick, created, updated = row
    return {"id": job, "config": json.loads(config), "engine": engine, "options": json.loads(options),
            "state": state, "error": error, "summary": None if summary is None else json.loads(summary),
            "tick": tick, "created": created, "updated": updated}
