"""`k2serve bench` arguments; the client itself is imported only when the command runs."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _request_rate(text: str) -> float:
    value = float(text)  # float() accepts "inf"
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive or inf, got {text}")
    return value


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="benchmark a running server (TTFT, TPOT, ITL, throughput)",
        description="Send streamed requests to an OpenAI-compatible server and report "
                    "latency and throughput, like `vllm bench serve`. Token counts are the "
                    "server's usage figures; random prompts are random words, about one token "
                    "each.")
    bench.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                       help="API base, up to and including /v1")
    bench.add_argument("--model", default=None, help="default: the first id from GET /models")
    bench.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    bench.add_argument("--dataset", default="random",
                       help='"random", or a JSONL file of {"prompt": str} or '
                            '{"messages": [...]} lines with optional "max_tokens"')
    bench.add_argument("--num-prompts", type=_positive_int, default=None,
                       help="default: 100 random prompts, or every line of the file")
    bench.add_argument("--random-input-len", type=_positive_int, default=256,
                       help="words per random prompt")
    bench.add_argument("--random-output-len", type=_positive_int, default=128,
                       help="max_tokens per request (and for file lines without one)")
    bench.add_argument("--concurrency", type=_positive_int, default=None,
                       help="most requests in flight at once (default: no cap)")
    bench.add_argument("--request-rate", type=_request_rate, default=math.inf,
                       help="mean requests per second, Poisson arrivals; inf sends all at once")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                       help="send vLLM's ignore_eos so every output has max_tokens tokens")
    bench.add_argument("--json-out", default=None, help="also write the metrics to this file")
    bench.add_argument("--api-key", default=None, help="sent as a Bearer token")
    bench.add_argument("--warmup", type=_non_negative_int, default=0,
                       help="requests sent before the measured run and not counted")
    bench.add_argument("--timeout", type=float, default=600.0,
                       help="seconds a request may wait for its next bytes")
    bench.add_argument("--log-level", default="warning")
    bench.set_defaults(func=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> int:
    """Exit code 0 when every request succeeded, 1 when any failed, 2 when none could run."""
    try:
        from k2serve.bench.client import BenchConfig, run_benchmark
        from k2serve.bench.metrics import format_table
    except ImportError as exc:
        print(f"k2serve bench: {exc}; install httpx (`pip install httpx`)", file=sys.stderr)
        return 2
    import httpx

    config = BenchConfig(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint, dataset=args.dataset,
        num_prompts=args.num_prompts, random_input_len=args.random_input_len,
        random_output_len=args.random_output_len, concurrency=args.concurrency,
        request_rate=args.request_rate, seed=args.seed, ignore_eos=args.ignore_eos,
        api_key=args.api_key, warmup=args.warmup, timeout_s=args.timeout)
    try:
        metrics = run_benchmark(config)
    except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        print(f"k2serve bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(format_table(metrics), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0 if metrics["failed"] == 0 else 1
