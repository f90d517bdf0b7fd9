"""The reference chip (examples/reference_chip.py) as its own process, for the chip tests."""

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from services.cluster.launcher import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CHIP = os.path.join(ROOT, "examples", "reference_chip.py")


class RefChip:
    """``examples/reference_chip.py ARGS`` on a free loopback port, run with ``python -I`` from a
    folder outside the repository (no PYTHONPATH, no script folder on sys.path)."""

    def __init__(self, workdir, *args: str, endpoint: str = ""):
        self.workdir, self.args = str(workdir), list(args)
        self.endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen | None = None
        self.ready_line = self.tail = ""

    def start(self, timeout_s: float = 30.0) -> "RefChip":
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen([sys.executable, "-I", CHIP, "--endpoint", self.endpoint, *self.args],
                                     cwd=self.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.monotonic() + timeout_s  # a liveness bound, not a timing claim
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"the reference chip exited with {self.proc.wait()} before it was ready")
                if line.rstrip().endswith("ready"):
                    self.ready_line = line
                    return self
        raise AssertionError("the reference chip did not get ready")

    def kill(self) -> None:
        """SIGKILL: the chip vanishes mid-answer, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status (None when it was not running)."""
        if self.proc is None:
            return None
        if self.proc.stdout.closed:  # stopped already
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.tail = self.proc.stdout.read()  # what it printed after the ready line
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def ref_chip(tmp_path):
    """``ref_chip(*args, endpoint="")`` starts a reference chip; every one is stopped after the test."""
    chips: list[RefChip] = []

    def start(*args: str, endpoint: str = "") -> RefChip:
        chip = RefChip(tmp_path, *args, endpoint=endpoint).start()
        chips.append(chip)
        return chip

    yield start
    for chip in chips:
        chip.stop()
