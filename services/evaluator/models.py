"""The model zoo: every network as a function of ONE flat parameter vector.

A model is ``y = f(x; θ)`` with all weights and biases in a flat vector θ of length P,
so a perturbation θ̃ and an update ``θ⁰ ← θ⁰ − η G`` are plain vector operations and
parameter nodes can own any slice of θ. Every method takes ``theta`` with an optional
leading run axis S (independent runs, e.g. 100 random initialisations): ``(S, P)`` gives
``(S,)`` costs, ``(P,)`` gives a scalar-shaped result.

Costs (mean over the B samples of a batch):

* :class:`MLP` (sigmoid hidden and output layers), squared error
  ``C = (1/B) Σ_b Σ_o (y_bo − t_bo)²`` with ``t`` = the label for one output and the
  one-hot label for several;
* :class:`CNN` (ReLU convolutions, 2×2 max-pooling, dense read-out), cross-entropy
  ``C = −(1/B) Σ_b log softmax(z_b)[y_b]``.

Flat layout: layer by layer, the weight tensor in row-major order (MLP ``W[out, in]``,
conv ``W[out, in, kh, kw]``, dense ``W[out, in]``), then the bias ``b[out]``. The dense
layer reads the conv features flattened in (C, H, W) order, as ``torch.flatten`` does.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Batch",
    "Model",
    "MLP",
    "CNN",
    "Conv",
    "Pool",
    "Dense",
    "fmnist_cnn",
    "cifar10_cnn",
    "build_model",
]


@dataclass(frozen=True, eq=False)
class Batch:
    """A data slice converted once into what a model's forward pass consumes.

    ``x`` and ``target`` are model-specific (numpy arrays for :class:`MLP`, torch tensors
    on the model's device for :class:`CNN`); ``y`` holds the int64 labels in the same
    container; ``size`` is the number of samples B.
    """

    x: Any
    y: Any
    target: Any
    size: int
    aux: Any = None


class Model(ABC):
    """A network whose parameters are one flat vector, with an optional run axis."""

    name: str
    num_params: int
    dtype: np.dtype

    @abstractmethod
    def init(self, rng: np.random.Generator, runs: int) -> np.ndarray:
        """Random initial parameters, shape (runs, P), dtype ``self.dtype``."""

    @abstractmethod
    def prepare(self, x: np.ndarray, y: np.ndarray) -> Batch:
        """Convert a data slice once (device transfer, one-hot targets, layout)."""

    @abstractmethod
    def cost(self, theta, batch: Batch) -> np.ndarray:
        """Mean cost over the batch: theta (S, P) -> (S,) float64."""

    @abstractmethod
    def accuracy(self, theta, batch: Batch) -> np.ndarray:
        """Fraction of the batch classified correctly: (S, P) -> (S,) float64."""

    @abstractmethod
    def gradient(self, theta, batch: Batch) -> np.ndarray:
        """Exact dC/dθ of :meth:`cost`: (S, P) -> (S, P)."""

    def evaluate(self, theta, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """``(cost, accuracy)``; models override this to share one forward pass."""
        return self.cost(theta, batch), self.accuracy(theta, batch)


# --------------------------------------------------------------------------- MLP


def _sigmoid_(z: np.ndarray) -> np.ndarray:
    """In-place logistic σ(z) = 1 / (1 + e^(−z)); avoids temporaries on the hot path.

    e^(−z) is capped at e^700 so that saturated units give 0 without an overflow warning."""
    np.negative(z, out=z)
    return _sigmoid_of_negated_(z)


def _sigmoid_of_negated_(nz: np.ndarray) -> np.ndarray:
    """In place: σ(z) from nz = −z, i.e. 1 / (1 + e^(min(nz, 700)))."""
    z = nz
    np.minimum(z, 700.0, out=z)
    np.exp(z, out=z)
    z += 1.0
    np.reciprocal(z, out=z)
    return z


class MLP(Model):
    """Fully connected sigmoid network, numpy float64, every run vectorised.

    Layer l computes ``a_l = σ(W_l a_{l−1} + b_l)`` (output layer included). Internally
    activations are laid out (S, features, B) so each layer is one batched matmul
    ``W (S,out,in) @ a (S,in,B)``; with inputs shared by all runs the first layer,
    bias included, is a single 2-D GEMM on the flat parameters (see :meth:`prepare`).
    Tiny networks are dominated by per-call numpy overhead, so the hot path keeps the
    number of numpy calls low (about 20 for a 2-2-1 cost()).

    ``prepare`` accepts x of shape (B, n_in) shared by all runs, or (S, B, n_in) with
    one batch per run (labels (B,) or (S, B) accordingly).
    """

    def __init__(self, layers: Sequence[int] = (2, 2, 1), init_scale: float = 1.0) -> None:
        layers = tuple(int(n) for n in layers)
        if len(layers) < 2 or any(n < 1 for n in layers):
            raise ValueError(f"MLP layers must be >= 2 positive sizes, got {layers}")
        self.layers = layers
        self.init_scale = float(init_scale)
        self.name = "mlp-" + "-".join(str(n) for n in layers)
        self.dtype = np.dtype(np.float64)
        # (w_start, b_start, b_end, n_out, n_in) per layer
        self._slices: list[tuple[int, int, int, int, int]] = []
        off = 0
        for n_in, n_out in zip(layers[:-1], layers[1:]):
            self._slices.append((off, off + n_out * n_in, off + n_out * n_in + n_out, n_out, n_in))
            off += n_out * n_in + n_out
        self.num_params = off

    def __repr__(self) -> str:
        return f"MLP(layers={self.layers}, init_scale={self.init_scale})"

    # -- parameters
    def init(self, rng: np.random.Generator, runs: int) -> np.ndarray:
        """Uniform(−1, 1) · init_scale for every weight and bias."""
        return rng.uniform(-1.0, 1.0, size=(int(runs), self.num_params)) * self.init_scale

    def _theta(self, theta) -> tuple[np.ndarray, bool]:
        if type(theta) is not np.ndarray or theta.dtype != np.float64:
            theta = np.asarray(theta, dtype=np.float64)
        single = theta.ndim == 1
        if single:
            theta = theta[None, :]
        if theta.ndim != 2 or theta.shape[1] != self.num_params:
            raise ValueError(f"{self.name}: theta must be (S, {self.num_params}), got {theta.shape}")
        return theta, single

    def _unpack(self, theta: np.ndarray, first: int = 0):
        s = theta.shape[0]
        return [
            (theta[:, w0:b0].reshape(s, n_out, n_in), theta[:, b0:b1, None])
            for (w0, b0, b1, n_out, n_in) in self._slices[first:]
        ]

    # -- data
    def prepare(self, x: np.ndarray, y: np.ndarray) -> Batch:
        """Inputs transposed to (.., n_in, B), targets (.., n_out, B); for inputs shared by
        all runs also the first layer as one GEMM: ``z₁ = θ[:, W₁b₁] @ K`` with
        ``K[o·n_in + i, o·B + b] = x[b, i]`` and ``K[n_out·n_in + o, o·B + b] = 1``."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if x.shape[-1] != self.layers[0] or x.ndim not in (2, 3) or y.shape != x.shape[:-1]:
            raise ValueError(
                f"{self.name}: x must be (B, {self.layers[0]}) or (S, B, {self.layers[0]}) with "
                f"labels (B,) / (S, B); got x {x.shape}, y {y.shape}"
            )
        n_out = self.layers[-1]
        if n_out == 1:
            target = y.astype(np.float64)[..., None, :]  # (.., 1, B)
        else:
            target = np.moveaxis(np.eye(n_out, dtype=np.float64)[y], -1, -2)  # (.., out, B)
        xt = np.ascontiguousarray(np.swapaxes(x, -1, -2))  # (.., in, B)
        k1 = None
        if x.ndim == 2:
            n_h = self.layers[1]
            b = x.shape[0]
            eye = np.eye(n_h)
            kw = np.einsum("op,bi->oipb", eye, x).reshape(n_h * x.shape[1], n_h * b)
            kb = np.repeat(eye, b, axis=1)
            # Stored negated: the GEMM then yields −z₁, the argument σ needs, and saves a pass.
            # IEEE negation is exact and rounding is sign-symmetric, so θ·(−K) = −(θ·K) bit for
            # bit (up to the sign of exact zeros, which e^(·) does not see).
            k1 = np.ascontiguousarray(-np.vstack([kw, kb]))
        return Batch(x=xt, y=y, target=np.ascontiguousarray(target), size=int(y.shape[-1]), aux=k1)

    # -- forward
    def _forward(self, theta: np.ndarray, batch: Batch, keep: bool) -> list[np.ndarray]:
        """Activations [a_0, a_1, ..., a_L] (all of them if ``keep``, else [a_L])."""
        s = theta.shape[0]
        acts = [batch.x] if keep else []
        first = 0
        a = batch.x
        if batch.aux is not None:
            w0, _, b1, n_out, _ = self._slices[0]
            a = _sigmoid_of_negated_(np.matmul(theta[:, w0:b1], batch.aux).reshape(s, n_out, batch.size))
            if keep:
                acts.append(a)
            first = 1
        for w, b in self._unpack(theta, first):
            z = np.matmul(w, a)
            z += b
            a = _sigmoid_(z)
            if keep:
                acts.append(a)
        return acts if keep else [a]

    def _out(self, theta: np.ndarray, batch: Batch) -> np.ndarray:
        """Output activations (S, out, B): :meth:`_forward` without keeping the hidden
        layers, spelled out because this is the per-tick hot path (same operations)."""
        s = theta.shape[0]
        a = batch.x
        layers = self._slices
        first = 0
        if batch.aux is not None:
            w0, _, b1, n_out, _ = layers[0]
            a = _sigmoid_of_negated_(np.matmul(theta[:, w0:b1], batch.aux).reshape(s, n_out, batch.size))
            first = 1
        for k in range(first, len(layers)):
            w0, b0, b1, n_out, n_in = layers[k]
            z = np.matmul(theta[:, w0:b0].reshape(s, n_out, n_in), a)
            z += theta[:, b0:b1, None]
            a = _sigmoid_(z)
        return a

    def forward(self, theta, x: np.ndarray) -> np.ndarray:
        """Network outputs for raw inputs x (B, n_in) or (S, B, n_in): (S, B, n_out)."""
        th, single = self._theta(theta)
        x = np.asarray(x, dtype=np.float64)
        batch = self.prepare(x, np.zeros(x.shape[:-1], dtype=np.int64))
        out = np.swapaxes(self._out(th, batch), -1, -2)
        return out[0] if single else out

    def _sq_err(self, out: np.ndarray, batch: Batch) -> np.ndarray:
        out -= batch.target
        d = out.reshape(out.shape[0], -1)
        if d.shape[1] == 1:
            c = d[:, 0]
            c *= c
        else:
            c = np.vecdot(d, d)
        if batch.size != 1:
            c /= batch.size
        return c

    def cost(self, theta, batch: Batch) -> np.ndarray:
        th, single = self._theta(theta)
        c = self._sq_err(self._out(th, batch), batch)
        return c[0] if single else c

    def _correct(self, out: np.ndarray, y: np.ndarray) -> np.ndarray:
        if out.shape[1] == 1:
            pred = out[:, 0, :] > 0.5
            return (pred == (y == 1)).mean(axis=-1)
        return (out.argmax(axis=1) == y).mean(axis=-1)

    def accuracy(self, theta, batch: Batch) -> np.ndarray:
        th, single = self._theta(theta)
        acc = self._correct(self._out(th, batch), batch.y)
        return acc[0] if single else acc

    def evaluate(self, theta, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        th, single = self._theta(theta)
        out = self._out(th, batch)
        acc = self._correct(out, batch.y)
        c = self._sq_err(out, batch)
        return (c[0], acc[0]) if single else (c, acc)

    def gradient(self, theta, batch: Batch) -> np.ndarray:
        """Backpropagation: δ_L = (2/B)(a_L − t)·σ'(z_L), δ_{l−1} = (W_lᵀ δ_l)·σ'(z_{l−1}),
        ∂C/∂W_l = δ_l a_{l−1}ᵀ, ∂C/∂b_l = Σ_b δ_l, with σ'(z) = a(1 − a)."""
        th, single = self._theta(theta)
        acts = self._forward(th, batch, keep=True)
        params = self._unpack(th)
        s = th.shape[0]
        grad = np.empty((s, self.num_params), dtype=np.float64)
        a = acts[-1]
        delta = (a - batch.target) * (2.0 / batch.size) * a * (1.0 - a)
        for k in range(len(self._slices) - 1, -1, -1):
            w0, b0, b1, n_out, n_in = self._slices[k]
            a_prev = acts[k]
            gw = np.matmul(delta, np.swapaxes(a_prev, -1, -2))  # (S, out, in)
            grad[:, w0:b0] = gw.reshape(s, -1)
            grad[:, b0:b1] = delta.sum(axis=-1)
            if k:
                w = params[k][0]
                delta = np.matmul(np.swapaxes(w, -1, -2), delta) * a_prev * (1.0 - a_prev)
        return grad[0] if single else grad


# --------------------------------------------------------------------------- CNN


@dataclass(frozen=True)
class Conv:
    """3×3-style convolution (stride 1, no padding) followed by ReLU."""

    c_in: int
    c_out: int
    k: int = 3


@dataclass(frozen=True)
class Pool:
    """k×k max-pooling with stride k (floor)."""

    k: int = 2


@dataclass(frozen=True)
class Dense:
    """Fully connected read-out on the flattened (C, H, W) features; no activation."""

    n_in: int
    n_out: int


def _channels_last(x):
    """The same images, (…, C, H, W), stored channels-last, (…, H, W, C) in memory.

    The CPU convolutions (oneDNN) are faster on this layout for the paper's CNNs from two
    images on (measured: 1.25× at 2, 1.5–2.2× at 100–1000). The layout is set by hand, not
    with ``memory_format``: for C = 1 torch counts any channel stride as channels-last, and
    a stride-0 channel axis (``x[:, None]``) then silently takes the slow path.
    """
    torch = _torch()
    nd = x.ndim
    order = (*range(nd - 3), nd - 2, nd - 1, nd - 3)  # … H W C
    back = (*range(nd - 3), nd - 1, nd - 3, nd - 2)
    out = torch.empty([x.shape[i] for i in order], dtype=x.dtype, device=x.device).permute(back)
    out.copy_(x)
    return out


def _torch():
    import torch  # local: importing the package must not pull torch in

    return torch


def torch_runs(model, theta):
    """θ as a torch tensor (S, P) on ``model``'s device and dtype, and whether one vector (P,)
    was given (torch models: :class:`CNN`, the user's own in :mod:`.user_model`)."""
    torch = _torch()
    if isinstance(theta, torch.Tensor):
        t = theta.detach().to(device=model.device, dtype=model.torch_dtype)
    else:
        arr = np.asarray(theta)
        if arr.dtype != model.dtype:
            arr = arr.astype(model.dtype)
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(model.device)
    single = t.ndim == 1
    if single:
        t = t[None, :]
    if t.ndim != 2 or t.shape[1] != model.num_params:
        raise ValueError(f"{model.name}: theta must be (S, {model.num_params}), got {tuple(t.shape)}")
    return t, single


class TorchModel(Model):
    """A model computed in torch, every run of a batch in one pass: :class:`CNN` and the user's
    own (:mod:`.user_model`). Subclasses give ``_outputs(t, batch)`` (S, B, O), ``_batch_costs(z,
    batch)`` (S,) and ``_batch_correct(z, batch)`` (S,), and hold ``device``, ``torch_dtype``."""

    def _theta(self, theta):
        return torch_runs(self, theta)

    def evaluate(self, theta, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        torch = _torch()
        t, single = self._theta(theta)
        with torch.inference_mode():
            z = self._outputs(t, batch)
            both = torch.stack([self._batch_costs(z, batch).to(torch.float64),
                                self._batch_correct(z, batch).to(torch.float64)]).cpu().numpy()
        c, a = both[0], both[1]
        return (c[0], a[0]) if single else (c, a)

    def cost(self, theta, batch: Batch) -> np.ndarray:
        torch = _torch()
        t, single = self._theta(theta)
        with torch.inference_mode():
            c = self._batch_costs(self._outputs(t, batch), batch).to(torch.float64).cpu().numpy()
        return c[0] if single else c

    def accuracy(self, theta, batch: Batch) -> np.ndarray:
        return self.evaluate(theta, batch)[1]


class CNN(TorchModel):
    """Convolutional classifier in torch, evaluated on views of the flat parameter vector.

    ``spec`` is a sequence of :class:`Conv`, :class:`Pool` and :class:`Dense`. The forward
    pass for a flat vector θ is one chain of ``torch.nn.functional`` calls on
    ``θ[start:end].view(shape)`` slices: no module state is copied.

    Several runs (S > 1) go through the network together, k runs per call
    (:meth:`run_logits`): their feature maps side by side along the channel axis,
    ``h (B, k·C, H, W)``, each convolution one grouped call with the runs' kernels stacked,
    ``W (k·C_out, C_in, kh, kw)``, ``groups = k`` (for inputs shared by every run the first
    convolution needs no groups: ``W (k·C_out, C_in, kh, kw)`` on ``x (B, C_in, H, W)``), the
    pooling per channel as before, the dense read-out one batched matmul
    ``z (k, B, out) = h (k, B, in) @ Wᵀ (k, in, out) + b``. k is :attr:`runs_per_call` if
    set, else ``IMAGES_PER_CALL / B`` (at least 1): on a GPU nearly every run in one call, on
    the CPU about 200 images a call, where wider calls measured slower (docs/benchmarks.md).
    One run (S = 1) takes the plain path, :meth:`logits`. Results are gathered on the device
    and moved to the host once.
    """

    # CPU: images per batched call (k·B). Calls over 60–200 images measured fastest; wider
    # ones slower than one call per run (16 runs at B = 100: 0.57×; their activations leave
    # the caches and glibc maps fresh pages for them on every call), k = 2 runs at B = 100
    # 1.16–1.24× faster (docs/benchmarks.md, "CNN runs batched").
    CPU_IMAGES_PER_CALL = 200
    # GPU: a bound on the activations of one call (≈ 1.8 GB for CIFAR-10's first layer), not a
    # measured optimum.
    GPU_IMAGES_PER_CALL = 32768

    def __init__(
        self,
        spec: Sequence[Conv | Pool | Dense],
        input_shape: tuple[int, int, int],
        num_classes: int,
        name: str = "cnn",
        device: str | None = None,
        init_scale: float = 1.0,
        dtype: str = "float32",
        label_smoothing: float = 0.0,
    ) -> None:
        torch = _torch()
        self.spec = tuple(spec)
        # Cross-entropy against (1 − s)·one-hot + s/classes: its optimum keeps the logits finite,
        # so the cost stops rewarding ever larger weights (the authors' CNN runs use s = 0.01).
        self.label_smoothing = float(label_smoothing)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = int(num_classes)
        self.name = name
        self.init_scale = float(init_scale)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"CNN dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = np.dtype(dtype)
        self.torch_dtype = torch.float32 if dtype == "float32" else torch.float64
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # (kind, w_start, w_end, w_shape, b_end, fan_in) per parameterised layer; Pool -> k
        self._plan: list[tuple] = []
        c, h, w = self.input_shape
        off = 0
        for layer in self.spec:
            if isinstance(layer, Conv):
                if layer.c_in != c:
                    raise ValueError(f"{name}: Conv expects {layer.c_in} channels, gets {c}")
                shape = (layer.c_out, layer.c_in, layer.k, layer.k)
                n_w = math.prod(shape)
                self._plan.append(("conv", off, off + n_w, shape, off + n_w + layer.c_out, layer.c_in * layer.k**2))
                off += n_w + layer.c_out
                c, h, w = layer.c_out, h - layer.k + 1, w - layer.k + 1
            elif isinstance(layer, Pool):
                self._plan.append(("pool", layer.k))
                h, w = h // layer.k, w // layer.k
            elif isinstance(layer, Dense):
                if layer.n_in != c * h * w:
                    raise ValueError(f"{name}: Dense expects {layer.n_in} inputs, gets {c}x{h}x{w}")
                shape = (layer.n_out, layer.n_in)
                n_w = layer.n_out * layer.n_in
                self._plan.append(("dense", off, off + n_w, shape, off + n_w + layer.n_out, layer.n_in))
                off += n_w + layer.n_out
                c, h, w = layer.n_out, 1, 1
            else:
                raise TypeError(f"{name}: unknown layer {layer!r}")
            if h < 1 or w < 1:
                raise ValueError(f"{name}: feature map vanished after {layer!r}")
        if not isinstance(self.spec[-1], Dense) or self.spec[-1].n_out != self.num_classes:
            raise ValueError(f"{name}: the last layer must be Dense(..., {self.num_classes})")
        self.num_params = off
        # Runs per batched call (S > 1); None: the device's default, see :meth:`_runs_per_call`.
        self.runs_per_call: int | None = None

    def __repr__(self) -> str:
        return f"CNN(name={self.name!r}, params={self.num_params}, device={str(self.device)!r})"

    # -- parameters
    def init(self, rng: np.random.Generator, runs: int) -> np.ndarray:
        """PyTorch's default for Conv2d/Linear: weights and biases ~ U(±1/√fan_in), · init_scale."""
        theta = np.empty((int(runs), self.num_params), dtype=self.dtype)
        for step in self._plan:
            if step[0] == "pool":
                continue
            _, w0, _, _, b1, fan_in = step
            bound = self.init_scale / math.sqrt(fan_in)
            theta[:, w0:b1] = rng.uniform(-bound, bound, size=(int(runs), b1 - w0))
        return theta

    # -- data
    def prepare(self, x, y) -> Batch:
        """x (B, C, H, W) shared by every run, or (S, B, C, H, W) one batch per run."""
        torch = _torch()
        xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        yt = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y, dtype=np.int64))
        xt = xt.to(device=self.device, dtype=self.torch_dtype)
        if self.device.type == "cpu" and xt.ndim in (4, 5) and xt.shape[-4] > 1:
            xt = _channels_last(xt)  # one image: measured 0–25 % slower channels-last, so left as is
        yt = yt.to(device=self.device, dtype=torch.int64)
        if tuple(xt.shape[-3:]) != self.input_shape or xt.ndim not in (4, 5) or tuple(yt.shape) != tuple(xt.shape[:-3]):
            raise ValueError(
                f"{self.name}: x must be (B, {', '.join(map(str, self.input_shape))}) or with a "
                f"leading run axis, labels matching; got x {tuple(xt.shape)}, y {tuple(yt.shape)}"
            )
        return Batch(x=xt, y=yt, target=yt, size=int(yt.shape[-1]))

    # -- forward
    def logits(self, flat, x):
        """Logits for one flat parameter vector (P,) torch and inputs (B, C, H, W) torch."""
        F = _torch().nn.functional
        h = x
        for step in self._plan:
            kind = step[0]
            if kind == "conv":
                _, w0, w1, shape, b1, _ = step
                h = F.relu(F.conv2d(h, flat[w0:w1].view(shape), flat[w1:b1]))
            elif kind == "pool":
                h = F.max_pool2d(h, step[1])
            else:
                _, w0, w1, shape, b1, _ = step
                h = F.linear(h.flatten(1), flat[w0:w1].view(shape), flat[w1:b1])
        return h

    def run_logits(self, t, x):
        """Logits (k, B, classes) of k runs at once: t (k, P) torch, x (B, C, H, W) shared by
        the runs or (k, B, C, H, W) one batch per run (see the class docstring).

        Where a convolution is followed by pooling, the pooling comes first and the ReLU after
        it, on a quarter of the values: ReLU is monotone, so ``max(relu(a), relu(b)) =
        relu(max(a, b))`` exactly, NaN included."""
        torch = _torch()
        F = torch.nn.functional
        k = t.shape[0]
        if x.ndim == 4:
            h, groups = x, 1
        else:
            if x.shape[0] != k:
                raise ValueError(f"{self.name}: {k} runs but inputs for {x.shape[0]}")
            _, b, c, hh, ww = x.shape
            # (k, B, C, H, W) -> (B, k·C, H, W), stored channels-last like the prepared batches.
            h = x.permute(1, 3, 4, 0, 2).reshape(b, hh, ww, k * c).permute(0, 3, 1, 2)
            groups = k
        plan = self._plan
        i, n = 0, len(plan)
        while i < n:
            step = plan[i]
            kind = step[0]
            if kind == "conv":
                _, w0, w1, shape, b1, _ = step
                w = t[:, w0:w1].reshape(k * shape[0], *shape[1:])
                h = F.conv2d(h, w, t[:, w1:b1].reshape(-1), groups=groups)
                groups = k
                if i + 1 < n and plan[i + 1][0] == "pool":
                    i += 1
                    h = F.max_pool2d(h, plan[i][1])
                h = F.relu_(h)
            elif kind == "pool":
                h = F.max_pool2d(h, step[1])
            else:
                _, w0, w1, shape, b1, _ = step
                if h.ndim == 4:  # (B, k·C, H, W) -> (k, B, C·H·W), each run's features in (C, H, W) order
                    h = h.reshape(h.shape[0], k, -1).transpose(0, 1)
                h = torch.baddbmm(t[:, w1:b1].unsqueeze(1), h, t[:, w0:w1].view(k, *shape).transpose(1, 2))
            i += 1
        return h

    def _runs_per_call(self, runs: int, size: int) -> int:
        if self.runs_per_call is not None:
            per = int(self.runs_per_call)
        else:
            cap = self.GPU_IMAGES_PER_CALL if self.device.type == "cuda" else self.CPU_IMAGES_PER_CALL
            per = cap // max(size, 1)
        return max(1, min(runs, per))

    def _logits(self, t, batch: Batch):
        """Logits (S, B, classes): one run by :meth:`logits`, several by :meth:`run_logits`."""
        torch = _torch()
        runs = t.shape[0]
        if batch.x.ndim == 5 and batch.x.shape[0] != runs:
            raise ValueError(f"{self.name}: theta has {runs} runs but the batch has inputs for {batch.x.shape[0]}")
        if runs == 1:
            return self.logits(t[0], self._x(batch, 0))[None]
        k = self._runs_per_call(runs, batch.size)
        shared = batch.x.ndim == 4
        parts = [self.run_logits(t[i:i + k], batch.x if shared else batch.x[i:i + k]) for i in range(0, runs, k)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, theta, x) -> np.ndarray:
        """Logits as numpy: theta (S, P) and x (B, C, H, W) -> (S, B, classes)."""
        torch = _torch()
        batch = self.prepare(x, np.zeros(np.shape(x)[:-3], dtype=np.int64))
        t, single = self._theta(theta)
        with torch.inference_mode():
            out = self._logits(t, batch).cpu().numpy()
        return out[0] if single else out

    @staticmethod
    def _x(batch: Batch, s: int):
        return batch.x if batch.x.ndim == 4 else batch.x[s]

    @staticmethod
    def _y(batch: Batch, s: int):
        return batch.y if batch.y.ndim == 1 else batch.y[s]

    def _costs(self, z, y):
        """Mean cross-entropy per run in the model's dtype: z (S, B, classes), y (B,) or (S, B)."""
        F = _torch().nn.functional
        runs, size, classes = z.shape
        s = self.label_smoothing
        if runs == 1:
            return F.cross_entropy(z[0], y if y.ndim == 1 else y[0], label_smoothing=s)[None]
        ce = F.cross_entropy(z.reshape(runs * size, classes), y.expand(runs, size).reshape(-1), reduction="none",
                             label_smoothing=s)
        return ce.view(runs, size).mean(dim=1)

    def _outputs(self, t, batch: Batch):
        return self._logits(t, batch)

    def _batch_costs(self, z, batch: Batch):
        return self._costs(z, batch.y)

    def _batch_correct(self, z, batch: Batch):
        return (z.argmax(dim=2) == batch.y).to(_torch().float64).mean(dim=1)

    def gradient(self, theta, batch: Batch) -> np.ndarray:
        """dC/dθ by torch autograd through the same functional forward pass."""
        torch = _torch()
        F = torch.nn.functional
        t, single = self._theta(theta)
        grads = []
        with torch.enable_grad():
            for s in range(t.shape[0]):
                flat = t[s].clone().requires_grad_(True)
                loss = F.cross_entropy(self.logits(flat, self._x(batch, s)), self._y(batch, s),
                                       label_smoothing=self.label_smoothing)
                (g,) = torch.autograd.grad(loss, flat)
                grads.append(g)
        g = torch.stack(grads).cpu().numpy()
        return g[0] if single else g


def fmnist_cnn(device: str | None = None, init_scale: float = 1.0, dtype: str = "float32",
               label_smoothing: float = 0.0) -> CNN:
    """Fashion-MNIST reference CNN (14,378 parameters): 1→16→32→32 conv3×3 + pool2, dense 32→10."""
    spec = (Conv(1, 16), Pool(2), Conv(16, 32), Pool(2), Conv(32, 32), Pool(2), Dense(32, 10))
    return CNN(spec, (1, 28, 28), 10, name="fmnist-cnn", device=device, init_scale=init_scale, dtype=dtype,
               label_smoothing=label_smoothing)


def cifar10_cnn(device: str | None = None, init_scale: float = 1.0, dtype: str = "float32",
                label_smoothing: float = 0.0) -> CNN:
    """CIFAR-10 reference CNN (26,154 parameters): 3→16→32→64 conv3×3 + pool2, dense 256→10."""
    spec = (Conv(3, 16), Pool(2), Conv(16, 32), Pool(2), Conv(32, 64), Pool(2), Dense(256, 10))
    return CNN(spec, (3, 32, 32), 10, name="cifar10-cnn", device=device, init_scale=init_scale, dtype=dtype,
               label_smoothing=label_smoothing)


_PARITY_RE = re.compile(r"parity(\d+)")
_NETWORK_RE = re.compile(r"\d+(-\d+)+")


# Reference initial scales: uniform ±0.5 for the parity MLPs (fewer runs stall in XOR's
# local minimum than with ±1; docs/benchmarks.md), PyTorch's default init for the CNNs.
MLP_INIT_SCALE = 0.5


def build_model(task: str, network: str | None = None, device: str | None = None,
                init_scale: float | None = None, label_smoothing: float = 0.0) -> Model:
    """Model for a task: ``parityN`` → MLP N-N-1 (``network`` such as "2-2-1" overrides;
    its input size must be N), ``fmnist`` → :func:`fmnist_cnn`, ``cifar10`` → :func:`cifar10_cnn`.
    ``init_scale`` None picks the reference init (``MLP_INIT_SCALE`` for MLPs, 1 for CNNs);
    ``label_smoothing`` applies to the CNNs' cross-entropy (the MLPs' cost is the MSE)."""
    m = _PARITY_RE.fullmatch(task)
    if m:
        n = int(m.group(1))
        if network is None:
            layers = (n, n, 1)
        else:
            if not _NETWORK_RE.fullmatch(network.strip()):
                raise ValueError(f"network must look like '2-2-1', got {network!r}")
            layers = tuple(int(v) for v in network.strip().split("-"))
            if layers[0] != n:
                raise ValueError(f"network {network!r} has {layers[0]} inputs but task {task!r} has {n}")
        if label_smoothing:
            raise ValueError(f"label_smoothing applies to the CNNs' cross-entropy; {task} trains on the MSE")
        return MLP(layers, init_scale=MLP_INIT_SCALE if init_scale is None else init_scale)
    builders = {"fmnist": fmnist_cnn, "cifar10": cifar10_cnn}
    if task in builders:
        model = builders[task](device=device, init_scale=1.0 if init_scale is None else init_scale,
                               label_smoothing=label_smoothing)
        if network not in (None, "", model.name, "cnn", f"cnn-{task}"):
            raise ValueError(f"task {task!r} has one network ({model.name}); got network={network!r}")
        return model
    raise ValueError(f"unknown task {task!r}: expected parityN, 'fmnist' or 'cifar10'")


def job_model(config, device: str | None = None) -> Model:
    """The model a :class:`~pmgd_node.config.JobConfig` trains: its task, network, init and cost
    (the user's own network for task ``custom``: :mod:`.user_model`)."""
    if config.task == "custom":
        from .user_model import user_model

        return user_model(config, device=device)
    return build_model(config.task, config.network, device=device, init_scale=config.init_scale,
                       label_smoothing=config.label_smoothing)
