"""The API in process: ``create_app`` driven through ``httpx.AsyncClient`` over ``ASGITransport``
(no server, no port), with its lifespan; the routers, the token rule, the response models and
the mapping of the job controller's domain errors to HTTP."""

import ast
import asyncio
import dataclasses
import io
import os
import time

import httpx
import numpy as np
import pytest
import pytest_asyncio

from pmgd_node.config import JobConfig
from services.api.app import create_app
from services.api.errors import EvaluatorFailed, InvalidJob, JobConflict, JobNotFound
from services.api.jobs import FINAL
from services.api.routes.deps import http_status
from services.api.settings import ApiSettings
from services.api.store import STATES
from services.engine.engine import Engine

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest_asyncio.fixture
async def client(tmp_path):
    app = create_app(ApiSettings(db=str(tmp_path / "pmgd.sqlite"), token=TOKEN))
    async with app.router.lifespan_context(app):  # its end stops active jobs and closes the store
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            yield c


async def wait_state(client: httpx.AsyncClient, job: str, states, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        got = (await client.get(f"/jobs/{job}")).json()
        if got["state"] in states:
            return got
        assert time.monotonic() < deadline, f"job {job} did not reach {states}; it is {got['state']}"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_a_job_is_created_with_the_token_and_read_back_without_it(client):
    body = {"config": {"max_ticks": 10, "seeds": 2}}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        r = await client.post("/jobs", json=body, headers=headers)
        assert r.status_code == 401 and "authorization" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/jobs")).json() == []  # a refused POST makes nothing

    r = await client.post("/jobs", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "created" and job["engine"] == "local" and job["options"] == {"angle": False}
    assert job["config"] == JobConfig(max_ticks=10, seeds=2).to_dict()  # stored whole, defaults filled in
    assert job["summary"] is None and job["tick"] == 0 and job["error"] == ""
    assert (await client.get(f"/jobs/{job['id']}")).json() == job  # reads need no token
    assert (await client.get("/jobs")).json() == [job]
    assert (await client.get("/jobs?state=created")).json() == [job]
    assert (await client.get("/jobs?state=running")).json() == []
    assert (await client.get(f"/jobs/{job['id']}/logs")).json()["lines"][0]["text"] == "created"
    assert (await client.get(f"/jobs/{job['id']}/metrics")).json() == {"job": job["id"], "series": {}}
    assert (await client.delete(f"/jobs/{job['id']}")).status_code == 401
    assert (await client.post(f"/jobs/{job['id']}/start")).status_code == 401
    assert (await client.get(f"/jobs/{job['id']}")).json()["state"] == "created"  # untouched
    assert (await client.delete(f"/jobs/{job['id']}", headers=AUTH)).status_code == 204
    assert (await client.get(f"/jobs/{job['id']}")).status_code == 404


@pytest.mark.asyncio
async def test_a_local_job_runs_to_its_end_as_the_engine_does(client):
    config = JobConfig(seeds=2, max_ticks=400, eval_every=100, target_accuracy=None, seed=5)
    r = await client.post("/jobs", json={"config": config.to_dict(), "start": True}, headers=AUTH)
    assert r.status_code == 201 and r.json()["state"] == "running", r.text
    job = r.json()["id"]
    done = await wait_state(client, job, FINAL)
    reference = Engine(config)
    result = reference.run()
    assert done["state"] == "finished" and done["tick"] == 400
    assert done["summary"]["ticks_run"] == 400 and done["summary"]["runs"] == 2
    series = (await client.get(f"/jobs/{job}/metrics?names=cost,accuracy")).json()["series"]
    assert set(series) == {"cost", "accuracy"}
    assert series["accuracy"] == [[p.tick, float(np.median(p.accuracy))] for p in result.history]
    r = await client.get(f"/jobs/{job}/checkpoint")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    with np.load(io.BytesIO(r.content)) as z:
        np.testing.assert_array_equal(z["theta0"], reference.theta0)
    report = await client.post(f"/jobs/{job}/evaluate", json={"split": "train", "run": 1}, headers=AUTH)
    assert report.status_code == 200 and report.json()["accuracy"] == result.final_accuracy[1]
    lines = [line["text"] for line in (await client.get(f"/jobs/{job}/logs")).json()["lines"]]
    assert lines[:2] == ["created", "started"] and lines[-1].startswith("finished: ")


@pytest.mark.asyncio
async def test_the_controllers_refusals_keep_their_status_and_detail(client):
    r = await client.get("/jobs/nope")
    assert (r.status_code, r.json()) == (404, {"detail": "no job 'nope'"})
    assert (await client.post("/jobs/nope/stop", headers=AUTH)).status_code == 404
    r = await client.get("/jobs?state=melted")
    assert r.status_code == 422 and r.json()["detail"].startswith("state: must be one of created, running")
    r = await client.post("/jobs", json={"config": {"eta": -1}}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"].startswith("config: job config field 'eta'")
    r = await client.post("/jobs", json={"config": {}, "engine": "cluster", "start": True}, headers=AUTH)
    assert r.status_code == 409 and r.json()["detail"].startswith("engine: this API has no cluster")
    assert (await client.get("/jobs")).json() == []  # the job that could not start is not left behind
    job = (await client.post("/jobs", json={"config": {}}, headers=AUTH)).json()["id"]
    r = await client.post(f"/jobs/{job}/pause", headers=AUTH)
    assert (r.status_code, r.json()["detail"]) == (409, "cannot pause a job that is created (allowed from: running)")
    r = await client.get(f"/jobs/{job}/checkpoint")
    assert (r.status_code, r.json()["detail"]) == (404, f"job '{job}' has no checkpoint yet")
    assert (await client.post(f"/jobs/{job}/evaluate", json={}, headers=AUTH)).status_code == 404
    # The action is the path's: no query parameter may turn a start into another action.
    r = await client.post(f"/jobs/{job}/stop?action=start", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "stopped"


def test_evaluator_failures_map_to_its_4xx_or_to_502():
    assert http_status(JobNotFound("x")) == 404 and http_status(JobConflict("x")) == 409
    assert http_status(InvalidJob("x")) == 422
    assert http_status(EvaluatorFailed("evaluator: no such data set", 404)) == 404
    assert http_status(EvaluatorFailed("evaluator: boom", 500)) == 502
    assert http_status(EvaluatorFailed("evaluator http://x: connection refused")) == 502


@pytest.mark.asyncio
async def test_openapi_documents_the_jobs_as_they_are_returned(client):
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]

    def returns(path: str, method: str, status: str = "200") -> dict:
        return spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]

    job_ref = {"$ref": "#/components/schemas/Job"}
    assert returns("/jobs", "post", "201") == returns("/jobs/{job_id}", "get") == job_ref
    assert returns("/jobs/{job_id}/start", "post") == returns("/jobs/{job_id}/stop", "post") == job_ref
    assert returns("/jobs", "get")["items"] == job_ref
    assert returns("/jobs/{job_id}/metrics", "get") == {"$ref": "#/components/schemas/JobMetrics"}
    assert all("action" not in str(op.get("parameters")) for op in spec["paths"]["/jobs/{job_id}/start"].values())
    job = (await client.post("/jobs", json={"config": {}}, headers=AUTH)).json()
    assert list(schemas["Job"]["properties"]) == list(job)  # every field, in the order returned
    assert schemas["Job"]["properties"]["state"]["enum"] == list(STATES)
    point = schemas["JobMetrics"]["properties"]["series"]["additionalProperties"]["items"]
    assert point["prefixItems"] == [{"type": "integer"}, {"type": "number"}]
    assert set(schemas["JobCreate"]["properties"]["config"]["properties"]) == {
        f.name for f in dataclasses.fields(JobConfig)}


def test_the_job_controller_and_scoring_are_free_of_http_and_sockets():
    """jobs.py, scoring.py and errors.py import no web framework and no ZeroMQ: the routes map
    their errors, the cluster client owns the sockets."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "services", "api")
    for name in ("jobs.py", "scoring.py", "errors.py"):
        tree = ast.parse(open(os.path.join(root, name), encoding="utf-8").read())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in modules if m.split(".")[0] in ("fastapi", "starlette", "zmq")}, (name, modules)
        assert "HTTPException" not in open(os.path.join(root, name), encoding="utf-8").read(), name


@pytest.mark.asyncio
async def test_the_token_is_checked_before_the_body_and_bodies_are_capped(client):
    from services.http_edge import MAX_BODY

    r = await client.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401  # a stranger's malformed body: refused for the token, never parsed
    r = await client.post("/jobs", content=b"{not json", headers={"content-type": "application/json", **AUTH})
    assert r.status_code == 422  # with the token, the body is read and found malformed
    big = b'{"config": {"data_dir": "' + b"x" * MAX_BODY + b'"}}'
    r = await client.post("/jobs", content=big, headers={"content-type": "application/json", **AUTH})
    assert r.status_code == 413 and f"{MAX_BODY:,} bytes" in r.json()["detail"]

    async def chunks():  # no Content-Length: read up to the cap, then refused
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536

    r = await client.post("/jobs", content=chunks(), headers={"content-type": "application/json", **AUTH})
    assert r.status_code == 413
    assert (await client.get("/jobs")).json() == []  # nothing was made
    r = await client.post("/jobs", json={"config": {"max_ticks": 10}}, headers=AUTH)
    assert r.status_code == 201  # a normal request passes the gate unchanged


@pytest.mark.asyncio
async def test_your_own_network_from_a_model_root_and_nowhere_else(tmp_path):
    """A job's ``model`` is code the server runs: only a .py file under ``model_roots`` is
    accepted (422 naming the field otherwise, nothing stored); one that does not fit is refused at
    submission; an accepted one trains as the engine does."""
    roots = tmp_path / "models"
    roots.mkdir()
    xor = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "xor_task.py")
    (roots / "xor.py").write_text(open(xor).read())
    (roots / "broken.py").write_text("import torch\ndef task():\n    return dict(model=torch.nn.Linear(2, 1))\n")
    (tmp_path / "outside.py").write_text(open(xor).read())
    open_app = create_app(ApiSettings(db=str(tmp_path / "a.sqlite")))
    app = create_app(ApiSettings(db=str(tmp_path / "b.sqlite"), model_roots=str(roots)))
    for application, ref, words in [
        (open_app, f"{roots}/xor.py:task", "accepts no custom models"),
        (app, f"{tmp_path}/outside.py:task", "outside the directories"),
        (app, f"{roots}/../outside.py:task", "outside the directories"),
        (app, "os.path:join", "must name a .py file"),
        (app, f"{roots}/broken.py:task", "missing ['train']"),
    ]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://api") as c:
            r = await c.post("/jobs", json={"config": {"model": ref}})
            assert r.status_code == 422 and "model" in r.text and words in r.text, (ref, r.text)
            assert (await c.get("/jobs")).json() == []
    config = JobConfig(model=f"{roots}/xor.py:task", seeds=3, max_ticks=600, eval_every=100, target_accuracy=None)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
            r = await c.post("/jobs", json={"config": config.to_dict(), "start": True})
            assert r.status_code == 201, r.text
            done = await wait_state(c, r.json()["id"], FINAL)
    assert done["state"] == "finished" and done["summary"]["num_params"] == 13
    reference = Engine(config).run()
    assert done["summary"]["final_cost"] == pytest.approx(reference.final_cost.tolist(), rel=0, abs=0)
