"""Perturbation generators θ̃_i[t] (paper §4).

Every value is a pure function of ``(run seed, global parameter index i, tick t)``: a shard
``[start, stop)`` asks only for its own columns and gets exactly the numbers any other split
of the index range would give it. That is what makes a 1-node and a 64-node run identical.

Arrays carry a leading run axis S (one seed per independent run): ``values`` returns shape
``(S, stop − start)``, ``block`` returns ``(T, S, stop − start)`` for ticks ``t0 … t0+T−1``.

``power`` is the time-averaged perturbation power ⟨θ̃_i²⟩ used to normalise the error
signal ε_i = C̃·θ̃_i/⟨θ̃_i²⟩, which makes E[ε_i] = ∂C/∂θ_i for every type:

=====  =====================================================  ==========
type   θ̃_i[t]                                                 ⟨θ̃_i²⟩
=====  =====================================================  ==========
TM     A if t mod P = π(i) else 0   (π: seeded permutation)    A²/P
CM     A·H[r_i, t mod L],  H Walsh–Hadamard, r_i = i + 1       A²
R-CM   ±A, sign = top bit of hash(seed, i, t)                  A²
FM     A·sin(2π f_i t + φ_i), f_i unique in the band           A²/2
=====  =====================================================  ==========
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective avalanche hash of uint64 (wraps modulo 2⁶⁴)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def seeded_uniform(seeds: np.ndarray, stream: int, index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers as a pure function of (seed, stream, index): shape (S, n)."""
    key = splitmix64(splitmix64(np.asarray(seeds, np.uint64)[:, None] ^ np.uint64(stream)))
    h = splitmix64(key ^ np.asarray(index, np.uint64)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def seeded_permutation(seed: int, stream: int, n: int) -> np.ndarray:
    """A permutation of range(n) drawn from (seed, stream) alone."""
    return np.argsort(seeded_uniform(np.array([seed]), stream, np.arange(n))[0], kind="stable")


class Perturbation(ABC):
    """θ̃ for ``P`` parameters and one run per entry of ``seeds``."""

    def __init__(self, num_params: int, seeds: np.ndarray, amplitude: float, dtype=np.float64):
        self.num_params = int(num_params)
        self.seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
        self.amplitude = float(amplitude)
        self.dtype = np.dtype(dtype)

    @property
    @abstractmethod
    def power(self) -> float:
        """Time-averaged ⟨θ̃_i²⟩ (the same for every parameter)."""

    @property
    @abstractmethod
    def period(self) -> int | None:
        """Ticks after which the pattern repeats (None: aperiodic)."""

    @abstractmethod
    def block(self, t0: int, count: int, start: int, stop: int) -> np.ndarray:
        """θ̃ for ticks t0 … t0+count−1 and parameters start … stop−1: (count, S, n)."""

    def values(self, tick: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """θ̃ at one tick: (S, n)."""
        return self.block(tick, 1, start, self.num_params if stop is None else stop)[0]


class TimeMultiplexed(Perturbation):
    """TM: one parameter per tick, in an order shuffled by the run seed (coordinate descent)."""

    _STREAM = 0x544D  # "TM"

    def __init__(self, num_params, seeds, amplitude, dtype=np.float64):
        super().__init__(num_params, seeds, amplitude, dtype)
        # slot[s, i]: the tick (mod P) at which run s perturbs parameter i.
        order = np.stack([seeded_permutation(int(s), self._STREAM, self.num_params) for s in self.seeds])
        self.slot = np.argsort(order, axis=1)

    @property
    def power(self) -> float:
        return self.amplitude**2 / self.num_params

    @property
    def period(self) -> int:
        return self.num_params

    def block(self, t0, count, start, stop):
        ticks = (np.arange(t0, t0 + count) % self.num_params)[:, None, None]
        hit = self.slot[None, :, start:stop] == ticks
        return hit.astype(self.dtype) * self.dtype.type(self.amplitude)


class CodeMultiplexed(Perturbation):
    """CM: row r_i = i + 1 of the Sylvester Walsh–Hadamard matrix, H[r, c] = (−1)^popcount(r & c).

    The all-ones row 0 is skipped, so every code is zero-mean; the code length L is the
    next power of two above P, and over any full period Σ_t H[r,t]·H[r',t] = L·δ_rr'.
    """

    def __init__(self, num_params, seeds, amplitude, dtype=np.float64):
        super().__init__(num_params, seeds, amplitude, dtype)
        self.length = 1 << int(self.num_params).bit_length()  # smallest power of two > P

    @property
    def power(self) -> float:
        return self.amplitude**2

    @property
    def period(self) -> int:
        return self.length

    def block(self, t0, count, start, stop):
        rows = np.arange(start + 1, stop + 1, dtype=np.int64)
        cols = np.arange(t0, t0 + count, dtype=np.int64) % self.length
        parity = np.bitwise_count(rows[None, :] & cols[:, None]) & 1
        signs = (1 - 2 * parity.astype(np.int8)).astype(self.dtype) * self.dtype.type(self.amplitude)
        return np.broadcast_to(signs[:, None, :], (count, len(self.seeds), stop - start))


class RandomCode(Perturbation):
    """R-CM: independent ±A per (run, parameter, tick): zero-mean, statistically orthogonal."""

    _STREAM = 0x52434D  # "RCM"

    def __init__(self, num_params, seeds, amplitude, dtype=np.float64):
        super().__init__(num_params, seeds, amplitude, dtype)
        self._run_key = splitmix64(splitmix64(self.seeds.astype(np.uint64) ^ np.uint64(self._STREAM)))

    @property
    def power(self) -> float:
        return self.amplitude**2

    @property
    def period(self) -> None:
        return None

    def block(self, t0, count, start, stop):
        ticks = np.arange(t0, t0 + count, dtype=np.uint64)
        key = splitmix64(self._run_key[None, :] ^ ticks[:, None])  # (T, S)
        idx = np.arange(start, stop, dtype=np.uint64)
        h = splitmix64(key[:, :, None] ^ (idx * np.uint64(0xD6E8FEB86659FD93))[None, None, :])
        a = self.dtype.type(self.amplitude)
        return np.where((h >> np.uint64(63)).astype(bool), a, -a)


class FrequencyMultiplexed(Perturbation):
    """FM: θ̃_i(t) = A·sin(2π f_i t + φ_i), t in ticks.

    The band [f_min, f_max] (cycles per tick) is cut into P equal bins; parameter i takes
    the centre of bin π(i) (π a seeded permutation), so frequencies are unique and in band;
    φ_i is uniform from the run seed. Default band [0, ½] is the paper's bandwidth 1/2τ_p.
    """

    _STREAM_F, _STREAM_PHI = 0x464D, 0x504849

    def __init__(self, num_params, seeds, amplitude, band=(0.0, 0.5), dtype=np.float64):
        super().__init__(num_params, seeds, amplitude, dtype)
        f_min, f_max = band
        bins = np.stack([seeded_permutation(int(s), self._STREAM_F, self.num_params) for s in self.seeds])
        self.freq = f_min + (bins + 0.5) * (f_max - f_min) / self.num_params  # (S, P)
        self.phase = 2 * np.pi * seeded_uniform(self.seeds, self._STREAM_PHI, np.arange(self.num_params))

    @property
    def power(self) -> float:
        return self.amplitude**2 / 2

    @property
    def period(self) -> None:
        return None

    def block(self, t0, count, start, stop):
        t = np.arange(t0, t0 + count, dtype=np.float64)[:, None, None]
        arg = 2 * np.pi * self.freq[None, :, start:stop] * t + self.phase[None, :, start:stop]
        return (self.amplitude * np.sin(arg)).astype(self.dtype, copy=False)


def make_perturbation(kind: str, num_params: int, seeds, amplitude: float, fm_band=(0.0, 0.5), dtype=np.float64) -> Perturbation:
    """Build the generator named by a job config's ``perturbation`` field."""
    if kind == "tm":
        return TimeMultiplexed(num_params, seeds, amplitude, dtype)
    if kind == "cm":
        return CodeMultiplexed(num_params, seeds, amplitude, dtype)
    if kind == "rcm":
        return RandomCode(num_params, seeds, amplitude, dtype)
    if kind == "fm":
        return FrequencyMultiplexed(num_params, seeds, amplitude, fm_band, dtype)
    raise ValueError(f"perturbation must be one of tm, cm, rcm, fm; got {kind!r}")
