"""The runtime seam: one job on the engine and on a real local cluster gives one result shape
with the same numbers, C₀ counts to solution included (the cluster's used to read −1)."""

import numpy as np
import pytest

from pmgd_node.config import ConfigError, JobConfig
from services import runtime
from services.chip.job import summarize
from services.cluster.launcher import LocalCluster


def test_engine_and_cluster_return_the_same_result_through_one_seam():
    config = JobConfig(seeds=4, batch=4, init_scale=0.5, max_ticks=6000, seed=2, nodes=2, eval_every=50)
    seen = {"local": [], "cluster": []}
    local = runtime.run(config, "local", on_eval=lambda point, solved: seen["local"].append((point.tick, solved)))
    with LocalCluster(2) as cluster:
        remote = runtime.run(config, "cluster", control=cluster.endpoints["control"], keys=cluster.keys,
                             on_eval=lambda point, solved: seen["cluster"].append((point.tick, solved)))
    assert local.solved.any()  # some runs solve, so the per-run counts below are exercised
    for name in ("ticks_to_solution", "c0_to_solution", "final_accuracy", "diverged_at"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(local, name), err_msg=name)
    assert (remote.c0_to_solution[remote.solved] > 0).all()
    assert (remote.ticks, remote.c0_measurements) == (local.ticks, local.c0_measurements)
    assert [p.tick for p in remote.history] == [p.tick for p in local.history]
    assert seen["cluster"] == seen["local"] and seen["local"][-1][1] == int(local.solved.sum())
    assert local.details["device"] == "cpu" and len(remote.details["theta0"]) == 4
    drop = ("wall_time_s",)
    assert {k: v for k, v in summarize(remote).items() if k not in drop} == \
        {k: v for k, v in summarize(local).items() if k not in drop}


def test_an_unknown_runtime_is_named():
    with pytest.raises(ConfigError, match="'engine'.*local, cluster"):
        runtime.run(JobConfig(), "gpu-farm")
