"""`k2serve serve --files-url s3://bucket/prefix` ($K2SERVE_FILES_URL): uploaded files and
batch output live in an S3-compatible bucket (a real moto S3 server on loopback), written,
read back and deleted through the API; a bucket that does not exist stops start-up with a
clear message. The batch runs on the platform `serve` opens (open_platform) with the fake
model: loading the real one takes minutes on a busy CI machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import openai
import pytest

from k2serve.app import create_app
from k2serve.platform.service import open_platform
from tests.platform.conftest import live_server
from tests.platform.test_api import fake_registry
from tests.platform.test_files import batch_jsonl

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

N = 3
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """(endpoint URL, boto3 client) of a moto S3 server on a free loopback port."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    yield endpoint, client
    server.stop()


def _keys(client, bucket: str, prefix: str) -> set[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for o in listed.get("Contents", [])}


def test_batch_files_live_in_the_bucket_and_are_deleted_from_it(s3, tmp_path, monkeypatch):
    endpoint, client = s3
    client.create_bucket(Bucket="k2-files")
    for name, value in {**CREDENTIALS, "K2SERVE_S3_ENDPOINT_URL": endpoint,
                        "K2SERVE_FILES_URL": "s3://k2-files/team/a"}.items():
        monkeypatch.setenv(name, value)
    platform = open_platform(data_dir=str(tmp_path))
    with live_server(create_app(fake_registry(), platform=platform)) as root:
        api = openai.OpenAI(base_url=root + "/v1", api_key="none", max_retries=0)
        lines = batch_jsonl(N)
        file = api.files.create(file=("in.jsonl", lines), purpose="batch")
        assert client.get_object(Bucket="k2-files", Key=f"team/a/{file.id}")["Body"].read() \
            == lines
        assert not (tmp_path / "files").exists() or not any((tmp_path / "files").iterdir())
        batch = api.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        deadline = time.time() + 30
        while (batch := api.batches.retrieve(batch.id)).status != "completed":
            assert batch.status in ("validating", "in_progress", "finalizing"), batch
            assert time.time() < deadline, "the batch did not finish"
            time.sleep(0.1)
        assert (batch.request_counts.completed, batch.request_counts.failed) == (N, 0)
        assert _keys(client, "k2-files", "team/a/") == {f"team/a/{file.id}",
                                                       f"team/a/{batch.output_file_id}"}
        output = api.files.content(batch.output_file_id).content
        stored = client.get_object(Bucket="k2-files",
                                   Key=f"team/a/{batch.output_file_id}")["Body"].read()
        assert output == stored
        results = [json.loads(x) for x in output.splitlines()]
        assert sorted(r["custom_id"] for r in results) == [f"req-{i}" for i in range(N)]
        assert all(r["response"]["status_code"] == 200 for r in results)

        assert api.files.delete(file.id).deleted
        assert _keys(client, "k2-files", "team/a/") == {f"team/a/{batch.output_file_id}"}
        with pytest.raises(openai.NotFoundError):
            api.files.content(file.id)
    platform.db.close()


@pytest.mark.parametrize("url, message", [
    ("s3://no-such-bucket/x", "the files bucket s3://no-such-bucket does not exist"),
    ("https://example.com/files", "must look like s3://bucket/prefix, not 'https://example.com"),
])
def test_a_bad_files_url_stops_start_up_with_a_clear_message(s3, tmp_path, url, message):
    endpoint, _ = s3
    env = {**CREDENTIALS, "K2SERVE_S3_ENDPOINT_URL": endpoint, "K2SERVE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "k2serve.cli", "serve", "--quiet",
                           "--port", "0", "--files-url", url], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
