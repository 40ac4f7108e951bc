"""The switches around telemetry, each in a fresh process: multiprocess metrics are one
environment variable, and tracing off costs no OpenTelemetry SDK import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = str(Path(__file__).parents[2])


def _python(code: str, env: dict[str, str]) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_prometheus_multiproc_dir_sums_the_processes(tmp_path):
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for tokens in (5, 7):  # two worker processes count prompt tokens
        _python("from k2serve.telemetry.metrics import PROMPT_TOKENS\n"
                f"PROMPT_TOKENS.labels('m').inc({tokens})", env)
    text = _python("from prometheus_client import generate_latest\n"
                   "from k2serve.telemetry.metrics import scrape_source\n"
                   "print(generate_latest(scrape_source()).decode())", env)
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.labels.get("model_name") == "m"}
    assert samples["k2serve:prompt_tokens_total"] == 12


def test_tracing_off_imports_no_sdk():
    out = _python("import sys\n"
                  "from k2serve.app import create_app\n"
                  "from k2serve.serving.registry import ModelRegistry\n"
                  "from k2serve.telemetry import tracing\n"
                  "create_app(ModelRegistry())\n"
                  "assert tracing.setup() is False and not tracing.enabled()\n"
                  "print(any(m.startswith('opentelemetry.sdk') for m in sys.modules))",
                  {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""})
    assert out.strip() == "False"
