"""Your own CNN for PMGD: bars of two orientations, a generated 8×8 image set (no download).

    pmgd train --model examples/tiny_cnn_task.py:task --eta 0.05 --amplitude 0.01 --batch 32

Class 0 holds a horizontal bar, class 1 a vertical one, at a random row or column, in
Gaussian noise; 512 training and 256 held-out images. The network is the user's own
torch module (not a built-in one): conv 3×3 → ReLU → 2×2 max-pool → dense 2, trained on
the cross-entropy. The typed :class:`pmgd.Task` form is used here instead of a dict.
"""

import numpy as np
import torch

from pmgd import Task


def images(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, size=(n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 2, size=n)
    where = rng.integers(1, 7, size=n)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, where[i], :] += 1.0
        else:
            x[i, 0, :, where[i]] += 1.0
    return torch.from_numpy(x), torch.from_numpy(y)


def task():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 2))
    return Task(model=net, train=images(512, 1), test=images(256, 2), loss="cross_entropy")
