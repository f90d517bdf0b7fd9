"""pmgd study transfer at a small size: real reference-chip processes over the chip protocol."""

import csv
import json

import numpy as np
import pytest

from services.cli import main


def test_transfer_study_scores_both_arms_on_the_chip(tmp_path):
    args = ["study", "transfer", "--out", str(tmp_path), "--set", "levels=[0.0,0.8]", "--set", "devices=1",
            "--set", "seeds=2", "--set", "max_ticks=3000", "--quiet"]
    assert main(args) == 0
    with open(tmp_path / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2
    ideal = [r for r in rows if float(r["variation"]) == 0.0]
    varied = [r for r in rows if float(r["variation"]) == 0.8]
    for r in ideal:  # a chip without variation is the ideal model: deployment changes nothing
        assert float(r["backprop_chip_cost"]) == pytest.approx(float(r["backprop_ideal_cost"]), rel=1e-9)
        assert r["backprop_chip_accuracy"] == r["backprop_ideal_accuracy"]
    for r in varied:  # the same weights on a varied device measure another cost
        assert abs(float(r["backprop_chip_cost"]) - float(r["backprop_ideal_cost"])) > 1e-6
    # both arms start from the same θ⁰ per seed, and PMGD's numbers are the chip's
    assert [r["seed"] for r in ideal] == [r["seed"] for r in varied]
    assert all(np.isfinite(float(r["pmgd_chip_cost"])) for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["variation"] for e in summary["deployed"]] == [0.0, 0.8]
    assert (tmp_path / "transfer.png").stat().st_size > 10_000


def test_transfer_study_refuses_a_task_the_chip_does_not_run(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["study", "transfer", "--out", str(tmp_path), "--set", "task=fmnist", "--quiet"])
    assert stop.value.code == 2
