"""inference.score and load_checkpoint: one θ scored over a split, agreeing with the models."""

import io

import numpy as np
import pytest

from services.evaluator import data as D
from services.evaluator import models as M
from services.evaluator.inference import InvalidInput, load_checkpoint, score

# XOR on bipolar inputs x ∈ {−1, +1}: h1 = OR = σ(20(x1+x2) + 20), h2 = AND = σ(20(x1+x2) − 20),
# out = σ(20 h1 − 20 h2 − 10) = OR and not AND. Layout: W1 (out, in), b1, W2, b2.
XOR_BIPOLAR = np.array([20.0, 20.0, 20.0, 20.0, 20.0, -20.0, 20.0, -20.0, -10.0])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    D.write_fake_cifar10(root, n_per_batch=30, seed=3)
    return D.load_cifar10(root, "test")


@pytest.mark.parametrize("task", ["parity2", "parity3", "parity5"])
def test_mlp_score_agrees_with_the_models_accuracy_and_cost(task):
    data = D.load(task)
    model = M.build_model(task)
    thetas = model.init(np.random.default_rng(0), 20) * 8.0  # large weights: varied accuracies
    batch = model.prepare(data.x, data.y)
    accs = set()
    for theta in thetas:
        r = score(model, theta, data, batch_size=3)  # chunks that do not divide N
        assert r["accuracy"] == model.accuracy(theta, batch)
        assert r["loss"] == pytest.approx(model.cost(theta, batch), rel=1e-12)
        accs.add(r["accuracy"])
    assert len(accs) > 2  # the comparison saw different classifiers, not one constant


def test_cnn_score_agrees_with_the_models_accuracy_and_cost(cifar):
    model = M.build_model("cifar10", "", device="cpu")
    batch = model.prepare(cifar.x, cifar.y)
    for seed in range(3):
        theta = model.init(np.random.default_rng(seed), 1)[0] * 3.0
        r = score(model, theta, cifar, batch_size=7)
        assert r["accuracy"] == pytest.approx(float(model.accuracy(theta, batch)), abs=0)
        assert r["loss"] == pytest.approx(float(model.cost(theta, batch)), rel=1e-5)
        conf = np.array(r["confusion"])
        assert conf.shape == (10, 10) and conf.sum() == len(cifar) == r["samples"]
        np.testing.assert_array_equal(conf.sum(axis=1), np.bincount(cifar.y, minlength=10))  # rows: true class
        assert r["accuracy"] == np.trace(conf) / len(cifar)
        assert r["device"] == "cpu" and r["seconds"] > 0 and r["images_per_second"] > 0


def test_xor_solution_scores_perfectly():
    data = D.parity(2)
    r = score(M.build_model("parity2"), XOR_BIPOLAR, data)
    assert r["accuracy"] == 1.0 and r["per_class_accuracy"] == [1.0, 1.0]
    assert r["confusion"] == [[2, 0], [0, 2]]
    assert r["loss"] < 1e-6


def test_hand_made_constant_classifier_per_class_and_confusion():
    """2-2-1 with every weight 0 and output bias +3 says "1" for every input."""
    data = D.parity(2)  # labels 0, 1, 1, 0
    theta = np.zeros(9)
    theta[8] = 3.0
    r = score(M.build_model("parity2"), theta, data)
    assert r["confusion"] == [[0, 2], [0, 2]]  # rows true 0/1, columns predicted 0/1
    assert r["per_class_accuracy"] == [0.0, 1.0] and r["accuracy"] == 0.5
    out = _sigmoid(3.0)
    assert r["loss"] == pytest.approx((2 * out**2 + 2 * (1 - out) ** 2) / 4, rel=1e-12)
    assert r["samples"] == 4


def test_hand_made_cnn_predicting_one_class_leaves_absent_classes_none():
    """Dense bias favours class 3 and everything else is 0: every image is called 3."""
    model = M.CNN((M.Conv(1, 2), M.Pool(2), M.Dense(2 * 3 * 3, 4)), (1, 8, 8), 4, name="tiny", device="cpu")
    theta = np.zeros(model.num_params, dtype=np.float32)
    theta[-4:] = [0.0, 0.0, 0.0, 1.0]
    y = np.array([0, 0, 0, 1, 3, 3], dtype=np.int64)  # class 2 absent
    data = D.Dataset(np.random.default_rng(0).uniform(size=(6, 1, 8, 8)).astype(np.float32), y, 4, "hand")
    r = score(model, theta, data, batch_size=4)
    assert r["confusion"] == [[0, 0, 0, 3], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 2]]
    assert r["per_class_accuracy"] == [0.0, 0.0, None, 1.0]
    assert r["accuracy"] == pytest.approx(2 / 6)
    # cross-entropy of logits (0, 0, 0, 1): −log softmax = log(3 + e) − z_y
    z = np.array([0.0, 0.0, 0.0, 1.0])
    expected = np.mean(np.log(np.exp(z).sum()) - z[y])
    assert r["loss"] == pytest.approx(expected, rel=1e-6)


def test_theta_of_the_wrong_shape_or_not_finite_names_theta():
    model, data = M.build_model("parity2"), D.parity(2)
    for bad in (np.zeros(8), np.zeros((2, 9)), np.array([np.nan] * 9), np.array([np.inf] + [0.0] * 8)):
        with pytest.raises(InvalidInput) as err:
            score(model, bad, data)
        assert err.value.field == "theta"
    with pytest.raises(InvalidInput, match=r"theta: mlp-2-2-1 needs 9 parameters"):
        score(model, np.zeros(5), data)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_load_checkpoint_reads_the_store_format():
    single = np.arange(9.0)
    theta, tick = load_checkpoint(_npz(theta0=single, tick=np.int64(42)))
    np.testing.assert_array_equal(theta, single)
    assert tick == 42
    runs = np.arange(27.0).reshape(3, 9)
    for run in range(3):
        theta, tick = load_checkpoint(_npz(theta0=runs, tick=np.int64(7)), run=run)
        np.testing.assert_array_equal(theta, runs[run])
        assert tick == 7


@pytest.mark.parametrize("blob,run,field", [
    (b"", 0, "checkpoint"),
    (b"not a zip at all", 0, "checkpoint"),
    (b"PK\x03\x04truncated", 0, "checkpoint"),
    (_npz(weights=np.zeros(9)), 0, "checkpoint"),
    (_npz(theta0=np.zeros((2, 3, 9))), 0, "checkpoint"),
    (_npz(theta0=np.zeros((2, 9)), tick=np.int64(1)), 2, "run"),
    (_npz(theta0=np.zeros(9), tick=np.int64(1)), -1, "run"),
])
def test_bad_checkpoints_name_the_field(blob, run, field):
    with pytest.raises(InvalidInput) as err:
        load_checkpoint(blob, run=run)
    assert err.value.field == field and str(err.value).startswith(field + ":")
