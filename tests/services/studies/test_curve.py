"""`pmgd curve`: a long PMGD run beside backprop, checkpointed so that a stop or a crash loses nothing."""

import json
import os

import numpy as np
import pytest

from pmgd_node.config import ConfigError, JobConfig
from services.studies import curve as C


def config(**kw):
    return JobConfig(**{"task": "parity2", "seed": 3, "max_ticks": 600, "eval_every": 100, "target_accuracy": 1.0,
                        **kw})


def test_a_resumed_curve_equals_an_uninterrupted_one_bit_for_bit(tmp_path):
    whole = C.CurveRun(config(), str(tmp_path / "whole"), backprop_steps=300, backprop_lr=2.0)
    whole.run_backprop(log=lambda line: None)
    whole.run_pmgd(log=lambda line: None)
    assert whole.engine.tick == 600 and len(whole.pmgd.ticks) == 7 and whole.backprop.ticks[-1] == 300

    first = C.CurveRun(config(max_ticks=300), str(tmp_path / "parts"), backprop_steps=300, backprop_lr=2.0)
    first.run_backprop(log=lambda line: None)
    first.run_pmgd(log=lambda line: None)
    assert first.done and first.engine.tick == 300
    # A new process with a larger budget continues the same curve from the checkpoint.
    rest = C.CurveRun(config(), str(tmp_path / "parts"), backprop_steps=300, backprop_lr=2.0)
    assert rest.engine.tick == 300 and rest.pmgd.ticks == [0, 100, 200, 300]
    rest.run_backprop(log=lambda line: None)  # already done: not run again
    rest.run_pmgd(log=lambda line: None)
    np.testing.assert_array_equal(rest.engine.theta0, whole.engine.theta0)
    assert rest.pmgd.accuracy == whole.pmgd.accuracy and rest.pmgd.cost == whole.pmgd.cost
    assert rest.backprop.accuracy == whole.backprop.accuracy
    # Parity2 is solved by both within the budget here; the first tick at the target is reported.
    s = json.loads((tmp_path / "parts" / "curve.json").read_text())
    assert s["pmgd_first_at_target"] == whole.pmgd.first_at(1.0)
    assert s["pmgd"]["ticks"] == whole.pmgd.ticks


def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path):
    run = C.CurveRun(config(max_ticks=200), str(tmp_path), backprop_steps=0, backprop_lr=1.0)
    run.run_pmgd(log=lambda line: None)
    path = tmp_path / C.STATE
    good = path.read_bytes()
    with pytest.raises(ConfigError, match="another config"):
        C.CurveRun(config(eta=0.25), str(tmp_path), backprop_steps=0, backprop_lr=1.0)
    # One flipped byte inside an array (np.savez stores them uncompressed) fails the digest.
    data = bytearray(good)
    i = good.index(np.asarray(run.engine.theta0).tobytes()[:16])
    data[i + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch|not a readable checkpoint"):
        C.CurveRun(config(max_ticks=200), str(tmp_path), backprop_steps=0, backprop_lr=1.0)
    path.write_bytes(good[: len(good) // 2])  # a torn write (what os.replace prevents)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        C.CurveRun(config(max_ticks=200), str(tmp_path), backprop_steps=0, backprop_lr=1.0)


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = C.CurveRun(config(max_ticks=300), str(tmp_path), backprop_steps=0, backprop_lr=1.0)
    run.run_pmgd(log=lambda line: None, stop_after=0)  # one check, then stop: tick 100 on disk
    assert run.engine.tick == 100

    def killed(src, dst):  # the process dies after writing the new file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(C.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run.run_pmgd(log=lambda line: None, stop_after=0)
    monkeypatch.undo()
    assert os.path.exists(tmp_path / (C.STATE + ".tmp"))
    again = C.CurveRun(config(max_ticks=300), str(tmp_path), backprop_steps=0, backprop_lr=1.0)
    assert again.engine.tick == 100 and again.pmgd.ticks == [0, 100]


def test_a_diverging_curve_stops_and_says_so(tmp_path):
    from services.evaluator.data import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path, n_train=200, n_test=50, seed=0)
    cfg = JobConfig(task="fmnist", data_dir=str(tmp_path), batch=10, amplitude=0.01, eta=1e3, max_ticks=500,
                    eval_every=100, target_accuracy=None)
    run = C.CurveRun(cfg, str(tmp_path / "out"), backprop_steps=0, backprop_lr=1.0)
    run.run_pmgd(log=lambda line: None)
    assert 0 < run.diverged_at < 100 and run.engine.tick == run.diverged_at + 1 and run.done  # its first NaN C̃
    assert json.loads((tmp_path / "out" / "curve.json").read_text())["diverged_at"] == run.diverged_at
    assert C.main(["--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "x")]) == 2  # no such file


def test_cli_writes_the_figure_and_the_summary(tmp_path, capsys):
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(config().to_dict()))
    out = tmp_path / "out"
    assert C.main(["--config", str(cfg), "--out", str(out), "--max-ticks", "200", "--eval-every", "100",
                   "--backprop-steps", "200", "--backprop-lr", "2", "--set", "eta=0.4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("tick       200") for line in lines)
    assert json.loads(lines[-1])["ticks_run"] == 200
    assert json.loads((out / "curve.json").read_text())["config"]["eta"] == 0.4
    assert (out / "curve.png").stat().st_size > 10_000


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path):
    run = C.CurveRun(config(max_ticks=100), str(tmp_path), backprop_steps=0, backprop_lr=1.0)
    run.run_pmgd(log=lambda line: None)
    state = C.load_state(str(tmp_path / C.STATE))
    identity = json.loads(str(state["identity"]))
    del identity["config"]["weight_decay"]  # as written by a version without that field
    state["identity"] = np.array(json.dumps(identity))
    C.save_state(str(tmp_path / C.STATE), state)
    again = C.CurveRun(config(max_ticks=200), str(tmp_path), backprop_steps=0, backprop_lr=1.0)
    assert again.engine.tick == 100
    with pytest.raises(ConfigError, match="another config"):  # a field set away from its default still counts
        C.CurveRun(config(max_ticks=200, weight_decay=0.1), str(tmp_path), backprop_steps=0, backprop_lr=1.0)
