"""Inference: one parameter vector θ scored over a whole data split (pure, no I/O).

:func:`score` runs the forward pass ``y = f(x; θ)`` of a model from :mod:`.models` over a
:class:`~.data.Dataset` in chunks of ``batch_size`` samples and reports, for N samples with
true classes ``y_b`` and predicted classes ``ŷ_b``:

* ``accuracy = (1/N) Σ_b [ŷ_b = y_b]``, with ``ŷ`` exactly as the model's own ``accuracy``
  decides it: ``ŷ = [y_out > ½]`` for a single sigmoid output (parity: classes 0/1),
  ``ŷ = argmax_o y_o`` (MLP outputs, CNN logits) otherwise;
* ``loss``: the model's cost averaged over all N samples, ``(1/N) Σ_b C_b`` with the
  per-sample cost ``C_b = Σ_o (y_bo − t_bo)²`` for the MLP and ``C_b = −log softmax(z_b)[y_b]``
  for the CNN (the per-chunk mean costs of ``model.cost`` weighted by chunk size);
* ``confusion[i][j] = #{b : y_b = i, ŷ_b = j}`` (rows true, columns predicted) and
  ``per_class_accuracy[i] = confusion[i][i] / Σ_j confusion[i][j]`` (None for a class with
  no samples in the split);
* ``images_per_second = N / seconds``, ``seconds`` being the wall time of the chunked forward
  passes (host→device transfer and the result's way back included, data loading excluded).

Every chunk makes ONE forward pass; predictions and cost come from the same outputs.
:func:`load_checkpoint` reads the θ⁰ checkpoints the job store writes
(``np.savez(buf, theta0=θ⁰ (P,) or (S, P), tick=int64)``).
"""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np

from .data import Dataset
from .models import CNN, MLP, Model

__all__ = ["InvalidInput", "score", "load_checkpoint", "model_device"]


class InvalidInput(ValueError):
    """A caller-supplied value (θ, a checkpoint, a run index) does not fit; names the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def model_device(model: Model) -> str:
    """Where the model computes: ``str(model.device)`` for torch models, "cpu" for the numpy MLP."""
    return str(model.device) if isinstance(model, CNN) else "cpu"


def _check_theta(model: Model, theta) -> np.ndarray:
    th = np.asarray(theta)
    if th.ndim != 1 or th.shape[0] != model.num_params:
        raise InvalidInput("theta", f"{model.name} needs {model.num_params} parameters (shape ({model.num_params},)); "
                                    f"got shape {th.shape}")
    if not np.issubdtype(th.dtype, np.number) or np.issubdtype(th.dtype, np.complexfloating):
        raise InvalidInput("theta", f"must be real numbers; got dtype {th.dtype}")
    if not np.all(np.isfinite(th)):
        raise InvalidInput("theta", "must be finite (no NaN or infinity)")
    return th


def _mlp_chunk(model: MLP, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Predicted classes (B,) and the summed cost Σ_b C_b of one chunk, one forward pass."""
    out = model.forward(theta, x)  # (B, n_out)
    if out.shape[1] == 1:
        pred = (out[:, 0] > 0.5).astype(np.int64)
        err = out[:, 0] - y
    else:
        pred = out.argmax(axis=1)
        err = out - np.eye(out.shape[1])[y]
    return pred, float(np.sum(err * err))


def _cnn_chunk(model: CNN, theta_t, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    import torch

    batch = model.prepare(x, y)
    with torch.inference_mode():
        z = model.logits(theta_t, batch.x)
        pred = z.argmax(dim=1)
        cost = torch.nn.functional.cross_entropy(z, batch.y, reduction="sum").to(torch.float64)
        pred, cost = pred.cpu().numpy(), float(cost.cpu())
    return pred.astype(np.int64), cost


def score(model: Model, theta, dataset: Dataset, batch_size: int = 1000) -> dict:
    """Accuracy, loss, per-class accuracy, confusion matrix and throughput of θ (P,) on ``dataset``.

    Returns a JSON-ready dict: ``samples``, ``accuracy``, ``loss``, ``per_class_accuracy``
    (length ``num_classes``), ``confusion`` (num_classes × num_classes ints), ``images_per_second``,
    ``seconds``, ``device``. Raises :class:`InvalidInput` (field ``theta``) for a θ of the wrong
    shape or with non-finite values.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not isinstance(model, (MLP, CNN)):
        raise TypeError(f"score: no prediction rule for {type(model).__name__}")
    th = _check_theta(model, theta)
    n = len(dataset)
    k = int(dataset.num_classes)
    if isinstance(model, CNN):
        import torch

        theta_t = torch.from_numpy(np.ascontiguousarray(th, dtype=model.dtype)).to(model.device)
        chunk = lambda x, y: _cnn_chunk(model, theta_t, x, y)  # noqa: E731
    else:
        th = th.astype(np.float64)
        chunk = lambda x, y: _mlp_chunk(model, th, x, y)  # noqa: E731
    preds = []
    cost_sum = 0.0
    seconds = 0.0
    for i in range(0, n, int(batch_size)):
        x, y = dataset.x[i : i + batch_size], dataset.y[i : i + batch_size]
        t0 = time.perf_counter()
        pred, c = chunk(x, y)
        seconds += time.perf_counter() - t0
        preds.append(pred)
        cost_sum += c
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    if pred.size and (pred.min() < 0 or pred.max() >= k):
        raise ValueError(f"{model.name} predicts class {int(pred.max())} but {dataset.name} has {k} classes")
    confusion = np.bincount(dataset.y * k + pred, minlength=k * k).reshape(k, k)
    per_class = confusion.sum(axis=1)
    correct = int(np.trace(confusion))
    return {
        "samples": n,
        "accuracy": correct / n if n else 0.0,
        "loss": cost_sum / n if n else 0.0,
        "per_class_accuracy": [float(confusion[i, i] / per_class[i]) if per_class[i] else None for i in range(k)],
        "confusion": confusion.astype(int).tolist(),
        "images_per_second": n / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "device": model_device(model),
    }


def load_checkpoint(npz_bytes: bytes, run: int = 0) -> tuple[np.ndarray, int]:
    """``(θ⁰ of run ``run`` (P,), tick)`` from a store checkpoint (.npz with ``theta0``, ``tick``).

    ``theta0`` may hold one run (P,) or S runs (S, P). Raises :class:`InvalidInput` naming
    ``checkpoint`` (not such an .npz) or ``run`` (outside 0…S−1).
    """
    npz_bytes = bytes(npz_bytes)
    if not npz_bytes:
        raise InvalidInput("checkpoint", "is empty; expected the bytes of an .npz holding theta0 and tick")
    if not npz_bytes.startswith(b"PK"):
        raise InvalidInput("checkpoint", f"not an .npz (a zip archive starts with b'PK'; got {npz_bytes[:8]!r})")
    try:
        with np.load(io.BytesIO(npz_bytes), allow_pickle=False) as d:
            if "theta0" not in d.files:
                raise InvalidInput("checkpoint", f"the .npz holds {sorted(d.files)}, no 'theta0'")
            theta0 = np.asarray(d["theta0"])
            tick = int(d["tick"]) if "tick" in d.files else 0
    except InvalidInput:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, TypeError) as err:
        raise InvalidInput("checkpoint", f"not a readable .npz ({err})") from None
    if theta0.ndim == 1:
        theta0 = theta0[None, :]
    if theta0.ndim != 2 or theta0.shape[1] == 0:
        raise InvalidInput("checkpoint", f"theta0 must be (P,) or (S, P); got shape {theta0.shape}")
    if isinstance(run, bool) or not isinstance(run, (int, np.integer)) or not 0 <= run < theta0.shape[0]:
        raise InvalidInput("run", f"must be an integer in [0, {theta0.shape[0] - 1}] (the checkpoint holds "
                                  f"{theta0.shape[0]} run(s)); got {run!r}")
    return np.ascontiguousarray(theta0[int(run)]), tick
