"""`serve --speculative`: a server that speculates answers as one that does not (greedy,
through the official SDK), says in /health how many proposals it kept, and refuses a bad
option value at start-up."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai

from tests.conftest import EMBEDDED_ID, start_server, stop_server
from tests.unit.test_speculative import CODE

PROMPT = ("<|im_start|>user\nRewrite this function with subtotal renamed to base_amount:\n"
          f"```python\n{CODE}```<|im_end|>\n<|im_start|>assistant\n```python\n")


def _complete(base_url: str) -> str:
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    reply = client.completions.create(model=EMBEDDED_ID, prompt=PROMPT, max_tokens=70,
                                      temperature=0)
    return reply.choices[0].text


def test_ngram_speculation_answers_as_plain_decoding(server):
    live = start_server("--speculative", "ngram")
    try:
        fast = _complete(live.base_v1)
        engine = next(iter(httpx.get(live.root + "/health", timeout=30).json()["engines"].values()))
    finally:
        stop_server(live)
    assert fast == _complete(server.base_v1)
    assert fast.startswith("def total_price(items, tax_rate):")  # copied from the prompt
    assert 0 < engine["spec_accepted_tokens"] <= engine["spec_proposed_tokens"]


def test_bad_speculative_value_is_refused_at_start():
    proc = subprocess.run([sys.executable, "-m", "k2serve.cli", "serve", "--speculative",
                           "medusa"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--speculative must be 'ngram' or 'draft:MODEL'" in proc.stderr
