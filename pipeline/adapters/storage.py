"""The one module that talks to object storage (S3 API).

Endpoint and credentials come from the standard variables ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (boto3 reads them itself); nothing here
holds a default secret. Every boto3 failure that a user can cause (endpoint down, wrong keys,
missing bucket) becomes a :class:`StorageError` with one line naming the endpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import StorageError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    etag: str
    size: int


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix/`` into ``("bucket", "prefix/")``; the prefix ends with ``/`` or is empty."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com (AWS default)")


def client():
    """A boto3 S3 client configured from the environment, with short timeouts and few retries.

    Cached per (endpoint, key id): building a client costs ~20 ms, more than a small object's transfer.
    """
    key = (
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )
    if key not in _CLIENTS:
        _CLIENTS[key] = _new_client()
    return _CLIENTS[key]


_CLIENTS: dict = {}


def _new_client():
    import boto3
    from botocore.config import Config

    cfg = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=16,
        s3={"addressing_style": "path"},
        signature_version="s3v4",
    )  # v4 presigned URLs too, not v2
    # A fresh session: boto3's default session caches the credentials it saw first, even after the env changes.
    return boto3.session.Session().client(
        "s3", config=cfg, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    )


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Translate boto3/botocore exceptions raised inside the block into one clear StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    try:
        yield
    except EndpointConnectionError:
        raise StorageError(
            f"{what}: cannot reach the S3 endpoint {endpoint()} (is it running? "
            f"`make services-up` starts the embedded one)"
        ) from None
    except NoCredentialsError:
        raise StorageError(
            f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for {endpoint()}"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            raise StorageError(
                f"{what}: the S3 endpoint {endpoint()} refused the credentials in "
                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ({code})"
            ) from None
        if code in ("NoSuchBucket", "404"):
            raise StorageError(f"{what}: bucket does not exist on {endpoint()} ({code})") from None
        raise StorageError(f"{what}: S3 error {code} from {endpoint()}: {exc}") from None
    except BotoCoreError as exc:
        raise StorageError(f"{what}: S3 request to {endpoint()} failed: {exc}") from None


def list_objects(uri: str, s3_client=None) -> list[ObjectInfo]:
    """All objects under an ``s3://bucket/prefix/`` (keys are full keys, ETags without quotes).

    ``s3_client`` lets Airflow pass the client of its S3 hook (an Airflow connection); default: the environment.
    """
    bucket, prefix = parse_s3_uri(uri)
    out: list[ObjectInfo] = []
    with storage_errors(f"listing {uri}"):
        paginator = (s3_client or client()).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(obj["Key"], obj.get("ETag", "").strip('"'), int(obj.get("Size", 0))))
    return out


def download(bucket: str, key: str, dest: Path) -> ObjectInfo:
    """Download one object to ``dest`` atomically (temp file + rename); returns what was fetched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with storage_errors(f"downloading s3://{bucket}/{key}"):
            resp = client().get_object(Bucket=bucket, Key=key)
            with open(tmp, "wb") as fh:
                for chunk in resp["Body"].iter_chunks(1 << 20):
                    fh.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a cut-off transfer leaves no partial file behind
        raise
    os.replace(tmp, dest)
    return ObjectInfo(key, resp.get("ETag", "").strip('"'), int(resp.get("ContentLength", 0)))


def upload_file(src: Path, bucket: str, key: str) -> None:
    with storage_errors(f"uploading to s3://{bucket}/{key}"):
        client().upload_file(str(src), bucket, key)


def put_bytes(bucket: str, key: str, data: bytes, s3_client=None) -> None:
    with storage_errors(f"writing s3://{bucket}/{key}"):
        (s3_client or client()).put_object(Bucket=bucket, Key=key, Body=data)


def get_bytes(uri: str, s3_client=None) -> bytes:
    bucket, _, key = uri[5:].partition("/")
    with storage_errors(f"reading {uri}"):
        return (s3_client or client()).get_object(Bucket=bucket, Key=key)["Body"].read()


def check_bucket(bucket: str) -> None:
    """Raise a clear StorageError unless ``bucket`` exists and our credentials work on it."""
    with storage_errors(f"checking bucket {bucket!r}"):
        client().head_bucket(Bucket=bucket)


def head(bucket: str, key: str) -> ObjectInfo | None:
    """The object's ETag and size now, or None when there is no such key."""
    from botocore.exceptions import ClientError

    with storage_errors(f"reading s3://{bucket}/{key}"):
        try:
            resp = client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
    return ObjectInfo(key, resp.get("ETag", "").strip('"'), int(resp.get("ContentLength", 0)))


def copy(bucket: str, src_key: str, dst_key: str, if_etag: str) -> ObjectInfo:
    """Server-side copy of ``src_key`` to ``dst_key`` in one bucket, only while the source's ETag is ``if_etag``
    (a source replaced between our check and the copy makes the copy fail); returns the new object."""
    with storage_errors(f"copying s3://{bucket}/{src_key} to {dst_key}"):
        client().copy_object(
            Bucket=bucket,
            Key=dst_key,
            CopySource={"Bucket": bucket, "Key": src_key},
            CopySourceIfMatch=f'"{if_etag}"',
            MetadataDirective="COPY",
        )
    info = head(bucket, dst_key)
    if info is None:
        raise StorageError(f"copy to s3://{bucket}/{dst_key} reported success but the object is not there")
    return info


def delete(bucket: str, key: str) -> None:
    with storage_errors(f"deleting s3://{bucket}/{key}"):
        client().delete_object(Bucket=bucket, Key=key)


def presigned_get_url(bucket: str, key: str, expires_s: int) -> str:
    """A GET URL for one object that works without credentials until it expires (SigV4: at most 7 days)."""
    with storage_errors(f"signing a URL for s3://{bucket}/{key}"):
        return client().generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires_s)
        )
