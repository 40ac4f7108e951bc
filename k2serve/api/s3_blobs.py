"""Uploaded files' bytes in an S3-compatible bucket (`k2serve serve --files-url s3://bucket/prefix`):
the same write/read/delete as `FileBlobs`, one object per file id under the prefix.

boto3 is optional (`pip install 'k2serve[s3]'`) and imported only when a URL is configured.
The endpoint of a non-AWS store (MinIO, Ceph...) comes from K2SERVE_S3_ENDPOINT_URL or
AWS_ENDPOINT_URL; credentials and region from the standard AWS variables/files. Calls block
(HTTP): async code runs them off the event loop, as it does the local store's.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

ENV_URL = "K2SERVE_FILES_URL"


def parse_files_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix ending in "/" or empty) of an s3:// URL; ValueError otherwise."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"--files-url / ${ENV_URL} must look like s3://bucket/prefix, "
                         f"not {url!r}")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


class S3FileBlobs:
    """One object per file id at `s3://bucket/prefix/<id>`."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        self.bucket, self.prefix = parse_files_url(url)
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise RuntimeError("--files-url needs boto3: pip install 'k2serve[s3]'") from exc
        endpoint_url = (endpoint_url or os.environ.get("K2SERVE_S3_ENDPOINT_URL")
                        or os.environ.get("AWS_ENDPOINT_URL") or None)
        # Clients are thread-safe; the threadpool shares this one.
        self._client = boto3.client("s3", endpoint_url=endpoint_url,
                                    config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                  connect_timeout=5, read_timeout=60))
        from botocore.exceptions import ClientError

        self._client_error = ClientError

    def check(self) -> None:
        """Raise RuntimeError (a message to act on) unless the bucket exists and answers."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._client_error as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            what = ("does not exist" if code in ("404", "NoSuchBucket")
                    else "is not accessible with these credentials" if code in ("403", "AccessDenied")
                    else f"answered {code or exc}")
            raise RuntimeError(f"the files bucket s3://{self.bucket} {what}") from exc
        except Exception as exc:  # no credentials, unreachable endpoint...
            raise RuntimeError(f"cannot reach the files bucket s3://{self.bucket}: {exc}") from exc

    def key(self, file_id: str) -> str:
        return self.prefix + file_id

    def write(self, file_id: str, data: bytes) -> None:
        """A PUT is atomic: readers see the old object or the new, never half of it."""
        self._client.put_object(Bucket=self.bucket, Key=self.key(file_id), Body=data)

    def read(self, file_id: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.key(file_id))
        except self._client_error as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return response["Body"].read()

    def delete(self, file_id: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self.key(file_id))  # absent: no error


def open_file_blobs(url: str) -> S3FileBlobs:
    """The bucket store for `url`, checked; RuntimeError with a message a user can act on."""
    try:
        blobs = S3FileBlobs(url)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from exc
    blobs.check()
    return blobs
