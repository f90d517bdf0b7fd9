"""A study on one worker and on N, side by side in one run (a benchmark, not a test).

    python benchmarks/study_workers.py                    # pmgd study latency, its defaults, --workers 1 vs 2
    python benchmarks/study_workers.py --study drop --set values=[0.0,0.3] --workers 1 2

Runs ``pmgd study NAME`` (each in its own process, as a user runs it) once per ``--workers``
value into fresh folders, then checks that every run wrote the same files as the first:
``runs.csv`` and ``summary.json`` byte for byte (neither holds a wall time: the one timing
field, ``wall_s`` per point, lives in ``points.jsonl``, compared here without it) and the
figures. Prints, per run, the wall time, the CPU seconds the study's processes used (so
the cores they had on average: CPU ÷ wall) and what the rest of the machine used meanwhile
(other processes' CPU seconds, and time the hypervisor stole), then speed-ups beside the ideal
(the workers, at most the cores). On a machine shared with other work that last column is
what stops N workers short of N×. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def run(study: str, out: str, workers: int, sets: list[str]) -> dict:
    """One ``pmgd study`` run: its wall time, the CPU seconds it and its workers used, and the
    CPU seconds the rest of the machine used (or the hypervisor stole) meanwhile."""
    args = [sys.executable, "-m", "services.cli", "study", study, "--out", out, "--workers", str(workers), "--quiet"]
    for item in sets:
        args += ["--set", item]
    before, busy0, stolen0 = resource.getrusage(resource.RUSAGE_CHILDREN), *machine_cpu_s()
    started = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    after, busy1, stolen1 = resource.getrusage(resource.RUSAGE_CHILDREN), *machine_cpu_s()
    ours = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": ours, "others_cpu_s": max(0.0, busy1 - busy0 - ours),
            "stolen_s": stolen1 - stolen0}


def machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far (/proc/stat: every process on it)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


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
    runs, outputs = {}, {}
    with tempfile.TemporaryDirectory(prefix="study-workers-") as tmp:
        for n in args.workers:
            out = os.path.join(tmp, f"workers{n}")
            runs[n] = run(args.study, out, n, args.sets)
            outputs[n] = files(out)
            print(f"--workers {n}: {runs[n]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    walls = {n: r["wall_s"] for n, r in runs.items()}
    first = args.workers[0]
    same = {n: outputs[n] == outputs[first] for n in args.workers}
    differing = {n: sorted(k for k in set(outputs[n]) | set(outputs[first])
                           if outputs[n].get(k) != outputs[first].get(k)) for n in args.workers}
    print(f"pmgd study {args.study} {' '.join('--set ' + s for s in args.sets)} on {cores()} cores "
          f"(1-min load average {load_before:.2f} before, {load_after:.2f} after)")
    print(f"{'workers':>8} {'wall s':>8} {'CPU s':>8} {'cores used':>11} {'others, cores':>14} {'stolen, cores':>14} "
          f"{'speed-up':>9} {'ideal':>6}  files as --workers {first}")
    for n in args.workers:
        speedup = walls[first] / walls[n]
        r = runs[n]
        print(f"{n:>8} {walls[n]:>8.1f} {r['cpu_s']:>8.1f} {r['cpu_s'] / walls[n]:>11.2f} "
              f"{r['others_cpu_s'] / walls[n]:>14.2f} {r['stolen_s'] / walls[n]:>14.2f} {speedup:>8.2f}× "
              f"{min(n, cores()) / min(first, cores()):>5.1f}×  "
              f"{'identical' if same[n] else 'DIFFER: ' + ', '.join(differing[n])}")
    print(json.dumps({"benchmark": "study_workers", "study": args.study, "sets": args.sets, "cores": cores(),
                      "load_average": [round(load_before, 2), round(load_after, 2)],
                      "wall_s": {str(n): round(walls[n], 2) for n in args.workers},
                      "cpu_s": {str(n): round(runs[n]["cpu_s"], 2) for n in args.workers},
                      "others_cpu_s": {str(n): round(runs[n]["others_cpu_s"], 2) for n in args.workers},
                      "stolen_s": {str(n): round(runs[n]["stolen_s"], 2) for n in args.workers},
                      "speedup": {str(n): round(walls[first] / walls[n], 3) for n in args.workers},
                      "identical": all(same.values()), "files": sorted(outputs[first])}))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
