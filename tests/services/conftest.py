"""What the tests of more than one service share: the schemathesis run over a live service's
own OpenAPI spec (the API's in ``api/test_openapi_fuzz.py``, the evaluator's in
``evaluator/test_evaluator_openapi_fuzz.py``)."""

import pytest


def _examples(op, mode, headers: dict | None, max_examples: int) -> list[int]:
    """Statuses of ``op`` called with up to ``max_examples`` generated ``mode`` requests, each
    answer checked: no 5xx, and status, content type, body and headers as the spec documents."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks as spec

    checks = [not_a_server_error, spec.status_code_conformance, spec.content_type_conformance,
              spec.response_schema_conformance, spec.response_headers_conformance]
    statuses = []

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        statuses.append(case.call_and_validate(headers=headers, checks=checks, timeout=60).status_code)

    try:
        check()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # nothing to get wrong (no parameters, no body)
    return statuses


@pytest.fixture
def fuzz():
    """``fuzz(base_url, headers=None, max_examples=15)``: every operation of the spec at
    ``base_url + "/openapi.json"`` called with requests its hypothesis strategies generate,
    valid (positive) and not (negative), ``headers`` added to each; every answer must be no
    5xx and conform to the spec (a documented status, content type, body schema and headers).
    Returns ``{operation label: [status, …]}``.

    (schemathesis's pytest plugin does not load under pytest 9, so the strategies are driven
    directly.)
    """
    import schemathesis
    from schemathesis import GenerationMode

    def run(base_url: str, headers: dict | None = None, max_examples: int = 15) -> dict[str, list[int]]:
        schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
        return {op.label: [s for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                           for s in _examples(op, mode, headers, max_examples)]
                for op in (result.ok() for result in schema.get_all_operations())}

    return run
