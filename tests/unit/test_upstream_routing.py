"""Which replica an upstream request goes to (k2serve.serving.upstream): prompts sharing a long
prefix stay together, load is spread, a replica that is down is avoided."""

from __future__ import annotations

import random
import time

from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.serving.upstream import (
    AFFINITY_TOKENS,
    IMBALANCE,
    UpstreamBackend,
    UpstreamConfig,
)
from k2serve.text.loading import load_tokenizer

URLS = [f"http://10.0.0.{i}:8000/v1" for i in range(1, 5)]


def backend() -> UpstreamBackend:
    tokenizer = load_tokenizer(embedded_smollm2_gguf_path())
    return UpstreamBackend(UpstreamConfig("m", URLS), tokenizer, context_length=2048,
                           chat_template=None)


def prompt(prefix_seed: int, tail_seed: int, prefix_len: int = 300) -> list[int]:
    head = random.Random(prefix_seed)
    tail = random.Random(tail_seed)
    return [head.randrange(1000) for _ in range(prefix_len)] + \
        [tail.randrange(1000) for _ in range(50)]


def test_prompts_that_share_a_long_prefix_go_to_one_replica():
    b = backend()
    for shared in range(10):
        chosen = {b._pick(set(), prompt(shared, tail)).url for tail in range(8)}
        assert len(chosen) == 1
    spread = {b._pick(set(), prompt(shared, 0)).url for shared in range(40)}
    assert len(spread) == len(URLS)  # different prefixes spread over every replica


def test_a_busy_preferred_replica_gives_way_and_short_prompts_go_to_the_least_busy():
    b = backend()
    ids = prompt(1, 1)
    preferred = b._pick(set(), ids)
    preferred.in_flight = IMBALANCE + 1
    assert b._pick(set(), ids) is not preferred
    preferred.in_flight = IMBALANCE
    assert b._pick(set(), ids) is preferred
    for i, replica in enumerate(b.replicas):
        replica.in_flight = 10 - i
    assert b._pick(set(), [1, 2, 3]) is b.replicas[-1]
    assert len(ids[:AFFINITY_TOKENS]) == AFFINITY_TOKENS


def test_a_replica_that_is_down_or_already_tried_is_avoided():
    b = backend()
    ids = prompt(2, 2)
    first = b._pick(set(), ids)
    first.failed(time.monotonic())
    assert not first.up(time.monotonic())
    second = b._pick(set(), ids)
    assert second is not first
    assert b._pick({second.url}, ids) not in (first, second)
    first.succeeded()
    assert b._pick(set(), ids) is first
