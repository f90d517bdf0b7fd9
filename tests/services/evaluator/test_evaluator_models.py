"""Model zoo: parameter counts, flat layout, exact gradients, run-axis vectorisation."""

import numpy as np
import pytest
import torch

from services.evaluator import data as D
from services.evaluator import models as M

# ----------------------------------------------------------------------------- counts


def test_parameter_counts():
    assert M.MLP((2, 2, 1)).num_params == 9
    assert M.MLP((3, 3, 1)).num_params == 16
    assert M.fmnist_cnn(device="cpu").num_params == 14378
    assert M.cifar10_cnn(device="cpu").num_params == 26154


def test_build_model():
    m = M.build_model("parity3")
    assert isinstance(m, M.MLP) and m.layers == (3, 3, 1) and m.num_params == 16
    assert M.build_model("parity2", network="2-4-1").layers == (2, 4, 1)
    assert M.build_model("parity2", init_scale=0.5).init_scale == 0.5
    assert M.build_model("fmnist", device="cpu").num_params == 14378
    c = M.build_model("cifar10", device="cpu")
    assert c.num_params == 26154 and str(c.device) == "cpu"
    with pytest.raises(ValueError, match="inputs"):
        M.build_model("parity3", network="2-2-1")
    with pytest.raises(ValueError, match="2-2-1"):
        M.build_model("parity2", network="two layers")
    with pytest.raises(ValueError, match="unknown task"):
        M.build_model("imagenet")
    with pytest.raises(ValueError, match="one network"):
        M.build_model("fmnist", network="2-2-1", device="cpu")


# ----------------------------------------------------------------------------- MLP

XOR_THETA = np.array([20.0, 20.0, 20.0, 20.0, -10.0, -30.0, 20.0, -20.0, -10.0])


def test_mlp_flat_layout_and_xor_solution():
    """W1 (out, in) row-major, b1, W2, b2: h1 = OR, h2 = AND, out = OR and not AND."""
    m = M.MLP((2, 2, 1))
    d = D.parity(2)
    d = D.Dataset((d.x + 1) / 2, d.y, d.num_classes, d.name)  # XOR_THETA is written for {0, 1} inputs
    b = m.prepare(d.x, d.y)
    assert m.accuracy(XOR_THETA, b) == 1.0
    assert m.cost(XOR_THETA, b) < 1e-3

    def sig(z):
        return 1 / (1 + np.exp(-z))

    h = sig(d.x @ XOR_THETA[:4].reshape(2, 2).T + XOR_THETA[4:6])
    out = sig(h @ XOR_THETA[6:8] + XOR_THETA[8])
    np.testing.assert_allclose(m.forward(XOR_THETA, d.x)[:, 0], out, rtol=1e-12)
    np.testing.assert_allclose(m.cost(XOR_THETA, b), np.mean((out - d.y) ** 2), rtol=1e-12)


def test_mlp_init_scale_and_reproducibility():
    m = M.MLP((3, 3, 1), init_scale=0.3)
    a = m.init(np.random.default_rng(5), 50)
    assert a.shape == (50, 16) and a.dtype == np.float64
    assert np.abs(a).max() <= 0.3 and np.abs(a).max() > 0.25
    np.testing.assert_array_equal(a, m.init(np.random.default_rng(5), 50))


def _fd_gradient(model, theta, batch, h=1e-6):
    g = np.zeros_like(theta)
    for i in range(theta.shape[-1]):
        e = np.zeros_like(theta)
        e[..., i] = h
        g[..., i] = (model.cost(theta + e, batch) - model.cost(theta - e, batch)) / (2 * h)
    return g


@pytest.mark.parametrize("layers", [(2, 2, 1), (3, 3, 1), (4, 5, 3, 1), (2, 3, 3)])
@pytest.mark.parametrize("bsize", [1, 3, 8])
def test_mlp_gradient_matches_finite_differences(layers, bsize):
    m = M.MLP(layers, init_scale=2.0)
    rng = np.random.default_rng(0)
    theta = m.init(rng, 6)
    x = rng.integers(0, 2, size=(bsize, layers[0])).astype(float)
    y = rng.integers(0, max(2, layers[-1]), size=bsize)
    b = m.prepare(x, y)
    np.testing.assert_allclose(m.gradient(theta, b), _fd_gradient(m, theta, b), rtol=1e-6, atol=1e-9)


def test_mlp_multi_output_uses_one_hot_and_argmax():
    m = M.MLP((2, 3, 3))
    theta = m.init(np.random.default_rng(1), 4)
    x = np.array([[0.0, 1.0], [1.0, 1.0]])
    y = np.array([2, 0])
    out = m.forward(theta, x)  # (S, B, 3)
    t = np.eye(3)[y]
    np.testing.assert_allclose(m.cost(theta, m.prepare(x, y)), ((out - t) ** 2).sum(-1).mean(-1), rtol=1e-12)
    np.testing.assert_array_equal(m.accuracy(theta, m.prepare(x, y)), (out.argmax(-1) == y).mean(-1))


def test_mlp_vectorised_runs_equal_per_run_loop():
    m = M.MLP((3, 3, 1))
    rng = np.random.default_rng(2)
    theta = m.init(rng, 9)
    d = D.parity(3)
    for sl in (slice(0, 1), slice(2, 7), slice(None)):
        b = m.prepare(d.x[sl], d.y[sl])
        cost, acc, grad = m.cost(theta, b), m.accuracy(theta, b), m.gradient(theta, b)
        c2, a2 = m.evaluate(theta, b)
        np.testing.assert_allclose(c2, cost, rtol=1e-14)
        np.testing.assert_array_equal(a2, acc)
        for s in range(len(theta)):
            np.testing.assert_allclose(m.cost(theta[s], b), cost[s], rtol=1e-13)
            np.testing.assert_allclose(m.cost(theta[s : s + 1], b), cost[s : s + 1], rtol=1e-13)
            assert m.accuracy(theta[s], b) == acc[s]
            np.testing.assert_allclose(m.gradient(theta[s], b), grad[s], rtol=1e-12, atol=1e-15)


def test_mlp_per_run_batches():
    """x of shape (S, B, n_in) gives each run its own inputs."""
    m = M.MLP((2, 2, 1))
    rng = np.random.default_rng(3)
    theta = m.init(rng, 5)
    d = D.parity(2)
    idx = rng.integers(0, 4, size=(5, 2))
    b = m.prepare(d.x[idx], d.y[idx])
    cost, grad, acc = m.cost(theta, b), m.gradient(theta, b), m.accuracy(theta, b)
    for s in range(5):
        bs = m.prepare(d.x[idx[s]], d.y[idx[s]])
        np.testing.assert_allclose(cost[s], m.cost(theta[s], bs), rtol=1e-13)
        np.testing.assert_allclose(grad[s], m.gradient(theta[s], bs), rtol=1e-12, atol=1e-15)
        assert acc[s] == m.accuracy(theta[s], bs)


def test_mlp_saturation_is_finite_and_silent():
    m = M.MLP((2, 2, 1))
    theta = np.full((1, 9), -1e4)
    b = m.prepare(np.ones((1, 2)), np.ones(1, dtype=int))
    with np.errstate(all="raise"):
        c = m.cost(theta, b)
    assert np.isfinite(c).all()


def test_mlp_rejects_bad_shapes():
    m = M.MLP((2, 2, 1))
    with pytest.raises(ValueError):
        m.prepare(np.zeros((4, 3)), np.zeros(4))
    with pytest.raises(ValueError):
        m.cost(np.zeros((2, 8)), m.prepare(np.zeros((1, 2)), np.zeros(1)))
    with pytest.raises(ValueError):
        m.cost(np.zeros(8), m.prepare(np.zeros((1, 2)), np.zeros(1)))


# ----------------------------------------------------------------------------- CNN


def _module_like(cnn: M.CNN) -> torch.nn.Sequential:
    layers = []
    for spec in cnn.spec:
        if isinstance(spec, M.Conv):
            layers += [torch.nn.Conv2d(spec.c_in, spec.c_out, spec.k), torch.nn.ReLU()]
        elif isinstance(spec, M.Pool):
            layers.append(torch.nn.MaxPool2d(spec.k))
        else:
            layers += [torch.nn.Flatten(), torch.nn.Linear(spec.n_in, spec.n_out)]
    return torch.nn.Sequential(*layers).to(torch.float64)


def _load_flat(module, flat):
    off = 0
    for p in module.parameters():  # weight then bias, layer by layer
        n = p.numel()
        p.data.copy_(torch.from_numpy(flat[off : off + n]).view_as(p))
        off += n
    assert off == flat.size


@pytest.mark.parametrize("make", [M.fmnist_cnn, M.cifar10_cnn])
def test_cnn_matches_nn_module_forward_and_autograd(make):
    cnn = make(device="cpu", dtype="float64")
    rng = np.random.default_rng(0)
    theta = cnn.init(rng, 2)
    x = rng.random((5,) + cnn.input_shape)
    y = rng.integers(0, 10, size=5)
    b = cnn.prepare(x, y)
    cost, grad = cnn.cost(theta, b), cnn.gradient(theta, b)
    acc = cnn.accuracy(theta, b)
    for s in range(2):
        net = _module_like(cnn)
        _load_flat(net, theta[s])
        z = net(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(z, torch.from_numpy(y))
        loss.backward()
        g_ref = torch.cat([p.grad.flatten() for p in net.parameters()]).numpy()
        np.testing.assert_allclose(cost[s], loss.item(), rtol=1e-12)
        np.testing.assert_allclose(grad[s], g_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(cnn.forward(theta[s], x), z.detach().numpy(), rtol=1e-12)
        assert acc[s] == (z.argmax(1).numpy() == y).mean()


def test_cnn_stores_cpu_batches_channels_last_with_the_same_costs():
    """On the CPU a batch of two or more images is stored channels-last (oneDNN's convolutions
    are 1.25–2.2× faster on it, docs/benchmarks.md) whatever strides it arrives with, a
    stride-0 channel axis (``x[:, None]``) included; one image keeps its layout. The costs
    equal those of the plain nn.Module on the plain NCHW tensor."""
    rng = np.random.default_rng(4)
    for make, strides in ((M.fmnist_cnn, (784, 1, 28, 1)), (M.cifar10_cnn, (3072, 1, 96, 3))):
        cnn = make(device="cpu", dtype="float64")
        theta = cnn.init(rng, 1)
        net = _module_like(cnn)
        _load_flat(net, theta[0])
        c, h, w = cnn.input_shape
        plain = rng.random((4, c, h, w))
        y = rng.integers(0, 10, size=4)
        for x in (plain, plain[:, None, 0] if c == 1 else plain.transpose(0, 2, 3, 1).transpose(0, 3, 1, 2)):
            b = cnn.prepare(x, y)
            assert b.x.stride() == strides
            ref = torch.nn.functional.cross_entropy(net(torch.from_numpy(plain)), torch.from_numpy(y)).item()
            np.testing.assert_allclose(cnn.cost(theta, b)[0], ref, rtol=1e-12)
        per_run = cnn.prepare(np.stack([plain, plain]), np.stack([y, y]))
        assert per_run.x.stride() == (4 * c * h * w,) + strides
        assert cnn.prepare(plain[:1], y[:1]).x.stride() == (c * h * w, h * w, w, 1)


def test_cnn_gradient_matches_finite_differences():
    cnn = M.fmnist_cnn(device="cpu", dtype="float64")
    rng = np.random.default_rng(1)
    theta = cnn.init(rng, 1)
    b = cnn.prepare(rng.random((2, 1, 28, 28)), rng.integers(0, 10, size=2))
    g = cnn.gradient(theta, b)[0]
    coords = [0, 150, 159, 2000, 4799, 10000, 14047, 14100, 14377]  # conv1 w/b, conv2, conv3, dense w/b
    h = 1e-6
    for i in coords:
        e = np.zeros_like(theta)
        e[0, i] = h
        fd = (cnn.cost(theta + e, b)[0] - cnn.cost(theta - e, b)[0]) / (2 * h)
        assert fd == pytest.approx(g[i], rel=1e-5, abs=1e-8)


def test_cnn_float32_runs_equal_per_run_loop_and_accept_tensors():
    cnn = M.cifar10_cnn(device="cpu")
    rng = np.random.default_rng(2)
    theta = cnn.init(rng, 2)
    assert theta.dtype == np.float32
    x = rng.random((3, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, size=3)
    b = cnn.prepare(x, y)
    cost, acc = cnn.evaluate(theta, b)
    assert cost.dtype == np.float64 and cost.shape == (2,) and acc.shape == (2,)
    grad = cnn.gradient(theta, b)
    assert grad.shape == (2, 26154) and grad.dtype == np.float32
    for s in range(2):
        assert cnn.cost(theta[s], b) == pytest.approx(cost[s], rel=1e-6)
        np.testing.assert_allclose(cnn.gradient(theta[s : s + 1], b)[0], grad[s], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cnn.cost(torch.from_numpy(theta), b), cost, rtol=1e-6)
    np.testing.assert_allclose(cnn.cost(theta.astype(np.float64), b), cost, rtol=1e-6)


def test_cnn_per_run_batches():
    cnn = M.fmnist_cnn(device="cpu")
    rng = np.random.default_rng(3)
    theta = cnn.init(rng, 2)
    x = rng.random((2, 3, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, size=(2, 3))
    cost = cnn.cost(theta, cnn.prepare(x, y))
    for s in range(2):
        assert cost[s] == pytest.approx(cnn.cost(theta[s], cnn.prepare(x[s], y[s])), rel=1e-6)


def test_cnn_init_is_pytorch_default_and_seeded():
    cnn = M.fmnist_cnn(device="cpu", init_scale=1.0)
    a = cnn.init(np.random.default_rng(7), 4)
    np.testing.assert_array_equal(a, cnn.init(np.random.default_rng(7), 4))
    conv1 = a[:, :160]
    assert np.abs(conv1).max() <= 1 / 3 and np.abs(conv1).max() > 0.3  # fan_in 9
    dense = a[:, 14048:]
    assert np.abs(dense).max() <= 1 / np.sqrt(32)
    half = M.fmnist_cnn(device="cpu", init_scale=0.5).init(np.random.default_rng(7), 4)
    np.testing.assert_allclose(half, a * 0.5, rtol=1e-6)


def test_cnn_rejects_bad_shapes():
    cnn = M.fmnist_cnn(device="cpu")
    with pytest.raises(ValueError):
        cnn.prepare(np.zeros((2, 3, 28, 28), np.float32), np.zeros(2))
    with pytest.raises(ValueError):
        cnn.cost(np.zeros((1, 10), np.float32), cnn.prepare(np.zeros((1, 1, 28, 28), np.float32), [0]))
    with pytest.raises(ValueError, match="Dense"):
        M.CNN((M.Conv(1, 2), M.Dense(10, 10)), (1, 28, 28), 10)


@pytest.mark.parametrize("runs", [1, 3])
def test_cnn_label_smoothing_is_cross_entropy_against_smoothed_labels(runs):
    """C = −Σ_c q_c log p_c with q = (1 − s)·one-hot + s/classes, per run; and its gradient."""
    import torch

    s = 0.1
    plain, smooth = M.build_model("fmnist", device="cpu"), M.build_model("fmnist", device="cpu", label_smoothing=s)
    rng = np.random.default_rng(0)
    theta = plain.init(rng, runs)
    x, y = rng.normal(size=(6, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 6)
    batch = plain.prepare(x, y)
    logp = torch.log_softmax(torch.from_numpy(plain.forward(theta, x).reshape(runs, 6, 10)).double(), dim=-1).numpy()
    q = np.full((6, 10), s / 10) + (1 - s) * np.eye(10)[y]
    expected = -(q * logp).sum(-1).mean(-1)
    np.testing.assert_allclose(np.atleast_1d(smooth.cost(theta, batch)), expected, rtol=1e-5)
    assert np.all(np.atleast_1d(plain.cost(theta, batch)) != np.atleast_1d(smooth.cost(theta, batch)))
    # The backprop baseline trains the same smoothed cost: autograd against a finite difference.
    d = np.zeros_like(theta[:1])
    d[0, -1] = 1e-2  # the last dense bias
    fd = (smooth.cost(theta[:1] + d, batch) - smooth.cost(theta[:1] - d, batch)) / 2e-2
    np.testing.assert_allclose(smooth.gradient(theta[:1], batch)[0, -1], fd, rtol=1e-2)


def test_label_smoothing_is_refused_for_the_mse_models():
    with pytest.raises(ValueError, match="label_smoothing.*MSE"):
        M.build_model("parity2", label_smoothing=0.1)
