"""The CNN settings study on a small fake Fashion-MNIST: its points, divergence, curves and figure."""

import json

import pytest

from services import studies
from services.evaluator.data import write_fake_fashion_mnist
from services.studies.sweep import resolve_params, run_study


def test_cnn_study_reports_each_setting_and_which_diverged(tmp_path):
    write_fake_fashion_mnist(tmp_path / "data", n_train=200, n_test=50, seed=0)
    study = studies.get("cnn")
    params = resolve_params(study, {"data_dir": str(tmp_path / "data"), "max_ticks": 40, "eval_every": 20,
                                    "batch": 10, "eval_samples": 0, "etas": [7e-4, 1e3], "amplitudes": [4e-4],
                                    "stabilisers": ["smoothing, λ 0.05"]})
    summary = run_study(study, params, str(tmp_path / "out"), progress=False)
    eta = {row["value"]: row for row in summary["eta"]}
    assert eta["1000.0"]["diverged_at"] is not None and eta["1000.0"]["final_accuracy"] is None
    assert eta["0.0007"]["diverged_at"] is None and 0 <= eta["0.0007"]["final_accuracy"] <= 1
    assert eta["0.0007"]["best_at"] in (20, 40)
    assert [r["value"] for r in summary["amplitude"]] == ["0.0004"]
    assert [r["value"] for r in summary["stabiliser"]] == ["smoothing, λ 0.05"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "points.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert (tmp_path / "out" / "cnn_settings.png").stat().st_size > 10_000


def test_unknown_stabiliser_is_named():
    from pmgd_node.config import ConfigError

    study = studies.get("cnn")
    with pytest.raises(ConfigError, match="stabilisers.*none"):
        study.points(resolve_params(study, {"stabilisers": ["magic"]}))
