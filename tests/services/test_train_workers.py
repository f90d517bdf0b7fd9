"""`pmgd train --workers N`: a job's seeds split into contiguous slices over worker processes,
with the same result as one process (services/train.py, ``run_split``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pmgd_node.config import ConfigError, JobConfig
from services import train
from services.cli import main

# 2-bit parity, batch 2 of 4 samples (so the input order matters), four seeds that all solve:
# runs 0–1 solve by tick 720, runs 2–3 at 810 and 930, so with two workers the first slice
# stops at 720 and must be continued to 930, the job's last tick.
JOB = dict(task="parity2", perturbation="rcm", batch=2, init_scale=0.25, eta=0.5, amplitude=0.1, tau_theta=1,
           tau_x=1, seed=5, seeds=4, max_ticks=20_000)
TIMES = ("wall_time_s", "training_time_s")


def test_seed_slices_are_contiguous_and_cover_every_run():
    assert train.seed_slices(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert train.seed_slices(2, 8) == [(0, 1), (1, 1)]
    assert train.seed_slices(5, 1) == [(0, 5)]


def test_a_slice_sees_the_whole_jobs_input_order():
    """The input order is drawn from the job's seed: a slice (seed + k) would draw another; its
    engine is handed the job's."""
    from services.engine.engine import Engine

    job = JobConfig(**JOB)
    whole = Engine(job).stage.schedule
    alone = Engine(job.replace(seed=job.seed + 2, seeds=2)).stage.schedule
    sliced = train._slice_engine(job.replace(seed=job.seed + 2, seeds=2), job.seed, None).stage.schedule
    steps = range(0, 400, 7)
    assert all(np.array_equal(whole.indices(k), sliced.indices(k)) for k in steps)
    assert not all(np.array_equal(whole.indices(k), alone.indices(k)) for k in steps)


@pytest.mark.slow
def test_split_job_equals_one_process(tmp_path):
    """Per-run ticks to solution, C₀ counts, final costs and accuracies, medians, quartiles and
    the final θ⁰: identical, including a slice continued past its own end to the job's."""
    config = JobConfig(**JOB)
    one, one_summary, one_theta = train.run_job(config, progress=False)
    assert one.solved.all()
    per_slice = [one.ticks_to_solution[a:a + n].max() for a, n in train.seed_slices(config.seeds, 2)]
    assert per_slice[0] < per_slice[1] == one.ticks  # the first slice stops early: continued

    (tmp_path / "job.json").write_text(json.dumps(JOB))
    assert main(["train", "--config", str(tmp_path / "job.json"), "--workers", "2", "--quiet",
                 "--json", str(tmp_path / "split.json")]) == 0
    split_summary = json.loads((tmp_path / "split.json").read_text())
    expected = json.loads(json.dumps(one_summary))
    for name in TIMES:
        assert split_summary.pop(name) > 0
        expected.pop(name)
    assert split_summary == expected

    merged, theta0 = train.run_split(config, 2)
    np.testing.assert_array_equal(theta0, one_theta)
    np.testing.assert_array_equal(merged.final_cost, one.final_cost)
    assert [p.tick for p in merged.history] == [p.tick for p in one.history]
    np.testing.assert_array_equal(merged.history[-1].accuracy, one.history[-1].accuracy)


@pytest.mark.parametrize("change, field", [
    (dict(timing="async", drift=0.1), "timing"), (dict(jitter=2), "jitter"), (dict(drop=0.1), "drop"),
    (dict(delay=1), "delay"), (dict(node_links={"0": {"delay": 1}}), "node_links"),
])
def test_jobs_whose_seeds_cannot_split_are_refused_naming_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        train.check_splittable(JobConfig(**dict(JOB, **change)))
    assert err.value.field == field


def test_train_workers_option_is_checked(capsys):
    for args, field in ((["--workers", "0"], "workers"), (["--workers", "2", "--engine", "cluster"], "workers"),
                        (["--workers", "2", "--jitter", "3"], "jitter")):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--task", "parity2", "--seeds", "4", "--quiet", *args])
        assert exc.value.code == 2 and field in capsys.readouterr().err
