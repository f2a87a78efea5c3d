"""Property-based requests generated from /openapi.json: no input may make the server answer 5xx.

Schemathesis builds the requests (valid and invalid ones) from the live schema;
Hypothesis drives them. Image generation runs 576 steps and a VQ decode per
image, seconds each on CPU even for janus-tiny, so those two routes get invalid
requests only (negative mode, and cases the server would accept are dropped);
valid ones, edge values included, are in test_api_native.py.
"""
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from pydantic import ValidationError
from schemathesis.generation.modes import GenerationMode

from conftest import API_KEY
from server.protocol import IMAGE_SIZE, GenerateBody, ImageGenerationRequest

GENERATION_PATHS = "^/(generate|v1/images/generations)$"


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def would_draw(case) -> bool:
    """Whether the server would accept this case and run an image generation."""
    if not isinstance(case.body, dict) or case.operation.path not in ("/generate", "/v1/images/generations"):
        return False
    try:
        if case.operation.path == "/generate":
            body = GenerateBody.model_validate(case.body)
            return body.response_format == "b64_json" or (body.n == 1 and not body.stream)
        body = ImageGenerationRequest.model_validate(case.body)
        return body.size in (None, IMAGE_SIZE) and body.response_format != "url"
    except ValidationError:
        return False


def run_cases(schema, server, modes: list[GenerationMode], max_examples: int) -> None:
    @given(case=st.one_of(schema.as_strategy(mode) for mode in modes))
    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
        database=None,
    )
    def check(case) -> None:
        assume(not would_draw(case))
        case.call_and_validate(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {API_KEY}"},
            checks=[not_a_server_error],
            timeout=120,
        )

    check()


def test_no_server_errors(api_schema, server):
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    run_cases(api_schema.exclude(path_regex=GENERATION_PATHS), server, modes, max_examples=250)


def test_no_server_errors_on_invalid_image_generation(api_schema, server):
    run_cases(api_schema.include(path_regex=GENERATION_PATHS), server, [GenerationMode.NEGATIVE], max_examples=40)
