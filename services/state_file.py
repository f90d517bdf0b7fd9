"""State files that a crash cannot tear: one ``.npz`` written atomically, verified on load.

A state is a mapping of names to numpy arrays (strings as 0-d unicode arrays). It is written
to ``PATH.tmp``, flushed to the disk, renamed over ``PATH`` and the rename itself flushed, so a
kill at any instant leaves the previous state or the new one, never a mix. A SHA-256 over
every array (name, dtype, shape, bytes) is stored beside them and checked on load: a file
damaged on disk or written by something else is refused with a message, never used.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_state(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` with their digest so that a kill at any instant leaves old or new."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    arrays["digest"] = np.array(_digest(arrays))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def load_state(path: str) -> dict[str, np.ndarray]:
    """The arrays of a checkpoint, after checking their digest (ValueError if it does not match)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from None
    digest = str(arrays.pop("digest", ""))
    if digest != _digest(arrays):
        raise ValueError(f"{path}: checksum mismatch, the checkpoint is damaged")
    return arrays
