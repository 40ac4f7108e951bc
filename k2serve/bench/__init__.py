"""`k2serve bench`: a serving benchmark client modeled on `vllm bench serve`.

    from k2serve.bench import BenchConfig, run_benchmark
    metrics = run_benchmark(BenchConfig(base_url="http://127.0.0.1:8000/v1", num_prompts=8))

Exports load lazily: the client needs httpx, which `k2serve serve` does not, and the
`k2serve` command line imports this package for every subcommand.
"""

from __future__ import annotations

__all__ = ["BenchConfig", "BenchRun", "benchmark_records", "run_benchmark", "run_benchmark_async"]


def __getattr__(name: str):
    if name in __all__:
        from k2serve.bench import client
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
