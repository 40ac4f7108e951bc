"""Engine capacity is released on every path, and shared fairly between API keys.

The app runs in-process (real routes, real AsyncEngine and scheduler) on a tiny random model
that uses the embedded model's tokenizer and chat template, so a thousand failing requests
of each kind take seconds. The live-server checks are in test_backpressure.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from k2serve.app import create_app
from k2serve.engine.async_engine import AsyncEngine, EngineOverloaded, ShareExceeded
from k2serve.engine.config import EngineConfig
from k2serve.engine.core import EngineCore
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.models.loader import load_model
from k2serve.safety.labels import LABELS
from k2serve.safety.model import TextScore
from k2serve.safety.serving import ModerationBackend
from k2serve.serving.registry import ModelRegistry, ModelSpec
from k2serve.serving.text_backend import TextBackend
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.tokenizer import Tokenizer
from tests.tiny_models import smollm2_gguf_path

CHAT = "tiny/chat"
GUARD = "tiny/guard"
MAX_NUM_SEQS, MAX_WAITING = 4, 60  # capacity 64: four leaked n=16 requests fill it
KINDS = 1000  # failing requests of each kind


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, one_torch_thread):
    """A 1-layer random Llama over the embedded model's 49k-token vocabulary."""
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-vocab")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    model, _ = load_model(str(directory), progress=False)
    return model, tokenizer


class FlagEverything(ModerationBackend):
    """A safety model that flags every input (the real classifier is tested elsewhere)."""

    def __init__(self):
        super().__init__(model=None)

    async def classify(self, texts, *, tail=False):
        return [TextScore({label: 0.99 for label in LABELS}, 1) for _ in texts]


@pytest.fixture()
def served(tiny_model):
    """(app, engine, failing): `failing["engine"] = True` makes every model step raise."""
    model, tokenizer = tiny_model
    failing = {"engine": False}
    forward = model.forward

    def maybe_failing_forward(*args, **kwargs):
        if failing["engine"]:
            raise RuntimeError("injected engine failure")
        return forward(*args, **kwargs)

    model.forward = maybe_failing_forward
    engine = AsyncEngine(EngineCore(model, EngineConfig(
        max_num_seqs=MAX_NUM_SEQS, max_waiting=MAX_WAITING, context_length=512,
        num_kv_blocks=512, block_size=16)))
    backend = TextBackend(tokenizer, engine, context_length=512,
                          chat_template=ChatTemplate.from_tokenizer(tokenizer))
    registry = ModelRegistry()
    registry.register(ModelSpec(id=CHAT, type="chat", context_length=512), backend)
    registry.register(ModelSpec(id=GUARD, type="moderation"), FlagEverything())
    try:
        yield create_app(registry), engine, failing
    finally:
        engine.shutdown()
        model.forward = forward


def chat(**extra) -> dict:
    return {"model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}],
            **extra}


async def asgi_call(app, path: str, body: dict, *, client_gone: str | None = None
                    ) -> tuple[int, bytes]:
    """One raw ASGI exchange. `client_gone`: the client disconnects right after its body:
    receive() reports it, and sending fails (what uvicorn raises) from the response's "start"
    or from its first "body" bytes on."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent_body = False
    status, chunks = 0, []

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if client_gone:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            if client_gone == "start":
                raise OSError("client disconnected")
            status = message["status"]
        elif message["type"] == "http.response.body":
            if client_gone and message.get("body"):
                raise OSError("client disconnected")
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception:  # a client gone; or re-raised after the 500 was sent (logged)
        pass
    return status, b"".join(chunks)


async def wait_idle(engine: AsyncEngine, timeout: float = 30.0) -> dict:
    """Stats once nothing is held, running or waiting (aborts reach the engine thread)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = engine.stats()
        if (stats["in_flight"] == stats["reserved"] == stats["running"] == stats["waiting"] == 0
                and stats["kv_blocks_free"] == stats["kv_blocks_total"]):
            return stats
        assert asyncio.get_running_loop().time() < deadline, stats
        await asyncio.sleep(0.02)


def assert_all_free(stats: dict) -> None:
    assert stats["capacity"] == MAX_NUM_SEQS + MAX_WAITING
    assert stats["capacity_free"] == stats["capacity"], stats
    assert stats["owners"] == 0, stats


async def run_kind(app, engine, kind: str) -> list[int]:
    """KINDS failing requests of one kind, `batch` at a time (each batch fits the engine)."""
    path = "/v1/chat/completions"
    client_gone = None
    batch = 1
    if kind == "validation":  # a 400 found after admission (n=16 takes half the engine)
        body = chat(n=16, logit_bias={"99999999": 1})
    elif kind == "validation_stream":
        body = chat(n=16, logit_bias={"99999999": 1}, stream=True)
    elif kind == "safety":  # input flagged: nothing generated
        body = chat(n=16, safety_model=GUARD)
    elif kind == "safety_stream":
        body = chat(n=16, safety_model=GUARD, stream=True)
    elif kind == "grammar":  # a schema the grammar compiler refuses
        body = chat(n=16, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}})
    elif kind == "disconnect_before_stream":  # gone before a stream's headers
        body, client_gone = chat(n=16, stream=True), "start"
    elif kind == "disconnect_stream":  # gone at the first byte of a stream
        body, client_gone, batch = chat(stream=True), "body", 50
    elif kind == "disconnect":  # gone while a non-streamed reply is generated
        path, client_gone, batch = "/v1/completions", "body", 50
        body = {"model": CHAT, "prompt": "Hi", "max_tokens": 400, "ignore_eos": True}
    elif kind == "upstream":  # the engine fails while generating
        body, batch = chat(), 50
    else:
        raise AssertionError(kind)
    statuses = []
    for start in range(0, KINDS, batch):
        results = await asyncio.gather(*[asgi_call(app, path, body, client_gone=client_gone)
                                         for _ in range(min(batch, KINDS - start))])
        statuses += [s for s, _ in results]
    return statuses


EXPECTED = {"validation": {400}, "validation_stream": {400}, "safety": {200},
            "safety_stream": {200}, "grammar": {400}, "disconnect_before_stream": {0},
            "disconnect_stream": {200},
            "disconnect": {499}, "upstream": {500}}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_thousand_failures_of_each_kind_leave_all_capacity_free(served, kind, monkeypatch):
    app, engine, failing = served
    monkeypatch.setattr("k2serve.api.generation.DISCONNECT_POLL_S", 0.01)

    async def scenario():
        failing["engine"] = kind == "upstream"
        try:
            statuses = await run_kind(app, engine, kind)
        finally:
            failing["engine"] = False
        stats = await wait_idle(engine)
        # The whole capacity is admitted straight after: nothing was left reserved.
        full = await asyncio.gather(*[asgi_call(app, "/v1/chat/completions", chat(n=16))
                                      for _ in range((MAX_NUM_SEQS + MAX_WAITING) // 16)])
        return statuses, stats, full

    statuses, stats, full = asyncio.run(scenario())
    assert len(statuses) == KINDS
    assert set(statuses) <= EXPECTED[kind], sorted(set(statuses))
    assert_all_free(stats)
    for status, raw in full:
        assert status == 200, raw[:300]
        assert len(json.loads(raw)["choices"]) == 16


def test_validation_error_after_admission_is_a_400_for_streams_too(served):
    """An out-of-vocabulary logit_bias id is refused before a stream's 200 is sent."""
    app, engine, _ = served
    status, raw = asyncio.run(asgi_call(app, "/v1/chat/completions",
                                        chat(logit_bias={"99999999": 1}, stream=True)))
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["param"] == "logit_bias" and "99999999" in error["message"]


# -- fairness between keys, on the engine itself ---------------------------------------------
@pytest.fixture()
def engine(tiny_model):
    model, _ = tiny_model
    engine = AsyncEngine(EngineCore(model, EngineConfig(max_num_seqs=2, max_waiting=6,
                                                         context_length=512,
                                                         num_kv_blocks=256)))
    yield engine
    engine.shutdown()


def test_a_key_past_its_share_is_refused_while_other_keys_are_admitted(engine):
    capacity = engine.max_in_flight  # 8
    flood = engine.reserve(capacity, owner="a")  # idle capacity: a key alone may take it all
    with pytest.raises(EngineOverloaded) as alone:
        engine.reserve(1, owner="a")
    assert not isinstance(alone.value, ShareExceeded)  # nobody else waits: plain overload
    other = engine.reserve(1, owner="b")  # under its share (8 / 2 keys): admitted
    with pytest.raises(ShareExceeded, match="share"):
        engine.reserve(1, owner="a")
    more = engine.reserve(3, owner="b")  # b holds 4 = its share
    with pytest.raises(ShareExceeded):
        engine.reserve(1, owner="b")
    third = engine.reserve(2, owner="c")  # 8 // 3 keys = 2
    with pytest.raises(ShareExceeded):
        engine.reserve(1, owner="c")
    stats = engine.stats()
    assert stats["reserved"] == capacity + 6 and stats["owners"] == 3
    for reservation in (flood, other, more, third):
        reservation.release()
        reservation.release()  # idempotent
    stats = engine.stats()
    assert stats["reserved"] == 0 and stats["capacity_free"] == capacity
    assert stats["owners"] == 0


def test_the_overflow_past_the_queue_bound_is_itself_bounded(engine):
    """Keys under their share may overflow a full engine, up to twice its capacity."""
    held = [engine.reserve(1, owner=f"k{i}") for i in range(2 * engine.max_in_flight)]
    with pytest.raises(EngineOverloaded):
        engine.reserve(1, owner="late")
    for reservation in held:
        reservation.release()
    assert engine.stats()["capacity_free"] == engine.max_in_flight


def test_generation_uses_the_reservation_and_gives_it_back(engine):
    async def scenario():
        reservation = engine.reserve(2, owner="a")
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        outputs = [o async for o in engine.generate(
            GenerationRequest("r1", [1, 2, 3], params, owner="a"), reservation)]
        during = engine.stats()  # one slot still reserved, nothing running
        reservation.release()
        return outputs, during

    outputs, during = asyncio.run(scenario())
    assert outputs[-1].finish_reason == "length"
    assert during["reserved"] == 1 and during["in_flight"] == 0 and during["owners"] == 1
    stats = engine.stats()
    assert stats["reserved"] == stats["in_flight"] == stats["owners"] == 0


def test_a_waiting_key_gets_the_next_sequence_slot(tiny_model):
    """One key's queue cannot take every slot: a second key's request runs before the first
    key's older queued requests (FIFO would run all of key a's first)."""
    model, _ = tiny_model
    core = EngineCore(model, EngineConfig(max_num_seqs=2, context_length=512,
                                          num_kv_blocks=256))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i in range(6):
        core.add(GenerationRequest(f"a{i}", [1, 2, 3 + i], params, owner="a"))
    core.add(GenerationRequest("b0", [7, 8, 9], params, owner="b"))
    core.step()
    assert sorted(s.request_id for s in core.scheduler.running) == ["a0", "b0"]
    finished = []
    while core.has_work():
        finished += [o.request_id for o in core.step() if o.finish_reason]
    assert finished.index("b0") < finished.index("a1")
    assert core.stats()["kv_blocks_free"] == core.stats()["kv_blocks_total"]
