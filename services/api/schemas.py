"""The API's request and response models, in one place (what ``/openapi.json`` documents).

A job's config is documented by the job config's own schema (``pmgd_node.config.json_schema``:
every field, its type, range, default and meaning) and validated by ``JobConfig`` itself, the
one code path every command shares.

The response models describe the JSON the routes return (the rows of ``store.py``, the cluster
client's status) field for field, in the order they are returned; they allow extra fields, so
a field the store gains later passes through rather than failing the response.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from pmgd_node.config import json_schema as job_config_schema

from .store import STATES


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Documented by the job config's own schema (every field, its type, range and meaning);
    # validated by JobConfig itself, the one code path every command shares (422 naming the field).
    config: Annotated[dict[str, Any], WithJsonSchema(job_config_schema())] = Field(
        description="job-config fields (see `pmgd train --help`); unset fields default")
    engine: Literal["local", "cluster"] = "local"
    start: bool = False
    angle: bool = Field(False, description="record the gradient angle (local engine only)")


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "test"] = "test"
    run: int = Field(0, ge=0, description="which of the job's runs (seeds) to score")
    limit: int = Field(0, ge=0, description="score only the first N samples (0 = all)")


# --- responses -------------------------------------------------------------------------------------
JobState = Literal[STATES]  # the store's states, in order


class Job(BaseModel):
    """A job: its config, engine, state and, once it ended, its result summary."""

    model_config = ConfigDict(extra="allow")
    id: str
    config: dict[str, Any] = Field(description="the whole job config, every field (see JobCreate.config)")
    engine: Literal["local", "cluster"]
    options: dict[str, Any] = Field(description="options of the run, e.g. angle")
    state: JobState
    error: str = Field(description="why the job failed, diverged or was interrupted ('' otherwise)")
    summary: dict[str, Any] | None = Field(description="the result summary once the job ended (null before)")
    tick: int = Field(description="the newest tick its metrics reached")
    created: float = Field(description="Unix time")
    updated: float = Field(description="Unix time of the last state change")


class JobMetrics(BaseModel):
    """A job's metric series: name → [[tick, value], …] in tick order (cost, accuracy, c0, solved,
    ticks_per_second, angle, staleness.<k>, dropped, heldout_accuracy, heldout_loss); values
    that were not finite are left out."""

    model_config = ConfigDict(extra="allow")
    job: str
    series: dict[str, list[tuple[int, float]]]


class LogLine(BaseModel):
    model_config = ConfigDict(extra="allow")
    seq: int = Field(description="increasing; pass the last one seen as ?since= to get only newer lines")
    time: float = Field(description="Unix time")
    text: str


class JobLogs(BaseModel):
    model_config = ConfigDict(extra="allow")
    job: str
    lines: list[LogLine]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    broadcaster: str | None = Field(None, description="the cluster's control endpoint (null: local engine only)")
    error: str | None = Field(None, description="why the database does not answer (when not ready)")


class ClusterNode(BaseModel):
    model_config = ConfigDict(extra="allow")
    shard: int = Field(description="its shard of the current job (-1 when idle)")
    last_heartbeat_s: float = Field(description="seconds since its last heartbeat")
    dropped: int = Field(description="malformed frames the node dropped")


class ClusterStatus(BaseModel):
    """The broadcaster and its nodes: `error` only when it is unreachable; `job`, `pause_reason`
    and `dropped` only when it answered."""

    model_config = ConfigDict(extra="allow")
    broadcaster: str = Field(description="its control endpoint ('' when this API has no cluster)")
    reachable: bool
    state: str = Field(description="none, unreachable, or the broadcaster's: idle, waiting, running, paused, …")
    error: str | None = None
    job: dict[str, Any] | None = None
    pause_reason: str | None = None
    dropped: dict[str, int] | None = Field(None, description="frames the broadcaster dropped, by reason")
    nodes: dict[str, ClusterNode]
