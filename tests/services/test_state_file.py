"""State files: a crash injected at every step of a write leaves the old state or the new one,
never a mix; damage on disk is refused with a message."""

import numpy as np
import pytest

from services import state_file as sf


class Crash(BaseException):
    """The process dies here (BaseException: nothing in the writer may catch it)."""


def _state(tick: int) -> dict:
    return {"tick": np.int64(tick), "theta0": np.arange(6.0).reshape(2, 3) * tick, "meta": np.array(f"tick {tick}")}


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


STEPS = ["write", "fsync", "replace", "dir_fsync"]


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_any_step_of_a_write_leaves_the_old_state_or_the_new(tmp_path, monkeypatch, step):
    path = str(tmp_path / "job.npz")
    sf.save_state(path, _state(100))
    real_savez, real_fsync, real_replace = np.savez, sf.os.fsync, sf.os.replace
    calls = {"fsync": 0}

    def savez(f, **arrays):
        if step == "write":  # half the bytes reach the temporary file, then the process dies
            import io

            buf = io.BytesIO()
            real_savez(buf, **arrays)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise Crash
        real_savez(f, **arrays)

    def fsync(fd):
        calls["fsync"] += 1
        if (step == "fsync" and calls["fsync"] == 1) or (step == "dir_fsync" and calls["fsync"] == 2):
            raise Crash
        real_fsync(fd)

    def replace(src, dst):
        if step == "replace":
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(sf.np, "savez", savez)
    monkeypatch.setattr(sf.os, "fsync", fsync)
    monkeypatch.setattr(sf.os, "replace", replace)
    with pytest.raises(Crash):
        sf.save_state(path, _state(200))
    monkeypatch.undo()
    loaded = sf.load_state(path)
    expected = _state(200) if step == "dir_fsync" else _state(100)  # renamed already, or not yet
    assert _equal(loaded, expected)
    sf.save_state(path, _state(300))  # the leftover temporary file is no obstacle to the next write
    assert _equal(sf.load_state(path), _state(300))


def test_damage_on_disk_is_refused_with_a_message(tmp_path):
    path = tmp_path / "job.npz"
    sf.save_state(str(path), _state(7))
    good = path.read_bytes()
    path.write_bytes(good[:-40])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        sf.load_state(str(path))
    # A file whose arrays were changed and re-zipped consistently (so its CRCs hold) fails the digest.
    path.write_bytes(good)
    with np.load(str(path)) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["theta0"] = arrays["theta0"] + 1.0  # the stored digest no longer matches
    np.savez(str(path), **arrays)
    with pytest.raises(ValueError, match="checksum mismatch"):
        sf.load_state(str(path))
    path.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        sf.load_state(str(path))
