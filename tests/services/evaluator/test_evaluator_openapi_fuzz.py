"""Property-based run of schemathesis over the evaluator's own OpenAPI spec, on a live `pmgd
evaluator` started with a token: sent, the routes are exercised; not sent, every POST is
refused at the gate. Either way no answer is a 5xx and every answer is what the spec documents
(the ``fuzz`` fixture of ``tests/services/conftest.py``)."""

import pytest
from test_service import Evaluator  # the test directory is on sys.path (rootdir-relative imports)

TOKEN = "fuzz"


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    ev = Evaluator(tmp_path_factory.mktemp("ev") / "evaluator.log", f"--token={TOKEN}")
    ev.wait_http()
    yield ev
    assert ev.stop() == 0, ev.output()


@pytest.mark.slow
def test_every_answer_of_the_evaluator_is_documented_and_none_is_a_5xx(evaluator, fuzz):
    seen = fuzz(evaluator.url, headers={"Authorization": f"Bearer {TOKEN}"}, max_examples=25)
    assert set(seen) == {"GET /health", "POST /evaluate", "POST /evaluate/checkpoint", "GET /metrics"}
    for op in ("POST /evaluate", "POST /evaluate/checkpoint"):
        assert 401 not in seen[op] and any(400 <= s < 500 for s in seen[op]), (op, seen[op])


@pytest.mark.slow
def test_without_the_token_every_post_is_refused_as_documented(evaluator, fuzz):
    seen = fuzz(evaluator.url, max_examples=5)
    assert set(seen["POST /evaluate"]) == set(seen["POST /evaluate/checkpoint"]) == {401}
    assert set(seen["GET /health"]) == {200}
