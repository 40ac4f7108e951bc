"""RayEndpointBackend's failure rules against a stand-in deployment handle (no cluster):
retry once before anything was sent, a buffered reply retried unseen, a started stream ended
with a 502, a replica that never comes a 503 with retry-after, a stopped endpoint a 400."""

from __future__ import annotations

import asyncio

import pytest

from k2serve.engine.sampling_params import SamplingParams
from k2serve.errors import APIError
from k2serve.serving.backend import REPLY_BUFFERED, TextDelta

pytest.importorskip("ray.exceptions", reason="Ray is not installed (pip install 'k2serve[ray]')")

from ray.exceptions import ActorDiedError  # noqa: E402

from k2serve.serving.ray_backend import RayEndpointBackend  # noqa: E402


class FakeTokenizer:
    def token_to_id(self, token):
        return None


def delta(text: str, finish: str | None = None) -> TextDelta:
    return TextDelta(text=text, token_ids=[1], logprobs=None, finish_reason=finish,
                     prompt_tokens=3, completion_tokens=1)


class Stream:
    """One call's response: yields `script` items (a TextDelta, an exception to raise, or
    None to wait forever)."""

    def __init__(self, script):
        self.script = list(script)
        self.cancelled = False

    async def __anext__(self):
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if item is None:
            await asyncio.sleep(3600)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class Handle:
    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.calls: list[Stream] = []
        self.generate = self

    def options(self, stream):
        assert stream is True
        return self

    def remote(self, *args):
        self.calls.append(Stream(self.scripts.pop(0)))
        return self.calls[-1]


def backend(handle: Handle, timeout: float = 5.0) -> RayEndpointBackend:
    b = RayEndpointBackend("owner/m-1", lambda: handle, FakeTokenizer(), context_length=64,
                           chat_template=None, start_timeout_s=timeout)
    b.state = "STARTED"
    return b


async def collect(b: RayEndpointBackend, buffered: bool) -> list[str]:
    REPLY_BUFFERED.set(buffered)
    return [d.text async for d in b.generate([1, 2, 3], SamplingParams(max_tokens=4), [])]


def test_lost_before_the_first_delta_is_sent_again():
    handle = Handle([ActorDiedError()], [delta("a"), delta("b", "stop")])
    assert asyncio.run(collect(backend(handle), buffered=False)) == ["a", "b"]
    assert len(handle.calls) == 2


def test_a_buffered_reply_lost_midway_is_generated_again_unseen():
    handle = Handle([delta("x"), ActorDiedError()], [delta("a"), delta("b", "stop")])
    assert asyncio.run(collect(backend(handle), buffered=True)) == ["a", "b"]  # no "x"


def test_a_stream_lost_midway_ends_with_a_502_naming_the_replica():
    handle = Handle([delta("x"), ActorDiedError()], [delta("never")])
    sent = []

    async def run():
        REPLY_BUFFERED.set(False)
        async for d in backend(handle).generate([1], SamplingParams(), []):
            sent.append(d.text)

    with pytest.raises(APIError) as err:
        asyncio.run(run())
    assert sent == ["x"] and err.value.status == 502
    assert err.value.code == "replica_failed" and "replica" in err.value.message
    assert len(handle.calls) == 1


def test_lost_twice_is_a_502_not_a_hang():
    handle = Handle([ActorDiedError()], [ActorDiedError()])
    with pytest.raises(APIError) as err:
        asyncio.run(collect(backend(handle), buffered=True))
    assert err.value.status == 502 and len(handle.calls) == 2


def test_no_replica_in_time_is_a_503_with_retry_after():
    handle = Handle([None])
    with pytest.raises(APIError) as err:
        asyncio.run(collect(backend(handle, timeout=0.2), buffered=False))
    assert err.value.status == 503 and err.value.code == "endpoint_starting"
    assert err.value.headers["retry-after"]
    assert handle.calls[0].cancelled  # the queued request is withdrawn


def test_a_stopped_endpoint_refuses_naming_its_state():
    b = backend(Handle())
    b.state = "STOPPED"
    with pytest.raises(APIError) as err:
        b.check(SamplingParams())
    assert err.value.status == 400 and "STOPPED" in err.value.message
    assert err.value.code == "endpoint_not_running"
