"""Your own network: any torch module trained by PMGD as a flat-θ :class:`Model`.

A job with ``model = "xor_task.py:task"`` (a file) or ``"package.module:task"`` (an importable
module) calls ``task()`` once per process. It returns a mapping, or a :class:`Task`::

    model   torch.nn.Module        all of its parameters become θ; buffers (batch-norm
                                   statistics) stay put, and it runs in eval mode
    train   (x, y)                 tensors or arrays: N inputs and N targets
    test    (x, y), optional       the held-out set evaluations score (default: train)
    loss    "mse" (default), "cross_entropy", or a callable loss(outputs, targets) -> scalar

Flat layout: the parameters in ``named_parameters()`` order, each tensor row-major, so node k
owns a contiguous slice of that list exactly as for the built-in networks.

Costs, over the B samples of a batch (outputs ``y (B, O)``):

* ``mse``: ``C = (1/B) Σ_b Σ_o (y_bo − t_bo)²`` with targets (B, O), or (B,) for O = 1 (the
  built-in MLP's cost);
* ``cross_entropy``: ``C = −(1/B) Σ_b Σ_c q_bc log softmax(y_b)_c`` with integer labels and
  ``q = (1 − s)·onehot + s/O`` (s = the job's ``label_smoothing``);
* a callable: its value on (outputs, targets) of one run.

Accuracy: integer labels → ``argmax y_b == t_b``; one output → ``(y_b > ½) == (t_b > ½)``;
several outputs with real targets → ``argmax y_b == argmax t_b``.

All S runs go through the network in one call: ``torch.func.vmap`` over the run axis of
``functional_call(module, θ_s as views, x)``. Run r's initial θ⁰ comes from re-running every
submodule's ``reset_parameters()`` with torch's generator seeded from the run's own stream, so
it depends on the job seed alone (parameters no submodule resets keep the values the task
built, the same for every run); ``task()`` itself runs with torch seeded to 0, so every
process builds the same module.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pmgd_node.config import MAX_JOB_VALUES, ConfigError

from .data import Dataset
from .models import Batch, TorchModel

LOSSES = ("mse", "cross_entropy")
_TASK_KEYS = ("model", "train", "test", "loss")
_PROBE = 4  # samples of the dry forward pass that checks shapes at load


@dataclass(frozen=True)
class Task:
    """The typed form of what a task function returns (the same fields as its mapping)."""

    model: Any  # torch.nn.Module
    train: tuple
    test: tuple | None = None
    loss: str | Callable = "mse"


def _error(message: str) -> ConfigError:
    return ConfigError("model", message)


def _torch():
    import torch  # local: the job config and the CLI stay free of torch until a job runs

    return torch


# ------------------------------------------------------------------------- loading


def _import(ref: str):
    """The module a reference names: a ``.py`` file (relative to the working directory) or a
    dotted module name on ``sys.path``."""
    where = ref.rsplit(":", 1)[0]
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise _error(f"file {where!r} not found (looked at {path})")
        # One module per file and version: two files of the same name do not collide.
        name = "pmgd_user_" + hashlib.sha256(path.encode()).hexdigest()[:16]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(name, None)
            raise _error(f"importing {where} failed: {type(err).__name__}: {err}") from None
        return module
    try:
        return importlib.import_module(where)
    except Exception as err:
        raise _error(f"cannot import module {where!r}: {type(err).__name__}: {err}") from None


def confine_model(ref: str, roots: list[str]) -> None:
    """Refuse a reference that is not a ``.py`` file inside one of ``roots`` (symbolic links
    resolved): what a service accepts from the network, since a model is code it runs."""
    where = ref.rpartition(":")[0]
    if not roots:
        raise _error("this server accepts no custom models (its model_roots setting is empty)")
    if not where.endswith(".py"):
        raise _error(f"must name a .py file under {', '.join(roots)}; got {where!r}")
    path = os.path.realpath(where)
    if not any(os.path.commonpath([path, os.path.realpath(r)]) == os.path.realpath(r) for r in roots):
        raise _error(f"{where!r} is outside the directories this server runs models from ({', '.join(roots)})")


def _as_array(value, what: str) -> np.ndarray:
    torch = _torch()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as err:
        raise _error(f"{what} must be a tensor or array; got {type(value).__name__} ({err})") from None
    if arr.dtype == object or arr.ndim == 0:
        raise _error(f"{what} must be a tensor or array with a sample axis; got {arr.dtype} of shape {arr.shape}")
    return arr


def _pair(value, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise _error(f"{what} must be a pair (x, y) of inputs and targets; got {type(value).__name__}")
    x, y = _as_array(value[0], f"{what} x"), _as_array(value[1], f"{what} y")
    if len(x) != len(y) or not len(x):
        raise _error(f"{what}: x has {len(x)} samples and y has {len(y)}; they must match and not be empty")
    return x, y


@dataclass(frozen=True, eq=False)
class LoadedTask:
    """A task as the job uses it: the module, its data as numpy, the loss."""

    ref: str
    module: Any
    train: Dataset
    test: Dataset
    loss: str | Callable


_CACHE: dict[tuple, LoadedTask] = {}


def load_task(ref: str) -> LoadedTask:
    """Import ``ref`` ("file.py:NAME" or "package.module:NAME"), call it and check what it gives
    (once per process and file version). Every problem is a :class:`ConfigError` on ``model``."""
    where, _, name = ref.rpartition(":")
    path = os.path.abspath(where) if where.endswith(".py") else where
    stamp = os.stat(path).st_mtime_ns if where.endswith(".py") and os.path.isfile(path) else 0
    key = (path, name, stamp)
    if key in _CACHE:
        return _CACHE[key]
    module = _import(ref)
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:20]
        raise _error(f"{where} has no {name!r} (it defines {', '.join(public) or 'nothing public'})")
    torch = _torch()
    factory = getattr(module, name)
    spec = factory
    if callable(factory) and not isinstance(factory, (Task, Mapping)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                spec = factory()
            except Exception as err:
                raise _error(f"{ref}() failed: {type(err).__name__}: {err}") from None
    if isinstance(spec, Task):
        spec = {k: getattr(spec, k) for k in _TASK_KEYS}
    if not isinstance(spec, Mapping):
        raise _error(f"{ref} must return a dict with model, train (and optionally test, loss) or a Task; "
                     f"got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_TASK_KEYS))
    missing = [k for k in ("model", "train") if spec.get(k) is None]
    if unknown or missing:
        raise _error(f"{ref}: " + (f"unknown keys {unknown} " if unknown else "")
                     + (f"missing {missing} " if missing else "") + f"(allowed: {', '.join(_TASK_KEYS)})")
    net = spec["model"]
    if not isinstance(net, torch.nn.Module):
        raise _error(f"{ref}: model must be a torch.nn.Module; got {type(net).__name__}")
    loss = spec.get("loss") or "mse"
    if not callable(loss) and loss not in LOSSES:
        raise _error(f"{ref}: loss must be one of {', '.join(LOSSES)} or a callable; got {loss!r}")
    x, y = _pair(spec["train"], "train")
    tx, ty = _pair(spec["test"], "test") if spec.get("test") is not None else (x, y)
    if tx.shape[1:] != x.shape[1:]:
        raise _error(f"{ref}: test inputs have shape {tx.shape[1:]} per sample, train inputs {x.shape[1:]}")
    outputs = _probe(ref, net, x, y, loss)
    task = LoadedTask(ref, net, Dataset(x, y, outputs, f"{ref} train"), Dataset(tx, ty, outputs, f"{ref} test"), loss)
    _CACHE[key] = task
    return task


def _probe(ref: str, net, x: np.ndarray, y: np.ndarray, loss) -> int:
    """Run the module once on a few training samples; the number of outputs O, or a clear
    error when outputs and targets do not fit the loss."""
    torch = _torch()
    dtypes = {p.dtype for p in net.parameters()}
    if not dtypes:
        raise _error(f"{ref}: the model has no parameters to train")
    if len(dtypes) > 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        raise _error(f"{ref}: parameters must all be float32 or all float64; got {sorted(map(str, dtypes))}")
    dtype = next(iter(dtypes))
    try:
        with torch.no_grad():
            out = net.eval()(torch.as_tensor(x[:_PROBE], dtype=dtype))
    except Exception as err:
        raise _error(f"{ref}: the forward pass on train x[:{_PROBE}] (shape {x[:_PROBE].shape}) failed: "
                     f"{type(err).__name__}: {err}") from None
    if not isinstance(out, torch.Tensor) or out.ndim not in (1, 2) or out.shape[0] != min(len(x), _PROBE):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _error(f"{ref}: the model must return outputs (B, O) for inputs (B, …); got {shape}")
    outputs = 1 if out.ndim == 1 else int(out.shape[1])
    if loss == "cross_entropy":
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= outputs:
            raise _error(f"{ref}: cross_entropy needs integer labels (N,) in [0, {outputs}) for {outputs} outputs; "
                         f"got {y.dtype} of shape {y.shape}")
        if outputs < 2:
            raise _error(f"{ref}: cross_entropy needs at least 2 outputs (one per class); the model has 1")
    elif loss == "mse":
        per_sample = y.shape[1:] if y.ndim > 1 else (1,)
        if math.prod(per_sample) != outputs or y.ndim > 2:
            raise _error(f"{ref}: mse compares outputs (B, {outputs}) with targets; got targets of shape {y.shape}")
    return outputs


# ------------------------------------------------------------------------- the model


class TorchModule(TorchModel):
    """A user's torch module as a function of one flat parameter vector (module docstring)."""

    def __init__(self, task: LoadedTask, device: str | None = None, init_scale: float | None = None,
                 label_smoothing: float = 0.0):
        torch = _torch()
        if label_smoothing and task.loss != "cross_entropy":
            raise ConfigError("label_smoothing", "smooths a cross_entropy loss; this model's loss is "
                                                 f"{task.loss if isinstance(task.loss, str) else 'a callable'}")
        self.task = task
        self.name = task.ref
        self.loss = task.loss
        self.label_smoothing = float(label_smoothing)
        self.init_scale = 1.0 if init_scale is None else float(init_scale)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # The module object is shared by every job of this process that names the task: its
        # parameters are never read (functional_call swaps in θ), so it is left as built.
        self.module = task.module.to(self.device).eval()
        params = dict(self.module.named_parameters())
        self.torch_dtype = next(iter(params.values())).dtype
        self.dtype = np.dtype("float32" if self.torch_dtype == torch.float32 else "float64")
        self._layout = []  # (name, start, end, shape)
        off = 0
        for name, p in params.items():
            self._layout.append((name, off, off + p.numel(), tuple(p.shape)))
            off += p.numel()
        self.num_params = off
        self.outputs = task.train.num_classes
        self._buffers = {n: b for n, b in self.module.named_buffers()}
        self.classify = self.loss == "cross_entropy" or np.issubdtype(task.train.y.dtype, np.integer)
        self._vmap_loss = True  # a callable loss that vmap cannot run falls back to a loop

    def __repr__(self) -> str:
        return f"TorchModule({self.name!r}, params={self.num_params}, device={str(self.device)!r})"

    # -- parameters
    def _flat(self, module) -> np.ndarray:
        torch = _torch()
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        return flat.cpu().numpy().astype(self.dtype)

    def init(self, rng: np.random.Generator, runs: int) -> np.ndarray:
        """Each row: every submodule's ``reset_parameters()`` under torch seeded from ``rng``,
        times ``init_scale`` (see the module docstring)."""
        torch = _torch()
        rows = []
        for _ in range(int(runs)):
            seed = int(rng.integers(2**63 - 1))
            fresh = copy.deepcopy(self.task.module).cpu()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for sub in fresh.modules():
                    reset = getattr(sub, "reset_parameters", None)
                    if callable(reset):
                        reset()
            rows.append(self._flat(fresh) * self.dtype.type(self.init_scale))
        return np.stack(rows).astype(self.dtype, copy=False)

    # -- data
    def prepare(self, x, y) -> Batch:
        """x (B, …) shared by every run; targets as the loss wants them (labels or values)."""
        torch = _torch()
        xt = torch.as_tensor(np.asarray(x), dtype=self.torch_dtype, device=self.device)
        y = np.asarray(y)
        if self.classify:
            yt = torch.as_tensor(y.astype(np.int64), device=self.device)
        else:
            yt = torch.as_tensor(y, dtype=self.torch_dtype, device=self.device)
            if self.loss == "mse":
                yt = yt.reshape(len(y), self.outputs)
        return Batch(x=xt, y=yt, target=yt, size=int(len(y)))

    # -- forward
    def _one(self, flat, x):
        """Outputs (B, O) of one run: the module with θ's views as its parameters."""
        from torch.func import functional_call

        params = {name: flat[a:b].view(shape) for name, a, b, shape in self._layout}
        out = functional_call(self.module, (params, self._buffers), (x,))
        return out.reshape(out.shape[0], -1)

    def _outputs(self, t, batch: Batch):
        """Outputs (S, B, O) of every run in one vmapped call."""
        from torch.func import vmap

        return vmap(self._one, in_dims=(0, None))(t, batch.x)

    def _loss_one(self, out, target):
        F = _torch().nn.functional
        if self.loss == "mse":
            return ((out - target) ** 2).sum(dim=1).mean()
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, target, label_smoothing=self.label_smoothing)
        return self.loss(out, target)

    def _batch_costs(self, z, batch: Batch):
        torch = _torch()
        from torch.func import vmap

        if self._vmap_loss:
            try:
                return vmap(self._loss_one, in_dims=(0, None))(z, batch.target)
            except Exception:  # e.g. a callable loss that calls .item(): one run at a time
                if not callable(self.loss):
                    raise
                self._vmap_loss = False
        return torch.stack([torch.as_tensor(self._loss_one(z[s], batch.target)) for s in range(z.shape[0])])

    def _batch_correct(self, z, batch: Batch):
        torch = _torch()
        if self.classify:
            hit = z.argmax(dim=2) == batch.y
        elif self.outputs == 1:
            hit = (z[..., 0] > 0.5) == (batch.y.reshape(-1) > 0.5)
        else:
            hit = z.argmax(dim=2) == batch.y.reshape(batch.size, -1).argmax(dim=1)
        return hit.to(torch.float64).mean(dim=1)

    def forward(self, theta, x) -> np.ndarray:
        """Outputs as numpy: theta (S, P) and x (B, …) -> (S, B, O)."""
        torch = _torch()
        t, single = self._theta(theta)
        xt = torch.as_tensor(np.asarray(x), dtype=self.torch_dtype, device=self.device)
        with torch.inference_mode():
            out = self._outputs(t, Batch(xt, None, None, len(xt))).cpu().numpy()
        return out[0] if single else out

    def gradient(self, theta, batch: Batch) -> np.ndarray:
        """dC/dθ by ``torch.func.grad`` through the same functional forward pass, vmapped over runs."""
        torch = _torch()
        from torch.func import grad, vmap

        t, single = self._theta(theta)

        def loss_of(flat, x, target):
            return self._loss_one(self._one(flat, x), target)

        with torch.enable_grad():
            if self._vmap_loss:
                try:
                    g = vmap(grad(loss_of), in_dims=(0, None, None))(t, batch.x, batch.target)
                except Exception:
                    if not callable(self.loss):
                        raise
                    self._vmap_loss = False
            if not self._vmap_loss:
                g = torch.stack([grad(loss_of)(t[s], batch.x, batch.target) for s in range(t.shape[0])])
        g = g.detach().cpu().numpy()
        return g[0] if single else g


def user_model(config, device: str | None = None) -> TorchModule:
    """The model of a job whose ``model`` names the user's task; its size is checked against
    the job's runs here, where P is first known."""
    model = TorchModule(load_task(config.model), device=device, init_scale=config.init_scale,
                        label_smoothing=config.label_smoothing)
    if model.num_params * config.seeds > MAX_JOB_VALUES:
        raise ConfigError("seeds", f"the job holds {model.num_params:,} parameters × {config.seeds:,} runs = "
                                   f"{model.num_params * config.seeds:,} values; at most {MAX_JOB_VALUES:,}")
    return model


def user_data(config, split: str) -> Dataset:
    """The user's training set (``split`` "train") or held-out set ("test"; the training set
    when the task gives none)."""
    task = load_task(config.model)
    return task.train if split == "train" else task.test
