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
