"""What the safety model costs: one output check, a /v1/moderations-sized batch, and a whole
chat request with and without `safety_model`, on a live server.

    python benchmarks/safety_overhead.py [--tokens 96] [--repeats 5]

Figures are medians; on a shared machine the request timings are noisy, so compare the
guarded/plain ratio with the spread of the plain runs.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import httpx
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from k2serve.safety.convert import converted_dir  # noqa: E402
from k2serve.safety.model import ToxicityClassifier  # noqa: E402
from k2serve.serving.catalog import SAFETY_MODEL_ID  # noqa: E402
from tests.conftest import EMBEDDED_ID, start_server, stop_server  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    started = time.perf_counter()
    classifier = ToxicityClassifier(converted_dir(tempfile.mkdtemp()))
    print(f"convert + load: {time.perf_counter() - started:.2f} s")
    text = "The river runs past the old mill and on to the sea. " * 600  # 32k characters
    check = statistics.median(timed(lambda: classifier.score([text[:4096]], tail=True), 200))
    print(f"one output check (last 100 words): {check * 1e3:.1f} ms")
    batch = statistics.median(timed(lambda: classifier.score([text[:32768]] * 8), 5))
    print(f"8 inputs x 32,768 characters, windowed: {batch * 1e3:.0f} ms")

    server = start_server("--families", "chat,moderation", "--threads", "1")
    try:
        client = httpx.Client(base_url=server.root, timeout=600)
        body = {"model": EMBEDDED_ID, "max_tokens": args.tokens, "temperature": 0,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell me a story about a dog."}]}
        guarded = {**body, "safety_model": SAFETY_MODEL_ID}
        for b in (body, guarded):  # warm-up
            client.post("/v1/chat/completions", json=b).raise_for_status()
        plain_s = timed(lambda: client.post("/v1/chat/completions", json=body), args.repeats)
        guard_s = timed(lambda: client.post("/v1/chat/completions", json=guarded), args.repeats)
        p, g = statistics.median(plain_s), statistics.median(guard_s)
        print(f"chat, {args.tokens} tokens: plain {p:.2f} s (spread {min(plain_s):.2f}-"
              f"{max(plain_s):.2f}), guarded {g:.2f} s: ratio {g / p:.3f}")
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
