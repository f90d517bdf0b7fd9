"""Property-based run of schemathesis over the API's own OpenAPI spec, on a live `pmgd api`:
whatever the generated request, valid (positive) or not (negative), the answer is never a 5xx.

(schemathesis's pytest plugin does not load under pytest 9, so the operations' hypothesis
strategies are driven directly.)
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_api import Api  # the test directory is on sys.path (rootdir-relative imports)


@pytest.mark.slow
def test_no_request_makes_the_api_fail_with_5xx(tmp_path):
    # One local job at a time: generated configs may ask for large jobs, and they run on.
    server = Api(tmp_path / "pmgd.sqlite", "--max-local-jobs=1")
    try:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12  # every route is in the spec
        calls = []
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                def check(case):
                    response = case.call(timeout=60)
                    calls.append(response.status_code)
                    assert response.status_code < 500, (case.method, case.formatted_path, case.query, case.body,
                                                         response.text)

                try:
                    check()
                except Unsatisfiable:
                    assert mode == GenerationMode.NEGATIVE  # nothing to get wrong (no parameters, no body)
        assert any(200 <= s < 300 for s in calls) and any(400 <= s < 500 for s in calls)  # both kinds exercised
    finally:
        server.proc.kill()
        server.proc.wait()
