"""What k2serve in front of an engine costs: the same workload against the engine directly
and through a k2serve front (`--upstream`), in one run, alternating.

    python benchmarks/upstream_overhead.py [--streams 32] [--prompts 64] [--rounds 2]

The engine here is a second k2serve process serving the embedded SmolLM2 (vLLM-CPU is the
issue's target peer; point --upstream-url at a running vLLM to measure that instead). Prints
median TTFT and TPOT per side and their differences; the front adds one loopback HTTP hop,
the prompt's rendering and tokenizing, and the platform's admission.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from k2serve.bench import BenchConfig, run_benchmark  # noqa: E402
from tests.conftest import EMBEDDED_ID, start_server, stop_server  # noqa: E402


def measure(base: str, args) -> dict:
    return run_benchmark(BenchConfig(base_url=base, model=args.model, endpoint="chat",
                                     num_prompts=args.prompts, concurrency=args.streams,
                                     random_input_len=args.input_len,
                                     random_output_len=args.output_len, warmup=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--upstream-url", default=None,
                        help="an engine already running (its /v1 URL); default: start a "
                             "k2serve process serving the embedded model")
    parser.add_argument("--model", default=EMBEDDED_ID, help="the model id the engine serves")
    parser.add_argument("--tokenizer", default=None,
                        help="the model's checkpoint dir or .gguf (the embedded model's is known)")
    args = parser.parse_args()

    engine = None if args.upstream_url else start_server("--threads", "2")
    url = args.upstream_url or engine.base_v1
    tokenizer = ("--upstream-tokenizer", f"{args.model}={args.tokenizer}") if args.tokenizer else ()
    front = start_server("--families", "", "--upstream", f"{args.model}={url}", *tokenizer)
    results: dict[str, list[dict]] = {"direct": [], "through k2serve": []}
    try:
        for _ in range(args.rounds):
            results["direct"].append(measure(url, args))
            results["through k2serve"].append(measure(front.base_v1, args))
    finally:
        stop_server(front)
        if engine is not None:
            stop_server(engine)

    med = statistics.median
    print(f"\n{args.streams} streams, {args.prompts} chat requests of {args.input_len} prompt / "
          f"{args.output_len} output tokens, {args.rounds} rounds (medians of the rounds)")
    print(f"{'':<18}{'TTFT ms':>10}{'TPOT ms':>10}{'out tok/s':>11}")
    rows = {}
    for name, runs in results.items():
        rows[name] = (med(r["median_ttft_ms"] for r in runs), med(r["median_tpot_ms"] for r in runs),
                      med(r["output_throughput"] for r in runs))
        print(f"{name:<18}{rows[name][0]:>10.0f}{rows[name][1]:>10.1f}{rows[name][2]:>11.1f}")
    (d_ttft, d_tpot, _), (f_ttft, f_tpot, _) = rows["direct"], rows["through k2serve"]
    print(f"front overhead: TTFT {f_ttft - d_ttft:+.0f} ms (target <= 10 ms), "
          f"TPOT {100 * (f_tpot / d_tpot - 1):+.1f}% (target <= 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
