"""The Python API on 2-bit parity: eight seeds of the documented R-CM job, one line per run.

    python examples/python_api.py        (after `make setup` or `pip install .`; a few seconds)

The same job from the command line: pmgd train --config configs/parity2-rcm.toml --seeds 8
"""

from pathlib import Path

import pmgd

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "parity2-rcm.toml"


def main() -> None:
    # The documented parity job (batch 4, θ⁰ in ±0.25), eight seeds instead of its hundred.
    result = pmgd.train(CONFIG, seeds=8, progress=False)
    print(f"{'run':>3}  {'seed':>4}  {'solved':>6}  {'ticks to 100 %':>14}  {'final cost':>10}  {'accuracy':>8}")
    for run in result.runs():
        ticks = "—" if run["ticks_to_solution"] is None else f"{run['ticks_to_solution']:,}"
        print(f"{run['run']:>3}  {run['seed']:>4}  {'yes' if run['solved'] else 'no':>6}  {ticks:>14}  "
              f"{run['final_cost']:>10.4f}  {100 * run['final_accuracy']:>7.1f}%")
    s = result.summary
    median = s["ticks_to_solution_median"]  # over the solved runs; None when none was
    reached = "no run reached 100 %" if median is None else f"median {median:,.0f} perturbed ticks to 100 %"
    print(f"converged {s['converged']}/{s['runs']}, {reached}; "
          f"θ⁰ {result.theta0.shape[0]} runs × {result.theta0.shape[1]} parameters")


if __name__ == "__main__":
    main()
