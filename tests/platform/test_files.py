"""Files (/v1/files) with the official SDKs against a live app on the platform: OpenAI's
upload, Together's presigned upload (together 3.x) and its documented /v1/files/upload; a
file belongs to its key; batch files are checked line by line at upload; the size cap."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from together import Together

from k2serve.app import create_app
from k2serve.platform.keys import KeyStore
from k2serve.platform.service import Platform
from tests.platform.conftest import live_server
from tests.platform.test_api import MODEL, make_app


def batch_jsonl(n: int, url: str | None = "/v1/chat/completions") -> bytes:
    lines = []
    for i in range(n):
        line = {"custom_id": f"req-{i}", "body": {
            "model": MODEL, "messages": [{"role": "user", "content": f"say {i}"}],
            "max_tokens": 2}}
        if url is not None:
            line.update(method="POST", url=url)
        lines.append(json.dumps(line))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture()
def keys(database):
    store = KeyStore(database)
    return store.create("alice")[1], store.create("bob")[1]


def test_openai_sdk_files_belong_to_their_key(database, keys, tmp_path):
    alice_key, bob_key = keys
    app, _ = make_app(database)
    data = batch_jsonl(3)
    with live_server(app) as root:
        alice = openai.OpenAI(base_url=root + "/v1", api_key=alice_key, max_retries=0)
        bob = openai.OpenAI(base_url=root + "/v1", api_key=bob_key, max_retries=0)
        made = alice.files.create(file=("in.jsonl", data), purpose="batch")
        assert made.id.startswith("file-") and made.bytes == len(data)
        assert made.filename == "in.jsonl" and made.purpose == "batch"
        assert made.status == "processed"
        assert alice.files.retrieve(made.id).bytes == len(data)
        assert alice.files.content(made.id).read() == data
        assert [f.id for f in alice.files.list()] == [made.id]
        assert list(bob.files.list()) == []
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            bob.files.content(made.id)
        with pytest.raises(openai.NotFoundError):
            bob.files.delete(made.id)
        assert alice.files.delete(made.id).deleted is True
        with pytest.raises(openai.NotFoundError):
            alice.files.retrieve(made.id)


def test_together_sdk_presigned_upload_and_documented_upload(database, keys, tmp_path):
    alice_key, bob_key = keys
    app, _ = make_app(database)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(batch_jsonl(4, url=None))  # Together's lines may leave out the url
    with live_server(app) as root:
        client = Together(base_url=root, api_key=alice_key, max_retries=0)
        made = client.files.upload(path, purpose="batch-api")
        assert made.filename == "requests.jsonl" and made.bytes == path.stat().st_size
        assert made.purpose == "batch-api" and made.file_type == "jsonl"
        assert client.files.retrieve(made.id).id == made.id
        assert client.files.content(made.id).read() == path.read_bytes()
        assert made.id in [f.id for f in client.files.list().data]
        bob = Together(base_url=root, api_key=bob_key, max_retries=0)
        assert made.id not in [f.id for f in bob.files.list().data]
        # Together's documented upload: one multipart POST; its object spells Processed and
        # FileType so.
        r = httpx.post(root + "/v1/files/upload", headers={"Authorization": f"Bearer {bob_key}"},
                       data={"purpose": "batch-api", "file_name": "b.jsonl",
                             "file_type": "jsonl"},
                       files={"file": ("x.jsonl", path.read_bytes())})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["Processed"] is True and body["FileType"] == "jsonl"
        assert body["filename"] == "b.jsonl" and body["object"] == "file"
        assert client.files.delete(made.id).deleted is True


@pytest.mark.parametrize("line, why", [
    ('not json', "is not valid JSON"),
    ('[1, 2]', "is not a JSON object"),
    ('{"custom_id": "req-0", "method": "POST", "url": "/v1/chat/completions", "body": {}}',
     "repeats the custom_id 'req-0'"),
    ('{"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
     "has method 'GET'"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/images/generations", "body": {}}',
     "has url '/v1/images/generations'"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": "hi"}',
     "needs a body"),
    ('{"custom_id": "x", "body": {}}', 'needs "method": "POST"'),
])
def test_a_bad_batch_line_is_named_in_a_400(database, keys, line, why):
    alice_key, _ = keys
    app, _ = make_app(database)
    data = batch_jsonl(2) + b"\n" + line.encode() + b"\n"  # a blank line 3: line 4 is bad
    with live_server(app) as root:
        alice = openai.OpenAI(base_url=root + "/v1", api_key=alice_key, max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            alice.files.create(file=("in.jsonl", data), purpose="batch")
        assert err.value.body["message"].startswith(f"Line 4 of the file {why}")
        assert err.value.body["param"] == "file"
        assert list(alice.files.list()) == []  # nothing kept


def test_a_file_over_the_cap_is_413(database, keys):
    from tests.platform.test_api import PRICE, FakeBackend, ModelRegistry, ModelSpec

    alice_key, _ = keys
    registry = ModelRegistry()
    registry.register(ModelSpec(id=MODEL, type="chat", context_length=64, pricing=PRICE),
                      FakeBackend())
    app = create_app(registry, platform=Platform(database), max_file_bytes=1000)
    with live_server(app) as root:
        alice = openai.OpenAI(base_url=root + "/v1", api_key=alice_key, max_retries=0)
        alice.files.create(file=("ok.jsonl", batch_jsonl(2)), purpose="batch")
        with pytest.raises(openai.APIStatusError) as err:
            alice.files.create(file=("big.jsonl", batch_jsonl(40)), purpose="batch")
        assert err.value.status_code == 413
        assert "limit of 1000 bytes" in err.value.body["message"]
        with pytest.raises(openai.APIStatusError) as err:  # past even the body limit
            alice.files.create(file=("huge.jsonl", b"x" * (3 << 20)), purpose="batch")
        assert err.value.status_code == 413
