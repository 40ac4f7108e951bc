"""200-line batches end to end through the together and openai SDKs, and `k2serve batch`:
each line's result matched by custom_id, at the model's own batch price, each line in the
engine at the batch priority (interactive requests: 0). Embeddings lines run on the real
MiniLM encoder and equal the same input sent directly. SQLite only: PostgreSQL's batch
store is covered by test_batches."""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout

import openai
import pytest
from together import Together

from k2serve.cli import main
from k2serve.platform.db import Database
from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import ledger_rows
from k2serve.serving.registry import ModelSpec, Pricing
from tests.platform.conftest import live_server
from tests.platform.test_api import FakeBackend, make_app

N = 200
CHEAP = "fake/k2-batch-quarter"  # a model whose batch lines pay a quarter of its price
CHEAP_PRICE = Pricing(input=2.0, output=4.0, batch=0.25)


class PriorityRecorder(FakeBackend):
    """The fake model, noting the engine priority each request was admitted at."""

    def __init__(self):
        super().__init__()
        self.priorities: list[int] = []

    def reserve(self, num_requests, owner=None, priority=0):
        self.priorities.append(priority)
        return None


@pytest.fixture()
def database(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'k2serve.db'}")
    yield db
    db.close()


@pytest.fixture()
def served(database, request):
    """(root URL, alice's key, the recording backend, the platform) of a live server; with
    MiniLM (the packaged embedding model) too where the test is marked `minilm`."""
    _, key = KeyStore(database).create("alice", rpm=2)  # batch lines skip the RPM limit
    app, platform = make_app(database)
    recorder = PriorityRecorder()
    app.state.registry.register(ModelSpec(id=CHEAP, type="language", context_length=64,
                                          pricing=CHEAP_PRICE), recorder)
    if "minilm" in request.fixturenames:
        app.state.registry.register(*request.getfixturevalue("minilm"))
    with live_server(app) as root:
        yield root, key, recorder, platform


@pytest.fixture()
def minilm():
    """MiniLM's spec and backend, loaded."""
    from k2serve.embeddings import packages
    from k2serve.embeddings.backend import EmbeddingBackend
    from k2serve.embeddings.serving import MINILM_ID, _sentence_encoder
    from k2serve.serving.catalog import model_spec

    backend = EmbeddingBackend(MINILM_ID, lambda: _sentence_encoder(packages.minilm_dir()),
                               max_tokens=256).start()
    deadline = time.time() + 120
    while backend.load_state == "loading" and time.time() < deadline:
        time.sleep(0.1)
    assert backend.load_state == "ready"
    yield model_spec(MINILM_ID, context_length=256, type="embedding"), backend
    backend.shutdown()


def lines(n: int, body, url: str | None = None) -> bytes:
    out = []
    for i in range(n):
        line = {"custom_id": f"line-{i}", "body": body(i)}
        if url is not None:
            line.update(method="POST", url=url)
        out.append(json.dumps(line))
    return ("\n".join(out) + "\n").encode()


def test_together_sdk_runs_200_completions_at_the_models_batch_price(served, database,
                                                                     tmp_path):
    root, key, recorder, platform = served
    path = tmp_path / "in.jsonl"
    path.write_bytes(lines(N, lambda i: {"model": CHEAP, "prompt": f"count {i} now",
                                         "max_tokens": 2}))
    client = Together(base_url=root, api_key=key, max_retries=0)
    # An interactive request is admitted at priority 0.
    direct = client.completions.create(model=CHEAP, prompt="one two", max_tokens=2)
    assert direct.choices[0].text == "xx" and recorder.priorities == [0]
    file = client.files.upload(path, purpose="batch-api")
    job = client.batches.create(input_file_id=file.id, endpoint="/v1/completions").job
    deadline = time.time() + 90
    while (job := client.batches.retrieve(job.id)).status != "COMPLETED":
        assert job.status in ("VALIDATING", "IN_PROGRESS") and time.time() < deadline
        time.sleep(0.2)
    assert job.progress == 100.0 and job.error_file_id == ""
    assert [j.id for j in client.batches.list()] == [job.id]
    out = [json.loads(x) for x in client.files.content(job.output_file_id).read().splitlines()]
    assert len(out) == N
    by_id = {o["custom_id"]: o for o in out}
    assert set(by_id) == {f"line-{i}" for i in range(N)}
    for i in range(N):
        response = by_id[f"line-{i}"]["response"]
        assert response["status_code"] == 200
        assert response["body"]["choices"][0]["text"] == "xx"
        assert response["body"]["usage"]["prompt_tokens"] == 3  # "count {i} now"
    # Every batch line went to the engine at the batch priority.
    assert recorder.priorities == [0] + [1] * N
    # Cancel: a batch cancelled at once keeps every line, run or not, once.
    again = client.batches.create(input_file_id=file.id, endpoint="/v1/completions").job
    cancelled = client.batches.cancel(again.id)
    assert cancelled.status == "CANCELLED"
    kept = []
    for file_id in (cancelled.output_file_id, cancelled.error_file_id):
        if file_id:
            kept += client.files.content(file_id).read().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in kept) == sorted(by_id)
    platform.writer.flush()
    rows = [r for r in ledger_rows(database) if r.batch_id == job.id]
    assert len(rows) == N and all(r.status == "ok" for r in rows)
    for r in rows:  # this model's batch share: a quarter of its price
        full = (r.prompt_tokens * CHEAP_PRICE.input + r.completion_tokens * CHEAP_PRICE.output)
        assert r.cost_usd == pytest.approx(full / 1e6 * 0.25) and r.cost_usd > 0


def test_openai_sdk_runs_200_embeddings_on_minilm(minilm, served):
    root, key, _, _ = served
    from k2serve.embeddings.serving import MINILM_ID

    client = openai.OpenAI(base_url=root + "/v1", api_key=key, max_retries=0)
    data = lines(N, lambda i: {"model": MINILM_ID, "input": f"sentence number {i}"},
                 url="/v1/embeddings")
    file = client.files.create(file=("emb.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    deadline = time.time() + 120
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert batch.status in ("validating", "in_progress", "finalizing")
        assert time.time() < deadline
        time.sleep(0.2)
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (N, N, 0)
    assert batch.error_file_id is None
    out = {}
    for raw in client.files.content(batch.output_file_id).text.splitlines():
        line = json.loads(raw)
        out[line["custom_id"]] = line["response"]["body"]["data"][0]["embedding"]
    assert set(out) == {f"line-{i}" for i in range(N)}
    assert {len(v) for v in out.values()} == {384}
    # A line's vector is the one the same input gets directly (one request: the key's RPM
    # is 2, which the 200 lines never counted against).
    picked = (0, 57, 199)
    direct = client.embeddings.create(model=MINILM_ID, encoding_format="float",
                                      input=[f"sentence number {i}" for i in picked])
    for i, item in zip(picked, direct.data):
        assert out[f"line-{i}"] == pytest.approx(item.embedding, abs=1e-5)
    assert out["line-1"] != pytest.approx(out["line-2"], abs=1e-3)


def test_k2serve_batch_submit_waits_with_a_progress_bar_and_downloads(served, tmp_path):
    root, key, _, _ = served
    path = tmp_path / "jobs.jsonl"
    data = lines(30, lambda i: {"model": CHEAP, "messages": [{"role": "user",
                                                              "content": f"hi {i}"}],
                                "max_tokens": 3})
    bad = data.decode().splitlines()
    bad[4] = bad[4].replace('"max_tokens": 3', '"max_tokens": -1')  # a 400: an error line
    path.write_text("\n".join(bad) + "\n")
    client = ["--url", root, "--api-key", key]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["batch", "submit", str(path), "--endpoint", "/v1/chat/completions",
                     "--wait", "--poll", "0.1", *client])
    assert code == 0
    batch_id, status = out.getvalue().split()[:2]
    assert status == "completed:" and "29 completed, 1 failed of 30" in out.getvalue()
    progress = err.getvalue()
    assert "30/30 (100%) 1 failed" in progress and "lines/min" in progress
    assert "[" + "#" * 30 + "]" in progress
    results = [json.loads(x) for x in (tmp_path / "jobs.output.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / "jobs.errors.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(
        f"line-{i}" for i in range(30) if i != 4)
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] == "xxx"
               for r in results)
    assert [e["custom_id"] for e in errors] == ["line-4"]
    assert errors[0]["response"]["status_code"] == 400
    # status, and without --wait: the id only; cancel keeps what ran.
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["batch", "status", batch_id, *client]) == 0
    assert f"{batch_id}  completed" in out.getvalue() and "29 completed" in out.getvalue()
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["batch", "submit", str(path), "--endpoint", "/v1/chat/completions",
                     *client]) == 0
    second = out.getvalue().strip()
    assert second.startswith("batch_") and second != batch_id
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["batch", "cancel", second, "--json", *client]) == 0
    assert json.loads(out.getvalue())["status"] == "cancelled"
    # An endpoint batches cannot call is the server's 400, said on stderr, exit status 1.
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(["batch", "submit", str(path), "--endpoint", "/v1/nope", *client])
    assert exit_.value.code == 1 and "k2serve: 400:" in err.getvalue()
    assert "endpoint" in err.getvalue()
