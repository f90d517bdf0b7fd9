"""Service settings at the edge (docs/architecture.md §4), shared by every service process.

A service's settings are one frozen dataclass of str/int/float fields. :func:`parse` reads
each field from the environment (``<prefix><FIELD>``; the cluster-wide ``keys`` and
``key_name`` also from ``PMGD_KEYS`` and ``PMGD_KEY_NAME``, so one variable serves every
service), lets a command-line flag (``--field-name``) override it, and fails fast naming the
variable; :func:`serve` runs the
service until SIGTERM or SIGINT clears its ``running`` flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal

_TYPES = {"str": str, "int": int, "float": float}
SHARED = ("keys", "key_name")  # fields every service also reads from PMGD_<FIELD>


def from_env(cls, prefix: str, env=os.environ, **overrides):
    """``cls`` from ``<prefix><FIELD>`` environment variables, then non-None ``overrides``."""
    values = {}
    for f in dataclasses.fields(cls):
        raw = env.get(prefix + f.name.upper())
        if raw is None and f.name in SHARED:
            raw = env.get("PMGD_" + f.name.upper())
        if raw is None:
            continue
        try:
            values[f.name] = _TYPES[f.type](raw)
        except ValueError:
            raise SystemExit(f"{prefix}{f.name.upper()} must be of type {f.type}; got {raw!r}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def parse(cls, prefix: str, prog: str, description: str, argv: list[str] | None = None):
    """``cls`` from the environment with one flag per field overriding it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        shared = f" or PMGD_{f.name.upper()}" if f.name in SHARED and prefix != "PMGD_" else ""
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, type=_TYPES[f.type],
                            help=f"default: env {prefix}{f.name.upper()}{shared} or {f.default!r}")
    return from_env(cls, prefix, **vars(parser.parse_args(argv)))


def serve(service) -> int:
    """``service.run()`` until SIGTERM or SIGINT asks it to stop (it then closes cleanly)."""

    def leave(signum, frame):
        service.running = False

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    return service.run()
