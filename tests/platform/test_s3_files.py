"""`k2serve serve --files-url s3://bucket/prefix`: uploaded files and batch output live in an
S3-compatible bucket (a real moto S3 server on loopback), written, read back and deleted
through the API; a bucket that does not exist stops start-up with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import openai
import pytest

from k2serve.serving.catalog import EMBEDDED_CHAT_MODEL_ID
from tests.conftest import start_server, stop_server

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


def test_batch_files_live_in_the_bucket_and_are_deleted_from_it(s3):
    endpoint, client = s3
    client.create_bucket(Bucket="k2-files")
    env = {**CREDENTIALS, "K2SERVE_S3_ENDPOINT_URL": endpoint}
    server = start_server("--threads", "1", "--files-url", "s3://k2-files/team/a", env=env)
    try:
        api = openai.OpenAI(base_url=server.base_v1, api_key="none", max_retries=0)
        lines = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST",
                                    "url": "/v1/completions",
                                    "body": {"model": EMBEDDED_CHAT_MODEL_ID, "prompt": f"count {i}",
                                             "max_tokens": 2}}) + "\n"
                        for i in range(N)).encode()
        file = api.files.create(file=("in.jsonl", lines), purpose="batch")
        assert client.get_object(Bucket="k2-files", Key=f"team/a/{file.id}")["Body"].read() \
            == lines
        batch = api.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                   completion_window="24h")
        deadline = time.time() + 60
        while (batch := api.batches.retrieve(batch.id)).status != "completed":
            assert batch.status in ("validating", "in_progress", "finalizing"), batch
            assert time.time() < deadline, "the batch did not finish"
            time.sleep(0.2)
        assert (batch.request_counts.completed, batch.request_counts.failed) == (N, 0)
        assert _keys(client, "k2-files", "team/a/") == {f"team/a/{file.id}",
                                                       f"team/a/{batch.output_file_id}"}
        output = api.files.content(batch.output_file_id).content
        stored = client.get_object(Bucket="k2-files",
                                   Key=f"team/a/{batch.output_file_id}")["Body"].read()
        assert output == stored
        results = [json.loads(x) for x in output.splitlines()]
        assert sorted(r["custom_id"] for r in results) == [f"line-{i}" for i in range(N)]
        assert all(r["response"]["status_code"] == 200 for r in results)

        assert api.files.delete(file.id).deleted
        assert _keys(client, "k2-files", "team/a/") == {f"team/a/{batch.output_file_id}"}
        with pytest.raises(openai.NotFoundError):
            api.files.content(file.id)
    finally:
        stop_server(server)


def test_a_missing_bucket_stops_start_up_with_a_clear_message(s3, tmp_path):
    endpoint, _ = s3
    env = {**CREDENTIALS, "K2SERVE_S3_ENDPOINT_URL": endpoint, "K2SERVE_HOME": str(tmp_path),
           "K2SERVE_FILES_URL": "s3://no-such-bucket/x"}

    done = subprocess.run([sys.executable, "-m", "k2serve.cli", "serve", "--quiet",
                           "--port", "0"], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "s3://no-such-bucket does not exist" in done.stderr
    assert "Traceback" not in done.stderr
