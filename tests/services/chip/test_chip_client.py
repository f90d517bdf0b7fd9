"""The chip protocol end to end on one machine: the reference chip (examples/reference_chip.py)
as its own process, ChipClient, and jobs of the in-process engine trained through a chip."""

import ast
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from pmgd_node import protocol as p
from pmgd_node.config import ConfigError, JobConfig
from pmgd_node.shell import keys as cluster_keys
from services.chip.client import ChipClient, ChipError
from services.cluster.launcher import free_port
from services.engine.engine import Engine
from services.evaluator.data import parity
from services.evaluator.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CHIP = os.path.join(ROOT, "examples", "reference_chip.py")


def _mlp(task: str, theta: np.ndarray, idx) -> tuple[np.ndarray, np.ndarray]:
    bits = int(task[len("parity"):])
    model, data = build_model(task, f"{bits}-{bits}-1"), parity(bits)
    return model.evaluate(theta, model.prepare(data.x[idx], data.y[idx]))


def _history(result) -> tuple[list, np.ndarray, np.ndarray]:
    return ([h.tick for h in result.history], np.array([h.cost for h in result.history]),
            np.array([h.accuracy for h in result.history]))


# --- the reference chip itself ----------------------------------------------------------------
def test_the_reference_chip_imports_only_numpy_pyzmq_and_the_standard_library():
    tree = ast.parse(open(CHIP, encoding="utf-8").read())
    roots = set()
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"numpy", "zmq"}
    # And at run time: with the project's packages made unimportable, it still loads.
    blocker = ("import sys, runpy\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('pmgd_node', 'services', 'pmgd'):\n"
               "            raise ImportError('the reference chip imported ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               f"sys.argv = [{CHIP!r}, '--help']\n"
               f"runpy.run_path({CHIP!r}, run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-I", "-c", blocker], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(ROOT))
    assert out.returncode == 0 and "--gain-variation" in out.stdout, out.stderr


def test_bad_options_are_refused_naming_the_option(tmp_path):
    for args, text in ((["--task", "parity9"], "--task"), (["--read-noise", "-1"], "--read-noise"),
                       (["--endpoint", "tcp://0.0.0.0:5999"], "--keys")):
        out = subprocess.run([sys.executable, "-I", CHIP, *args], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert out.returncode == 2 and text in out.stderr, (args, out.stderr)


@pytest.mark.parametrize("task", ["parity2", "parity3"])
def test_a_perfect_chip_computes_the_projects_mlp_cost(ref_chip, task):
    chip = ref_chip("--task", task)
    client = ChipClient(chip.endpoint, "j", JobConfig(task=task), timeout_s=10, retries=0)
    try:
        info = client.hello()
        bits = int(task[6:])
        assert info.params == bits * bits + 2 * bits + 1 and info.samples == {"train": 2 ** bits, "test": 2 ** bits}
        assert info.outputs == 1
        theta = np.random.default_rng(1).normal(size=(5, info.params)) * 3
        idx = np.array([3, 0, 1, 1, 2])
        cost, accuracy = client.evaluate(theta, idx, "test")
        want_cost, want_acc = _mlp(task, theta, idx)
        np.testing.assert_allclose(cost, want_cost, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(accuracy, want_acc)
        np.testing.assert_allclose(client.cost(theta, idx), want_cost, rtol=1e-12, atol=1e-15)
        # the outputs, as the protocol returns them (S, B, O), are the network's
        seq = client.seq + 1
        client.sock.send_multipart(p.encode_chip(p.ChipCost(seq, "j", theta, idx, "train", True)))
        assert client.sock.poll(10_000)
        reply = p.decode_chip_reply(client.sock.recv_multipart())
        bits_model = build_model(task, f"{bits}-{bits}-1")
        np.testing.assert_allclose(reply.outputs, bits_model.forward(theta, parity(bits).x[idx]), rtol=1e-12)
        assert client.dropped == {}
    finally:
        client.close()


def test_imperfections_belong_to_the_device_and_its_seed(ref_chip):
    theta = np.random.default_rng(2).normal(size=(2, 9))
    idx = np.arange(4)

    def costs(*args, n=2):
        chip = ref_chip(*args)
        client = ChipClient(chip.endpoint, "j", None, timeout_s=10, retries=0)
        try:
            client.hello()
            return [client.evaluate(theta, idx) for _ in range(n)]
        finally:
            client.close()
            chip.stop()

    perfect = _mlp("parity2", theta, idx)[0]
    mismatch = costs("--gain-variation", "0.2", "--offset-variation", "0.1", "--seed", "7")
    assert not np.allclose(mismatch[0][0], perfect)  # the device computes with g⊙θ + o
    np.testing.assert_array_equal(mismatch[0][0], mismatch[1][0])  # fixed mismatch: repeatable
    again = costs("--gain-variation", "0.2", "--offset-variation", "0.1", "--seed", "7")
    np.testing.assert_array_equal(again[0][0], mismatch[0][0])  # the seed is the device's identity
    other = costs("--gain-variation", "0.2", "--offset-variation", "0.1", "--seed", "8")
    assert not np.allclose(other[0][0], mismatch[0][0])
    noisy = costs("--read-noise", "0.01")
    assert not np.array_equal(noisy[0][0], noisy[1][0]) and np.allclose(noisy[0][0], perfect, atol=0.1)
    np.testing.assert_array_equal(noisy[0][1], noisy[1][1])  # accuracy carries no read noise
    drifting = costs("--drift", "0.05", n=3)
    assert len({tuple(c) for c, _ in drifting}) == 3  # the offsets walk with every request


# --- ChipClient against chips that misbehave ---------------------------------------------------
class FakeChip:
    """A ROUTER in a thread that answers each request with ``script(header, frames)``: a list of
    frame lists to send back (possibly none)."""

    def __init__(self, script):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.script, self.seen, self.running = script, [], True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            header = json.loads(frames[1])
            self.seen.append(header)
            for reply in self.script(header, frames[2:]):
                self.sock.send_multipart([frames[0]] + reply)

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()


def _info(h):
    return p.encode_chip(p.ChipInfo(h["seq"], h["job"], 9, {"train": 4, "test": 4}, 1, "fake"))


def _cost(h, runs=2):
    return p.encode_chip(p.ChipCostReply(h["seq"], h["job"], np.full(runs, 0.5), np.full(runs, 1.0)))


def test_a_silent_chip_is_asked_again_then_gives_a_clear_error():
    chip = FakeChip(lambda h, f: [])
    client = ChipClient(chip.endpoint, "job-x", None, timeout_s=0.2, retries=2)
    try:
        started = time.monotonic()
        with pytest.raises(ChipError) as err:
            client.evaluate(np.zeros((2, 9)), [0, 1])
        waited = time.monotonic() - started
        text = str(err.value)
        assert chip.endpoint in text and "cost" in text and "job-x" in text and "3 tries" in text, text
        assert "no answer within 0.2 s" in text
        assert waited >= 0.6 and [h["seq"] for h in chip.seen] == [1, 2, 3]  # sent again, each a new seq
        assert client.stats["timeouts"] == 3 and client.stats["resent"] == 2
    finally:
        client.close()
        chip.close()


def test_malformed_stale_and_foreign_replies_are_dropped_and_counted():
    def script(h, frames):
        if h["op"] == "hello":
            return [_info(h)]
        junk = [[b"\xff not json"], [b'{"chip": 2}'], _cost(dict(h, seq=h["seq"] - 1)),  # stale
                _cost(dict(h, job="another")), _cost(h, runs=3),  # another job; other runs than asked
                p.encode_chip(p.ChipInfo(h["seq"], h["job"], 9, {"train": 4, "test": 4}, 1, "x"))]  # wrong op
        return junk + [_cost(h)]

    chip = FakeChip(script)
    client = ChipClient(chip.endpoint, "j", None, timeout_s=5, retries=0)
    try:
        assert client.hello().params == 9
        np.testing.assert_array_equal(client.cost(np.zeros((2, 9)), [0, 1]), [0.5, 0.5])
        assert client.dropped == {"header": 1, "version": 1, "stale": 1, "unexpected": 3}
    finally:
        client.close()
        chip.close()


def test_unknown_job_says_hello_again_busy_retries_and_bad_request_does_not():
    answers = {"cost": 0}

    def script(h, frames):
        if h["op"] == "hello":
            return [_info(h)]
        answers["cost"] += 1
        if answers["cost"] == 1:
            return [p.encode_chip(p.ChipErrorReply(h["seq"], h["job"], "restarted", "unknown_job"))]
        if answers["cost"] == 2:
            return [p.encode_chip(p.ChipErrorReply(h["seq"], h["job"], "calibrating", "busy"))]
        if answers["cost"] == 3:
            return [_cost(h)]
        return [p.encode_chip(p.ChipErrorReply(h["seq"], h["job"], "indices out of range"))]

    chip = FakeChip(script)
    client = ChipClient(chip.endpoint, "j", None, timeout_s=5, retries=3)
    try:
        np.testing.assert_array_equal(client.cost(np.zeros((2, 9)), [0, 1]), [0.5, 0.5])
        assert [h["op"] for h in chip.seen] == ["cost", "hello", "cost", "cost"]
        assert client.stats["hellos"] == 1 and client.stats["resent"] == 2
        with pytest.raises(ChipError, match="refused it: indices out of range \\(bad_request\\)"):
            client.cost(np.zeros((2, 9)), [0, 1])
        assert answers["cost"] == 4  # never sent again
    finally:
        client.close()
        chip.close()


def test_client_arguments_are_checked():
    for kwargs, text in (({"endpoint": ""}, "endpoint"), ({"job_id": ""}, "job id"), ({"timeout_s": 0}, "timeout"),
                         ({"retries": -1}, "retries")):
        args = {"endpoint": "tcp://127.0.0.1:1", "job_id": "j", "timeout_s": 1.0, "retries": 0} | kwargs
        with pytest.raises(ValueError, match=text):
            ChipClient(args["endpoint"], args["job_id"], None, args["timeout_s"], args["retries"])


# --- CurveZMQ ---------------------------------------------------------------------------------
def test_a_chip_with_keys_takes_the_clusters_clients_only(ref_chip, tmp_path):
    keys_dir = str(tmp_path / "keys")
    cluster_keys.init(keys_dir)
    chip = ref_chip("--keys", keys_dir)
    assert "(CurveZMQ)" in chip.ready_line
    good = ChipClient(chip.endpoint, "j", None, timeout_s=10, retries=0, keys=cluster_keys.load(keys_dir))
    try:
        assert good.hello().params == 9
    finally:
        good.close()
    plain = ChipClient(chip.endpoint, "j", None, timeout_s=1, retries=1)
    try:
        with pytest.raises(ChipError, match="handshake .* failed: the server requires the cluster's keys"):
            plain.hello()
    finally:
        plain.close()
    other_dir = str(tmp_path / "other")
    cluster_keys.init(other_dir)
    theirs = cluster_keys.load(other_dir)  # a client pair this chip never authorized
    stranger = cluster_keys.Keys(other_dir, "client", theirs.public, theirs.secret,
                                 cluster_keys.load(keys_dir).server_public)
    foreign = ChipClient(chip.endpoint, "j", None, timeout_s=1, retries=1, keys=stranger)
    try:
        with pytest.raises(ChipError, match="refused our key"):
            foreign.hello()
    finally:
        foreign.close()


# --- jobs through a chip ----------------------------------------------------------------------
def test_the_local_engine_through_a_perfect_chip_matches_in_process(ref_chip):
    chip = ref_chip()
    config = JobConfig(seeds=3, seed=4, max_ticks=3000, eval_every=20)
    in_process = Engine(config)
    reference = in_process.run()
    engine = Engine(JobConfig.from_dict(config.to_dict() | {"chip": chip.endpoint}))
    result = engine.run()
    assert engine.job.remote.stats["timeouts"] == 0 and engine.job.remote.dropped == {}
    assert result.solved.any() and result.ticks == reference.ticks
    np.testing.assert_array_equal(result.ticks_to_solution, reference.ticks_to_solution)
    ticks, cost, accuracy = _history(result)
    ref_ticks, ref_cost, ref_accuracy = _history(reference)
    assert ticks == ref_ticks
    np.testing.assert_allclose(cost, ref_cost, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(accuracy, ref_accuracy)  # measured on the chip (split "train" for parity)
    np.testing.assert_allclose(engine.theta0, in_process.theta0, rtol=1e-9, atol=1e-12)


def test_pmgd_train_with_chip_trains_through_it(ref_chip, tmp_path):
    chip = ref_chip()
    out = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, "-m", "services.cli", "train", "--task", "parity2", "--chip", chip.endpoint,
                          "--seeds", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads(out.read_text())
    assert summary["converged"] == 2 and summary["config"]["chip"] == chip.endpoint


def test_a_chip_killed_mid_job_and_restarted_on_the_same_endpoint_is_retried(ref_chip):
    chip = ref_chip()
    config = JobConfig(seeds=2, seed=6, max_ticks=3000, eval_every=20, chip=chip.endpoint, chip_timeout=1.0,
                       chip_retries=3)
    engine = Engine(config)
    restarted = []

    def on_eval(point, solved):
        if point.tick == 100:  # mid-job: kill -9 the chip and bring up a fresh one (it knows no job)
            chip.kill()
            restarted.append(ref_chip(endpoint=chip.endpoint))

    result = engine.run(on_eval)
    assert restarted and result.ticks > 100
    stats = engine.job.remote.stats
    assert stats["hellos"] == 2 and stats["resent"] >= 1, stats  # asked again, introduced again
    reference = Engine(JobConfig.from_dict(config.to_dict() | {"chip": ""})).run()
    assert result.ticks == reference.ticks  # the retry changed nothing: never a wrong result
    np.testing.assert_allclose(_history(result)[1], _history(reference)[1], rtol=1e-9, atol=1e-12)


def test_a_chip_that_stays_dead_ends_the_job_with_a_chip_error(ref_chip):
    chip = ref_chip()
    engine = Engine(JobConfig(seeds=1, max_ticks=3000, chip=chip.endpoint, chip_timeout=0.3, chip_retries=1))

    def on_eval(point, solved):
        if point.tick == 50:
            chip.kill()

    with pytest.raises(ChipError) as err:
        engine.run(on_eval)
    text = str(err.value)
    assert text.startswith(f"chip {chip.endpoint}: cost for job job-") and "2 tries" in text, text
    assert engine.tick < 3000 and not engine.job.history[-1].tick > 50


def test_a_chip_with_another_p_is_a_config_error_naming_both(ref_chip):
    chip = ref_chip()
    with pytest.raises(ConfigError) as err:
        Engine(JobConfig(network="2-3-1", chip=chip.endpoint))
    assert err.value.field == "chip"
    assert f"{chip.endpoint} (reference chip parity2 (seed 0)) has P=9 parameters" in str(err.value)
    assert "mlp-2-3-1) has 13" in str(err.value)


def test_a_chip_for_another_task_refuses_the_job(ref_chip):
    chip = ref_chip("--task", "parity3")
    with pytest.raises(ChipError, match="this chip runs parity3; the job is parity2"):
        Engine(JobConfig(chip=chip.endpoint, chip_retries=0))


def test_no_chip_listening_is_a_chip_error_at_set_up():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ChipError, match=f"chip {endpoint}: hello .* no answer within 0.2 s to any of 1 tries"):
        Engine(JobConfig(chip=endpoint, chip_timeout=0.2, chip_retries=0))


def test_the_chip_stops_cleanly_on_sigterm(ref_chip):
    chip = ref_chip()
    client = ChipClient(chip.endpoint, "j", None, timeout_s=10, retries=0)
    try:
        client.hello()
        client.cost(np.zeros((1, 9)), [0])
        client.sock.send_multipart([b"not json"])  # dropped and counted
        time.sleep(0.3)
    finally:
        client.close()
    assert chip.stop() == 0
    assert "stopped after 2 answers; dropped {'header': 1}" in chip.tail, chip.tail


def test_the_minimal_chip_of_the_document_trains_a_job(tmp_path):
    """docs/chip-protocol.md §8, run as printed (only its port changed): a chip built from the
    document alone works with the trainer."""
    text = open(os.path.join(ROOT, "docs", "chip-protocol.md"), encoding="utf-8").read()
    code = text.split("## 8. A minimal chip", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    assert code.count('"tcp://127.0.0.1:5570"') == 1
    script = tmp_path / "minimal_chip.py"
    script.write_text(code.replace('"tcp://127.0.0.1:5570"', repr(endpoint)))
    proc = subprocess.Popen([sys.executable, "-I", str(script)], cwd=tmp_path)
    try:
        config = JobConfig(seeds=2, seed=4, max_ticks=2000, chip=endpoint, chip_timeout=10)
        result = Engine(config).run()
        reference = Engine(config.replace(chip="")).run()
        assert result.ticks == reference.ticks
        np.testing.assert_allclose(result.final_cost, reference.final_cost, rtol=1e-9)
    finally:
        proc.kill()
        proc.wait(30)


def test_pmgd_train_reaches_a_keyed_chip_with_keys_and_not_without(ref_chip, tmp_path):
    """The local engine's identity towards a keyed chip: ``pmgd train --chip E --keys DIR``."""
    keys_dir = str(tmp_path / "keys")
    cluster_keys.init(keys_dir)
    chip = ref_chip("--keys", keys_dir)
    base = [sys.executable, "-m", "services.cli", "train", "--task", "parity2", "--chip", chip.endpoint,
            "--seeds", "2", "--max-ticks", "200", "--quiet", "--chip-retries", "0", "--chip-timeout", "2"]
    env = {k: v for k, v in os.environ.items() if k != "PMGD_KEYS"}
    ok = subprocess.run(base + ["--keys", keys_dir], capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1 and "requires the cluster's keys" in refused.stderr, refused.stderr[-2000:]
