"""The pure pieces of the replica uplink (issue 17): θ̃ of a shard regenerated away from its
node is the node's own, at any block length; the tiled R-CM generator is the hash it always
was; a Digest round-trips and a malformed one is refused; the checksum sees one changed value."""

import dataclasses

import msgpack
import numpy as np
import pytest

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from pmgd_node.node import BLOCK, BLOCK_VALUES, ParameterNode, ShardPerturbation, block_ticks, shard_perturbation
from pmgd_node.perturbation import _IDX_MUL, make_perturbation, splitmix64


@pytest.mark.parametrize("kind", ["rcm", "cm", "tm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variation", [0.0, 0.3])
def test_a_shard_regenerated_elsewhere_is_the_nodes_own(kind, dtype, variation):
    """What the broadcaster's replica computes (one generator shared by every shard, one block
    kept) equals θ⁰ + θ̃ as the node sends it, bit for bit, tick after tick."""
    config = JobConfig(perturbation=kind, seeds=3, seed=4, device_variation=variation, amplitude=0.05)
    P, (a, b) = 1000, (317, 800)
    theta0 = np.random.default_rng(0).normal(size=(3, b - a)).astype(dtype)
    node = ParameterNode(config, P, a, b, theta0)
    shared = make_perturbation(kind, P, config.seed + np.arange(3), config.amplitude, config.fm_band, dtype)
    replica = shard_perturbation(config, P, a, b, dtype, shared, keep=1)
    for tick in [0, 1, 63, 64, 65, 200, 199, 5000]:
        sent = node.effective_weights(tick)
        rebuilt = theta0 + replica.at(tick)
        assert sent.dtype == rebuilt.dtype == dtype
        assert np.array_equal(sent.view(np.uint8), rebuilt.view(np.uint8)), tick


def test_analog_fm_with_gain_correction_is_regenerated_too():
    config = JobConfig(perturbation="fm", mode="analog", seeds=2, fm_gain_correction=True, device_variation=0.1)
    P, (a, b) = 50, (10, 37)
    node = ParameterNode(config, P, a, b, np.zeros((2, b - a)))
    replica = shard_perturbation(config, P, a, b, np.float64, keep=1)
    for tick in range(0, 300, 7):
        assert np.array_equal(node.effective_weights(tick), np.zeros((2, b - a)) + replica.at(tick))


@pytest.mark.parametrize("kind", ["rcm", "cm", "tm"])
def test_block_length_changes_no_value(kind):
    """Blocks are a cache: a value is a function of (seed, index, tick) whatever block holds it."""
    gen = make_perturbation(kind, 5000, np.array([3, 9]), 0.2, dtype=np.float32)
    plain = gen.block(0, 300, 1200, 4100)
    for ticks in (1, 7, 64):
        shard = ShardPerturbation(gen, 1200, 4100, (2, 2900), np.float32)
        shard.ticks, shard._block_buf = ticks, np.empty((ticks, 2, 2900), np.float32)
        for t in (0, 5, 150, 299, 64, 63):
            assert np.array_equal(shard.at(t), plain[t])


def test_blocks_stay_small_for_big_shards():
    assert block_ticks(100, 9) == BLOCK  # parity sweeps: as before
    assert block_ticks(1, 62_500) == 4 and block_ticks(1, 15_625) == 16 and block_ticks(1, 10**6) == 1
    for runs, n in ((1, 26_154), (3, 70_000), (1, 10**6)):
        assert block_ticks(runs, n) * runs * n <= max(BLOCK_VALUES, runs * n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 5), (2, 1, 40_000), (70, 3, 200), (1, 1, 100_003)])
def test_tiled_random_code_is_the_plain_hash(dtype, shape):
    """R-CM's sign is bit 63 of splitmix64(splitmix64(key_s ^ t) ^ i·c), computed here element by
    element the plain way, against the tiled generator (which tiles span rows and columns)."""
    count, S, n = shape
    start, t0, seeds = 12_345, 777, np.arange(5, 5 + S)
    gen = make_perturbation("rcm", start + n, seeds, 0.25, dtype=dtype)
    got = gen.block(t0, count, start, start + n)
    ticks = np.arange(t0, t0 + count, dtype=np.uint64)
    key = splitmix64(gen._run_key[None, :] ^ ticks[:, None])
    h = splitmix64(key[:, :, None] ^ (np.arange(start, start + n, dtype=np.uint64) * _IDX_MUL)[None, None, :])
    want = np.where((h >> np.uint64(63)).astype(bool), dtype(0.25), -dtype(0.25)).astype(dtype)
    assert got.dtype == dtype and np.array_equal(got, want)
    out = np.empty(shape, dtype)
    assert gen.block(t0, count, start, start + n, out=out) is out and np.array_equal(out, want)


def test_digest_round_trips_and_malformed_digests_are_refused():
    theta0 = np.arange(6, dtype=np.float32).reshape(2, 3)
    for msg in (p.Digest("j", 2, 1, 40, p.checksum(theta0), theta0), p.Digest("j", 2, 1, 41, p.checksum(theta0))):
        back = p.decode(p.encode(msg))
        assert type(back) is p.Digest
        for f in dataclasses.fields(msg):
            a, b = getattr(msg, f.name), getattr(back, f.name)
            assert np.array_equal(a, b) and (not isinstance(a, np.ndarray) or a.dtype == b.dtype)
    frames = p.encode(p.Digest("j", 2, 1, 40, "0123456789abcdef", theta0))
    header = msgpack.unpackb(frames[0])
    for changes, reason in (({"checksum": 5}, "field"), ({"tick": 2**60}, "field"), ({"a": [None, None]}, "arrays")):
        with pytest.raises(p.ProtocolError) as err:
            p.decode([msgpack.packb(header | changes)] + frames[1:])
        assert err.value.reason == reason
    del header["checksum"]
    with pytest.raises(p.ProtocolError, match="checksum missing"):
        p.decode([msgpack.packb(header)] + frames[1:])
    with pytest.raises(p.ProtocolError) as err:
        p.decode(frames[:1])
    assert err.value.reason == "truncated"
    assert p.decode(p.encode(p.Control("j", "resync", 40, "θ⁰ checksum", 2))).command == "resync"


def test_the_checksum_sees_one_changed_value_and_nothing_else():
    theta0 = np.random.default_rng(1).normal(size=(2, 1000)).astype(np.float32)
    base = p.checksum(theta0)
    assert len(base) == 16 and int(base, 16) >= 0
    assert p.checksum(theta0.copy()) == base and p.checksum(np.asfortranarray(theta0)) == base  # bytes in C order
    flipped = theta0.copy()
    flipped[1, 517] = np.nextafter(flipped[1, 517], np.inf)  # one ulp of one parameter
    assert p.checksum(flipped) != base
    assert p.checksum(theta0.astype(np.float64)) != base  # a dtype is part of the bytes


def test_replica_only_in_sync_timing():
    assert p.replica_uplink(JobConfig(uplink="replica"))
    assert not p.replica_uplink(JobConfig())  # the default: full
    assert not p.replica_uplink(JobConfig(timing="async", tick_period=0.01, uplink="replica"))


def test_a_result_holding_a_million_parameters_decodes_and_a_small_lying_header_does_not():
    """A job's final Progress carries θ⁰ as a list: 10⁶ numbers must decode (a fixed bound of
    2¹⁶ elements refused it), while a few bytes claiming a huge list or string are still refused."""
    theta0 = np.random.default_rng(2).normal(size=(1, 10**6)).tolist()
    back = p.decode(p.encode(p.Progress("j", True, {"theta0": theta0})))
    assert back.data["theta0"] == theta0
    for lie in (b"\xdd\xff\xff\xff\xff" + b"\xc0" * 8, b"\xdb\xff\xff\xff\xff" + b"a" * 8, b"\x91" * 5000 + b"\xc0"):
        with pytest.raises(p.ProtocolError) as err:
            p.decode([lie])
        assert err.value.reason == "header"
