"""The chip's output stage: present inputs, run the network, extract C̃ (no I/O).

Per perturbed tick t the stage

1. changes the input every τ_x ticks (``batch`` samples at once, epochs shuffled by the job seed);
2. in discrete mode, asks for a C₀ measurement whenever the input changed or θ⁰ was
   updated since the last one (both known from the schedule: updates follow ticks with
   (t+1) mod τ_θ = 0), and holds it: C̃ = C(θ⁰ + θ̃) − C₀;
3. in analog mode, high-pass filters C(t) instead (no C₀ measurements at all).

The broadcaster service and the in-process engine both drive this class; they differ only
in how the weights reach it and how C̃ leaves it.
"""

from __future__ import annotations

import numpy as np

from pmgd_node.config import JobConfig
from pmgd_node.cost_variation import HighPass, SampleAndHold
from pmgd_node.perturbation import seeded_permutation

_ORDER_STREAM = 0x44415441  # "DATA"


class InputSchedule:
    """Sample indices shown at input step k = ⌊t/τ_x⌋: consecutive ``batch``-sized slices of
    an endless stream of epochs, each epoch a permutation drawn from (seed, epoch)."""

    def __init__(self, num_samples: int, batch: int, seed: int):
        self.n, self.batch, self.seed = num_samples, batch, seed
        self._epochs: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = seeded_permutation(self.seed * 1_000_003 + epoch, _ORDER_STREAM, self.n)
        return self._epochs[epoch]

    def indices(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch, (step + 1) * self.batch)
        epochs, offsets = np.divmod(pos, self.n)
        if epochs[0] == epochs[-1]:
            return self._order(int(epochs[0]))[offsets]
        return np.concatenate([self._order(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])


class OutputStage:
    """Forward pass and C̃ extraction for the S runs of one job."""

    def __init__(self, config: JobConfig, model, train):
        self.config = config
        self.model = model
        self.train = train
        self.schedule = InputSchedule(len(train.y), config.batch, config.seed)
        self.discrete = config.mode == "discrete"
        self.extractor = SampleAndHold() if self.discrete else HighPass(config.tau_hp)
        self.batch = None
        self._c0_stale = True
        self._prepared: dict[bytes, object] = {}
        self.c0_measurements = 0

    def begin_tick(self, tick: int) -> None:
        """Present the input of this tick; mark C₀ stale if the input or θ⁰ changed."""
        if tick % self.config.tau_x == 0 or self.batch is None:
            idx = self.schedule.indices(tick // self.config.tau_x)
            self.batch = self._prepare(idx)
            self._c0_stale = True
        if tick > 0 and (self.config.mode == "analog" or tick % self.config.tau_theta == 0):
            self._c0_stale = True

    def _prepare(self, idx: np.ndarray):
        # Small data sets (parity) cycle through few distinct batches: prepare each once.
        if len(self.train.y) > 64:
            return self.model.prepare(self.train.x[idx], self.train.y[idx])
        key = idx.tobytes()
        if key not in self._prepared:
            self._prepared[key] = self.model.prepare(self.train.x[idx], self.train.y[idx])
        return self._prepared[key]

    @property
    def needs_c0(self) -> bool:
        return self.discrete and self._c0_stale

    def measure_c0(self, theta0: np.ndarray) -> None:
        """Sample-and-hold C₀ = C(θ⁰) on the current input (one unperturbed tick)."""
        self.extractor.hold(self.model.cost(theta0, self.batch))
        self.c0_measurements += 1
        self._c0_stale = False

    def cost_variation(self, theta: np.ndarray) -> np.ndarray:
        """C̃ for the effective weights θ = θ⁰ + θ̃ of this tick, one value per run."""
        return self.extractor.variation(self.model.cost(theta, self.batch))
