"""Batch jobs with the official SDKs against a live app on the platform (SQLite and
PostgreSQL): a batch runs every line through its route as the key that made it, one ledger
row per line at the batch price, its results in each API's shape; cancel keeps the finished
lines; another key sees none of it."""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stdout

import httpx
import openai
import pytest
from together import Together

from k2serve.cli import main
from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import ledger_rows
from k2serve.serving.backend import TextDelta
from k2serve.serving.registry import ModelSpec
from tests.platform.conftest import live_server
from tests.platform.test_api import MODEL, PRICE, FakeBackend, make_app
from tests.platform.test_files import batch_jsonl
from tests.platform.test_responses import SLOW, SlowBackend

N = 20  # lines


def openai_client(root: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=root + "/v1", api_key=key, max_retries=0)


def wait_openai(client: openai.OpenAI, batch_id: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch still {batch.status}")


def test_openai_sdk_runs_a_batch_billed_at_half_price(database):
    store = KeyStore(database)
    _, alice_key = store.create("alice", rpm=2)  # batch lines do not count against RPM
    _, bob_key = store.create("bob")
    app, platform = make_app(database)
    lines = batch_jsonl(N).decode().splitlines()
    bad = json.loads(lines[3])
    bad["body"]["max_tokens"] = -1  # the route answers it 400: an error line
    lines[3] = json.dumps(bad)
    with live_server(app) as root:
        alice, bob = openai_client(root, alice_key), openai_client(root, bob_key)
        file = alice.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
        made = alice.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"job": "t1"})
        assert made.status in ("validating", "in_progress") and made.metadata == {"job": "t1"}
        with pytest.raises(openai.NotFoundError):
            bob.batches.retrieve(made.id)
        done = wait_openai(alice, made.id)
        assert done.status == "completed"
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (N, N - 1, 1)
        assert [b.id for b in alice.batches.list()] == [made.id]
        assert list(bob.batches.list()) == []
        out = [json.loads(x) for x in alice.files.content(done.output_file_id).text.splitlines()]
        errors = [json.loads(x)
                  for x in alice.files.content(done.error_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in out) == sorted(
            f"req-{i}" for i in range(N) if i != 3)
        for o in out:
            assert o["response"]["status_code"] == 200 and o["error"] is None
            assert o["response"]["body"]["choices"][0]["message"]["content"] == "xx"
        assert [e["custom_id"] for e in errors] == ["req-3"]
        assert errors[0]["response"]["status_code"] == 400
        assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens"
        with pytest.raises(openai.NotFoundError):
            bob.files.content(done.output_file_id)
        platform.writer.flush()
    rows = [r for r in ledger_rows(database) if r.batch_id == made.id]
    assert len(rows) == N  # one row per line
    ok = [r for r in rows if r.status == "ok"]
    assert len(ok) == N - 1 and all(r.endpoint == "chat.completions" for r in ok)
    for r in ok:  # half of the model's price
        full = (r.prompt_tokens * PRICE.input + r.completion_tokens * PRICE.output) / 1e6
        assert r.cost_usd == pytest.approx(full * 0.5) and r.cost_usd > 0
    assert {r.request_id for r in rows} == {f"{made.id}-{n}" for n in range(1, N + 1)}
    assert store.get_by_name("alice").spent_usd == pytest.approx(sum(r.cost_usd for r in ok))
    # `k2serve usage` shows the batch spend apart (and within the total).
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["usage", "--json", "--database-url", database.url]) == 0
    alice_usage = {k["key"]: k for k in json.loads(out.getvalue())["keys"]}["alice"]
    assert alice_usage["batch_requests"] == N - 1
    assert alice_usage["batch_cost_usd"] == pytest.approx(sum(r.cost_usd for r in ok))
    assert alice_usage["cost_usd"] == pytest.approx(alice_usage["batch_cost_usd"])
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["usage", "--database-url", database.url]) == 0
    assert "OF WHICH BATCH USD" in out.getvalue()


def test_together_sdk_runs_and_cancels_batches(database, tmp_path):
    store = KeyStore(database)
    _, key = store.create("alice")
    app, platform = make_app(database)
    app.state.registry.register(ModelSpec(id=SLOW, type="chat", context_length=64,
                                          pricing=PRICE), SlowBackend())
    path = tmp_path / "in.jsonl"
    path.write_bytes(batch_jsonl(N, url=None))
    slow = tmp_path / "slow.jsonl"
    slow.write_text(batch_jsonl(N, url=None).decode().replace(MODEL, SLOW))
    with live_server(app) as root:
        client = Together(base_url=root, api_key=key, max_retries=0)
        file = client.files.upload(path, purpose="batch-api")
        created = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions")
        assert created.job.status in ("VALIDATING", "IN_PROGRESS")
        deadline = time.time() + 60
        while (job := client.batches.retrieve(created.job.id)).status != "COMPLETED":
            assert job.status in ("VALIDATING", "IN_PROGRESS") and time.time() < deadline
            time.sleep(0.1)
        assert job.progress == 100.0 and job.error_file_id == ""
        output = client.files.content(job.output_file_id).read().decode().splitlines()
        assert len(output) == N
        assert {json.loads(x)["custom_id"] for x in output} == {f"req-{i}" for i in range(N)}
        # A slow batch, cancelled while it runs: no new line starts, the finished ones stay.
        slow_file = client.files.upload(slow, purpose="batch-api")
        running = client.batches.create(input_file_id=slow_file.id,
                                        endpoint="/v1/chat/completions").job
        while client.batches.retrieve(running.id).progress < 10:
            time.sleep(0.05)
        cancelled = client.batches.cancel(running.id)
        assert cancelled.status == "CANCELLED"
        assert 10 <= cancelled.progress < 100
        time.sleep(0.5)
        again = client.batches.retrieve(running.id)
        assert again.status == "CANCELLED" and again.progress == cancelled.progress
        done = client.files.content(again.output_file_id).read().decode().splitlines()
        unrun = client.files.content(again.error_file_id).read().decode().splitlines()
        ids = [json.loads(x)["custom_id"] for x in done + unrun]
        assert sorted(ids) == sorted(f"req-{i}" for i in range(N))  # each line once
        assert all(json.loads(x)["error"]["code"] == "batch_cancelled" for x in unrun
                   if json.loads(x)["response"] is None)
        jobs = client.batches.list()
        assert {j.id for j in jobs} == {created.job.id, running.id}


def test_without_a_platform_batches_run_in_memory_and_expire_past_their_window(tmp_path):
    """No platform: files in a temporary directory, batches in memory, no key. A batch whose
    window closes before its lines have all run expires with the results it has."""
    from k2serve.app import create_app
    from k2serve.serving.registry import ModelRegistry

    registry = ModelRegistry()
    registry.register(ModelSpec(id=SLOW, type="chat", context_length=64, pricing=PRICE),
                      SlowBackend())
    app = create_app(registry)
    data = batch_jsonl(N).decode().replace(MODEL, SLOW).replace(
        '"max_tokens": 2', '"max_tokens": 8').encode()  # 0.4 s a line, 4 at a time: 2 s
    with live_server(app) as root:
        client = openai_client(root, "none")
        file = client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                      completion_window="1s")
        done = wait_openai(client, batch.id)
        assert done.status == "expired" and done.expired_at is not None
        assert 0 < done.request_counts.completed < N
        out = client.files.content(done.output_file_id).text.splitlines()
        unrun = [json.loads(x) for x in client.files.content(done.error_file_id)
                 .text.splitlines()]
        assert len(out) == done.request_counts.completed and len(out) + len(unrun) == N
        assert {e["error"]["code"] for e in unrun} == {"batch_expired"}
        with pytest.raises(openai.BadRequestError) as err:  # the window's format
            client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                  completion_window="soon")
        assert err.value.body["param"] == "completion_window"
        with pytest.raises(openai.BadRequestError) as err:  # lines call another endpoint
            client.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                  completion_window="24h")
        assert "Line 1 of the input file" in err.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id="file-nope", endpoint="/v1/completions",
                                  completion_window="24h")


class LineBreakingBackend(FakeBackend):
    """Writes characters that str.splitlines() ends a line at (a model can: a SIGKILL test's
    output once held one, and its reader split a result line in two)."""

    TEXT = "a\u2028b\u0085c\u2029d\re\nf"

    async def generate(self, prompt_ids, params, stop, reservation=None):
        yield TextDelta(text=self.TEXT, token_ids=[7], logprobs=None, finish_reason="stop",
                        prompt_tokens=len(prompt_ids), completion_tokens=1)


def test_output_and_stream_lines_stay_whole_whatever_the_model_wrote(tmp_path):
    """A batch's output file and a chat stream, read line by line with str.splitlines()
    semantics (httpx's iter_lines()), give back the model's text exactly."""
    from k2serve.app import create_app
    from k2serve.serving.registry import ModelRegistry

    registry = ModelRegistry()
    registry.register(ModelSpec(id=MODEL, type="chat", context_length=64, pricing=PRICE),
                      LineBreakingBackend())
    with live_server(create_app(registry)) as root:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "stream": True}
        with httpx.stream("POST", root + "/v1/chat/completions", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events if e["choices"]) == LineBreakingBackend.TEXT
        client = openai_client(root, "none")
        file = client.files.create(file=("in.jsonl", batch_jsonl(3)), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        done = wait_openai(client, batch.id)
        assert (done.status, done.request_counts.completed) == ("completed", 3)
        data = client.files.content(done.output_file_id).content
    for lines in (data.decode().splitlines(), data.split(b"\n")[:-1]):
        out = [json.loads(x) for x in lines]
        assert len(out) == 3
        for o in out:
            content = o["response"]["body"]["choices"][0]["message"]["content"]
            assert content == LineBreakingBackend.TEXT
