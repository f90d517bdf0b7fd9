"""A study on one worker and on N, side by side in one run (a benchmark, not a test).

    python benchmarks/study_workers.py                    # pmgd study latency, its defaults, --workers 1 vs 2
    python benchmarks/study_workers.py --study drop --set values=[0.0,0.3] --workers 1 2

Runs ``pmgd study NAME`` (each in its own process, as a user runs it) once per ``--workers``
value into fresh folders, then checks that every run wrote the same files as the first:
``runs.csv`` and ``summary.json`` byte for byte (neither holds a wall time: the one timing
field, ``wall_s`` per point, lives in ``points.jsonl``, compared here without it) and the
figures. Prints wall times and speed-ups beside the ideal (the workers, at most the cores),
the machine's load while it ran, and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def run(study: str, out: str, workers: int, sets: list[str]) -> float:
    args = [sys.executable, "-m", "services.cli", "study", study, "--out", out, "--workers", str(workers), "--quiet"]
    for item in sets:
        args += ["--set", item]
    started = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True)
    return time.perf_counter() - started


def files(out: str) -> dict[str, bytes]:
    """What must not depend on the workers: every file but study.json (its machine and start
    time) and points.jsonl (its wall times, dropped here)."""
    got = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name == "points.jsonl":
            with open(path, encoding="utf-8") as f:
                entries = [json.loads(line) for line in f if line.strip()]
            got[name] = json.dumps([[e["key"], e["rows"]] for e in entries]).encode()
        elif name != "study.json" and not name.endswith(".tmp"):
            with open(path, "rb") as f:
                got[name] = f.read()
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="latency")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="PARAM=VALUE")
    args = parser.parse_args()
    from services.studies.workers import cores

    load_before = os.getloadavg()[0]
    walls, outputs = {}, {}
    with tempfile.TemporaryDirectory(prefix="study-workers-") as tmp:
        for n in args.workers:
            out = os.path.join(tmp, f"workers{n}")
            walls[n] = run(args.study, out, n, args.sets)
            outputs[n] = files(out)
            print(f"--workers {n}: {walls[n]:.1f} s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    first = args.workers[0]
    same = {n: outputs[n] == outputs[first] for n in args.workers}
    differing = {n: sorted(k for k in set(outputs[n]) | set(outputs[first])
                           if outputs[n].get(k) != outputs[first].get(k)) for n in args.workers}
    print(f"pmgd study {args.study} {' '.join('--set ' + s for s in args.sets)} on {cores()} cores "
          f"(1-min load average {load_before:.2f} before, {load_after:.2f} after)")
    print(f"{'workers':>8} {'wall s':>8} {'speed-up':>9} {'ideal':>6}  files as --workers {first}")
    for n in args.workers:
        speedup = walls[first] / walls[n]
        print(f"{n:>8} {walls[n]:>8.1f} {speedup:>8.2f}× {min(n, cores()) / min(first, cores()):>5.1f}×  "
              f"{'identical' if same[n] else 'DIFFER: ' + ', '.join(differing[n])}")
    print(json.dumps({"benchmark": "study_workers", "study": args.study, "sets": args.sets, "cores": cores(),
                      "load_average": [round(load_before, 2), round(load_after, 2)],
                      "wall_s": {str(n): round(walls[n], 2) for n in args.workers},
                      "speedup": {str(n): round(walls[first] / walls[n], 3) for n in args.workers},
                      "identical": all(same.values()), "files": sorted(outputs[first])}))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
