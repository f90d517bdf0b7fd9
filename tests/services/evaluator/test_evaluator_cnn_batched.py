"""The CNN's batched runs (grouped convolutions, ``CNN.run_logits``) against a plain loop
over runs of ``CNN.logits``, one run at a time, as the model computed them before."""

import numpy as np
import pytest
import torch

from services.evaluator import models as M

F = torch.nn.functional

# Measured largest differences, batched against the loop, over the cases below (one torch
# thread): float32 costs 2.1e-7 relative, logits equal; float64 costs 4.4e-16, logits 5.8e-16
# of the largest logit.
RTOL = {"float32": 1e-5, "float64": 1e-12}


def _per_run_reference(cnn: M.CNN, theta: np.ndarray, batch: M.Batch):
    """(cost, accuracy, logits) one run after another: today's per-run loop, spelled out."""
    t = torch.from_numpy(theta)
    costs, accs, zs = [], [], []
    with torch.inference_mode():
        for s in range(t.shape[0]):
            x = batch.x if batch.x.ndim == 4 else batch.x[s]
            y = batch.y if batch.y.ndim == 1 else batch.y[s]
            z = cnn.logits(t[s], x)
            costs.append(F.cross_entropy(z, y).item())
            accs.append((z.argmax(dim=1) == y).to(torch.float64).mean().item())
            zs.append(z.numpy().copy())
    return np.array(costs), np.array(accs), np.stack(zs)


def _case(make, dtype, runs, per_run, size=6, seed=0):
    cnn = make(device="cpu", dtype=dtype)
    rng = np.random.default_rng(seed)
    theta = cnn.init(rng, runs)
    lead = (runs, size) if per_run else (size,)
    x = rng.random(lead + cnn.input_shape).astype(cnn.dtype)
    y = rng.integers(0, cnn.num_classes, size=lead)
    return cnn, theta, x, y


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("make", [M.fmnist_cnn, M.cifar10_cnn])
@pytest.mark.parametrize("per_run", [False, True], ids=["shared", "per-run"])
@pytest.mark.parametrize("runs", [1, 2, 4, 16])
def test_batched_cost_and_evaluate_equal_the_per_run_loop(make, dtype, runs, per_run):
    """cost, evaluate and forward for S runs, all in one call (runs_per_call = S), in calls of
    3 runs (the last one shorter) and by the CPU default, equal the per-run loop."""
    cnn, theta, x, y = _case(make, dtype, runs, per_run)
    batch = cnn.prepare(x, y)
    ref_cost, ref_acc, ref_z = _per_run_reference(cnn, theta, batch)
    rtol = RTOL[dtype]
    for per_call in (runs, 3, None):
        cnn.runs_per_call = per_call
        cost = cnn.cost(theta, batch)
        c, a = cnn.evaluate(theta, batch)
        assert cost.shape == c.shape == a.shape == (runs,) and cost.dtype == np.float64
        np.testing.assert_allclose(cost, ref_cost, rtol=rtol, atol=0)
        np.testing.assert_allclose(c, ref_cost, rtol=rtol, atol=0)
        np.testing.assert_array_equal(a, ref_acc)
        if not per_run:
            z = cnn.forward(theta, x)
            np.testing.assert_allclose(z, ref_z, rtol=10 * rtol, atol=10 * rtol * np.abs(ref_z).max())
    if runs == 1:  # one run keeps the plain path: the loop's numbers bit for bit
        np.testing.assert_array_equal(cnn.cost(theta, batch), ref_cost)
        np.testing.assert_array_equal(cnn.evaluate(theta, batch)[0], ref_cost)


def test_several_runs_take_the_batched_path(monkeypatch):
    """S > 1 runs go through ``run_logits`` in ceil(S / k) calls, never through ``logits``;
    one run goes through ``logits`` alone."""
    cnn, theta, x, y = _case(M.fmnist_cnn, "float32", 16, False)
    batch = cnn.prepare(x, y)
    calls = {"logits": 0, "run_logits": 0}

    def counting(name):
        f = getattr(cnn, name)

        def counted(*args):
            calls[name] += 1
            return f(*args)

        return counted

    for name in calls:
        monkeypatch.setattr(cnn, name, counting(name))
    cnn.runs_per_call = None  # B = 6: all 16 runs in one call on the CPU
    cnn.evaluate(theta, batch)
    assert calls == {"logits": 0, "run_logits": 1}
    cnn.runs_per_call = 5
    cnn.cost(theta, batch)
    assert calls == {"logits": 0, "run_logits": 5}
    cnn.cost(theta[:1], batch)
    assert calls == {"logits": 1, "run_logits": 5}


def test_cpu_default_runs_per_call():
    cnn = M.fmnist_cnn(device="cpu")
    per = M.CNN.CPU_IMAGES_PER_CALL
    assert cnn._runs_per_call(16, 1) == 16
    assert cnn._runs_per_call(16, per // 4) == 4
    assert cnn._runs_per_call(16, per) == 1
    assert cnn._runs_per_call(16, 10 * per) == 1
    cnn.runs_per_call = 5
    assert cnn._runs_per_call(16, 10 * per) == 5 and cnn._runs_per_call(3, 1) == 3


def test_batched_runs_accept_the_engines_2s_thetas_on_shared_inputs_only():
    """The engine measures C₀ beside the perturbed pass: 2S thetas on one shared batch. Inputs
    with a run axis must match theta's runs."""
    cnn, theta, x, y = _case(M.cifar10_cnn, "float32", 2, True, size=3)
    with pytest.raises(ValueError, match="runs"):
        cnn.cost(np.concatenate([theta, theta]), cnn.prepare(x, y))
    shared = cnn.prepare(x[0], y[0])
    both = cnn.cost(np.concatenate([theta, theta + 1e-3]), shared)
    np.testing.assert_allclose(both[:2], cnn.cost(theta, shared), rtol=1e-5)
