"""Loaders read the real on-disk formats; every failure names the file."""

import gzip
import io
import pickle
import sys

import numpy as np
import pytest

from services.evaluator import data as D

# ----------------------------------------------------------------------------- parity


def test_parity_two_bits_counting_order():
    d = D.parity(2)
    assert d.x.dtype == np.float64 and d.y.dtype == np.int64
    np.testing.assert_array_equal(d.x, [[-1, -1], [-1, 1], [1, -1], [1, 1]])
    np.testing.assert_array_equal(d.y, [0, 1, 1, 0])
    assert d.num_classes == 2 and d.name == "parity2" and len(d) == 4


@pytest.mark.parametrize("n", range(2, 9))
def test_parity_labels_are_xor(n):
    d = D.parity(n)
    assert d.x.shape == (2**n, n)
    assert set(np.unique(d.x)) == {-1.0, 1.0}  # bipolar inputs
    bits = (d.x > 0).astype(int)
    np.testing.assert_array_equal(d.y, bits.sum(axis=1) % 2)
    # binary counting order, MSB first
    np.testing.assert_array_equal(bits @ (2 ** np.arange(n - 1, -1, -1)), np.arange(2**n))


def test_load_dispatch():
    assert D.load("parity5").x.shape == (32, 5)
    with pytest.raises(ValueError, match="unknown task"):
        D.load("mnist", "/nonexistent")
    with pytest.raises(D.DatasetError, match="fashion-mnist"):
        D.load("fmnist", None)


def test_dataset_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        D.Dataset(x=np.zeros((3, 2)), y=np.zeros(2, dtype=np.int64), num_classes=2, name="bad")


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / f"a-idx3{suffix}"
    D.write_idx(p, a)
    b = D.read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    raw = gzip.open(p).read() if suffix else p.read_bytes()
    assert raw[:4] == bytes([0, 0, {np.uint8: 8, np.int8: 9, np.int16: 11, np.int32: 12,
                                    np.float32: 13, np.float64: 14}[dtype], 3])


def test_idx_magic_numbers_match_the_standard(tmp_path):
    D.write_fake_fashion_mnist(tmp_path, n_train=3, n_test=2, gz=False)
    assert int.from_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes()[:4], "big") == 2051
    assert int.from_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes()[:4], "big") == 2049


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fake_fashion_mnist_round_trip(tmp_path, gz):
    D.write_fake_fashion_mnist(tmp_path, n_train=30, n_test=20, seed=1, gz=gz)
    suffix = ".gz" if gz else ""
    for split, n, stem in (("train", 30, "train"), ("test", 20, "t10k")):
        d = D.load_fashion_mnist(tmp_path, split)
        assert d.x.shape == (n, 1, 28, 28) and d.x.dtype == np.float32
        assert d.y.shape == (n,) and d.y.dtype == np.int64
        assert d.num_classes == 10 and d.name == f"fmnist-{split}"
        raw = D.read_idx(tmp_path / f"{stem}-images-idx3-ubyte{suffix}")
        np.testing.assert_array_equal(d.x[:, 0], raw.astype(np.float32) / 255)
        np.testing.assert_array_equal(d.y, D.read_idx(tmp_path / f"{stem}-labels-idx1-ubyte{suffix}"))
        assert 0.0 <= d.x.min() and d.x.max() <= 1.0


def test_fashion_mnist_found_in_subdirectory_and_via_load(tmp_path):
    D.write_fake_fashion_mnist(tmp_path / "fashion-mnist", n_train=5, n_test=4)
    assert len(D.load("fmnist", tmp_path, "test")) == 4


def test_fashion_mnist_missing_file_named(tmp_path):
    D.write_fake_fashion_mnist(tmp_path, n_train=5, n_test=4)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetError) as e:
        D.load_fashion_mnist(tmp_path, "test")
    msg = str(e.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in msg
    assert "zalandoresearch/fashion-mnist" in msg and "dataset-fashion-mnist" in msg
    assert isinstance(e.value, RuntimeError)


def test_fashion_mnist_truncated_file_named(tmp_path):
    D.write_fake_fashion_mnist(tmp_path, n_train=5, n_test=4, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(D.DatasetError, match="train-images-idx3-ubyte") as e:
        D.load_fashion_mnist(tmp_path, "train")
    assert "implies" in str(e.value)


def test_fashion_mnist_wrong_magic_named(tmp_path):
    D.write_fake_fashion_mnist(tmp_path, n_train=5, n_test=4, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes((tmp_path / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(D.DatasetError, match="2051") as e:
        D.load_fashion_mnist(tmp_path, "train")
    assert str(img) in str(e.value)


def test_fashion_mnist_bad_gzip_named(tmp_path):
    D.write_fake_fashion_mnist(tmp_path, n_train=5, n_test=4)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(b"this is not gzip at all")
    with pytest.raises(D.DatasetError) as e:
        D.load_fashion_mnist(tmp_path, "train")
    assert str(p) in str(e.value)


def test_fashion_mnist_count_mismatch(tmp_path):
    D.write_fake_fashion_mnist(tmp_path, n_train=5, n_test=4)
    D.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(D.DatasetError, match="3 labels"):
        D.load_fashion_mnist(tmp_path, "train")


def test_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        D.load_fashion_mnist(tmp_path, "val")


# ----------------------------------------------------------------------------- CIFAR-10


def _read_pickle(p):
    with open(p, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_fake_cifar10_round_trip(tmp_path):
    root = D.write_fake_cifar10(tmp_path, n_per_batch=7, seed=3)
    assert root == tmp_path / "cifar-10-batches-py"
    meta = _read_pickle(root / "batches.meta")
    assert meta[b"label_names"][0] == b"airplane"
    b1 = _read_pickle(root / "data_batch_1")
    assert set(b1) == {b"data", b"labels", b"batch_label", b"filenames"}
    assert b1[b"data"].dtype == np.uint8 and b1[b"data"].shape == (7, 3072)

    tr = D.load_cifar10(tmp_path, "train")
    te = D.load("cifar10", tmp_path, "test")
    assert tr.x.shape == (35, 3, 32, 32) and tr.x.dtype == np.float32 and tr.y.dtype == np.int64
    assert te.x.shape == (7, 3, 32, 32) and te.num_classes == 10
    # channel-major planes: R of image 0 is the first 1024 bytes
    np.testing.assert_array_equal(tr.x[0, 0].ravel(), b1[b"data"][0, :1024].astype(np.float32) / 255)
    np.testing.assert_array_equal(tr.y[:7], b1[b"labels"])
    b5 = _read_pickle(root / "data_batch_5")
    np.testing.assert_array_equal(tr.y[28:], b5[b"labels"])


def test_cifar10_files_directly_in_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    D.write_cifar_batch(tmp_path / "test_batch", x, [0, 1, 2, 9])
    d = D.load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(d.x, x.astype(np.float32) / 255)
    np.testing.assert_array_equal(d.y, [0, 1, 2, 9])


def test_cifar10_missing_everything_named(tmp_path):
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar10(tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "cifar-10-python.tar.gz" in msg


def test_cifar10_partial_batches_named(tmp_path):
    root = D.write_fake_cifar10(tmp_path, n_per_batch=2)
    (root / "data_batch_3").unlink()
    with pytest.raises(D.DatasetError, match="data_batch_3") as e:
        D.load_cifar10(tmp_path, "train")
    assert str(root / "data_batch_3") in str(e.value)


def test_cifar10_corrupt_batch_named(tmp_path):
    root = D.write_fake_cifar10(tmp_path, n_per_batch=2)
    p = root / "test_batch"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar10(tmp_path, "test")
    assert str(p) in str(e.value)


def test_cifar10_refuses_arbitrary_pickle_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "cifar-10-batches-py" / "test_batch"
    p.parent.mkdir()
    p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(D.DatasetError, match="not allowed"):
        D.load_cifar10(tmp_path, "test")


def test_cifar10_wrong_shape_named(tmp_path):
    p = tmp_path / "test_batch"
    with open(p, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(D.DatasetError, match="3072") as e:
        D.load_cifar10(tmp_path, "test")
    assert str(p) in str(e.value)


def test_cifar10_test_npz_fallback(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    y = np.array([3, 8, 8, 0, 6])
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "cifar10_test_jpegq75.npz", x=x, y=y)
    d = D.load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(d.x, x.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    np.testing.assert_array_equal(d.y, y)


def _write_jpeg_npz(path, n):
    from PIL import Image

    rng = np.random.default_rng(1)
    blobs, decoded = [], []
    for _ in range(n):
        img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        blobs.append(buf.getvalue())
        decoded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    jpeg = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    np.savez(path, jpeg=jpeg, jpeg_offsets=offsets, y=np.arange(n) % 10)
    return np.stack(decoded)


def test_cifar10_train_jpeg_npz_fallback(tmp_path):
    pytest.importorskip("PIL")
    decoded = _write_jpeg_npz(tmp_path / "cifar10_train_jpegq75_bytes.npz", 4)
    d = D.load_cifar10(tmp_path, "train")
    np.testing.assert_array_equal(d.x, decoded.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    np.testing.assert_array_equal(d.y, [0, 1, 2, 3])


def test_cifar10_python_batches_preferred_over_npz(tmp_path):
    D.write_fake_cifar10(tmp_path, n_per_batch=3)
    np.savez(tmp_path / "cifar10_test_jpegq75.npz", x=np.zeros((9, 32, 32, 3), np.uint8), y=np.zeros(9))
    assert len(D.load_cifar10(tmp_path, "test")) == 3


def test_cifar10_jpeg_without_pillow_is_a_clear_error(tmp_path, monkeypatch):
    offsets = np.array([0, 3], dtype=np.int64)
    np.savez(tmp_path / "cifar10_train_jpegq75_bytes.npz", jpeg=np.zeros(3, np.uint8),
             jpeg_offsets=offsets, y=np.zeros(1, np.int64))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(D.DatasetError, match="Pillow") as e:
        D.load_cifar10(tmp_path, "train")
    assert str(tmp_path / "cifar10_train_jpegq75_bytes.npz") in str(e.value)


def test_cifar10_corrupt_npz_named(tmp_path):
    p = tmp_path / "cifar10_test_jpegq75.npz"
    p.write_bytes(b"PK garbage")
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar10(tmp_path, "test")
    assert str(p) in str(e.value)


def test_fake_data_is_learnable_by_class_means(tmp_path):
    """Nearest class mean on the fake training set classifies the fake test set well."""
    D.write_fake_fashion_mnist(tmp_path, n_train=200, n_test=100, seed=0)
    tr, te = D.load_fashion_mnist(tmp_path, "train"), D.load_fashion_mnist(tmp_path, "test")
    means = np.stack([tr.x[tr.y == c].mean(axis=0).ravel() for c in range(10)])
    pred = np.argmin(((te.x.reshape(len(te), 1, -1) - means) ** 2).sum(-1), axis=1)
    assert (pred == te.y).mean() > 0.9
