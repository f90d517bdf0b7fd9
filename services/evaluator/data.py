"""Datasets as numpy arrays, read from their standard on-disk formats.

Tasks (docs/architecture.md §1): ``parityN`` (all 2**N inputs of N bits, label = XOR of the bits),
``fmnist`` (Fashion-MNIST IDX files) and ``cifar10`` (CIFAR-10 python batches as
torchvision stores them, or the staged JPEG npz files described in
``shared/data/README.md``).

Conventions of the returned :class:`Dataset`:

* images: ``x`` float32 in [0, 1], shape (N, C, H, W) (pixel / 255);
* parity: ``x`` float64 in {0, 1}, shape (2**n, n), binary counting order (MSB first);
* ``y``: int64 class labels, shape (N,).

Every missing or unreadable file raises :class:`DatasetError` naming the exact path and
how to obtain the data. The ``write_*`` helpers produce small data in the real formats so
the loaders can be tested without the real datasets.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Dataset",
    "DatasetError",
    "parity",
    "load_fashion_mnist",
    "load_cifar10",
    "load",
    "read_idx",
    "write_idx",
    "write_cifar_batch",
    "write_fake_fashion_mnist",
    "write_fake_cifar10",
    "FMNIST_HELP",
    "CIFAR10_HELP",
]

FMNIST_HELP = (
    "download from https://github.com/zalandoresearch/fashion-mnist (data/fashion/) or "
    "`apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist) "
    "and put the four *-ubyte(.gz) files directly in DATA_DIR or in DATA_DIR/fashion-mnist"
)
CIFAR10_HELP = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it so "
    "that cifar-10-batches-py/ is inside DATA_DIR (or DATA_DIR/cifar10); the staged "
    "cifar10_{train,test}_jpegq75*.npz files (shared/data/README.md) are accepted as a "
    "fallback"
)


class DatasetError(RuntimeError):
    """A dataset file is missing, truncated or not in the expected format."""


class OutsideRoots(ValueError):
    """A data directory outside the ones a service was started with."""


def data_roots(data_dir: str, extra: str = "") -> list[str]:
    """The directories a service reads data from: its ``data_dir`` (the working directory
    when unset) and the ``os.pathsep``-separated ``extra`` ones, resolved."""
    return [os.path.realpath(d) for d in [data_dir or os.getcwd(), *filter(None, extra.split(os.pathsep))]]


def confine(task: str, data_dir: str, roots: list[str]) -> None:
    """Refuse a data directory outside ``roots`` (symlinks resolved) for a task that reads
    files; parity is generated and reads none. Requests over a network name their data
    directory: this keeps them from making the service search or read anywhere else."""
    if _PARITY_RE.fullmatch(task):
        return
    path = os.path.realpath(data_dir or roots[0])
    if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise OutsideRoots(f"data_dir {data_dir!r} is outside the directories this service reads "
                           f"({os.pathsep.join(roots)}; start it with --data-dir or --data-roots to add one)")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Inputs ``x`` (N, ...) and int64 labels ``y`` (N,) of one split of one task."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Dataset {self.name!r}: x has {self.x.shape[0]} samples, y has {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])


# --------------------------------------------------------------------------- parity


def parity(n_bits: int) -> Dataset:
    """All ``2**n_bits`` inputs in binary counting order; label = parity of the ones.

    Inputs are bipolar, bit b ↦ 2b − 1 ∈ {−1, +1}: on the 2-2-1 sigmoid network this
    roughly halves the runs that stall in XOR's "two outputs at ½" local minimum compared
    with {0, 1} inputs (measured in docs/benchmarks.md).
    """
    if not 1 <= int(n_bits) <= 24:
        raise ValueError(f"parity: n_bits must be in 1..24, got {n_bits}")
    n = int(n_bits)
    codes = np.arange(2**n, dtype=np.int64)
    bits = (codes[:, None] >> np.arange(n - 1, -1, -1, dtype=np.int64)) & 1
    y = (bits.sum(axis=1) % 2).astype(np.int64)
    return Dataset(x=2.0 * bits.astype(np.float64) - 1.0, y=y, num_classes=2, name=f"parity{n}")


# --------------------------------------------------------------------------- IDX

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
_IDX_CODES[np.dtype(np.uint8)] = 0x08
_IDX_CODES[np.dtype(np.int8)] = 0x09


def _read_bytes(path: Path, help_text: str) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"missing file {path}: {help_text}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read {path} ({exc}): the file is corrupt; {help_text}") from exc


def read_idx(path: str | os.PathLike, help_text: str = "") -> np.ndarray:
    """Read one IDX file (gzipped if its name ends with ``.gz``) into a native-endian array.

    Layout: magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 dimensions, then
    the data in C order. The file length must equal header + prod(dims) * itemsize.
    """
    path = Path(path)
    raw = _read_bytes(path, help_text)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic {raw[:4].hex()}); {help_text}")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header; {help_text}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: file holds {len(raw)} bytes but its IDX header {dims} implies {expected} "
            f"(truncated or corrupt); {help_text}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzip it when ``path`` ends with ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"write_idx: unsupported dtype {array.dtype}")
    if array.ndim > 255:
        raise ValueError("write_idx: too many dimensions")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


# --------------------------------------------------------------------------- Fashion-MNIST

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _find_file(dirs: Sequence[Path], names: Iterable[str]) -> Path | None:
    for d in dirs:
        for name in names:
            p = d / name
            if p.is_file():
                return p
    return None


def _fmnist_dirs(data_dir: Path) -> list[Path]:
    return [data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw"]


def _idx_path(data_dir: Path, stem: str) -> Path:
    dirs = _fmnist_dirs(data_dir)
    found = _find_file(dirs, (stem + ".gz", stem))
    if found is None:
        raise DatasetError(
            f"missing file {data_dir / (stem + '.gz')} (also looked for {stem}[.gz] in "
            f"{', '.join(str(d) for d in dirs)}): {FMNIST_HELP}"
        )
    return found


def load_fashion_mnist(data_dir: str | os.PathLike, split: str = "train") -> Dataset:
    """Fashion-MNIST from the four standard IDX files (gzipped or raw).

    Checks the magic numbers (2051 images, 2049 labels), the 28x28 image size, the file
    lengths against their headers, that image and label counts agree and labels are 0..9.
    Returns x float32 (N, 1, 28, 28) = pixel / 255.
    """
    split = _check_split(split)
    data_dir = Path(data_dir)
    img_stem, lbl_stem = _FMNIST_FILES[split]
    img_path = _idx_path(data_dir, img_stem)
    lbl_path = _idx_path(data_dir, lbl_stem)
    _check_magic(img_path, 2051)
    _check_magic(lbl_path, 2049)
    images = read_idx(img_path, FMNIST_HELP)
    labels = read_idx(lbl_path, FMNIST_HELP)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{img_path}: expected N x 28 x 28 images, header says {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"{lbl_path} holds {labels.shape[0]} labels but {img_path} holds "
            f"{images.shape[0]} images; {FMNIST_HELP}"
        )
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return Dataset(x=x, y=labels.astype(np.int64), num_classes=10, name=f"fmnist-{split}")


def _check_magic(path: Path, magic: int) -> None:
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(4)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read {path} ({exc}): the file is corrupt; {FMNIST_HELP}") from exc
    if len(head) < 4 or int.from_bytes(head, "big") != magic:
        raise DatasetError(
            f"{path}: magic number {int.from_bytes(head, 'big') if len(head) == 4 else head!r} "
            f"is not {magic}; wrong or corrupt file; {FMNIST_HELP}"
        )


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_NPZ = {"train": "cifar10_train_jpegq75_bytes.npz", "test": "cifar10_test_jpegq75.npz"}

# The CIFAR batches are pickles; only what they legitimately contain may be unpickled.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _cifar_dirs(data_dir: Path) -> list[Path]:
    return [
        data_dir / "cifar-10-batches-py",
        data_dir,
        data_dir / "cifar10" / "cifar-10-batches-py",
        data_dir / "cifar10",
    ]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DatasetError(f"missing file {path}: {CIFAR10_HELP}") from None
    except Exception as exc:  # any unpickling failure means a corrupt file
        raise DatasetError(f"cannot read CIFAR-10 batch {path} ({exc}); {CIFAR10_HELP}") from exc
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DatasetError(f"{path}: not a CIFAR-10 batch (no b'data'/b'labels'); {CIFAR10_HELP}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: b'labels' do not match b'data' or lie outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _decode_jpegs(path: Path, jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(
            f"{path} stores JPEG bytes and decoding them needs Pillow (`pip install pillow`), "
            f"which is not installed; or provide the python batches: {CIFAR10_HELP}"
        ) from None
    n = len(offsets) - 1
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    buf = jpeg.tobytes()
    for i in range(n):
        with Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]])) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def _read_cifar_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as d:
            y = np.asarray(d["y"], dtype=np.int64)
            if split == "test" and "x" in d.files:
                x = np.asarray(d["x"])
            else:
                offsets = np.asarray(d["jpeg_offsets"], dtype=np.int64)
                jpeg = np.asarray(d["jpeg"])
                x = None
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"cannot read {path} ({exc}): corrupt npz; {CIFAR10_HELP}") from exc
    if x is None:
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != jpeg.size or np.any(np.diff(offsets) <= 0):
            raise DatasetError(f"{path}: jpeg_offsets do not index the jpeg buffer; corrupt file")
        try:
            x = _decode_jpegs(path, jpeg, offsets)
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"{path}: cannot decode a JPEG ({exc}); corrupt file") from exc
    if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or y.shape != (x.shape[0],):
        raise DatasetError(f"{path}: expected x uint8 (N,32,32,3) and y (N,), got {x.dtype} {x.shape}, {y.shape}")
    return x.transpose(0, 3, 1, 2), y


def load_cifar10(data_dir: str | os.PathLike, split: str = "train") -> Dataset:
    """CIFAR-10 from the python batches, falling back to the staged JPEG npz files.

    Looks in ``DATA_DIR/cifar-10-batches-py``, ``DATA_DIR``, ``DATA_DIR/cifar10/...`` for
    ``data_batch_1..5`` (train) or ``test_batch`` (test): pickles with ``b"data"`` uint8
    (N, 3072), channel-major R, G, B planes of 32x32, and ``b"labels"``. When no batch file
    is present anywhere it uses ``cifar10_test_jpegq75.npz`` / ``cifar10_train_jpegq75_bytes.npz``
    (lossy, JPEG quality 75; the train file needs Pillow to decode). A partial set of batch
    files is an error, never silently a smaller training set.
    Returns x float32 (N, 3, 32, 32) = pixel / 255.
    """
    split = _check_split(split)
    data_dir = Path(data_dir)
    names = _CIFAR_TRAIN if split == "train" else _CIFAR_TEST
    dirs = _cifar_dirs(data_dir)
    for d in dirs:
        present = [(d / n).is_file() for n in names]
        if any(present):
            if not all(present):
                missing = [str(d / n) for n, p in zip(names, present) if not p]
                raise DatasetError(f"missing file(s) {', '.join(missing)}: {CIFAR10_HELP}")
            parts = [_read_cifar_batch(d / n) for n in names]
            x8 = np.concatenate([p[0] for p in parts])
            y = np.concatenate([p[1] for p in parts])
            break
    else:
        npz = _find_file(dirs, (_CIFAR_NPZ[split],))
        if npz is None:
            raise DatasetError(
                f"missing file {dirs[0] / names[0]} (looked for {', '.join(names)} or "
                f"{_CIFAR_NPZ[split]} in {', '.join(str(d) for d in dirs)}): {CIFAR10_HELP}"
            )
        x8, y = _read_cifar_npz(npz, split)
    x = x8.astype(np.float32) / np.float32(255.0)
    return Dataset(x=np.ascontiguousarray(x), y=y, num_classes=10, name=f"cifar10-{split}")


def write_cifar_batch(
    path: str | os.PathLike,
    x_uint8: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    batch_label: str = "fake batch",
) -> None:
    """Write one CIFAR-10 python batch (pickle protocol 2, bytes keys) from (N,3,32,32) uint8."""
    x_uint8 = np.asarray(x_uint8)
    if x_uint8.dtype != np.uint8 or x_uint8.shape[1:] != (3, 32, 32):
        raise ValueError(f"write_cifar_batch: need uint8 (N,3,32,32), got {x_uint8.dtype} {x_uint8.shape}")
    n = x_uint8.shape[0]
    d = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in np.asarray(labels).reshape(-1)],
        b"data": np.ascontiguousarray(x_uint8.reshape(n, 3072)),
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(n)],
    }
    if len(d[b"labels"]) != n:
        raise ValueError("write_cifar_batch: labels and images differ in length")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


# --------------------------------------------------------------------------- synthetic data


def _fake_prototypes(rng: np.random.Generator, shape: tuple[int, ...], classes: int) -> np.ndarray:
    """One smooth random pattern per class (4x4-pixel blocks), values in [0, 1]."""
    c, h, w = shape
    coarse = rng.uniform(0.0, 1.0, size=(classes, c, h // 4 + 1, w // 4 + 1))
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)[:, :, :h, :w]


def _fake_images(rng: np.random.Generator, n: int, protos: np.ndarray):
    """Class prototype plus uniform noise, as uint8: easily learnable, never trivial."""
    y = rng.integers(0, protos.shape[0], size=n).astype(np.int64)
    img = 0.75 * protos[y] + 0.25 * rng.uniform(0.0, 1.0, size=(n,) + protos.shape[1:])
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), y


def write_fake_fashion_mnist(
    data_dir: str | os.PathLike, n_train: int = 200, n_test: int = 100, seed: int = 0, gz: bool = True
) -> Path:
    """Write learnable synthetic Fashion-MNIST-shaped IDX files into ``data_dir``."""
    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    protos = _fake_prototypes(rng, (1, 28, 28), 10)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = _fake_images(rng, n, protos)
        img_stem, lbl_stem = _FMNIST_FILES[split]
        write_idx(data_dir / (img_stem + suffix), x[:, 0])
        write_idx(data_dir / (lbl_stem + suffix), y.astype(np.uint8))
    return data_dir


def write_fake_cifar10(data_dir: str | os.PathLike, n_per_batch: int = 50, seed: int = 0) -> Path:
    """Write learnable synthetic CIFAR-10 batches into ``data_dir/cifar-10-batches-py``."""
    root = Path(data_dir) / "cifar-10-batches-py"
    rng = np.random.default_rng(seed)
    x, y = _fake_images(rng, 6 * n_per_batch, _fake_prototypes(rng, (3, 32, 32), 10))
    for i, name in enumerate(_CIFAR_TRAIN + _CIFAR_TEST):
        s = slice(i * n_per_batch, (i + 1) * n_per_batch)
        write_cifar_batch(root / name, x[s], y[s], batch_label=f"fake {name}")
    meta = {
        b"num_cases_per_batch": n_per_batch,
        b"label_names": [
            b"airplane", b"automobile", b"bird", b"cat", b"deer",
            b"dog", b"frog", b"horse", b"ship", b"truck",
        ],
        b"num_vis": 3072,
    }
    with open(root / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


# --------------------------------------------------------------------------- dispatch

_PARITY_RE = re.compile(r"parity(\d+)")


def load(task: str, data_dir: str | os.PathLike | None = None, split: str = "train") -> Dataset:
    """Dataset for a task name: ``parityN`` (N >= 1; the reference tasks are 2..8),
    ``fmnist`` or ``cifar10``. Parity ignores ``data_dir`` and ``split`` (train = test)."""
    m = _PARITY_RE.fullmatch(task)
    if m:
        return parity(int(m.group(1)))
    if task in ("fmnist", "cifar10"):
        if data_dir is None:
            raise DatasetError(
                f"task {task!r} needs a data directory (DATA_DIR): "
                + (FMNIST_HELP if task == "fmnist" else CIFAR10_HELP)
            )
        loader = load_fashion_mnist if task == "fmnist" else load_cifar10
        return loader(data_dir, split)
    raise ValueError(f"unknown task {task!r}: expected parityN, 'fmnist' or 'cifar10'")


def job_data(config, split: str = "train") -> Dataset:
    """The data a :class:`~pmgd_node.config.JobConfig` trains on (``split`` "train") or is scored
    on ("test": the held-out split; parity's whole set; a custom task's test set, or its training
    set when it gives none)."""
    if config.task == "custom":
        from .user_model import user_data

        return user_data(config, split)
    return load(config.task, config.data_dir, split)
