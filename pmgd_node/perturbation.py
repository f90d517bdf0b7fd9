"""Perturbation generators θ̃_i[t] (paper §4).

Every value is a pure function of ``(run seed, global parameter index i, tick t)``: a shard
``[start, stop)`` asks only for its own columns and gets exactly the numbers any other split
of the index range would give it. That is what makes a 1-node and a 64-node run identical.

Arrays carry a leading run axis S (one seed per independent run): ``values`` returns shape
``(S, stop − start)``, ``block`` returns ``(T, S, stop − start)`` for ticks ``t0 … t0+T−1``.

``power`` is the time-averaged perturbation power ⟨θ̃_i²⟩ used to normalise the error
signal ε_i = C̃·θ̃_i/⟨θ̃_i²⟩, which makes E[ε_i] = ∂C/∂θ_i for every type when C̃ = C − C₀
(analog FM's high-pass C̃ scales tone i by Re H(f_i): see ``JobConfig.fm_gain_correction``):

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
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_IDX_MUL = np.uint64(0xD6E8FEB86659FD93)
_TILE = 1 << 15  # R-CM hashes this many values at a time: two uint64 tiles of 256 KiB, in L2


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective avalanche hash of uint64 (wraps modulo 2⁶⁴)."""
    with np.errstate(over="ignore"):
        z = x + _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _splitmix64_top_(z: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """In place on a uint64 array: z ← splitmix64(z) up to its last step ``z ^ (z >> 31)``.

    That step leaves bit 63 alone, so the top bit of the result is the top bit of
    splitmix64(z); callers that need only that bit skip it. ``tmp`` is scratch of z's shape.
    Array (not scalar) integer arithmetic wraps without warnings, so no errstate is needed.
    """
    z += _GAMMA
    np.right_shift(z, 30, out=tmp)
    z ^= tmp
    z *= _MIX1
    np.right_shift(z, 27, out=tmp)
    z ^= tmp
    z *= _MIX2
    return z


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
    def block(self, t0: int, count: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """θ̃ for ticks t0 … t0+count−1 and parameters start … stop−1: (count, S, n).

        With ``out`` (C-contiguous, that shape and ``dtype``) the values are written there and
        ``out`` is returned: a node reuses one buffer, since freshly allocated blocks of this
        size come from the OS page by page and faulting them in costs more than the hash.
        """

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

    def block(self, t0, count, start, stop, out=None):
        ticks = (np.arange(t0, t0 + count) % self.num_params)[:, None, None]
        hit = self.slot[None, :, start:stop] == ticks
        return np.multiply(hit, self.dtype.type(self.amplitude), out=out, dtype=self.dtype)


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

    def block(self, t0, count, start, stop, out=None):
        rows = np.arange(start + 1, stop + 1, dtype=np.int64)
        cols = np.arange(t0, t0 + count, dtype=np.int64) % self.length
        parity = np.bitwise_count(rows[None, :] & cols[:, None]) & 1
        signs = (1 - 2 * parity.astype(np.int8)).astype(self.dtype) * self.dtype.type(self.amplitude)
        view = np.broadcast_to(signs[:, None, :], (count, len(self.seeds), stop - start))
        if out is None:
            return view
        np.copyto(out, view)
        return out


class RandomCode(Perturbation):
    """R-CM: independent ±A per (run, parameter, tick): zero-mean, statistically orthogonal."""

    _STREAM = 0x52434D  # "RCM"

    def __init__(self, num_params, seeds, amplitude, dtype=np.float64):
        super().__init__(num_params, seeds, amplitude, dtype)
        self._run_key = splitmix64(splitmix64(self.seeds.astype(np.uint64) ^ np.uint64(self._STREAM)))
        self._codes_for: tuple[int, int] | None = None
        self._codes = np.empty(0, dtype=np.uint64)
        self._tmp = np.empty(0, dtype=np.uint64)

    @property
    def power(self) -> float:
        return self.amplitude**2

    @property
    def period(self) -> None:
        return None

    def block(self, t0, count, start, stop, out=None):
        """θ̃ = ±A with the sign from bit 63 of h = splitmix64(k_{s,t} ^ i·c), where
        k_{s,t} = splitmix64(key_s ^ t): set → +A, clear → −A.

        The hash runs over tiles of at most ``_TILE`` values, so its scratch stays in the
        L2 cache (a block of 4·10⁶ values hashed whole went through memory at each of its
        eight passes: 43 ns a float32 value against 4 ns tiled, docs/benchmarks.md, issue 17)."""
        ticks = np.arange(t0, t0 + count, dtype=np.uint64)
        key = splitmix64(self._run_key[None, :] ^ ticks[:, None]).reshape(-1, 1)  # (T·S, 1): one per row
        a = self.dtype.type(self.amplitude)
        n, rows = stop - start, count * len(self.seeds)
        if out is None:
            out = np.empty((count, len(self.seeds), n), dtype=self.dtype)
        codes = self._index_code(start, stop)[None, :]
        size = self.dtype.itemsize
        if size not in (4, 8):  # no bit trick for this width: a select, untiled
            z = np.bitwise_xor(key, codes)
            _splitmix64_top_(z, np.empty_like(z))
            np.copyto(out.reshape(rows, n), np.where((z >> np.uint64(63)).astype(bool), a, -a))
            return out
        # A and its sign bit flipped where the hash bit is clear: (h & 2^63) ^ (bits(A) ^ 2^63) is
        # exactly A or −A (a float32 takes the top half of h), as a select would give.
        bits = out.reshape(rows, n).view(np.uint64 if size == 8 else np.uint32)
        sign = np.uint64(1 << 63) if size == 8 else np.uint64(1 << 31)
        fill = np.uint64(int(a.view(np.uint64 if size == 8 else np.uint32))) ^ sign
        per_row, per_col = max(1, _TILE // n), min(n, _TILE)
        z_buf, tmp_buf = self._scratch()
        for r0 in range(0, rows, per_row):
            r1 = min(rows, r0 + per_row)
            for c0 in range(0, n, per_col):
                c1 = min(n, c0 + per_col)
                shape = (r1 - r0, c1 - c0)
                # float64 values are hashed in place; a float32's need 64-bit room first
                z = bits[r0:r1, c0:c1] if size == 8 else z_buf[: shape[0] * shape[1]].reshape(shape)
                np.bitwise_xor(key[r0:r1], codes[:, c0:c1], out=z)
                _splitmix64_top_(z, tmp_buf[: z.size].reshape(shape))
                if size == 4:
                    z >>= np.uint64(32)
                z &= sign
                z ^= fill
                if size == 4:
                    np.copyto(bits[r0:r1, c0:c1], z, casting="unsafe")
        return out

    def _scratch(self) -> tuple[np.ndarray, np.ndarray]:
        """Two uint64 tiles, kept: fresh arrays would come from the OS page by page."""
        if self._tmp.size != 2 * _TILE:
            self._tmp = np.empty(2 * _TILE, dtype=np.uint64)
        return self._tmp[:_TILE], self._tmp[_TILE:]

    def _index_code(self, start: int, stop: int) -> np.ndarray:
        """i·c for the shard's indices (a node asks for the same shard every block)."""
        if self._codes_for != (start, stop):
            self._codes = np.arange(start, stop, dtype=np.uint64) * _IDX_MUL
            self._codes_for = (start, stop)
        return self._codes


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

    def block(self, t0, count, start, stop, out=None):
        t = np.arange(t0, t0 + count, dtype=np.float64)[:, None, None]
        arg = 2 * np.pi * self.freq[None, :, start:stop] * t + self.phase[None, :, start:stop]
        values = (self.amplitude * np.sin(arg)).astype(self.dtype, copy=False)
        if out is None:
            return values
        np.copyto(out, values)
        return out


def make_perturbation(kind: str, num_params: int, seeds, amplitude: float, fm_band=(0.0, 0.5),
                      dtype=np.float64) -> Perturbation:
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
