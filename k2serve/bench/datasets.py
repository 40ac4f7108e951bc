"""Prompt sources for `k2serve bench`: random words, or a JSONL file.

Random prompts are built from common English words rather than token ids, because exact
token counts need the server's tokenizer, which a client does not have. Most of these words
are one token each in Llama-family BPE vocabularies, so `input_len` words come close to
`input_len` tokens; the benchmark reports the server's own `usage.prompt_tokens` instead of
this estimate whenever the server sends it (for chat that count includes the chat template).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Short, frequent words: most are a single BPE token when preceded by a space.
WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there one all we their has been if more when will would
who so no time can people out some two them other than into could state only new year
also after first where most over world may through many before back water great work down
made way long day part use little good very make own see men just both well here city old
high life same those under hand house last might found place while home small end book
help line every air set big few name give open tree road fish game food bird song rain snow
sun moon star king paper stone river light green blue red black white north south east west
""".split()


@dataclass
class BenchRequest:
    """One request to send: a plain prompt or chat messages, and its output length."""

    max_tokens: int
    prompt: str | None = None
    messages: list[dict] | None = None
    estimated_prompt_tokens: int = 0  # used only if the server reports no usage

    def chat_messages(self) -> list[dict]:
        return self.messages if self.messages is not None else [
            {"role": "user", "content": self.prompt or ""}]

    def completion_prompt(self) -> str:
        if self.prompt is None:
            raise ValueError("a request given as chat messages cannot be sent to the "
                             "completions endpoint; use --endpoint chat")
        return self.prompt


def random_requests(num_prompts: int, input_len: int, output_len: int,
                    seed: int) -> list[BenchRequest]:
    """`num_prompts` different word salads, so no two requests share a cacheable prefix."""
    rng = random.Random(seed)
    return [BenchRequest(max_tokens=output_len,
                         prompt=" ".join(rng.choices(WORDS, k=input_len)),
                         estimated_prompt_tokens=input_len)
            for _ in range(num_prompts)]


def file_requests(path: str | Path, num_prompts: int | None,
                  default_output_len: int) -> list[BenchRequest]:
    """Read `{"prompt": str}` or `{"messages": [...]}` lines (optional `max_tokens`).

    With more prompts asked for than lines, the lines repeat in order.
    """
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str)
                                             or isinstance(row.get("messages"), list)):
            raise ValueError(f'{path}:{number}: expected {{"prompt": str}} or '
                             f'{{"messages": [...]}}')
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    count = len(rows) if num_prompts is None else num_prompts
    requests = []
    for i in range(count):
        row = rows[i % len(rows)]
        text = row.get("prompt") or " ".join(
            str(m.get("content", "")) for m in row.get("messages", []))
        requests.append(BenchRequest(
            max_tokens=int(row.get("max_tokens", default_output_len)),
            prompt=row.get("prompt"), messages=row.get("messages"),
            estimated_prompt_tokens=len(text.split())))
    return requests


DEFAULT_RANDOM_PROMPTS = 100


def load_requests(dataset: str, num_prompts: int | None, input_len: int, output_len: int,
                  seed: int) -> list[BenchRequest]:
    """`dataset` is "random" or a JSONL path; no `num_prompts` means every line of a file."""
    if dataset == "random":
        return random_requests(num_prompts or DEFAULT_RANDOM_PROMPTS, input_len, output_len,
                               seed)
    return file_requests(dataset, num_prompts, output_len)
