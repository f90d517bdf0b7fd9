"""The remote cost server reads data only from the directories it was started with."""

import numpy as np

from pmgd_node import protocol as p
from pmgd_node.config import JobConfig
from services.evaluator import data as D
from services.evaluator.remote import CostServer, EvaluatorSettings


def test_a_job_naming_another_data_directory_is_answered_with_an_error(tmp_path):
    inside, outside = tmp_path / "served", tmp_path / "other"
    D.write_fake_fashion_mnist(inside, n_train=20, n_test=10, seed=0)
    D.write_fake_fashion_mnist(outside, n_train=20, n_test=10, seed=0)
    server = CostServer(EvaluatorSettings(endpoint="tcp://127.0.0.1:0", data_dir=str(inside), http_port=0))
    try:
        theta = np.zeros((1, 14378), dtype=np.float32)
        for data_dir, ok in ((str(inside), True), ("", True), (str(outside), False), ("/etc", False)):
            config = JobConfig(task="fmnist", data_dir=data_dir).to_dict()
            job = f"job-{data_dir}"
            reply = server.answer(p.ChipHello(1, job, config))
            assert isinstance(reply, p.ChipInfo) == ok, (data_dir, reply)
            if not ok:
                assert "outside the directories" in reply.error and reply.code == "bad_request"
                continue
            assert reply.params == 14378 and reply.samples == {"train": 20, "test": 10} and reply.outputs == 10
            cost = server.answer(p.ChipCost(2, job, theta, np.arange(4)))
            assert isinstance(cost, p.ChipCostReply) and cost.cost.shape == (1,), cost
    finally:
        server.sock.close()


def test_the_evaluator_is_a_chip_for_any_job_it_is_introduced_to(tmp_path):
    """ChipClient against the cost server: hello loads the job's model and data, cost and
    evaluate use its splits, a restarted server (unknown job) gets hello again, malformed
    frames are dropped and counted, never fatal."""
    import threading

    from services.chip.client import ChipClient
    from services.cluster.launcher import free_port
    from services.evaluator.models import job_model

    D.write_fake_fashion_mnist(tmp_path, n_train=20, n_test=10, seed=0)
    settings = EvaluatorSettings(endpoint=f"tcp://127.0.0.1:{free_port()}", data_dir=str(tmp_path), http_port=0)
    config = JobConfig(task="fmnist", data_dir=str(tmp_path))
    model = job_model(config)
    train, test = D.load("fmnist", str(tmp_path), "train"), D.load("fmnist", str(tmp_path), "test")
    theta = model.init(np.random.default_rng(0), 2)

    def serve():
        server = CostServer(settings)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        return server, thread

    server, thread = serve()
    client = ChipClient(settings.endpoint, "fm", config, timeout_s=5, retries=3)
    try:
        info = client.hello()
        assert (info.params, info.samples, info.outputs) == (14378, {"train": 20, "test": 10}, 10)
        idx = np.array([9, 0, 3])
        cost, accuracy = client.evaluate(theta, idx, "test")
        want = model.evaluate(theta, model.prepare(test.x[idx], test.y[idx]))
        np.testing.assert_array_equal(cost, want[0])
        np.testing.assert_array_equal(accuracy, want[1])
        np.testing.assert_array_equal(client.cost(theta, idx), model.cost(theta, model.prepare(train.x[idx],
                                                                                                train.y[idx])))
        client.sock.send_multipart([b'{"chip": 1, "op": "cost"}'])  # no seq, no job: dropped
        client.sock.send_multipart([b"\x00\x01"])
        client.cost(theta, idx)  # still answering
        assert server.dropped == {"field": 1, "header": 1}
        server.running = False  # a restart: the new server holds no job
        thread.join(10)
        server, thread = serve()
        hellos = client.stats["hellos"]
        np.testing.assert_array_equal(client.cost(theta, idx), model.cost(theta, model.prepare(train.x[idx],
                                                                                                train.y[idx])))
        assert client.stats["hellos"] == hellos + 1
    finally:
        client.close()
        server.running = False
        thread.join(10)
