"""What running a study's points elsewhere costs per point, beside a real point (a benchmark, not a test).

    python benchmarks/study_overhead.py            # latency's first point at its defaults (20 seeds, ≈4 s)
    python benchmarks/study_overhead.py --rounds 5 --empty 400

In one run, side by side:

* an **empty point**: a task that does nothing (``os.getpid``) sent through each executor,
  one at a time (the latency a lone point pays: hand-off, result back) and ``--empty`` at once
  (the throughput cost per point when every worker is busy): on a local Dask cluster of two
  worker processes (``--scheduler local``) and on two local worker processes (``--workers 2``);
* a **real point**: point 0 of ``pmgd study latency`` at its default parameters, run in this
  process (``--workers 1``), on the Dask cluster and on a local worker, in interleaved rounds
  (warm workers: their imports were paid by a first task), median of ``--rounds``.

The ratios printed are overhead ÷ real point: the share of a point's time the executor adds.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from services import studies  # noqa: E402
from services.studies.executor import InProcess  # noqa: E402
from services.studies.sweep import run_point  # noqa: E402
from services.studies.workers import WorkerPool, cores  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="real points per executor (median)")
    parser.add_argument("--empty", type=int, default=200, help="empty points sent at once")
    parser.add_argument("--study", default="latency")
    args = parser.parse_args()
    from distributed import as_completed

    from services.studies.dask_executor import DaskExecutor

    study = studies.get(args.study)
    params = dict(study.params)
    point = study.points(params)[0]
    task = (study.name, params, 0, point.key, "local", 2)
    dask = DaskExecutor(study, params, "local", workers=2)
    pool = WorkerPool(2).start()
    here = InProcess(study, params)
    client = dask.client
    try:
        # Warm-up: every worker pays its imports (torch, the study) before anything is timed.
        workers = list(client.scheduler_info()["workers"])
        client.gather([client.submit(run_point, *task, pure=False, workers=[w]) for w in workers])
        list(pool.run(run_point, [task, task]))
        list(here.run([(0, point)]))

        empty = {}
        lone = [timed(lambda: client.submit(os.getpid, pure=False).result()) for _ in range(50)]
        many = timed(lambda: [f.result() for f in as_completed([client.submit(os.getpid, pure=False)
                                                                for _ in range(args.empty)])])
        empty["dask"] = (statistics.median(lone), many / args.empty)
        lone = [timed(lambda: list(pool.run(os.getpid, [()]))) for _ in range(50)]
        many = timed(lambda: list(pool.run(os.getpid, [()] * args.empty)))
        empty["workers"] = (statistics.median(lone), many / args.empty)

        real: dict[str, list[float]] = {"in-process": [], "dask": [], "workers": []}
        for _ in range(args.rounds):
            real["in-process"].append(timed(lambda: list(here.run([(0, point)]))))
            real["dask"].append(timed(lambda: client.submit(run_point, *task, pure=False).result()))
            real["workers"].append(timed(lambda: list(pool.run(run_point, [task]))))
    finally:
        here.close()
        pool.close()
        dask.close()
    point_s = {k: statistics.median(v) for k, v in real.items()}
    base = point_s["in-process"]
    print(f"{args.study} point 0 ({', '.join(f'{k}={v}' for k, v in point.key.items())}), "
          f"{params.get('seeds')} seeds; {cores()} cores, 1-min load average {os.getloadavg()[0]:.2f}")
    print(f"{'executor':>10} {'empty, alone ms':>16} {'empty, ' + str(args.empty) + ' at once ms':>22} "
          f"{'real point s':>13} {'÷ in-process':>13} {'empty ÷ real':>13}")
    print(f"{'in-process':>10} {'—':>16} {'—':>22} {base:>13.3f} {1:>12.3f}× {'—':>13}")
    for name in ("dask", "workers"):
        alone, each = empty[name]
        print(f"{name:>10} {1e3 * alone:>16.2f} {1e3 * each:>22.2f} {point_s[name]:>13.3f} "
              f"{point_s[name] / base:>12.3f}× {100 * alone / base:>12.2f}%")
    print(json.dumps({"benchmark": "study_overhead", "study": args.study, "point": point.key, "cores": cores(),
                      "load_average": round(os.getloadavg()[0], 2), "rounds": args.rounds,
                      "empty_alone_ms": {k: round(1e3 * v[0], 3) for k, v in empty.items()},
                      "empty_at_once_ms": {k: round(1e3 * v[1], 3) for k, v in empty.items()},
                      "real_point_s": {k: round(v, 3) for k, v in point_s.items()},
                      "real_vs_in_process": {k: round(v / base, 3) for k, v in point_s.items()},
                      "empty_vs_real": {k: round(v[0] / base, 5) for k, v in empty.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
