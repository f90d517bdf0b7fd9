"""The typed job configuration: every training hyper-parameter of a PMGD job.

A job config travels over the wire (it is plain data: ``to_dict``/``from_dict``) and is
validated once, at construction: a bad value raises :class:`ConfigError` naming the field
and the allowed values, so nothing downstream ever sees an invalid job.

Conventions (docs/architecture.md §1): η is normalised so that ``E[ε_i] = ∂C/∂θ_i`` for every perturbation
type (analog FM: times its tone's high-pass gain Re H(f_i), unless ``fm_gain_correction``);
τ_θ and τ_x are in perturbed ticks; the mini-batch of discrete mode is τ_θ/τ_x samples.
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
TIMINGS = ("sync", "async")
CORRELATIONS = ("tagged", "untagged")
JITTER_DISTS = ("uniform", "exponential")
UPLINKS = ("full", "replica")
# Link-model fields a per-node override (``node_links``) may set.
LINK_FIELDS = ("delay", "jitter", "drop", "up_delay", "up_jitter", "up_drop", "drift")
_TASK_RE = re.compile(r"^(parity([2-9]|1[0-2])|fmnist|cifar10|custom)$")
_MLP_RE = re.compile(r"^\d+(-\d+)+$")
TASK_HELP = "parity2..parity12, fmnist, cifar10, custom (with model)"
# A user's network: "path/to/file.py:NAME" or "package.module:NAME" (services/evaluator/user_model.py).
_MODEL_RE = re.compile(r"^[^:\x00]{1,1000}:[A-Za-z_][A-Za-z0-9_]{0,200}$")
# A chip-protocol endpoint (docs/chip-protocol.md).
_CHIP_RE = re.compile(r"^(tcp://[A-Za-z0-9_.\-\[\]:*]{1,250}:\d{1,5}|ipc://[^\x00]{1,250})$")

# One line per field: `pmgd train --help` and the API's JSON schema both show it.
FIELD_HELP = {
    "task": "parity2..parity12, fmnist, cifar10, or custom (set by model)",
    "model": "your own network: PATH.py:NAME or package.module:NAME (docs/bring-your-own.md); sets task custom",
    "chip": "chip-protocol endpoint tcp://HOST:PORT that runs the forward passes ('' = in-process)",
    "chip_timeout": "seconds to wait for one chip answer before retrying",
    "chip_retries": "times a chip request is sent again before the job stops with an error",
    "network": "MLP spec like 2-2-1 for parity",
    "perturbation": "perturbation type",
    "mode": "discrete (sample and hold) or analog (continuous time)",
    "integrator": "gradient integrator; auto: sum (discrete) or lowpass (analog)",
    "amplitude": "perturbation amplitude A",
    "eta": "learning rate η",
    "tau_theta": "τ_θ in ticks: update period (discrete) or lowpass time constant (analog)",
    "tau_x": "τ_x in ticks: input-change period",
    "tau_hp": "τ_hp in ticks: high-pass time constant of the analog C̃ extraction",
    "momentum_decay": "β of the momentum integrator, G ← βG + ε (1: the paper's un-reset sum)",
    "fm_band": "FM tone band in cycles per tick",
    "batch": "samples the hardware sees at once in one tick",
    "init_scale": "θ⁰ drawn uniformly in ±X",
    "seed": "random seed of run 0 (run r uses seed + r)",
    "seeds": "number of random initialisations run side by side",
    "max_ticks": "perturbed-tick budget",
    "target_accuracy": "stop at this accuracy ('none' to disable)",
    "target_cost": "stop at this cost ('none' to disable)",
    "eval_every": "ticks between checks of the stopping rule",
    "eval_samples": "held-out samples per check (0: the whole split)",
    "nodes": "parameter nodes to shard the parameters over; unset, a job sent to a running cluster takes "
             "every node connected to it",
    "data_dir": "directory holding the Fashion-MNIST / CIFAR-10 files",
    "timing": "sync (lock-step) or async (each node on its own clock)",
    "correlation": "tagged (C̃ carries its tick) or untagged (nodes use their current θ̃)",
    "delay": "C̃ broadcast delay to the nodes, ticks",
    "jitter": "extra random C̃ delay, ticks",
    "jitter_dist": "distribution of the jitter",
    "drop": "probability a C̃ message to a node is lost",
    "up_delay": "node → broadcaster weights delay, ticks (async)",
    "up_jitter": "extra random weights delay, ticks (async)",
    "up_drop": "probability a weights message is lost (async)",
    "drift": "async: node clock rates uniform in 1 ± X",
    "tick_period": "cluster τ_p in seconds (0: as fast as possible)",
    "uplink": "cluster, sync: full (θ⁰ + θ̃ every tick) or replica (θ⁰ at updates and a checksum per tick; "
              "the broadcaster regenerates θ̃); async always sends full (docs/cluster.md)",
    "checkpoint_every": "cluster: ticks between θ⁰ checkpoints",
    "compensation": "untagged: correlate C̃ with θ̃[now − N] (a known delay; FM phase compensation)",
    "cost_noise": "σ of Gaussian read-out noise on every measured cost",
    "update_noise": "σ of Gaussian noise added to every weight update",
    "device_variation": "σ of the fixed per-parameter perturbation and update gains (1 ± σ)",
    "fm_gain_correction": "analog FM: each node divides its ε by its tone's high-pass gain",
    "c_tilde_limit": "clip every C̃ to ±X before it is broadcast ('none': never)",
    "label_smoothing": "CNNs: cross-entropy against (1 − X)·one-hot + X/classes (the authors use 0.01)",
    "weight_decay": "λ of each node's local decay: θ⁰ ← (1 − ηλ)θ⁰ − ηG at every update",
    "eta_decay_ticks": "T of the η decay η_t = η/(1 + t/T)^p, ticks (0: constant η)",
    "eta_decay_power": "p of the η decay (0.5: inverse square root)",
    "node_links": "per-node link overrides: {\"<node index>\": {delay, jitter, drop, up_delay, up_jitter, up_drop, "
                  "drift}} (config files only)",
}


@dataclass(frozen=True)
class Bound:
    """The allowed range of one numeric field: the one table that validation, the CLI and the
    API's JSON schema all read."""

    kind: type  # int or float
    lo: float
    hi: float | None = None
    lo_open: bool = False  # floats: lo itself excluded

    def check(self, name: str, value: Any) -> None:
        if self.kind is int:
            _int_range(name, value, int(self.lo), None if self.hi is None else int(self.hi))
        else:
            _float_range(name, value, self.lo, self.hi, self.lo_open)

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer" if self.kind is int else "number"}
        out["exclusiveMinimum" if self.lo_open else "minimum"] = self.kind(self.lo)
        if self.hi is not None:
            out["maximum"] = self.kind(self.hi)
        return out


# Numeric fields → their bounds (None-able fields are checked only when set).
BOUNDS: dict[str, Bound] = {
    "amplitude": Bound(float, 0.0, 10.0, lo_open=True),
    "eta": Bound(float, 0.0, 1e6),
    "tau_theta": Bound(int, 1),
    "tau_x": Bound(int, 1),
    "tau_hp": Bound(float, 0.0, lo_open=True),
    "momentum_decay": Bound(float, 0.0, 1.0),
    "batch": Bound(int, 1, 1_000_000),
    "init_scale": Bound(float, 0.0, 100.0, lo_open=True),
    "seed": Bound(int, 0, 2**31 - 1),
    "seeds": Bound(int, 1, 100_000),
    "max_ticks": Bound(int, 1, 10**12),  # a trillion ticks: years at any τ_p a CPU reaches
    "target_accuracy": Bound(float, 0.0, 1.0, lo_open=True),
    "target_cost": Bound(float, 0.0),
    "eval_every": Bound(int, 1),
    "eval_samples": Bound(int, 0),
    "nodes": Bound(int, 1, 4096),
    "delay": Bound(int, 0, 1_000_000),
    "jitter": Bound(int, 0, 1_000_000),
    "drop": Bound(float, 0.0, 0.99),
    "up_delay": Bound(int, 0, 1_000_000),
    "up_jitter": Bound(int, 0, 1_000_000),
    "up_drop": Bound(float, 0.0, 0.99),
    "drift": Bound(float, 0.0, 0.5),
    "tick_period": Bound(float, 0.0, 60.0),
    "checkpoint_every": Bound(int, 1),
    "compensation": Bound(int, 0, 1_000_000),
    "cost_noise": Bound(float, 0.0, 1e3),
    "update_noise": Bound(float, 0.0, 1e3),
    "device_variation": Bound(float, 0.0, 1.0),
    "c_tilde_limit": Bound(float, 0.0, 1e6, lo_open=True),
    "label_smoothing": Bound(float, 0.0, 0.5),
    "weight_decay": Bound(float, 0.0, 1e6),
    "eta_decay_ticks": Bound(int, 0, 10**12),
    "eta_decay_power": Bound(float, 0.0, 2.0, lo_open=True),
    "chip_timeout": Bound(float, 0.0, 3600.0, lo_open=True),
    "chip_retries": Bound(int, 0, 100),
}
# Parameters × runs a job may hold. The engine keeps θ⁰ and G per value and a block of θ̃ of
# at most 2¹⁸ values per node (pmgd_node/node.py: 64 ticks for small shards, fewer for large
# ones), so one request cannot take a service's memory (a GPU sweep of the CIFAR-10 CNN: 150 seeds).
MAX_JOB_VALUES = 4_000_000
# Parameter counts of the CNN tasks (their networks are fixed; services/evaluator/models.py).
CNN_PARAMS = {"fmnist": 14_378, "cifar10": 26_154}

CHOICES = {"perturbation": PERTURBATIONS, "mode": MODES, "integrator": INTEGRATORS, "timing": TIMINGS,
           "correlation": CORRELATIONS, "jitter_dist": JITTER_DISTS, "uplink": UPLINKS}


class ConfigError(ValueError):
    """A job-config field holds a value outside its allowed range.

    ``kind`` says what ``field_name`` names, so that other settings checked the same way
    (a study parameter, a config file) are not mistaken for job-config fields.
    """

    def __init__(self, field_name: str, message: str, kind: str = "job config field"):
        self.field, self.message = field_name, message
        super().__init__(f"{kind} '{field_name}': {message}")


def _default_network(task: str) -> str:
    if task.startswith("parity"):
        n = int(task[len("parity"):])
        return f"{n}-{n}-1"
    return f"cnn-{task}"


@dataclass(frozen=True)
class JobConfig:
    """One PMGD training job. Defaults are the documented 2-bit parity setting (README)."""

    task: str = "parity2"  # "custom" when ``model`` names the user's own network
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
    # --- timing and links (docs/architecture.md §2); all in ticks, so the engine and the cluster agree ---
    timing: str = "sync"  # sync: lock-step ticks; async: every node ticks on its own clock
    correlation: str = "tagged"  # tagged: C̃ carries its tick; untagged: nodes use their current θ̃
    delay: int = 0  # C̃ broadcast → node: fixed delay, ticks
    jitter: int = 0  # C̃ broadcast → node: extra random delay, ticks (spread of jitter_dist)
    jitter_dist: str = "uniform"  # uniform on {0…jitter}, or exponential with mean jitter (rounded)
    drop: float = 0.0  # C̃ broadcast → node: probability a message is lost
    up_delay: int = 0  # node → broadcaster weights (async only: sync waits for every shard)
    up_jitter: int = 0
    up_drop: float = 0.0
    drift: float = 0.0  # async: node clock rates drawn uniformly from 1 ± drift
    node_links: dict = field(default_factory=dict)  # {"<node index>": {link field: value}} overrides
    tick_period: float = 0.0  # τ_p of the cluster in seconds (0: as fast as the links allow; async needs > 0)
    # What a node sends the broadcaster each sync tick: "full", θ⁰ + θ̃ every tick (and θ⁰ when
    # it changed), or "replica", θ⁰ only when it changed and a checksum of it otherwise (the
    # broadcaster regenerates θ̃: pmgd_node/protocol.py, Digest). The trajectory is the same;
    # async timing always sends "full". ("full" by default: a node fuzz test expects Weights.)
    uplink: str = "full"
    checkpoint_every: int = 1000  # cluster: ticks between θ⁰ checkpoints (fault recovery)
    compensation: int = 0  # untagged: nodes correlate C̃ with θ̃[now − compensation] (a known delay)
    # --- hardware imperfections (pmgd_node/imperfections.py), all seeded ---
    cost_noise: float = 0.0  # σ of Gaussian read-out noise on every measured cost
    update_noise: float = 0.0  # σ of Gaussian noise added to every weight update
    device_variation: float = 0.0  # σ of the fixed per-parameter perturbation and update gains (1 ± σ)
    # Analog FM only. The high-pass extraction passes tone i with in-phase gain Re H(f_i)
    # (pmgd_node.cost_variation.highpass_gain: 0.05–0.8 over the default band for P = 16 at
    # τ_hp = 2), so by default E[ε_i] = Re H(f_i)·∂C/∂θ_i: G is tilted towards the high tones.
    # True: every node divides its ε_i by its own tone's gain, max(Re H(f_i), 0.01) (gains
    # below the floor GAIN_FLOOR = 0.01, tones near f = 0, are clipped to it), so E[ε_i] =
    # ∂C/∂θ_i for every tone above the floor at any τ_hp (when ε correlates C̃ with the θ̃ that
    # produced it: no delay, tagged, or compensated).
    fm_gain_correction: bool = False
    # Chip side: every C̃ is clipped to ±c_tilde_limit before it is broadcast (the authors'
    # C_ac_limit, a stabiliser against single huge cost swings); None: not clipped.
    c_tilde_limit: float | None = None
    # CNN tasks: cross-entropy against labels smoothed to (1 − s)·one-hot + s/classes (the
    # authors' CNN runs use 0.01); it bounds the logits the cost rewards. 0: plain cross-entropy.
    label_smoothing: float = 0.0
    # λ of a local weight decay: every update is θ⁰ ← (1 − ηλ)·θ⁰ − η·G, a restoring force
    # against the random walk that θ⁰ makes along directions the cost does not see. 0: none.
    weight_decay: float = 0.0
    # η decay: the update after tick t uses η_t = η / (1 + (t+1)/T)^p with T = eta_decay_ticks
    # and p = eta_decay_power, so Σ η_t diverges (learning goes on) while the noise the
    # estimate injects, ∝ Σ η_t², grows slower (p = 1/2: logarithmically). 0: constant η.
    eta_decay_ticks: int = 0
    eta_decay_power: float = 0.5
    # --- your own network, your own chip (docs/bring-your-own.md) ---
    # "file.py:NAME" or "package.module:NAME": a function returning the model and its data;
    # the task is then "custom" and the network is this reference.
    model: str = ""
    # Endpoint of a chip that runs the forward passes over the chip protocol (docs/chip-protocol.md);
    # each request waits chip_timeout seconds and is sent again up to chip_retries times.
    chip: str = ""
    chip_timeout: float = 10.0
    chip_retries: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not _TASK_RE.match(self.task):
            raise ConfigError("task", f"must be one of {TASK_HELP}; got {self.task!r}")
        if not isinstance(self.model, str) or (self.model and not _MODEL_RE.match(self.model)):
            raise ConfigError("model", f"must be 'PATH.py:NAME' or 'package.module:NAME'; got {self.model!r}")
        if self.model and self.task == "parity2":  # the default task: a model replaces it
            object.__setattr__(self, "task", "custom")
        if self.task == "custom" and not self.network:
            object.__setattr__(self, "network", self.model)
        if not self.network:
            object.__setattr__(self, "network", _default_network(self.task))
        if not isinstance(self.fm_band, (list, tuple)):
            raise ConfigError("fm_band", f"must be two numbers [f_min, f_max] in cycles per tick; got {self.fm_band!r}")
        object.__setattr__(self, "fm_band", tuple(self.fm_band))
        _validate(self)

    # --- derived ---------------------------------------------------------------------
    @property
    def resolved_integrator(self) -> str:
        if self.integrator != "auto":
            return self.integrator
        return "sum" if self.mode == "discrete" else "lowpass"

    @property
    def num_params(self) -> int | None:
        """P of the job's network: an MLP's weights and biases, or the CNN's fixed count; None
        for a custom model (known once it is built)."""
        if self.task == "custom":
            return None
        if self.task in CNN_PARAMS:
            return CNN_PARAMS[self.task]
        layers = [int(n) for n in self.network.split("-")]
        return sum(a * b + b for a, b in zip(layers, layers[1:]))

    @property
    def minibatch(self) -> float:
        """Samples integrated into one discrete update: τ_θ/τ_x (times ``batch``)."""
        return self.tau_theta / self.tau_x * self.batch

    # --- wire / file form ---------------------------------------------------------------
    def link(self, node: int) -> dict[str, Any]:
        """The link-model fields of node ``node``: the job's, with its ``node_links`` overrides."""
        values = {name: getattr(self, name) for name in LINK_FIELDS}
        values.update(self.node_links.get(str(node), {}))
        return values

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fm_band"] = list(self.fm_band)
        d["node_links"] = {k: dict(v) for k, v in self.node_links.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        if not isinstance(data, dict):
            raise ConfigError("<root>", f"expected a mapping of fields, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; allowed fields: {', '.join(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str) -> JobConfig:
        """Read a JSON or TOML file (by extension) holding job-config fields."""
        return cls.from_dict(read_mapping(path))


def read_mapping(path: str) -> Any:
    """The contents of a JSON or TOML file, by extension (TOML always gives a mapping).

    Every command reads its config files through here, so a file that cannot be read or
    parsed stops each of them the same way: a :class:`ConfigError` naming the file, the
    line and column, and what is wrong (never a parser's traceback).
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        return tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except OSError as err:
        raise ConfigError(path, f"cannot read it: {err.strerror or err}", kind="config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(path, f"byte {err.start}: not UTF-8 text", kind="config file") from None
    except json.JSONDecodeError as err:
        raise ConfigError(path, f"line {err.lineno}, column {err.colno}: {err.msg}", kind="config file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, _toml_error(str(err), text), kind="config file") from None


def _toml_error(message: str, text: str) -> str:
    """tomllib's "Invalid value (at line 2, column 5)" as "line 2, column 5: Invalid value"
    (Python 3.11 gives the position only inside the message; "at end of document" is the last line)."""
    where = re.search(r" \(at (?:line (\d+), column (\d+)|end of document)\)$", message)
    if where is None:
        return message
    what = message[:where.start()]
    if where.group(1):
        return f"line {where.group(1)}, column {where.group(2)}: {what}"
    return f"line {max(1, len(text.splitlines()))} (end of file): {what}"


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
            raise ConfigError("network", f"must start with {n} inputs and end with 1 output for {c.task}; "
                                         f"got {c.network!r}")
    elif c.task == "custom":
        if not c.model:
            raise ConfigError("model", "task custom trains your own network: set model to 'PATH.py:NAME' or "
                                       "'package.module:NAME'")
        if c.network != c.model:
            raise ConfigError("network", f"a custom model's network is its model reference {c.model!r}; "
                                         f"got {c.network!r}")
    elif c.model:
        raise ConfigError("model", f"a model replaces the built-in task; use task custom (or leave task unset), "
                                   f"not {c.task!r}")
    elif c.network != f"cnn-{c.task}":
        raise ConfigError("network", f"must be 'cnn-{c.task}' for task {c.task}; got {c.network!r}")
    if not isinstance(c.chip, str) or (c.chip and not _CHIP_RE.match(c.chip)):
        raise ConfigError("chip", f"must be '' or an endpoint like tcp://HOST:PORT; got {c.chip!r}")
    for name, choices in CHOICES.items():
        _choice(name, getattr(c, name), choices)
    for name, bound in BOUNDS.items():
        value = getattr(c, name)
        if value is not None or name not in _OPTIONAL:
            bound.check(name, value)
    if c.num_params is not None and c.num_params * c.seeds > MAX_JOB_VALUES:
        raise ConfigError("seeds", f"the job holds {c.num_params:,} parameters × {c.seeds:,} runs = "
                                   f"{c.num_params * c.seeds:,} values; at most {MAX_JOB_VALUES:,} (fewer runs per "
                                   "job, or several jobs)")
    if c.mode == "discrete" and c.resolved_integrator == "lowpass":
        raise ConfigError("integrator", "lowpass is the analog integrator; use sum or momentum in discrete mode")
    if c.mode == "analog" and c.resolved_integrator != "lowpass":
        raise ConfigError("integrator", "analog mode integrates with the leaky lowpass; use auto or lowpass")
    if c.mode == "discrete" and c.perturbation == "fm":
        raise ConfigError("perturbation", "fm is the analog perturbation; use mode 'analog' (or tm, cm, rcm)")
    band = c.fm_band
    if len(band) != 2 or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in band):
        raise ConfigError("fm_band", f"must be two numbers [f_min, f_max] in cycles per tick; got {band!r}")
    if not (0.0 <= band[0] < band[1] <= 0.5):
        raise ConfigError("fm_band", "must satisfy 0 ≤ f_min < f_max ≤ 0.5 cycles per tick (Nyquist); "
                                     f"got {list(band)}")
    if not isinstance(c.data_dir, str):
        raise ConfigError("data_dir", f"must be a path string; got {c.data_dir!r}")
    if not isinstance(c.node_links, dict):
        raise ConfigError("node_links", f"must be a mapping of node index to link fields; got {c.node_links!r}")
    for key, override in c.node_links.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < c.nodes):
            raise ConfigError("node_links", f"keys must be node indices '0'…'{c.nodes - 1}'; got {key!r}")
        if not isinstance(override, dict) or set(override) - set(LINK_FIELDS):
            raise ConfigError(f"node_links.{key}",
                              f"must map some of {', '.join(LINK_FIELDS)} to values; got {override!r}")
        for name, value in override.items():
            BOUNDS[name].check(f"node_links.{key}.{name}", value)
    if c.timing == "async" and c.mode == "analog":
        raise ConfigError("timing", "async clocks are modelled for discrete mode; use timing 'sync' with mode 'analog'")
    if c.label_smoothing and c.task.startswith("parity"):
        raise ConfigError("label_smoothing", f"smooths the CNNs' cross-entropy; {c.task} trains on the MSE, use 0")
    if c.eta * c.weight_decay >= 1:
        raise ConfigError("weight_decay", f"η·λ must be < 1 (each update scales θ⁰ by 1 − ηλ); "
                                          f"got η = {c.eta}, λ = {c.weight_decay}")
    if not isinstance(c.fm_gain_correction, bool):
        raise ConfigError("fm_gain_correction", f"must be true or false; got {c.fm_gain_correction!r}")
    if c.fm_gain_correction and c.perturbation != "fm":
        raise ConfigError("fm_gain_correction",
                          f"corrects the analog FM high-pass gain; use it with perturbation fm, not {c.perturbation}")


# Fields that may be None (unset): their bounds apply only to a value.
_OPTIONAL = ("init_scale", "target_accuracy", "target_cost", "c_tilde_limit")


def json_schema() -> dict[str, Any]:
    """The JSON schema of a job config: every field with its type, range or choices, default
    and meaning (the API's ``/openapi.json``). Validation itself is :class:`JobConfig`'s."""
    props: dict[str, Any] = {}
    for f in dataclasses.fields(JobConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name in BOUNDS:
            prop = BOUNDS[f.name].schema()
            if f.name in _OPTIONAL:
                prop = {"anyOf": [prop, {"type": "null"}]}
        elif f.name in CHOICES:
            prop = {"type": "string", "enum": list(CHOICES[f.name])}
        elif f.name == "task":
            prop = {"type": "string", "pattern": _TASK_RE.pattern}
        elif f.name in ("model", "chip"):
            pattern = (_MODEL_RE if f.name == "model" else _CHIP_RE).pattern
            prop = {"type": "string", "maxLength": 1202 if f.name == "model" else 256,
                    "pattern": f"^$|{pattern}"}
        elif f.name == "fm_band":
            prop = {"type": "array", "items": {"type": "number", "minimum": 0.0, "maximum": 0.5},
                    "minItems": 2, "maxItems": 2}
        elif f.name == "node_links":
            prop = {"type": "object", "additionalProperties": {
                "type": "object", "properties": {k: BOUNDS[k].schema() for k in LINK_FIELDS},
                "additionalProperties": False}}
        elif isinstance(default, bool):
            prop = {"type": "boolean"}
        else:
            prop = {"type": "string"}
        prop["description"] = FIELD_HELP.get(f.name, "")
        prop["default"] = list(default) if isinstance(default, tuple) else default
        props[f.name] = prop
    return {"title": "JobConfig", "type": "object", "properties": props, "additionalProperties": False,
            "description": "One PMGD training job; unset fields take their defaults. Cross-field rules "
                           "(mode and integrator, η·λ < 1, …) answer 422 naming the field."}
