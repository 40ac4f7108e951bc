"""Which kernel path runs is visible: /health, the start-up line and `k2serve doctor` say it,
and say why when it is PyTorch's fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys

from k2serve import native
from tests.conftest import start_server, stop_server


def test_health_and_startup_line_name_the_kernel_path(server, http):
    kernels = http.get("/health").json()["kernels"]
    expected = native.status()  # this process builds (or fails to build) the same kernels
    assert kernels == expected
    assert f"kernels: {expected['path']}" in server.startup_line
    if native.enabled() and expected["native"]:
        assert expected["vector_isa"] in ("avx512", "avx2", "portable")


def test_a_disabled_build_is_named_as_the_reason():
    live = start_server(env={"K2SERVE_NATIVE": "0"})
    try:
        assert "kernels: PyTorch fallbacks (disabled by K2SERVE_NATIVE=0)" in live.startup_line
        import httpx

        kernels = httpx.get(live.root + "/health", timeout=30).json()["kernels"]
        assert kernels == {"native": False, "reason": "disabled by K2SERVE_NATIVE=0",
                           "path": "PyTorch fallbacks"}
    finally:
        stop_server(live)


def _doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "k2serve.cli", "doctor", *args],
                          env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=600)


def test_doctor_reports_cpu_kernels_models_database(tmp_path):
    out = _doctor("--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line.split()[2]: line for line in out.stdout.splitlines() if line.startswith("[")}
    features = [name for name, on in native.cpu_features().items() if on]
    assert all(f in lines["cpu"] for f in features), lines["cpu"]
    assert native.status()["path"] in lines["kernels"]
    assert lines["chat"].startswith("[  ok]") and lines["chat"].endswith(".gguf")
    assert lines["database"].startswith("[  ok]") and str(tmp_path) in lines["database"]


def test_doctor_fails_on_an_unreachable_redis(tmp_path):
    out = _doctor("--data-dir", str(tmp_path), "--redis-url", "redis://127.0.0.1:1/0")
    assert out.returncode == 1
    assert any(line.startswith("[FAIL] redis") for line in out.stdout.splitlines()), out.stdout
