"""Property-based run of schemathesis over the API's own OpenAPI spec, on a live `pmgd api`:
whatever the generated request, valid (positive) or not (negative), the answer is never a 5xx
and is what the spec documents (status, content type, body, headers; the ``fuzz`` fixture of
``tests/services/conftest.py``)."""

import pytest
from test_api import Api  # the test directory is on sys.path (rootdir-relative imports)


@pytest.mark.slow
def test_every_answer_of_the_api_is_documented_and_none_is_a_5xx(tmp_path, fuzz):
    # One local job at a time: generated configs may ask for large jobs, and they run on.
    # With a token, sent: the routes are exercised, not refused at the gate.
    server = Api(tmp_path / "pmgd.sqlite", "--max-local-jobs=1", "--token=fuzz")
    try:
        seen = fuzz(server.url, headers={"Authorization": "Bearer fuzz"})
        assert len(seen) >= 12  # every route is in the spec
        calls = [s for statuses in seen.values() for s in statuses]
        assert any(200 <= s < 300 for s in calls) and any(400 <= s < 500 for s in calls)  # both kinds exercised
    finally:
        server.proc.kill()
        server.proc.wait()
