"""The broadcaster's --state-dir: every completed checkpoint is one verified file, and a damaged
one is refused at start with the reason in its status, never resumed."""

import numpy as np

from pmgd_node.config import JobConfig
from services.broadcaster.job import JobRun
from services.cluster.client import status
from services.cluster.launcher import LocalCluster


def _payload_offset(path: str) -> int:
    """The middle byte of the largest array stored in an (uncompressed) .npz."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(member.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_len + extra_len + member.file_size // 2


def test_a_checkpoint_round_trips_and_a_damaged_one_is_refused_by_load(tmp_path):
    job = JobRun("j1", JobConfig(nodes=2, seeds=3, checkpoint_every=10))
    path = str(tmp_path / "job.npz")
    job.save(path)
    again = JobRun.load(path)
    assert again.id == "j1" and again.config == job.config and again.checkpoint["tick"] == 0
    for a, b in zip(again.checkpoint["shards"], job.checkpoint["shards"]):
        np.testing.assert_array_equal(a["theta0"], b["theta0"])
    data = bytearray(open(path, "rb").read())
    data[_payload_offset(path)] ^= 0xFF  # one bit of stored numbers, not of zip metadata numpy never reads
    open(path, "wb").write(bytes(data))
    try:
        JobRun.load(path)
    except ValueError as err:
        assert "job.npz" in str(err)
    else:
        raise AssertionError("a damaged checkpoint was loaded")


def test_the_broadcaster_refuses_a_damaged_checkpoint_and_says_why(tmp_path):
    (tmp_path / "job.npz").write_bytes(b"PK\x03\x04 torn in the middle of a write")
    with LocalCluster(1, state_dir=str(tmp_path)) as cluster:
        st = status(cluster.endpoints["control"], keys=cluster.keys)
        assert st["state"] == "idle" and st["job"] is None
        assert "job.npz" in st["resume_error"] and "not a readable checkpoint" in st["resume_error"]
    assert (tmp_path / "job.npz").exists()  # left for a person to look at
