"""The typed job configuration: every training hyper-parameter of a PMGD job.

A job config travels over the wire (it is plain data: ``to_dict``/``from_dict``) and is
validated once, at construction: a bad value raises :class:`ConfigError` naming the field
and the allowed values, so nothing downstream ever sees an invalid job.

Conventions (DESIGN §1): η is normalised so that ``E[ε_i] = ∂C/∂θ_i`` for every perturbation
type; τ_θ and τ_x are in perturbed ticks; the mini-batch of discrete mode is τ_θ/τ_x samples.
Run ``r`` of a multi-seed job uses seed ``seed + r`` for its initialisation and perturbation,
so run 0 of ``--seeds 100 --seed 7`` is the single run ``--seed 7``; all runs of one job see
the same input order (drawn from ``seed``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

PERTURBATIONS = ("tm", "cm", "rcm", "fm")
MODES = ("discrete", "analog")
INTEGRATORS = ("auto", "sum", "lowpass", "momentum")
_TASK_RE = re.compile(r"^(parity([2-9]|1[0-2])|fmnist|cifar10)$")
_MLP_RE = re.compile(r"^\d+(-\d+)+$")
TASK_HELP = "parity2..parity12, fmnist, cifar10"


class ConfigError(ValueError):
    """A job-config field holds a value outside its allowed range."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"job config field '{field_name}': {message}")


def _default_network(task: str) -> str:
    if task.startswith("parity"):
        n = int(task[len("parity"):])
        return f"{n}-{n}-1"
    return f"cnn-{task}"


@dataclass(frozen=True)
class JobConfig:
    """One PMGD training job. Defaults are the documented 2-bit parity setting (README)."""

    task: str = "parity2"
    network: str = ""  # "" → the task's reference network (2-2-1, 3-3-1, cnn-fmnist, cnn-cifar10)
    perturbation: str = "rcm"
    mode: str = "discrete"
    integrator: str = "auto"  # auto: sum (discrete) or lowpass (analog)
    amplitude: float = 0.1  # A
    eta: float = 0.5  # η
    tau_theta: int = 1  # τ_θ, ticks between updates (discrete) / LPF time constant (analog)
    tau_x: int = 1  # τ_x, ticks between input changes
    tau_hp: float = 2.0  # τ_hp, high-pass time constant of the analog cost extraction, ticks
    momentum_decay: float = 1.0  # β of the momentum integrator: G ← βG + ε (1 = the paper's un-reset sum)
    fm_band: tuple[float, float] = (0.0, 0.5)  # FM frequencies, cycles per tick (paper: bandwidth 1/2τ_p)
    batch: int = 1  # samples the hardware sees at once in one tick
    init_scale: float | None = None  # scale of the initial θ⁰ (None: the model's reference init, MLP ±0.5)
    seed: int = 0
    seeds: int = 1  # independent random initialisations run side by side
    max_ticks: int = 20_000  # perturbed-tick budget (2× the paper's 10⁴ for 2-bit parity)
    target_accuracy: float | None = 1.0
    target_cost: float | None = None
    eval_every: int = 10  # ticks between checks of the stopping rule
    eval_samples: int = 0  # held-out samples per check (0 = whole split)
    nodes: int = 1
    data_dir: str = ""

    def __post_init__(self) -> None:
        if not self.network:
            object.__setattr__(self, "network", _default_network(self.task))
        object.__setattr__(self, "fm_band", tuple(self.fm_band))
        _validate(self)

    # --- derived ---------------------------------------------------------------------
    @property
    def resolved_integrator(self) -> str:
        if self.integrator != "auto":
            return self.integrator
        return "sum" if self.mode == "discrete" else "lowpass"

    @property
    def minibatch(self) -> float:
        """Samples integrated into one discrete update: τ_θ/τ_x (times ``batch``)."""
        return self.tau_theta / self.tau_x * self.batch

    # --- wire / file form ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fm_band"] = list(self.fm_band)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobConfig":
        if not isinstance(data, dict):
            raise ConfigError("<root>", f"expected a mapping of fields, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; allowed fields: {', '.join(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "JobConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str) -> "JobConfig":
        """Read a JSON or TOML file (by extension) holding job-config fields."""
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                return cls.from_dict(tomllib.load(f))
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _check_type(name: str, value: Any, kind: type | tuple[type, ...], allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(name, f"must be {allowed}, got {value!r}")


def _int_range(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    allowed = f"an integer ≥ {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    _check_type(name, value, int, allowed)
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(name, f"must be {allowed}, got {value!r}")


def _float_range(name: str, value: Any, lo: float, hi: float | None = None, lo_open: bool = True) -> None:
    bound = f"> {lo}" if lo_open else f"≥ {lo}"
    allowed = f"a number {bound}" + ("" if hi is None else f" and ≤ {hi}")
    _check_type(name, value, (int, float), allowed)
    if not math.isfinite(value) or (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
        raise ConfigError(name, f"must be {allowed}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}; got {value!r}")


def _validate(c: JobConfig) -> None:
    if not isinstance(c.task, str) or not _TASK_RE.match(c.task):
        raise ConfigError("task", f"must be one of {TASK_HELP}; got {c.task!r}")
    if c.task.startswith("parity"):
        if not isinstance(c.network, str) or not _MLP_RE.match(c.network):
            raise ConfigError("network", f"must be an MLP spec like '2-2-1' for {c.task}; got {c.network!r}")
        layers = [int(s) for s in c.network.split("-")]
        n = int(c.task[len("parity"):])
        if layers[0] != n or layers[-1] != 1 or min(layers) < 1:
            raise ConfigError("network", f"must start with {n} inputs and end with 1 output for {c.task}; got {c.network!r}")
    elif c.network != f"cnn-{c.task}":
        raise ConfigError("network", f"must be 'cnn-{c.task}' for task {c.task}; got {c.network!r}")
    _choice("perturbation", c.perturbation, PERTURBATIONS)
    _choice("mode", c.mode, MODES)
    _choice("integrator", c.integrator, INTEGRATORS)
    if c.mode == "discrete" and c.resolved_integrator == "lowpass":
        raise ConfigError("integrator", "lowpass is the analog integrator; use sum or momentum in discrete mode")
    if c.mode == "analog" and c.resolved_integrator != "lowpass":
        raise ConfigError("integrator", "analog mode integrates with the leaky lowpass; use auto or lowpass")
    if c.mode == "discrete" and c.perturbation == "fm":
        raise ConfigError("perturbation", "fm is the analog perturbation; use mode 'analog' (or tm, cm, rcm)")
    _float_range("amplitude", c.amplitude, 0.0, 10.0)
    _float_range("eta", c.eta, 0.0, 1e6, lo_open=False)
    _int_range("tau_theta", c.tau_theta, 1)
    _int_range("tau_x", c.tau_x, 1)
    _float_range("tau_hp", c.tau_hp, 0.0)
    _float_range("momentum_decay", c.momentum_decay, 0.0, 1.0, lo_open=False)
    band = c.fm_band
    if len(band) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in band):
        raise ConfigError("fm_band", f"must be two numbers [f_min, f_max] in cycles per tick; got {band!r}")
    if not (0.0 <= band[0] < band[1] <= 0.5):
        raise ConfigError("fm_band", f"must satisfy 0 ≤ f_min < f_max ≤ 0.5 cycles per tick (Nyquist); got {list(band)}")
    _int_range("batch", c.batch, 1, 1_000_000)
    if c.init_scale is not None:
        _float_range("init_scale", c.init_scale, 0.0, 100.0)
    _int_range("seed", c.seed, 0, 2**31 - 1)
    _int_range("seeds", c.seeds, 1, 100_000)
    _int_range("max_ticks", c.max_ticks, 1)
    if c.target_accuracy is not None:
        _float_range("target_accuracy", c.target_accuracy, 0.0, 1.0)
    if c.target_cost is not None:
        _float_range("target_cost", c.target_cost, 0.0, lo_open=False)
    _int_range("eval_every", c.eval_every, 1)
    _int_range("eval_samples", c.eval_samples, 0)
    _int_range("nodes", c.nodes, 1, 4096)
    if not isinstance(c.data_dir, str):
        raise ConfigError("data_dir", f"must be a path string; got {c.data_dir!r}")
