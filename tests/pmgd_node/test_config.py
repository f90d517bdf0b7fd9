import json

import pytest

from pmgd_node.config import ConfigError, JobConfig


def test_defaults_and_derived_fields():
    c = JobConfig()
    assert c.network == "2-2-1" and c.resolved_integrator == "sum"
    assert JobConfig(task="parity3").network == "3-3-1"
    assert JobConfig(task="fmnist").network == "cnn-fmnist"
    assert JobConfig(mode="analog", perturbation="fm").resolved_integrator == "lowpass"
    assert JobConfig(tau_theta=8, tau_x=2).minibatch == 4


@pytest.mark.parametrize("field,value,fragment", [
    ("task", "mnist", "parity2..parity12, fmnist, cifar10"),
    ("perturbation", "xx", "tm, cm, rcm, fm"),
    ("mode", "quantum", "discrete, analog"),
    ("amplitude", 0.0, "> 0.0"),
    ("amplitude", float("nan"), "> 0.0"),
    ("eta", -1.0, "≥ 0.0"),
    ("tau_theta", 0, "integer ≥ 1"),
    ("tau_x", 1.5, "integer ≥ 1"),
    ("tau_hp", -2.0, "> 0.0"),
    ("batch", True, "integer in [1, 1000000]"),
    ("seeds", 0, "integer in [1, 100000]"),
    ("fm_band", (0.3, 0.2), "0 ≤ f_min < f_max ≤ 0.5"),
    ("fm_band", (0.1, 0.7), "Nyquist"),
    ("target_accuracy", 1.5, "≤ 1.0"),
    ("network", "3-3-1", "start with 2 inputs"),
    ("nodes", 0, "integer in [1, 4096]"),
    ("momentum_decay", 1.1, "≤ 1.0"),
])
def test_bad_values_name_the_field_and_the_range(field, value, fragment):
    with pytest.raises(ConfigError) as err:
        JobConfig(**{field: value})
    assert err.value.field == field
    assert f"'{field}'" in str(err.value) and fragment in str(err.value)


def test_mode_and_integrator_must_agree():
    with pytest.raises(ConfigError, match="'perturbation'.*analog"):
        JobConfig(perturbation="fm")
    with pytest.raises(ConfigError, match="'integrator'"):
        JobConfig(integrator="lowpass")
    with pytest.raises(ConfigError, match="'integrator'"):
        JobConfig(mode="analog", integrator="sum")


def test_round_trip_dict_and_files(tmp_path):
    c = JobConfig(task="parity3", perturbation="fm", mode="analog", eta=0.5, fm_band=(0.1, 0.4), seeds=3)
    assert JobConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    p = tmp_path / "job.json"
    p.write_text(json.dumps({"task": "parity2", "eta": 3.0}))
    assert JobConfig.load(str(p)).eta == 3.0
    t = tmp_path / "job.toml"
    t.write_text('task = "parity3"\nperturbation = "cm"\nfm_band = [0.1, 0.2]\n')
    assert JobConfig.load(str(t)).fm_band == (0.1, 0.2)


def test_unknown_field_rejected_with_the_list_of_fields():
    with pytest.raises(ConfigError, match="'learning_rate'.*allowed fields: task"):
        JobConfig.from_dict({"learning_rate": 1})


def test_fm_gain_correction_is_a_bool_for_fm_only():
    assert JobConfig().fm_gain_correction is False
    assert JobConfig(perturbation="fm", mode="analog", fm_gain_correction=True).fm_gain_correction is True
    for bad in ("true", 1, None):
        with pytest.raises(ConfigError, match="'fm_gain_correction'.*true or false"):
            JobConfig(perturbation="fm", mode="analog", fm_gain_correction=bad)
    with pytest.raises(ConfigError, match="'fm_gain_correction'.*perturbation fm, not rcm"):
        JobConfig(fm_gain_correction=True)


def test_label_smoothing_and_weight_decay_are_bounded_and_named():
    c = JobConfig(task="fmnist", label_smoothing=0.01, weight_decay=0.02)
    assert (c.label_smoothing, c.weight_decay) == (0.01, 0.02)
    with pytest.raises(ConfigError, match="'label_smoothing'.*MSE"):
        JobConfig(label_smoothing=0.1)  # parity trains on the MSE: nothing to smooth
    with pytest.raises(ConfigError, match="'label_smoothing'.*≤ 0.5"):
        JobConfig(task="fmnist", label_smoothing=0.9)
    with pytest.raises(ConfigError, match="'weight_decay'.*≥ 0.0"):
        JobConfig(weight_decay=-0.1)
    with pytest.raises(ConfigError, match="'weight_decay'.*η·λ must be < 1"):
        JobConfig(eta=0.5, weight_decay=2.0)


def test_a_job_larger_than_the_bound_is_refused_naming_its_size():
    from pmgd_node.config import MAX_JOB_VALUES
    from services.evaluator.models import build_model

    for task in ("parity3", "fmnist", "cifar10"):  # the config's count is the model's
        assert JobConfig(task=task).num_params == build_model(task, device="cpu").num_params
    assert JobConfig(network="2-4-1").num_params == 17
    JobConfig(task="cifar10", seeds=MAX_JOB_VALUES // 26_154)  # just fits
    with pytest.raises(ConfigError, match=r"'seeds'.*26,154 parameters × 153 runs.*at most 4,000,000"):
        JobConfig(task="cifar10", seeds=153)
    with pytest.raises(ConfigError, match="'seeds'.*parameters"):
        JobConfig(network="2-1000000-1000000-1", seeds=1)  # the 10¹² weights in one request
