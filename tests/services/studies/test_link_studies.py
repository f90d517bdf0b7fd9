"""The link and noise studies end to end at a small size, and the sweep runner's resume rules."""

import csv
import json

import numpy as np
import pytest

from pmgd_node.config import ConfigError
from services import studies
from services.cli import main
from services.engine.angle_trace import angle_trace

SMALL = ["--seeds", "2", "--set", "max_ticks=400", "--set", "angle_ticks=40", "--quiet"]


def _rows(out):
    with open(out / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name, field, values, points", [
    ("latency", "delay", "[0,2]", 4 * 2 * 2 + 2),  # 4 types × tagged/untagged × 2 delays + FM compensated
    ("jitter", "jitter", "[0,2]", 4 * 2 * 2),
    ("drop", "drop", "[0.0,0.5]", 4 * 1 * 2),  # tagged only
    ("drift", "drift", "[0.0,0.1]", 3 * 2 * 2),  # async clocks: discrete types only (no FM)
])
def test_link_studies_write_a_row_per_run(tmp_path, name, field, values, points):
    assert main(["study", name, "--out", str(tmp_path), "--set", f"values={values}", *SMALL]) == 0
    rows = _rows(tmp_path)
    assert len(rows) == points * 2
    assert {"perturbation", "correlation", field, "seed", "solved", "ticks_to_solution", "final_cost",
            "final_accuracy", "angle_deg"} <= rows[0].keys()
    # Each angle is that of its point's job after angle_ticks ticks with θ⁰ frozen (recomputed
    # here for TM, tagged, at the largest value), and where the link is ideal (value 0) the
    # correlations agree: untagged without delay is tagged.
    study = studies.get(name)
    p = dict(study.params, seeds=2, max_ticks=400, angle_ticks=40, values=json.loads(values))
    value = p["values"][-1]
    mine = [float(r["angle_deg"]) for r in rows if (r["perturbation"], r["correlation"], float(r[field])) ==
            ("tm", "tagged", value)]
    np.testing.assert_allclose(mine, angle_trace(study.config(p, "tm", "tagged", value), 40)[-1], rtol=1e-9)
    ideal: dict[tuple, list] = {}
    for r in rows:
        if float(r[field]) == 0:
            ideal.setdefault((r["perturbation"], r["seed"]), []).append(float(r["angle_deg"]))
    assert {kind for kind, _ in ideal} == {r["perturbation"] for r in rows}  # every type has value-0 rows
    for angles in ideal.values():
        np.testing.assert_allclose(angles, angles[0], rtol=1e-9)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"] == len(rows) and summary["figures"] == [f"{name}.png"]
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    meta = json.loads((tmp_path / "study.json").read_text())
    assert meta["params"]["seeds"] == 2 and meta["code_version"] and meta["machine"]["cpus"] >= 1


def test_fm_delay_points_carry_the_analytic_prediction(tmp_path):
    main(["study", "latency", "--out", str(tmp_path), "--set", "values=[3]", "--set", 'perturbations=["fm"]',
          "--seeds", "2", "--set", "max_ticks=400", "--set", "angle_ticks=1000", "--quiet"])
    rows = _rows(tmp_path)
    assert {r["correlation"] for r in rows} == {"tagged", "untagged", "compensated"}
    for r in rows:  # measured (θ⁰ frozen, 1000 ticks) against Re(H·e^{−iωd}) from the FM frequencies alone
        assert abs(float(r["angle_deg"]) - float(r["predicted_angle_deg"])) < 2.0, r
    untagged = [r for r in rows if r["correlation"] == "untagged"]
    assert all(float(r["angle_deg"]) > 30 for r in untagged)  # the delay turns the estimate away
    assert all(float(r["ideal_angle_deg"]) > 30 for r in untagged)


def test_noise_study_sweeps_each_imperfection(tmp_path):
    main(["study", "noise", "--out", str(tmp_path), "--set", "cost_noise=[0.01]", "--set", "update_noise=[0.001]",
          "--set", "device_variation=[0.3]", "--set", 'perturbations=["rcm","fm"]', *SMALL])
    rows = _rows(tmp_path)
    assert len(rows) == 3 * 2 * 2
    assert {(r["imperfection"], r["level"]) for r in rows} == {("cost_noise", "0.01"), ("update_noise", "0.001"),
                                                               ("device_variation", "0.3")}


def test_a_study_resumes_and_refuses_other_parameters(tmp_path, monkeypatch):
    args = ["study", "drop", "--out", str(tmp_path), "--set", "values=[0.0,0.3]", "--set", 'perturbations=["rcm"]',
            *SMALL]
    study_cls = type(studies.get("drop"))
    calls = []
    original = study_cls.run

    def flaky(self, point, p, ctx):
        calls.append(point.key)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted after the first point
        return original(self, point, p, ctx)

    monkeypatch.setattr(study_cls, "run", flaky)
    monkeypatch.setattr("services.studies.workers.cores", lambda: 1)  # in-process points see the patch
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert len(_rows(tmp_path)) == 2  # the finished point is on disk
    main(args)  # resumes: only the missing point runs
    assert len(calls) == 3 and calls[2] == calls[1]
    assert len(_rows(tmp_path)) == 4
    main(args)  # complete: nothing runs again
    assert len(calls) == 3
    with pytest.raises(SystemExit):  # other parameters in the same folder: refused, naming --out
        main(["study", "drop", "--out", str(tmp_path), "--seeds", "3", "--quiet"])


def test_a_study_repeats_exactly_from_its_study_json(tmp_path):
    first, again = tmp_path / "a", tmp_path / "b"
    main(["study", "drop", "--out", str(first), "--set", "values=[0.3]", "--set", 'perturbations=["tm"]', *SMALL])
    main(["study", "drop", "--out", str(again), "--config", str(first / "study.json"), "--quiet"])
    assert _rows(again) == _rows(first)
    (tmp_path / "p.toml").write_text('values = [0.3]\nperturbations = ["tm"]\nseeds = 2\nmax_ticks = 400\n'
                                     'angle_ticks = 40\n')
    main(["study", "drop", "--out", str(tmp_path / "c"), "--config", str(tmp_path / "p.toml"), "--quiet"])
    assert _rows(tmp_path / "c") == _rows(first)


def test_bad_study_parameters_name_the_parameter(tmp_path, capsys):
    for args, name in ((["study", "nope"], "study"), (["study", "drop", "--set", "colour=1"], "colour"),
                       (["study", "drop", "--set", "seeds=many"], "seeds"), (["study", "drop", "--set", "x"], "set")):
        with pytest.raises(SystemExit):
            main([*args, "--out", str(tmp_path / "x")])
        assert name in capsys.readouterr().err
    with pytest.raises(ConfigError, match="values"):
        studies.sweep.resolve_params(studies.get("drop"), {"values": "true"})


@pytest.mark.slow
def test_drift_study_runs_async_jobs_on_a_real_cluster(tmp_path):
    """Async timing on the cluster needs a wall clock: the study gives jobs without one a tick period."""
    main(["study", "drift", "--out", str(tmp_path), "--engine", "cluster", "--set", "values=[0.05]",
          "--set", 'perturbations=["rcm"]', "--set", 'correlations=["tagged"]', *SMALL])
    rows = _rows(tmp_path)
    assert len(rows) == 2 and all(r["ticks_run"] == "400" for r in rows)
    assert json.loads((tmp_path / "study.json").read_text())["engine"] == "cluster"


def test_a_study_sweeps_your_own_network(tmp_path):
    """``--set model=FILE:NAME``: every point trains the user's network (13 parameters of the
    XOR example), with the angle measured on it too."""
    import os

    from services.engine.engine import Engine

    xor = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "xor_task.py")
    args = ["study", "noise", "--out", str(tmp_path), "--set", f"model={os.path.abspath(xor)}:task",
            "--set", 'perturbations=["rcm"]', "--set", "cost_noise=[0.0]", "--set", "update_noise=[0.0]",
            "--set", "device_variation=[0.0]", *SMALL]
    assert main(args) == 0
    rows = _rows(tmp_path)
    assert len(rows) == 3 * 2 and all(np.isfinite(float(r["angle_deg"])) for r in rows)
    study = studies.get("noise")
    p = dict(study.params, seeds=2, max_ticks=400, perturbations=["rcm"], model=f"{os.path.abspath(xor)}:task",
             cost_noise=[0.0], update_noise=[0.0], device_variation=[0.0])
    config = study.points(p)[0].config
    assert config.task == "custom" and Engine(config).job.num_params == 13
    with pytest.raises(SystemExit) as stop:  # the CLI's clear error, exit status 2
        main(["study", "noise", "--out", str(tmp_path / "bad"), "--set", "model=nowhere.py:task", *SMALL])
    assert stop.value.code == 2
