"""Waiting for a dedicated endpoint's state, through Together's endpoints API."""

from __future__ import annotations

import time

import httpx


def wait_for(http: httpx.Client, endpoint_id: str, check, what: str, timeout: float = 180,
             stop_at_error: bool = False) -> dict:
    """The endpoint object once `check` accepts it; AssertionError after `timeout` s (at
    once on ERROR with `stop_at_error`: a replica that cannot start will not)."""
    deadline = time.time() + timeout
    endpoint = None
    while time.time() < deadline:
        endpoint = http.get(f"/v1/endpoints/{endpoint_id}").json()
        if check(endpoint):
            return endpoint
        assert not (stop_at_error and endpoint.get("state") == "ERROR"), endpoint
        time.sleep(0.5)
    raise AssertionError(f"endpoint never {what} within {timeout} s: {endpoint}")
