"""The SQLite job store, on a real file, reopened as a restarted service would."""

import io
import threading

import numpy as np
import pytest

from services.api.store import Store, UnknownJob


def test_jobs_metrics_and_checkpoints_survive_a_reopen(tmp_path):
    path = str(tmp_path / "pmgd.sqlite")
    store = Store(path)
    a = store.create({"task": "parity2"}, "local")
    b = store.create({"task": "parity3"}, "cluster")
    store.set_state(a, "running")
    store.add_metrics(a, 10, {"cost": 0.5, "accuracy": 0.75})
    store.add_metrics(a, 20, {"cost": 0.25, "accuracy": 1.0})
    theta = np.arange(18.0).reshape(2, 9)
    store.save_checkpoint(a, 20, theta)
    store.set_state(b, "finished", summary={"converged": 1})
    store.close()

    store = Store(path)  # the service restarted
    assert store.recover() == [a]
    job = store.get(a)
    assert job["state"] == "interrupted" and "stopped" in job["error"] and job["config"] == {"task": "parity2"}
    assert store.get(b)["summary"] == {"converged": 1} and store.get(b)["state"] == "finished"
    assert store.metrics(a) == {"accuracy": [(10, 0.75), (20, 1.0)], "cost": [(10, 0.5), (20, 0.25)]}
    assert store.metrics(a, since=10) == {"accuracy": [(20, 1.0)], "cost": [(20, 0.25)]}
    tick, data = store.checkpoint(a)
    with np.load(io.BytesIO(data)) as z:
        np.testing.assert_array_equal(z["theta0"], theta)
        assert int(z["tick"]) == tick == 20
    assert [j["id"] for j in store.list()] == [a, b]


def test_delete_cascades_and_unknown_jobs_and_states_are_refused(tmp_path):
    store = Store(str(tmp_path / "s.sqlite"))
    a = store.create({}, "local")
    store.add_metrics(a, 1, {"cost": 1.0})
    store.save_checkpoint(a, 1, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="state must be one of"):
        store.set_state(a, "exploded")
    store.delete(a)
    for call in (lambda: store.get(a), lambda: store.metrics(a), lambda: store.checkpoint(a),
                 lambda: store.set_state(a, "running"), lambda: store.delete(a)):
        with pytest.raises(UnknownJob):
            call()
    assert store._run("SELECT COUNT(*) FROM metrics")[0][0] == 0  # cascaded
    assert store._run("SELECT COUNT(*) FROM checkpoints")[0][0] == 0


def test_threads_may_share_a_store(tmp_path):
    store = Store(str(tmp_path / "t.sqlite"))
    job = store.create({}, "local")

    def writer(k):
        for t in range(50):
            store.add_metrics(job, k * 1000 + t, {"cost": float(t)})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store.metrics(job)["cost"]) == 200


def test_a_replayed_point_replaces_the_old_one_and_old_files_are_deduplicated(tmp_path):
    import sqlite3

    path = str(tmp_path / "old.sqlite")
    store = Store(path)
    store.create({"task": "parity2"}, "local", {})
    job = store.list()[0]["id"]
    store.add_metrics(job, 10, {"cost": 0.5})
    store.add_metrics(job, 20, {"cost": 0.4})
    store.add_metrics(job, 10, {"cost": 0.45})  # a replay from a checkpoint before tick 10
    assert store.metrics(job)["cost"] == [(10, 0.45), (20, 0.4)]
    store.close()
    # A file written by a version without the unique index, holding duplicates:
    db = sqlite3.connect(path)
    db.executescript("DROP INDEX metrics_point; CREATE INDEX metrics_job ON metrics(job, name, tick);")
    db.execute("INSERT INTO metrics VALUES (?, 20, 'cost', 0.39)", (job,))
    db.commit()
    db.close()
    again = Store(path)
    assert again.metrics(job)["cost"] == [(10, 0.45), (20, 0.39)]  # the newest row of each point
    again.close()
