"""Worker processes on this machine, each with its share of the cores: where ``--workers N`` runs.

``WorkerPool(n)`` starts ``n`` processes (``python -m services.studies.workers``) and hands them
tasks, a module-level function and its arguments, one task per worker at a time; results come
back as tasks finish (:meth:`WorkerPool.run`). Studies run their points this way
(``pmgd study --workers N``) and ``pmgd train --workers N`` its slices of seeds.

**Threads.** ``n`` workers share the machine's cores (:func:`cores`: the CPUs this process may
run on): each gets ``cores // n`` threads (at least 1), set in its environment before it starts
(``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``: read by OpenMP and the BLAS
libraries when numpy and torch load) and with ``torch.set_num_threads`` once torch is loaded.
That is why workers are fresh interpreters started with their own environment, not forks of
this process (whose numpy and torch are loaded already, with every core's threads).

**Ports.** Each worker claims a port block of its own (``ports.claim``) before its first task,
so that servers started by tasks of different workers (a cluster engine, a reference chip)
never share a port.

**Messages.** Tasks and results are pickled, length-prefixed, over the worker's stdin and a
copy of its original stdout; the worker's own stdout then points at its stderr, so a task
that prints cannot corrupt the stream. Only this process and the workers it started are at
either end of those pipes (nothing listens on the network). A task that raises is reported
back and re-raised here as :class:`TaskError` naming the task; a worker that dies is a
:class:`TaskError` too. Ctrl-C reaches the workers as well (one process group): they ignore
it, and :meth:`WorkerPool.close` stops them.
"""

from __future__ import annotations

import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
THREADS_VARIABLE = "PMGD_WORKER_THREADS"  # the worker's share, for torch.set_num_threads
MAX_WORKERS = 256
_HEADER = struct.Struct("!Q")


class TaskError(RuntimeError):
    """A task failed in a worker (it raised, or its worker died); the message names the task."""


def config_error_parts(err) -> tuple[str, str, str]:
    """(field, message, kind) of a ``ConfigError``: what it takes to raise it again in another
    process (it does not pickle: its one argument is the formatted text)."""
    text = str(err)
    cut = text.find(f" '{err.field}'")
    return err.field, err.message, text[:cut] if cut > 0 else "job config field"


def raise_config_error(parts, where: str):
    from pmgd_node.config import ConfigError

    field, message, kind = parts
    raise ConfigError(field, f"{message} ({where})", kind=kind)


def cores() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Threads each of ``workers`` workers gets so that together they use every core once."""
    return max(1, cores() // workers)


def thread_env(threads: int) -> dict[str, str]:
    """The environment variables that hold a process to ``threads`` threads."""
    return {**{name: str(threads) for name in THREAD_VARIABLES}, THREADS_VARIABLE: str(threads)}


def check_workers(workers: int, name: str = "workers") -> int:
    from pmgd_node.config import ConfigError

    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(name, f"must be an integer in [1, {MAX_WORKERS}]; got {workers!r}", kind="option")
    return workers


def limit_torch_threads() -> None:
    """``torch.set_num_threads`` to this worker's share (set in its environment), if torch is loaded
    or when it is: the BLAS and OpenMP variables are read at load, torch's intra-op pool here."""
    threads = os.environ.get(THREADS_VARIABLE)
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream):
    """The next message, or None at the end of the stream (the other side closed or died)."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    size = _HEADER.unpack(head)[0]
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None


class _Worker:
    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "services.studies.workers"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.task: tuple[int, str] | None = None  # (item, label) in flight


class WorkerPool:
    """``workers`` worker processes with ``cores // workers`` threads each, started on first use."""

    def __init__(self, workers: int):
        self.workers = check_workers(workers)
        self.threads = threads_per_worker(workers)
        self._pool: list[_Worker] = []

    def start(self) -> WorkerPool:
        if not self._pool:
            env = {**os.environ, **thread_env(self.threads)}
            self._pool = [_Worker(env) for _ in range(self.workers)]
        return self

    def run(self, fn: Callable, tasks: list[tuple], labels: list[str] | None = None,
            on_start: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
        """``fn(*tasks[i])`` for every i in the workers; yields ``(i, result)`` as each finishes.

        ``fn`` must be a module-level function (it travels by name). ``labels[i]`` names task i
        in errors; ``on_start(i)`` is called as task i is handed to a worker."""
        self.start()
        labels = labels or [f"task {i}" for i in range(len(tasks))]
        todo = list(range(len(tasks)))[::-1]
        name = (fn.__module__, fn.__qualname__)
        selector = selectors.DefaultSelector()
        try:
            for w in self._pool:
                selector.register(w.proc.stdout, selectors.EVENT_READ, w)
            while todo or any(w.task for w in self._pool):
                for w in self._pool:
                    if w.task is None and todo:
                        i = todo.pop()
                        w.task = (i, labels[i])
                        if on_start is not None:
                            on_start(i)
                        try:
                            _send(w.proc.stdin, (name, tasks[i]))
                        except BrokenPipeError:
                            pass  # it died: its end of stdout says so below
                for key, _ in selector.select():
                    w = key.data
                    if w.task is None:
                        continue
                    message = _receive(w.proc.stdout)
                    i, label = w.task
                    if message is None:
                        code = w.proc.wait()
                        raise TaskError(f"{label}: its worker process (pid {w.proc.pid}) died with exit code {code}")
                    w.task = None
                    kind, payload = message
                    if kind == "config_error":  # a bad setting found as the task ran: still named as one
                        raise_config_error(payload, label)
                    if kind == "error":
                        raise TaskError(f"{label} failed: {payload}")
                    yield i, payload
        finally:
            selector.close()

    def close(self) -> None:
        """Stop the workers: the ones idle end at the end of their input; any still running a
        task (an interrupted run) are terminated, then killed."""
        for w in self._pool:
            try:
                w.proc.stdin.close()
            except OSError:
                pass
        for w in self._pool:
            try:
                w.proc.wait(timeout=0 if w.task else 10)
            except subprocess.TimeoutExpired:
                w.proc.terminate()
                try:
                    w.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
            w.proc.stdout.close()
        self._pool = []

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> int:
    """A worker: run the tasks read from stdin until it closes; answers on the original stdout."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner stops us (close), not the terminal's Ctrl-C
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a task's prints go to stderr, never into the answers
    sys.stdout = os.fdopen(1, "w", buffering=1)
    from pmgd_node.config import ConfigError
    from services.studies import ports

    ports.claim()
    limit_torch_threads()
    requests = sys.stdin.buffer
    while True:
        message = _receive(requests)
        if message is None:
            return 0
        (module, qualname), args = message
        try:
            fn = importlib.import_module(module)
            for part in qualname.split("."):
                fn = getattr(fn, part)
            answer = ("ok", fn(*args))
        except ConfigError as err:
            answer = ("config_error", config_error_parts(err))
        except Exception as err:  # reported to the runner, which raises it there
            traceback.print_exc()
            answer = ("error", f"{type(err).__name__}: {err}")
        try:
            _send(answers, answer)
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            _send(answers, ("error", f"its result cannot travel back (pickle): {err}"))


if __name__ == "__main__":
    sys.exit(main())
