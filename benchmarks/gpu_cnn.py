"""Prepared GPU runs of the paper's Table 1 CNN rows: PMGD with R-CM, batch 1000, τ_θ = τ_x = 1.

    python benchmarks/gpu_cnn.py fmnist     # 14,378 parameters, to 82.5 % held-out accuracy in ≤ 10⁶ ticks
    python benchmarks/gpu_cnn.py cifar10    # 26,154 parameters, to 60 % held-out accuracy in ≤ 5×10⁶ ticks
    python benchmarks/gpu_cnn.py fmnist --max-ticks 20 --eval-every 10 --device cpu   # CPU smoke check

The job is the task's shipped config (configs/fmnist-rcm.toml, configs/cifar10-rcm.toml), the same one
`pmgd train --config` runs; flags override its budget, evaluation and η, A. Prints one line per
evaluation and a final JSON line (the summary, device and whether the target was reached;
``--batch`` and ``--c-tilde-limit`` serve the CPU measurements of docs/studies.md);
exits 0 whether or not the target is reached (the JSON says which), 3 if the run diverged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from pmgd_node.config import JobConfig  # noqa: E402
from services.chip.job import summarize  # noqa: E402
from services.engine.engine import Engine  # noqa: E402

DEFAULT_DATA = {"fmnist": "fashion-mnist", "cifar10": "cifar10"}  # folders of ../shared/data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=sorted(DEFAULT_DATA))
    ap.add_argument("--data-dir", default=None, help="default: $PMGD_DATA_DIR, else ../shared/data/<task>")
    ap.add_argument("--max-ticks", type=int, default=None, help="default: the config's budget")
    ap.add_argument("--eval-every", type=int, default=5_000)
    ap.add_argument("--eval-samples", type=int, default=None, help="held-out samples per check (default: all)")
    ap.add_argument("--eta", type=float, default=None)
    ap.add_argument("--amplitude", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None, help="samples per tick (default: the config's 1000)")
    ap.add_argument("--c-tilde-limit", type=float, default=None, help="clip C̃ to ±X (default: the config's)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = ap.parse_args(argv)
    base = JobConfig.load(os.path.join(ROOT, "configs", f"{args.task}-rcm.toml"))
    data_dir = args.data_dir or os.environ.get("PMGD_DATA_DIR") or os.path.join(
        ROOT, "..", "shared", "data", DEFAULT_DATA[args.task])
    changes = {"data_dir": data_dir, "max_ticks": args.max_ticks or base.max_ticks, "eta": args.eta or base.eta,
               "amplitude": args.amplitude or base.amplitude}
    for name in ("eval_samples", "batch", "c_tilde_limit"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    cfg = base.replace(**changes)
    cfg = cfg.replace(eval_every=min(args.eval_every, cfg.max_ticks))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"device {device} ({gpu}); config {json.dumps(cfg.to_dict())}", flush=True)
    engine = Engine(cfg, device=device)
    t0 = time.perf_counter()

    def on_eval(point, solved):
        print(f"tick {point.tick:>9,}  C₀ {point.c0_measurements:>9,}  held-out cost {float(point.cost[0]):.4f}  "
              f"accuracy {100 * float(point.accuracy[0]):.2f} %  wall {time.perf_counter() - t0:.1f} s", flush=True)

    result = engine.run(on_eval=on_eval)
    s = summarize(result)
    s.update(device=device, gpu=gpu, reached_target=bool(result.solved[0]), config=cfg.to_dict())
    print(json.dumps(s), flush=True)
    return 3 if s["diverged"] == s["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
