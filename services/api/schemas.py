"""The API's request and response models, in one place (what ``/openapi.json`` documents).

A job's config is documented by the job config's own schema (``pmgd_node.config.json_schema``:
every field, its type, range, default and meaning) and validated by ``JobConfig`` itself, the
one code path every command shares.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from pmgd_node.config import json_schema as job_config_schema


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
