"""A message with a tick no node can have reached is refused: it must not pin a shard."""

import numpy as np

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from services.broadcaster.job import AHEAD_SLACK, JobRun


def _weights(job: JobRun, shard: int, tick: int) -> p.Weights:
    a, b = job.shards[shard]
    return p.Weights(job.id, job.epoch, shard, tick, np.zeros((job.config.seeds, b - a)))


def test_async_weights_from_the_far_future_are_refused_and_real_ones_still_land():
    job = JobRun("j", JobConfig(nodes=2, seeds=2, timing="async", tick_period=0.01, drift=0.05))
    job.assignments()
    assert job.on_weights(_weights(job, 0, 3)) == ""
    assert job.held[0] == 3
    assert job.on_weights(_weights(job, 0, 2**62)) == "tick"  # a stranger's, or a corrupted frame
    assert job.held[0] == 3
    assert job.on_weights(_weights(job, 0, 4)) == "" and job.held[0] == 4  # the shard is not pinned
    edge = job.tick + AHEAD_SLACK  # within the slack a node may run ahead: accepted
    assert job.on_weights(_weights(job, 1, edge)) == "" and job.held[1] == edge


def test_a_checkpoint_from_the_far_future_is_not_kept():
    job = JobRun("j", JobConfig(nodes=2, seeds=2, timing="async", tick_period=0.01))
    job.assignments()
    a, b = job.shards[0]
    state = np.zeros((2, b - a))
    empty = np.zeros(0, np.int64)
    far = p.Checkpoint("j", job.epoch, 0, 2**62, 1, state, state, empty, empty, np.zeros((0, 2)))
    job.on_checkpoint(far)
    assert 0 not in job.shard_checkpoints
    near = p.Checkpoint("j", job.epoch, 0, 10, 1, state, state, empty, empty, np.zeros((0, 2)))
    job.on_checkpoint(near)
    assert job.shard_checkpoints[0].tick == 10
