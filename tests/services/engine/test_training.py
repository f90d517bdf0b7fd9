"""What PMGD must do on the reference tasks (paper §5–8), on the in-process engine."""

import os

import numpy as np
import pytest
from test_engine import assert_solved_means_first_at_100_percent  # same directory, on sys.path

from pmgd_node.config import JobConfig
from services.chip.job import summarize
from services.engine.angle_trace import angle_trace
from services.engine.engine import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Fixed random 3-3-1 network, whole 3-bit parity data set at once, θ⁰ frozen.
ANGLE = dict(task="parity3", batch=8, seeds=12, amplitude=0.01, init_scale=1.0)


@pytest.mark.parametrize("kind", ["tm", "cm"])
def test_tm_and_cm_angle_falls_below_10_degrees_within_a_few_code_periods(kind):
    """θ⁰ frozen, so nothing is chaotic. Measured (OPENBLAS_CORETYPE=Haswell and =Prescott and
    under ±1-ulp sigmoid noise, equal to 1e-9°): median at a quarter period 67.1° (TM) and
    43.9° (CM); the largest after two and three periods 0.34° and 0.83°."""
    period = 16 if kind == "tm" else 32  # P = 16; the CM code length is the next power of two above P
    angles = angle_trace(JobConfig(perturbation=kind, **ANGLE), 3 * period)
    assert np.median(angles[period // 4]) > 20  # not yet
    assert np.all(angles[-1] < 10)  # every run, after three periods
    assert np.all(angles[2 * period - 1] < 10)


@pytest.mark.parametrize("kind,mode", [("rcm", "discrete"), ("fm", "analog")])
def test_rcm_and_fm_angle_trends_down(kind, mode):
    """θ⁰ frozen. Measured median angles at ticks 16, 128, 640 (Haswell = Prescott = under
    ±1-ulp noise to 0.01°): R-CM 44.34°, 16.69°, 8.24°; FM 41.84°, 11.17°, 11.10° (FM levels
    off at its high-pass floor: the last step is small but far above rounding)."""
    angles = np.median(angle_trace(JobConfig(perturbation=kind, mode=mode, **ANGLE), 640), axis=1)
    early, mid, late = angles[15], angles[127], angles[639]
    assert early > mid > late
    assert late < 20


@pytest.mark.slow
def test_parity2_rcm_100_seeds_with_documented_defaults():
    """The documented defaults (configs/parity2-rcm.toml: all four samples every tick, θ⁰ in
    ±0.25): at least 90 of 100 seeds reach 100 % accuracy, median ≤ 10⁴ ticks (paper Table 1).
    Measured 95, 92, 90 on the seed sets 0, 1000, 2000 (docs/benchmarks.md). Seed set 0 (this
    test): 95, median 2340 ticks, with OPENBLAS_CORETYPE=Haswell and =Prescott and under four
    streams of ±1-ulp sigmoid noise alike (η = 0.5 is far from chaotic; SkylakeX cannot run on
    the AVX2 machine these were measured on)."""
    config = JobConfig.load(os.path.join(ROOT, "configs", "parity2-rcm.toml"))
    assert (config.task, config.perturbation, config.seeds) == ("parity2", "rcm", 100)
    s = summarize(Engine(config).run())
    assert s["converged"] >= 90
    assert s["ticks_to_solution_median"] <= 10_000


def test_parity2_rcm_100_seeds_on_the_paper_table1_row():
    """Paper Table 1 row (2-bit parity, R-CM, τ_θ = τ_x = 1, batch 1). The paper reports 100 %
    in 10⁴ τ_p; we measure 77/100 converged in the 2×10⁴-tick budget (docs/benchmarks.md): the
    rest stall in XOR's local minimum. The assertion pins what we measured, with margin: 77,
    median 870 ticks, with OPENBLAS_CORETYPE=Haswell and =Prescott and under ±1-ulp noise alike."""
    result = Engine(JobConfig(seeds=100)).run()
    s = summarize(result)
    assert s["converged"] >= 70
    assert s["ticks_to_solution_median"] <= 10_000
    assert_solved_means_first_at_100_percent(result)  # (one solved run ends at 75 %: it trains on)


@pytest.mark.slow
def test_analog_fm_trains_parity2():
    """Analog mode: FM perturbations, high-pass C̃ (τ_hp), leaky-integrator G (τ_θ), continuous
    updates. The network sees the four samples at once (batch 4): with one sample at a time the
    input steps dominate the high-passed cost (see docs/benchmarks.md). Measured 28 of 30,
    median 560 ticks, with OPENBLAS_CORETYPE=Haswell and =Prescott and under ±1-ulp noise alike."""
    cfg = JobConfig(perturbation="fm", mode="analog", seeds=30, eta=0.1, tau_theta=20, tau_hp=2.0,
                    batch=4, amplitude=0.1, eval_every=20)
    s = summarize(Engine(cfg).run())
    assert s["converged"] >= 24
    assert s["c0_measurements_run"] == 0


def _run40(**kw):
    return Engine(JobConfig(seeds=40, **kw)).run()


def _median_all(result) -> float:
    """Median ticks to solution over all runs, an unsolved run counting as never (∞)."""
    return float(np.median(np.where(result.solved, result.ticks_to_solution, np.inf)))


@pytest.mark.slow
def test_fig4_trends_on_parity2():
    """Paper Fig 4. Batch 1 (τ_x = τ_θ): a longer τ_θ slows training. Batch 4 (τ_θ = 4τ_x): at a
    fixed low η the solution time hardly depends on τ_θ (each update integrates the full-data
    gradient over τ_θ ticks, so the step grows with τ_θ). The largest stable η falls as τ_θ grows.

    Training near the stability edge is chaotic: last-bit differences between BLAS kernels
    flip runs there (issue 11: at η = 2, τ_θ = 1, 19 of 40 solved with OPENBLAS_CORETYPE=SkylakeX
    and 22 with Haswell on an AVX-512 machine; on an AVX2 machine, where SkylakeX cannot run, 20
    with Haswell and Prescott and 19–24 under ±1-ulp sigmoid noise). So each claim below is made
    away from the edge, with margins well beyond the spread measured with
    OPENBLAS_CORETYPE=Haswell and =Prescott (equal) and under four streams of ±1-ulp noise on the
    sigmoid standing in for other kernels ("noise" below: the range over those streams)."""
    # Batch 1 at η = 0.5: median ticks to solution over all 40 runs 2405 at τ_θ = 1 (29 solved,
    # equal everywhere), 29 475 at τ_θ = 16 (21 solved; noise: 18–22 solved, so 32 450 or
    # never): 12× slower or never.
    b1 = {k: _run40(eta=0.5, tau_theta=k, tau_x=k, max_ticks=40_000) for k in (1, 16)}
    assert _median_all(b1[16]) > 3 * _median_all(b1[1])
    # Batch 4 at η = 0.2: medians of the solved runs 1260 (29 solved) and 1490 (27), ratio 1.18,
    # equal everywhere.
    b4 = {k: summarize(_run40(eta=0.2, tau_theta=4 * k, tau_x=k, max_ticks=40_000)) for k in (1, 4)}
    assert 0.6 < b4[4]["ticks_to_solution_median"] / b4[1]["ticks_to_solution_median"] < 1.6

    # One sample per tick (τ_x = 1), 20 000 ticks: η = 1 is well inside τ_θ = 1's stable range
    # (29 of 40 solved; 29–30 under noise) and well past τ_θ = 64's (5; 4–7), whose runs do train
    # at a lower η (0.25: 27, equal everywhere), so the stable η has fallen, not the time run out.
    def solved(eta, tau_theta):
        return int(_run40(eta=eta, tau_theta=tau_theta, tau_x=1, max_ticks=20_000).solved.sum())

    assert solved(1.0, 1) >= 24
    assert solved(1.0, 64) <= 12
    assert solved(0.25, 64) >= 20


def test_cnn_short_pmgd_run_lowers_the_cost_reproducibly(tmp_path):
    from services.evaluator.data import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, n_train=300, n_test=100, seed=0)
    cfg = JobConfig(task="fmnist", data_dir=str(tmp_path), batch=100, amplitude=0.01, eta=0.01,
                    max_ticks=60, eval_every=60, target_accuracy=None, seed=3)

    def run():
        engine = Engine(cfg, device="cpu")
        assert engine.model.num_params == 14_378
        start = engine.evaluate().cost
        return start, engine.run().final_cost, engine.theta0

    start, end, theta = run()
    # Torch's kernels, not OpenBLAS: 2.29735 → 2.29357 with OPENBLAS_CORETYPE=Haswell and
    # =Prescott, and with ATEN_CPU_CAPABILITY=default (no SIMD) the end differs by 3e-7 only.
    assert end[0] < start[0] - 0.001
    start2, end2, theta2 = run()
    np.testing.assert_array_equal(theta, theta2)
    assert end2[0] == end[0]
