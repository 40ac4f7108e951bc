"""Does a batch job slow interactive requests down? Interactive TTFT / TPOT with and without
a 1,000-line batch running on the same server, and the batch's progress meanwhile.

    python benchmarks/batch_interference.py [--rounds 2] [--interactive 12] [--rate 0.3]

Starts `k2serve serve` (the embedded model), then, each round: interactive requests alone
(streamed chat, random prompts, Poisson arrivals: a low interactive load), and the same
with a batch of `--batch-lines` chat lines (max_tokens 8) submitted just before, followed by
the batch alone for a few seconds (its idle rate) and its cancel; the two phases in turn
first (ABBA), so the machine's drift falls on both.
Prints each phase and the medians over rounds: TTFT and TPOT with / without the batch, their
ratio, and the batch's lines/min while interactive requests ran and alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from k2serve.bench.client import BenchConfig, run_benchmark  # noqa: E402
from tests.conftest import start_server, stop_server  # noqa: E402

OPENAI_UA = {"user-agent": "batch-interference (OpenAI-shaped replies)"}


def interactive(base_v1: str, args, seed: int) -> dict:
    metrics = run_benchmark(BenchConfig(
        base_url=base_v1, num_prompts=args.interactive, concurrency=args.concurrency,
        request_rate=args.rate, random_input_len=args.input_len,
        random_output_len=args.output_len, seed=seed, warmup=0))
    return {"ttft": metrics["median_ttft_ms"], "tpot": metrics["median_tpot_ms"]}


def batch_file(model: str, lines: int, max_tokens: int, tag: int) -> bytes:
    out = []
    for i in range(lines):
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"Batch {tag} item {i}: write a "
                                                         f"short note about the number {i}."}]}
        out.append(json.dumps({"custom_id": f"r{tag}-{i}", "body": body}))
    return ("\n".join(out) + "\n").encode()


def submit(root: str, data: bytes) -> str:
    file = httpx.post(root + "/v1/files/upload", files={"file": ("b.jsonl", data)},
                      data={"purpose": "batch-api"}, timeout=120).json()
    batch = httpx.post(root + "/v1/batches", headers=OPENAI_UA, timeout=120,
                       json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                             "completion_window": "24h"}).json()
    return batch["id"]


def batch_state(root: str, batch_id: str) -> tuple[int, str]:
    batch = httpx.get(f"{root}/v1/batches/{batch_id}", headers=OPENAI_UA, timeout=60).json()
    counts = batch["request_counts"]
    return counts["completed"] + counts["failed"], batch["status"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interactive", type=int, default=12,
                        help="interactive requests per phase")
    parser.add_argument("--rate", type=float, default=0.3,
                        help="interactive arrivals per second (Poisson)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="interactive requests in flight at most")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--batch-lines", type=int, default=1000)
    parser.add_argument("--batch-max-tokens", type=int, default=8)
    parser.add_argument("--idle-s", type=float, default=10.0,
                        help="seconds the batch runs alone after each interactive phase")
    parser.add_argument("--server-args", default="--threads 2",
                        help="extra `k2serve serve` arguments")
    args = parser.parse_args()

    server = start_server(*args.server_args.split())
    try:
        root = server.base_v1.removesuffix("/v1")
        model = httpx.get(server.base_v1 + "/models", timeout=60).json()[0]["id"]
        interactive(server.base_v1, argparse.Namespace(**{**vars(args), "interactive": 2}),
                    seed=999)  # warm-up: first-call costs out of the figures
        rounds = []
        for r in range(args.rounds):
            row: dict = {}
            # ABBA: alone first in even rounds, with the batch first in odd ones, so a drift
            # in the machine's load falls on both.
            for phase in (("alone", "batch") if r % 2 == 0 else ("batch", "alone")):
                seed = 2 * r + (phase == "batch")
                if phase == "alone":
                    alone = interactive(server.base_v1, args, seed=seed)
                    row.update(ttft_alone=alone["ttft"], tpot_alone=alone["tpot"])
                    continue
                batch_id = submit(root, batch_file(model, args.batch_lines,
                                                   args.batch_max_tokens, r))
                time.sleep(1.0)  # the batch under way
                done0, _ = batch_state(root, batch_id)
                t0 = time.monotonic()
                busy = interactive(server.base_v1, args, seed=seed)
                t1 = time.monotonic()
                done1, status1 = batch_state(root, batch_id)
                time.sleep(args.idle_s)
                done2, status2 = batch_state(root, batch_id)
                t2 = time.monotonic()
                httpx.post(f"{root}/v1/batches/{batch_id}/cancel", timeout=120)
                time.sleep(0.5)  # its running lines stop
                row.update(ttft_batch=busy["ttft"], tpot_batch=busy["tpot"],
                           batch_lpm_busy=(done1 - done0) / (t1 - t0) * 60,
                           batch_lpm_idle=(done2 - done1) / (t2 - t1) * 60,
                           batch_done=done2, batch_status=(status1, status2))
            rounds.append(row)
            print(f"round {r + 1}: TTFT {row['ttft_alone']:.0f} -> {row['ttft_batch']:.0f} ms, "
                  f"TPOT {row['tpot_alone']:.1f} -> {row['tpot_batch']:.1f} ms; batch "
                  f"{row['batch_lpm_busy']:.0f} lines/min beside interactive requests, "
                  f"{row['batch_lpm_idle']:.0f} alone ({row['batch_done']}/{args.batch_lines} "
                  f"lines, {' then '.join(row['batch_status'])})", flush=True)
            if row["batch_status"][0] != "in_progress":
                print("  (the batch ended before the interactive phase did: make it longer)")
    finally:
        stop_server(server)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in rounds)

    print(f"\nmedians of {args.rounds} rounds ({args.interactive} interactive requests each, "
          f"{args.rate}/s, {args.input_len} in / {args.output_len} out tokens):")
    for what, unit in (("ttft", "ms"), ("tpot", "ms")):
        alone, batch = med(f"{what}_alone"), med(f"{what}_batch")
        print(f"  {what.upper()}: {alone:.1f} {unit} alone, {batch:.1f} {unit} with the batch "
              f"running: x{batch / alone:.3f}")
    print(f"  batch progress: {med('batch_lpm_busy'):.0f} lines/min beside interactive "
          f"requests, {med('batch_lpm_idle'):.0f} lines/min alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
