"""Schemathesis against the app, in-process: every operation of our own OpenAPI schema, and
the operations of Together's published schema that this server serves (issue #12).

Zero 5xx, and every response conforms to the schema it is checked against (status code,
content type, body). Requests are generated both fitting the schema (positive) and breaking
it (negative). The schemas are narrowed only where a generated value would cost seconds
instead of milliseconds: `max_tokens` is required and at most 3, `n` at most 2, and `model`
is the model served for that endpoint or an unknown one.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fuzz.conftest import FUZZ_EXAMPLES

pytestmark = pytest.mark.fuzz

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# Together's schema does not list every 4xx a server answers (no 404 for an unknown model on
# /audio/speech, no 400 on /voices): there, a response is checked against the schema of its
# status when Together declares one.
TOGETHER_CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
UNKNOWN_MODEL = "no/such-model"
REPO = Path(__file__).resolve().parents[2]
TOGETHER_ENV = "K2SERVE_TOGETHER_OPENAPI"
# Together's paths (under its /v1 base) that this server serves.
TOGETHER_PATHS = {
    "/chat/completions": ("post",), "/completions": ("post",), "/embeddings": ("post",),
    "/rerank": ("post",), "/models": ("get",), "/audio/speech": ("post",),
    "/audio/transcriptions": ("post",), "/audio/translations": ("post",), "/voices": ("get",),
}


def _own_operations() -> list[tuple[str, str]]:
    from k2serve.app import create_app
    from k2serve.serving.registry import ModelRegistry

    paths = create_app(ModelRegistry()).openapi()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops]


def _model_for(fuzz_app, path: str) -> str | None:
    path = path.removeprefix("/v1")
    return {"/chat/completions": fuzz_app.chat, "/completions": fuzz_app.chat,
            "/responses": fuzz_app.chat, "/messages": fuzz_app.chat,
            "/messages/count_tokens": fuzz_app.chat,
            "/embeddings": fuzz_app.embedding, "/rerank": fuzz_app.embedding,
            "/moderations": fuzz_app.moderation, "/audio/speech": fuzz_app.speech,
            "/audio/transcriptions": fuzz_app.transcription,
            "/audio/translations": fuzz_app.transcription}.get(path)


def _narrow(spec: dict, fuzz_app) -> dict:
    """The schema with costly values bounded and `model` pinned per endpoint (see above)."""
    spec = copy.deepcopy(spec)
    for path, ops in spec["paths"].items():
        model = _model_for(fuzz_app, path)
        for op in ops.values():
            if not isinstance(op, dict):
                continue
            for content in (op.get("requestBody") or {}).get("content", {}).values():
                schema = content.get("schema") or {}
                if "$ref" in schema:
                    schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
                props = schema.get("properties") or {}
                if "model" in props and model is not None:
                    props["model"] = {"type": "string", "enum": [model, UNKNOWN_MODEL]}
                if "max_tokens" in props:
                    props["max_tokens"] = {"type": "integer", "minimum": 0, "maximum": 3}
                    schema["required"] = sorted(set(schema.get("required", [])) | {"max_tokens"})
                if "max_output_tokens" in props:  # the Responses API's max_tokens
                    props["max_output_tokens"] = {"type": "integer", "minimum": 0, "maximum": 3}
                    schema["required"] = sorted(set(schema.get("required", []))
                                                | {"max_output_tokens"})
                if "max_completion_tokens" in props:
                    props["max_completion_tokens"] = {"type": "integer", "minimum": 0,
                                                      "maximum": 3}
                if "n" in props:
                    props["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
    return spec


def _messages(exc: BaseException) -> list[str]:
    if isinstance(exc, BaseExceptionGroup):
        return [m for sub in exc.exceptions for m in _messages(sub)]
    return [str(exc)]


def _fuzz(schema, method: str, path: str, checks=CHECKS) -> None:
    """Run both generation modes on one operation; raise with every distinct failure."""
    operation = schema[path][method]
    failures: dict[str, str] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call()
            try:
                case.validate_response(response, checks=checks)
            except BaseException as exc:  # schemathesis raises an ExceptionGroup
                details = "\n".join(_messages(exc))
                failures.setdefault(details[:300], f"{details[:2000]}\n  {mode} body="
                                    f"{case.body!r:.400} -> {response.status_code} "
                                    f"{response.text[:400]}")

        try:
            run()
        except Unsatisfiable:  # nothing to break in an operation without inputs
            assert mode == GenerationMode.NEGATIVE
    assert not failures, "\n\n".join(f"{k}\n  {v}" for k, v in failures.items())


@pytest.fixture(scope="module")
def own_schema(fuzz_app):
    schema = schemathesis.openapi.from_dict(_narrow(fuzz_app.app.openapi(), fuzz_app))
    schema.app = fuzz_app.app
    return schema


@pytest.mark.parametrize("method,path", _own_operations())
def test_own_openapi_schema(own_schema, method, path):
    _fuzz(own_schema, method, path)


def _together_spec_path() -> Path:
    """Together's OpenAPI document: $K2SERVE_TOGETHER_OPENAPI, or shared/reference/ beside the
    checkout (where the project keeps it). Missing: skipped here, a failure under CI."""
    candidates = [Path(os.environ[TOGETHER_ENV])] if os.environ.get(TOGETHER_ENV) else []
    candidates += [parent / "shared/reference/together/openapi.yaml" for parent in REPO.parents]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    message = f"Together's openapi.yaml not found (set {TOGETHER_ENV})"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def together_schema(fuzz_app):
    import yaml

    spec = yaml.safe_load(_together_spec_path().read_text())
    spec["paths"] = {path: {m: op for m, op in ops.items() if m in TOGETHER_PATHS[path]}
                     for path, ops in spec["paths"].items() if path in TOGETHER_PATHS}
    spec["servers"] = [{"url": "/v1"}]
    # Together's SDKs (v1.x, v2, v3) also know these model types; its schema's enum lags
    # (API_NOTES.md, GET /models).
    model_type = spec["components"]["schemas"]["ModelInfo"]["properties"]["type"]
    model_type["enum"] = [*model_type["enum"], "audio", "transcribe", "video"]
    # With echo, the prompt's first token has no logprob (nothing precedes it): null, as
    # OpenAI answers; Together's LogprobsPart has no way to say so.
    logprobs = spec["components"]["schemas"]["LogprobsPart"]["properties"]
    for name in ("token_ids", "token_logprobs"):
        logprobs[name]["items"] = {"type": ["number", "null"]}
    # schemathesis cannot encode a binary part under oneOf (ValueError: Unsupported type:
    # 'Binary'); the upload alternative is the one this server takes.
    for name in ("AudioTranscriptionRequest", "AudioTranslationRequest"):
        spec["components"]["schemas"][name]["properties"]["file"] = {"type": "string",
                                                                    "format": "binary"}
    schema = schemathesis.openapi.from_dict(_narrow(spec, fuzz_app))
    schema.app = fuzz_app.app
    return schema


@pytest.mark.parametrize("method,path", [(m.upper(), p) for p, ms in TOGETHER_PATHS.items()
                                         for m in ms])
def test_together_openapi_schema(together_schema, method, path):
    _fuzz(together_schema, method, path, TOGETHER_CHECKS)
