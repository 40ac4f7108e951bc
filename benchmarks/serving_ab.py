"""Did a change make serving slower? k2serve's serving figures for two checkouts, in one run,
alternating, so that the machine's noise falls on both.

    git worktree add /tmp/before <commit>
    python benchmarks/serving_ab.py /tmp/before . [--rounds 3]

Each round starts each tree's server in turn (its own code: PYTHONPATH=tree) and measures,
with benchmarks/serving_compare.py's functions: batch-1 decode (TPOT), 32 concurrent streams
(256 prompt / 64 output tokens) and the TTFT of a ~2,000-token prompt cold and prefix-cached.
Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ONE_RUN = """
import json, statistics, sys
sys.path.insert(0, ".")
import httpx
from benchmarks.serving_compare import prefix_cache_ttft, served_decode_rate, served_throughput
from tests.conftest import start_server, stop_server
server = start_server("--threads", "2")
try:
    base = server.base_v1
    model = httpx.get(base + "/models").json()[0]["id"]
    decode = statistics.median([served_decode_rate(base, 64) for _ in range(3)])
    streams = served_throughput(base, 32, 32, 256, 64)
    cold, warm, _ = prefix_cache_ttft(base, model, 2)
finally:
    stop_server(server)
print("RESULT " + json.dumps({"decode tok/s": decode, "32 streams tok/s":
      streams["output_throughput"], "TPOT@32 ms": streams["median_tpot_ms"],
      "TTFT@32 ms": streams["median_ttft_ms"], "cold TTFT ms": cold * 1000,
      "cached TTFT ms": warm * 1000}))
"""


def measure(tree: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, "-c", ONE_RUN], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{tree}: no result\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[7:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for round_ in range(1, args.rounds + 1):
        for name, tree in (("before", args.before), ("after", args.after)):
            result = measure(tree)
            runs[name].append(result)
            print(f"round {round_} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()),
                  flush=True)
    print(f"\n{'median of ' + str(args.rounds):<20}{'before':>12}{'after':>12}{'change':>10}")
    for key in runs["before"][0]:
        b = statistics.median(r[key] for r in runs["before"])
        a = statistics.median(r[key] for r in runs["after"])
        print(f"{key:<20}{b:>12.1f}{a:>12.1f}{100 * (a / b - 1):>+9.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
