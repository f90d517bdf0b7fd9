"""Your own network: a user's torch module as the flat-θ model PMGD trains."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pmgd_node.config import ConfigError, JobConfig
from services import runtime
from services.evaluator.models import MLP, job_model
from services.evaluator.user_model import load_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
XOR = os.path.join(ROOT, "examples", "xor_task.py")
CNN = os.path.join(ROOT, "examples", "tiny_cnn_task.py")


def _task_file(tmp_path, body: str, name: str = "task_mod.py") -> str:
    path = tmp_path / name
    path.write_text("import numpy as np\nimport torch\n" + textwrap.dedent(body))
    return str(path)


def test_cost_and_gradient_equal_the_built_in_mlp(tmp_path):
    """A 2-2-1 sigmoid Sequential in float64 is the built-in MLP: same flat layout, same cost,
    and its gradient (torch.func, vmapped over runs) is the MLP's backprop gradient."""
    path = _task_file(tmp_path, """
        def task():
            x = torch.tensor([[0., 0.], [0., 1.], [1., 0.], [1., 1.]], dtype=torch.float64)
            y = torch.tensor([0., 1., 1., 0.], dtype=torch.float64)
            net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid(),
                                      torch.nn.Linear(2, 1), torch.nn.Sigmoid()).double()
            return dict(model=net, train=(x, y))
        """)
    config = JobConfig(model=f"{path}:task", seeds=5)
    model = job_model(config)
    assert model.num_params == 9 and model.dtype == np.float64
    theta = np.random.default_rng(3).normal(size=(5, 9))
    task = load_task(config.model)
    mlp = MLP((2, 2, 1))
    ours, theirs = model.prepare(task.train.x, task.train.y), mlp.prepare(task.train.x, task.train.y.astype(np.int64))
    np.testing.assert_allclose(model.cost(theta, ours), mlp.cost(theta, theirs), rtol=1e-12)
    np.testing.assert_allclose(model.gradient(theta, ours), mlp.gradient(theta, theirs), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(model.accuracy(theta, ours), mlp.accuracy(theta, theirs))
    # one run alone gives that run's numbers
    np.testing.assert_allclose(model.cost(theta[2], ours), mlp.cost(theta[2:3], theirs)[0], rtol=1e-12)


def test_initial_parameters_depend_on_the_seed_alone():
    a = job_model(JobConfig(model=f"{XOR}:task", seeds=3))
    first = a.init(np.random.default_rng([7, 1]), 2)
    again = a.init(np.random.default_rng([7, 1]), 2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1])
    assert np.abs(first).max() <= 1.0  # PyTorch's U(±1/√fan_in) for Linear(2, 3), Linear(3, 1)


def test_xor_trains_on_the_engine():
    result = runtime.run(JobConfig(model=f"{XOR}:task", perturbation="rcm", seeds=8, max_ticks=6000))
    assert result.solved.sum() >= 6
    assert result.num_params == 13


def test_a_users_cnn_lowers_its_cost():
    """Not a built-in network: conv → ReLU → pool → dense on generated 8×8 bar images."""
    config = JobConfig(model=f"{CNN}:task", eta=0.05, amplitude=0.01, batch=32, max_ticks=1500, eval_every=500,
                       target_accuracy=None, seeds=2)
    result = runtime.run(config)
    first, last = result.history[0].cost, result.history[-1].cost
    start = job_model(config)
    task = load_task(config.model)
    from services.chip.job import initial_parameters

    c0 = start.cost(initial_parameters(start, config), start.prepare(task.test.x, task.test.y))
    assert np.all(last < c0 - 0.1), (c0, first, last)
    assert np.all(result.final_accuracy > 0.8)


def test_callable_loss_and_the_package_form(tmp_path, monkeypatch):
    """``package.module:NAME`` imports from sys.path; a callable loss that vmap cannot run
    (it calls .item()) falls back to one run at a time with the same numbers."""
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(textwrap.dedent("""
        import torch

        def _data():
            x = torch.tensor([[-1., -1.], [-1., 1.], [1., -1.], [1., 1.]])
            return x, torch.tensor([[0.], [1.], [1.], [0.]])

        def net():
            return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1),
                                       torch.nn.Sigmoid())

        def plain():
            return dict(model=net(), train=_data(), loss="mse")

        def scalar_loss(out, target):
            return torch.tensor(((out - target) ** 2).sum(dim=1).mean().item())

        def custom():
            return dict(model=net(), train=_data(), loss=scalar_loss)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    plain, custom = job_model(JobConfig(model="mypkg.tasks:plain")), job_model(JobConfig(model="mypkg.tasks:custom"))
    theta = plain.init(np.random.default_rng(0), 4)
    data = load_task("mypkg.tasks:plain").train
    np.testing.assert_allclose(custom.cost(theta, custom.prepare(data.x, data.y)),
                               plain.cost(theta, plain.prepare(data.x, data.y)), rtol=1e-6)
    assert custom._vmap_loss is False


def test_buffers_stay_put(tmp_path):
    """Batch-norm statistics are state, not θ: training leaves them as the task built them."""
    path = _task_file(tmp_path, """
        NET = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                  torch.nn.Linear(4, 1), torch.nn.Sigmoid())
        def task():
            x = torch.tensor([[-1., -1.], [-1., 1.], [1., -1.], [1., 1.]])
            return dict(model=NET, train=(x, torch.tensor([[0.], [1.], [1.], [0.]])))
        """)
    config = JobConfig(model=f"{path}:task", max_ticks=200)
    model = job_model(config)
    assert model.num_params == 2 * 4 + 4 + 4 + 4 + 4 + 1  # BN's weight and bias are parameters
    before = {k: v.clone() for k, v in load_task(config.model).module.named_buffers()}
    runtime.run(config)
    after = dict(load_task(config.model).module.named_buffers())
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("body, words", [
    ("def task():\n    return 3\n", "must return a dict"),
    ("def task():\n    return dict(model=1, train=(np.zeros((2, 2)), np.zeros(2)))\n", "torch.nn.Module"),
    ("def task():\n    return dict(model=torch.nn.Linear(2, 1), train=(np.zeros((3, 2)), np.zeros(2)))\n",
     "x has 3 samples and y has 2"),
    ("def task():\n    return dict(model=torch.nn.Linear(2, 3), train=(np.zeros((4, 2)), np.zeros((4, 1))))\n",
     "mse compares outputs (B, 3)"),
    ("def task():\n    return dict(model=torch.nn.Linear(2, 3), train=(np.zeros((4, 2)), np.array([0, 1, 2, 3])),"
     " loss='cross_entropy')\n", "integer labels (N,) in [0, 3)"),
    ("def task():\n    return dict(model=torch.nn.Linear(5, 1), train=(np.zeros((4, 2)), np.zeros(4)))\n",
     "forward pass on train x[:4]"),
    ("def task():\n    return dict(model=torch.nn.Linear(2, 1), train=(np.zeros((4, 2)), np.zeros(4)), loss='l1')\n",
     "loss must be one of mse, cross_entropy"),
    ("def task():\n    return dict(model=torch.nn.Linear(2, 1), train=(np.zeros((4, 2)), np.zeros(4)), lr=1)\n",
     "unknown keys ['lr']"),
    ("def task():\n    raise RuntimeError('no data here')\n", "no data here"),
    ("import not_a_module_anywhere\n", "importing"),
])
def test_what_does_not_fit_is_named(tmp_path, body, words):
    path = _task_file(tmp_path, body, name=f"bad_{abs(hash(body))}.py")
    with pytest.raises(ConfigError) as err:
        job_model(JobConfig(model=f"{path}:task"))
    assert err.value.field == "model" and words in str(err.value), str(err.value)


def test_references_and_sizes_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        job_model(JobConfig(model=f"{tmp_path}/absent.py:task"))
    with pytest.raises(ConfigError, match="has no 'nothing'"):
        job_model(JobConfig(model=f"{XOR}:nothing"))
    with pytest.raises(ConfigError, match="label_smoothing"):
        job_model(JobConfig(model=f"{XOR}:task", label_smoothing=0.1))
    big = _task_file(tmp_path, """
        def task():
            return dict(model=torch.nn.Linear(2000, 1000), train=(np.zeros((2, 2000)), np.zeros((2, 1000))))
        """, name="big.py")
    with pytest.raises(ConfigError) as err:
        job_model(JobConfig(model=f"{big}:task", seeds=4))
    assert err.value.field == "seeds"


def test_pmgd_train_names_a_bad_model_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "services.cli", "train", "--model", f"{tmp_path}/nope.py:task",
                          "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "model" in out.stderr and "not found" in out.stderr and "Traceback" not in out.stderr
