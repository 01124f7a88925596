"""Fuzzing the gateway with requests generated from Ollama's OpenAPI spec (schemathesis):
valid and invalid bodies alike, no answer may be a server error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case, HookContext

from oshepherd.redis_server import EmbeddedRedis
from oshepherd.testing.fleet import Fleet
from tests.conftest import one_host
from tests.test_bad_input import assert_error

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SPEC = Path(__file__).with_name("data") / "ollama-openapi.yaml"
# Calls that change what the fleet holds (the gateway serves every one of them).
MUTATING = {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}

MODELS = ("llama3", "gemma4", "embeddinggemma")
# What the fuzzer names, besides its own inventions: the fleet's models, spelled variously.
NAMES = ("llama3", "LLAMA3:latest", "gemma4", "embeddinggemma:latest")

schema = schemathesis.openapi.from_path(SPEC)
schema.config.generation.update(max_examples=50)
# Not the "coverage" phase: its systematic wrong-type bodies are tests/test_bad_input.py's
# corpus again, and generating them doubles the run time.
schema.config.phases.update(phases=["examples", "fuzzing"])


@schema.hook
def flatmap_body(context: HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Often name a model the fleet holds: random names would all stop at the gateway's 404.
    Not for calls that change the fleet: those keep the fuzzer's names, which it does not hold."""
    if context.operation is None or context.operation.path in MUTATING:
        return st.just(body)
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return st.just(body)
    return st.sampled_from([body, *({**body, "model": name} for name in NAMES)])


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with one_host(redis_server, stack_log, *MODELS) as fleet:
        yield fleet


@schema.parametrize()
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Case, fleet: Fleet) -> None:
    path = case.operation.path
    response = case.call(base_url=fleet.url, timeout=10)
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        assert_error(response.status_code, content_type, response.content, path)
