"""A diverging job over REST: it ends ``diverged`` with the tick in its summary, and its
metrics, log and checkpoint still serve (JSON has no NaN: the values that are not finite are
left out of the series)."""

import pytest
from test_api import Api  # tests/services/api/test_api.py (the test directory is on sys.path)

from pmgd_node.config import JobConfig
from services.api.jobs import FINAL
from services.evaluator.data import write_fake_fashion_mnist


@pytest.fixture
def api(tmp_path):
    server = Api(tmp_path / "pmgd.sqlite")
    yield server
    if server.proc.poll() is None:
        server.stop()


def test_a_diverging_local_job_ends_diverged_and_still_serves_its_metrics(api, tmp_path):
    write_fake_fashion_mnist(tmp_path, n_train=200, n_test=50, seed=0)
    config = JobConfig(task="fmnist", data_dir=str(tmp_path), batch=10, amplitude=0.01, eta=1e3, max_ticks=500,
                       eval_every=1, target_accuracy=None, seeds=2)
    job = api.ok("POST", "/jobs", {"config": config.to_dict()}, expect=201)["id"]
    api.ok("POST", f"/jobs/{job}/start")
    done = api.wait_state(job, FINAL, timeout_s=120)
    assert done["state"] == "diverged", done
    summary = done["summary"]
    assert summary["diverged"] == 2 and min(summary["diverged_at"]) > 0
    assert max(summary["diverged_at"]) <= summary["ticks_run"] <= max(summary["diverged_at"]) + 1 < 500
    assert "diverged" in done["error"] and f"tick {min(summary['diverged_at'])}" in done["error"]
    series = api.ok("GET", f"/jobs/{job}/metrics")["series"]
    # Evaluated every tick: the points before the blow-up are there, the NaN after it is not.
    assert 0 < len(series["cost"]) < summary["ticks_run"] and all(v == v for _, v in series["cost"])
    assert api.ok("GET", "/jobs?state=diverged")[0]["id"] == job
    lines = [line["text"] for line in api.ok("GET", f"/jobs/{job}/logs")["lines"]]
    assert lines[-1].startswith("diverged: 0/2 runs converged") and lines[-1].endswith("2/2 diverged")
