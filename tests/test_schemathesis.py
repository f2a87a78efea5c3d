"""Property-based requests generated from /openapi.json: no input may make the server answer 5xx.

Schemathesis builds the requests (valid and invalid ones) from the live schema;
Hypothesis drives them. Image generation runs 576 steps per image even on
janus-tiny, so those routes get a small budget and at most 2 images a request.
"""
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from conftest import API_KEY

GENERATION_PATHS = "^/(generate|v1/images/generations)$"
MAX_IMAGES_PER_CASE = 2


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def cases(schema):
    return st.one_of(schema.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))


def cap_images(case) -> None:
    """Valid but large n is lowered to the cap; invalid values are sent as generated."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("n"), int) and 1 <= body["n"] <= 16:
        body["n"] = min(body["n"], MAX_IMAGES_PER_CASE)


def run_cases(schema, server, max_examples: int) -> None:
    @given(case=cases(schema))
    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
        database=None,
    )
    def check(case) -> None:
        cap_images(case)
        case.call_and_validate(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {API_KEY}"},
            checks=[not_a_server_error],
            timeout=120,
        )

    check()


def test_no_server_errors(api_schema, server):
    run_cases(api_schema.exclude(path_regex=GENERATION_PATHS), server, max_examples=300)


def test_no_server_errors_in_image_generation(api_schema, server):
    run_cases(api_schema.include(path_regex=GENERATION_PATHS), server, max_examples=12)
