"""`pmgd train` through the installed console command."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from pmgd_node.config import JobConfig
from services.engine.engine import Engine

PMGD = shutil.which("pmgd") or os.path.join(os.path.dirname(sys.executable), "pmgd")


def pmgd(*args, cwd=None):
    return subprocess.run([PMGD, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_train_seeds_writes_summary_json(tmp_path):
    out = tmp_path / "sub" / "out.json"
    r = pmgd("train", "--task", "parity2", "--perturbation", "rcm", "--seeds", "6", "--max-ticks", "3000",
             "--json", str(out))
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert s["runs"] == 6 and len(s["ticks_to_solution"]) == 6
    assert s["config"]["perturbation"] == "rcm" and s["config"]["max_ticks"] == 3000
    # The command is the in-process engine: the same runs solve at the same ticks. 4 of 6 solve
    # (at 390, 490, 750, 330) with OPENBLAS_CORETYPE=Haswell and =Prescott and under ±1-ulp noise.
    reference = Engine(JobConfig(task="parity2", perturbation="rcm", seeds=6, max_ticks=3000)).run()
    assert s["ticks_to_solution"] == reference.ticks_to_solution.tolist()
    assert s["converged"] == sum(t >= 0 for t in s["ticks_to_solution"]) >= 1
    for key in ("ticks_to_solution_median", "ticks_to_solution_q1", "ticks_to_solution_q3",
                "c0_to_solution_median", "final_cost_median", "final_accuracy_median", "wall_time_s"):
        assert key in s
    assert set(s["projected_solution_time_s"]) == {"HW1", "HW2", "HW3", "HW4"}
    # The summary table is printed too.
    assert "runs converged" in r.stderr and "HW4" in r.stderr


def test_config_file_and_flag_override(tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text('task = "parity3"\nperturbation = "cm"\nmax_ticks = 200\neta = 0.7\n')
    out = tmp_path / "o.json"
    r = pmgd("train", "--config", str(cfg), "--eta", "0.3", "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert s["task"] == "parity3" and s["network"] == "3-3-1" and s["num_params"] == 16
    assert s["config"]["eta"] == 0.3 and s["config"]["perturbation"] == "cm"
    assert s["ticks_run"] <= 200


@pytest.mark.parametrize("args,fragment", [
    (["--eta", "-1"], "'eta': must be a number ≥ 0.0"),
    (["--perturbation", "fm"], "'perturbation': fm is the analog perturbation"),
    (["--task", "mnist"], "'task': must be one of parity2..parity12, fmnist, cifar10"),
])
def test_bad_values_exit_2_naming_the_field(args, fragment):
    r = pmgd("train", *args)
    assert r.returncode == 2 and fragment in r.stderr


def test_missing_data_names_the_file(tmp_path):
    r = pmgd("train", "--task", "fmnist", "--data-dir", str(tmp_path))
    assert r.returncode == 1
    assert "train-images-idx3-ubyte" in r.stderr and "fashion-mnist" in r.stderr.lower()


def test_progress_updates_are_throttled(monkeypatch):
    """The bar is updated at most once per window (an update per evaluation slowed a 2 s
    parity run by a fifth); the first call and the first after each window get through."""
    from services import train

    now = [100.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: now[0])
    seen = []
    show = train._at_most_every(0.1, lambda *args: seen.append(args))
    for t, step in ((1, 0.0), (2, 0.05), (3, 0.04), (4, 0.02), (5, 0.2)):
        now[0] += step
        show(t, "x")
    assert seen == [(1, "x"), (4, "x"), (5, "x")]
