"""The Python API (``import pmgd``): the same job gives the same summary as `pmgd train --json`,
its per-run and per-evaluation tables agree with that summary, bad fields stop early naming
the field, and the example script runs."""

import json
import math
import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# pytest puts tests/ on sys.path for a module in it, and tests/services (a folder without
# __init__.py) would then be taken for the services package; with the root on the path too,
# the real package (it has an __init__.py) wins wherever it stands in the path.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import pmgd  # noqa: E402
from services.cli import main as cli_main  # noqa: E402

PARITY_FILE = ROOT / "configs" / "parity2-rcm.toml"
# Summary fields that differ between two runs of one job: the clocks, and the cluster's job id.
UNREPEATABLE = ("wall_time_s", "training_time_s", "run_wall_time_s", "job")


def deterministic(summary: dict) -> dict:
    """``summary`` as `--json` writes it (a JSON round trip), less the fields a rerun changes."""
    return {k: v for k, v in json.loads(json.dumps(summary)).items() if k not in UNREPEATABLE}


def cli_summary(tmp_path, *args: str) -> dict:
    path = tmp_path / "summary.json"
    assert cli_main(["train", *args, "--quiet", "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def result():
    # Four seeds of the default job: some solve, at least one does not within the budget.
    return pmgd.train(task="parity2", perturbation="rcm", seeds=4, max_ticks=3000, progress=False)


def test_keyword_form_gives_the_summary_of_pmgd_train(result, tmp_path):
    cli = cli_summary(tmp_path, "--task", "parity2", "--perturbation", "rcm", "--seeds", "4", "--max-ticks", "3000")
    assert deterministic(result.summary) == deterministic(cli)
    assert 0 < result.summary["converged"] < 4  # both kinds of run are in the tables below


def test_config_file_form_gives_the_summary_of_pmgd_train(tmp_path, capsys):
    api = pmgd.train(config=str(PARITY_FILE), seeds=3, max_ticks=4000, progress=False)
    assert capsys.readouterr().err == ""  # progress=False: silent
    cli = cli_summary(tmp_path, "--config", str(PARITY_FILE), "--seeds", "3", "--max-ticks", "4000")
    assert deterministic(api.summary) == deterministic(cli)
    assert api.config.batch == 4 and api.config.seeds == 3  # the file's fields, the keywords over them
    assert api.summary["config"] == api.config.to_dict()


def test_progress_draws_the_bar_and_the_table(capsys):
    pmgd.train(seeds=1, max_ticks=200, progress=True)
    err = capsys.readouterr().err
    assert "training" in err and "runs converged" in err


def test_a_jobconfig_with_keywords_over_it():
    base = pmgd.JobConfig(task="parity3", seeds=2, max_ticks=100)
    assert pmgd.train(base, progress=False).config == base
    over = pmgd.train(base, task="parity2", progress=False).config
    assert over.network == "2-2-1" and over.seeds == 2  # the network follows the new task
    assert pmgd.train({"seeds": 2, "max_ticks": 100}, eta=0.25, progress=False).config.eta == 0.25


def test_runs_and_rows_agree_with_the_summary(result):
    s, runs, rows = result.summary, result.runs(), result.rows()
    assert len(runs) == s["runs"] == 4
    assert s["converged"] == sum(run["solved"] for run in runs)
    assert [run["seed"] for run in runs] == [0, 1, 2, 3]
    assert [run["ticks_to_solution"] if run["solved"] else -1 for run in runs] == s["ticks_to_solution"]
    assert [run["final_cost"] for run in runs] == s["final_cost"]
    assert [run["diverged_at"] for run in runs] == [None] * 4
    last = result.history[-1]
    assert last.tick == s["ticks_run"]
    assert [run["final_accuracy"] for run in runs] == last.accuracy.tolist()
    assert [run["final_cost"] for run in runs] == last.cost.tolist()
    assert len(rows) == 4 * len(result.history) == 4 * s["ticks_run"] // result.config.eval_every
    assert rows[0].keys() == {"run", "seed", "tick", "c0_measurements", "cost", "accuracy"}
    assert [(row["run"], row["tick"]) for row in rows[:5]] == [(0, 10), (1, 10), (2, 10), (3, 10), (0, 20)]
    for run in runs:  # a solved run meets the target at its tick to solution, and not before
        mine = [row for row in rows if row["run"] == run["run"]]
        hit = [row["tick"] for row in mine if row["accuracy"] >= 1.0]
        assert (hit[0] if hit else None) == run["ticks_to_solution"]
    assert result.theta0.shape == (4, s["num_params"]) and np.isfinite(result.theta0).all()
    assert f"{s['converged']}/4 converged" in repr(result)


def test_to_pandas_without_pandas_says_how_to_install_it(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas fails, installed or not
    with pytest.raises(ImportError, match="pip install pandas"):
        result.to_pandas()


def test_to_pandas_is_a_frame_of_the_rows(result):
    pandas = pytest.importorskip("pandas")
    frame = result.to_pandas()
    assert isinstance(frame, pandas.DataFrame) and len(frame) == len(result.rows())
    assert frame.groupby("run")["tick"].max().tolist() == [result.summary["ticks_run"]] * 4


@pytest.mark.parametrize("kwargs, field", [
    ({"tsk": "parity2"}, "tsk"),
    ({"seeds": 0}, "seeds"),
    ({"perturbation": "xx"}, "perturbation"),
    ({"engine": "gpu"}, "engine"),
    ({"cluster": "tcp://127.0.0.1:5556"}, "cluster"),  # an endpoint without engine="cluster"
    ({"config": 3}, "config"),
    ({"config": "no/such/file.toml"}, "no/such/file.toml"),
])
def test_bad_fields_raise_config_error_naming_them(kwargs, field):
    with pytest.raises(pmgd.ConfigError) as err:
        pmgd.train(progress=False, **kwargs)
    assert err.value.field == field and f"'{field}'" in str(err.value)


def test_import_is_light_and_errors_come_before_the_heavy_imports():
    code = ("import sys, pmgd\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'import pmgd loaded the engine'\n"
            "try:\n    pmgd.train(seeds=-1)\nexcept pmgd.ConfigError as err:\n    print(err.field)\n"
            "print(sorted(m for m in ('torch', 'services.train', 'services.runtime') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["seeds", "[]"]


def test_exports_and_version():
    assert {"train", "Result", "JobConfig", "ConfigError", "__version__"} <= set(pmgd.__all__)
    assert pmgd.__version__ == version("pmgd-cluster")
    assert pmgd.JobConfig is __import__("pmgd_node.config").config.JobConfig


def test_the_package_is_in_the_distribution():
    """pyproject.toml's package list takes pmgd (tests/test_packaging.py builds the wheel of
    pmgd_node and services; this checks the same list finds pmgd and every module of it)."""
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(ROOT), include=include)
    assert "pmgd" in packages and "pmgd_node" in packages and "services" in packages
    assert not [p for p in packages if p.startswith(("tests", "examples"))]


def test_the_example_script_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "examples/python_api.py"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["run", "seed", "solved"]
    table = [line.split() for line in lines[1:-1]]
    assert [int(row[0]) for row in table] == list(range(8))
    solved = sum(row[2] == "yes" for row in table)
    assert lines[-1].startswith(f"converged {solved}/8") and "8 runs × 9 parameters" in lines[-1]
    assert all(0.0 <= float(row[-1].rstrip("%")) <= 100.0 and not math.isnan(float(row[-2])) for row in table)


@pytest.mark.slow
def test_the_cluster_engine_gives_the_local_summary():
    """engine="cluster" (a local cluster of two node processes) is bit-identical to the engine:
    the same summary, final θ⁰ and learning curves."""
    kwargs = dict(task="parity2", seeds=3, max_ticks=600, nodes=2, progress=False)
    local = pmgd.train(**kwargs)
    on_cluster = pmgd.train(engine="cluster", **kwargs)
    only_there = ("engine", "device", "epochs", "checkpoints", "dropped", "theta0", "trail")
    assert ({k: v for k, v in deterministic(on_cluster.summary).items() if k not in only_there}
            == {k: v for k, v in deterministic(local.summary).items() if k not in only_there})
    assert on_cluster.summary["engine"] == "cluster" and on_cluster.summary["epochs"] == 1
    np.testing.assert_array_equal(on_cluster.theta0, local.theta0)  # bit for bit
    assert on_cluster.runs() == local.runs()
    assert on_cluster.rows() == local.rows()


@pytest.mark.slow
def test_a_running_cluster_gives_a_job_every_connected_node():
    """cluster=ENDPOINT (as `pmgd train --cluster`): keys read from the cluster's key
    directory, and a job that leaves ``nodes`` unset takes both connected nodes."""
    from services.cluster.launcher import LocalCluster

    with LocalCluster(2) as running:
        running.wait_ready()  # both nodes joined first: a job takes the nodes connected when it is sent
        result = pmgd.train(pmgd.JobConfig(seeds=2, max_ticks=200), engine="cluster", progress=False,
                            cluster=running.endpoints["control"], keys=running.keys_dir)
    assert result.config.nodes == 2 and result.summary["config"]["nodes"] == 2
    local = pmgd.train(seeds=2, max_ticks=200, nodes=2, progress=False)
    np.testing.assert_array_equal(result.theta0, local.theta0)
    assert result.rows() == local.rows()
