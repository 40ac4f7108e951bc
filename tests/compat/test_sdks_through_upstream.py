"""The official SDK suite (test_official_sdks.py), run against k2serve in front of another
engine (`--upstream`): a second k2serve process serving the embedded model is the engine.
The clients cannot tell the two apart."""

from __future__ import annotations

import pytest

from tests.compat.test_official_sdks import *  # noqa: F401,F403 - the same tests, collected here
from tests.conftest import EMBEDDED_ID, start_server, stop_server


@pytest.fixture(scope="module")
def server():
    """Overrides the session's server for this module: the front, with no model of its own."""
    engine = start_server()
    try:
        front = start_server("--families", "", "--upstream", f"{EMBEDDED_ID}={engine.base_v1}")
    except Exception:
        stop_server(engine)
        raise
    yield front
    stop_server(front)
    stop_server(engine)
