"""S3 object storage through boto3: the bucket the stack creates, and the check that runs before any stage writes.

Endpoint and credentials come from the environment only (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`; boto3's own chain), never from committed files. Every failure names the endpoint and the
bucket and says what to do, before DVC or MLflow would fail with a retry loop and a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from conveyor.errors import ConveyorError


class S3UrlError(ConveyorError, ValueError):
    """Not an s3://bucket/prefix URL."""


class StorageError(ConveyorError, RuntimeError):
    """The S3 store cannot be used: unreachable, credentials refused, no such bucket. The message names the
    endpoint and the bucket."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise S3UrlError(f"not an S3 URL: {url} (expected s3://bucket/prefix)")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise S3UrlError(f"no bucket in {url} (expected s3://bucket/prefix)")
        return cls(bucket, prefix.strip("/"))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def client(endpoint: str | None = None, attempts: int = 2, credentials: tuple[str, str] | None = None) -> Any:
    """A boto3 S3 client on `endpoint` (default: the environment's, else AWS), path-style addressing (what
    S3-compatible stores on an IP address need), few retries: a check should answer in seconds. Credentials as
    given, else AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else the rest of boto3's chain."""
    import boto3
    from botocore.config import Config

    # Read from the environment on every call: boto3's default session resolves its credential chain once per process
    # and keeps the answer, so a process whose environment names another store would sign with the old keys.
    from_env = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"))
    key, secret = credentials or (from_env if all(from_env) else (None, None))
    url = endpoint or endpoint_from_env()
    if url and not url.startswith(("http://", "https://")):  # boto3's own ValueError names neither fix nor variable
        named = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
        raise StorageError(
            f"S3 endpoint {url!r}{'' if endpoint else f' ({named})'} has no scheme: write it as http://{url} "
            f"(or https://{url})"
        )
    return boto3.client(
        "s3",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=None if credentials or not key else os.environ.get("AWS_SESSION_TOKEN"),
        endpoint_url=url,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        ),
    )


def _where(bucket: str, endpoint: str | None) -> str:
    return f"bucket '{bucket}' on the S3 store {endpoint or 'AWS S3 (no AWS_ENDPOINT_URL set)'}"


@contextmanager
def explained(bucket: str, endpoint: str | None) -> Iterator[None]:
    """Turn boto3's failures on `bucket` into a StorageError a person can act on (naming endpoint and bucket)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = _where(bucket, endpoint)
    try:
        yield
    except NoCredentialsError:
        raise StorageError(
            f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(for the local stack: `source .conveyor/stack/stack.env`)"
        ) from None
    except EndpointConnectionError:
        raise StorageError(f"{where}: the store is unreachable (is it running? `conveyor stack status`)") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise StorageError(
                f"{where}: the store refused these credentials ({code}): check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            ) from None
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{where}: no such bucket (`conveyor stack up` creates it)") from None
        raise StorageError(f"{where}: {exc}") from None


def check_bucket(bucket: str, endpoint: str | None = None) -> None:
    """Fail with a message a person can act on unless the bucket answers to these credentials."""
    endpoint = endpoint or endpoint_from_env()
    with explained(bucket, endpoint):
        client(endpoint).head_bucket(Bucket=bucket)


def ensure_bucket(bucket: str, endpoint: str | None = None, credentials: tuple[str, str] | None = None) -> bool:
    """Create the bucket unless it exists; True when it was created."""
    from botocore.exceptions import ClientError

    s3 = client(endpoint, credentials=credentials)
    try:
        s3.create_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
        raise StorageError(f"{_where(bucket, endpoint)}: cannot create it: {exc}") from None


def list_keys(
    location: S3Location, endpoint: str | None = None, credentials: tuple[str, str] | None = None, s3: Any = None
) -> list[str]:
    """Every key under the location's prefix (paginated), with the given client or a new one."""
    s3 = s3 or client(endpoint, credentials=credentials)
    prefix = f"{location.prefix}/" if location.prefix else ""
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def list_objects(url: str, suffixes: set[str], endpoint: str | None = None) -> list[str]:
    """The s3:// URLs of the objects under `url` whose names end in one of `suffixes` (case-insensitive), sorted."""
    location = S3Location.parse(url)
    endpoint = endpoint or endpoint_from_env()
    with explained(location.bucket, endpoint):
        keys = list_keys(S3Location(location.bucket, location.prefix), endpoint)
    return sorted(f"s3://{location.bucket}/{key}" for key in keys if key.lower().endswith(tuple(suffixes)))


class ObjectReader:
    """Reads whole objects by s3:// URL with one client. A missing object is an OSError (like a missing file, so
    callers treat it as one bad input); an unreachable store or refused credentials is a StorageError."""

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint or endpoint_from_env()
        self._client = client(self.endpoint, attempts=4)

    def __call__(self, url: str) -> bytes:
        from botocore.exceptions import ClientError

        location = S3Location.parse(url)
        with explained(location.bucket, self.endpoint):
            try:
                response = self._client.get_object(Bucket=location.bucket, Key=location.prefix)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404"):
                    raise FileNotFoundError(f"{url}: no such object") from None
                raise
            return bytes(response["Body"].read())
