"""S3 and S3-compatible stores (MinIO, Ceph, moto): the one place that turns the platform's
``S3_ENDPOINT`` / ``S3_ACCESS_KEY`` / ``S3_SECRET_KEY`` settings into what each library reads.

MLflow's S3 artifact repository and boto3 read the process environment
(``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so :func:`configure_s3_env` exports
the settings there; call it early in every process that talks to MLflow or S3 (bootstrap,
the job runner, :class:`~app.registry.mlflow_registry.ModelRegistry`). Ray Data and pyarrow
take an explicit :func:`s3_filesystem` instead, and :func:`resolve_uri` pairs a URI with the
filesystem that reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from app.errors import ConfigError, InvalidInput
from app.settings import Settings

if TYPE_CHECKING:
    import pyarrow.fs

DEFAULT_REGION = "us-east-1"
_SCHEMES = ("s3://", "s3a://")


def is_s3(uri: str) -> bool:
    return uri.startswith(_SCHEMES)


def region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or DEFAULT_REGION


def _endpoint_parts(endpoint: str) -> tuple[str, str]:
    """``http://host:9000`` -> (``host:9000``, ``http``); a bare ``host:port`` means https."""
    if "://" not in endpoint:
        return endpoint.rstrip("/"), "https"
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"s3_endpoint {endpoint!r} is not an http(s) URL; set S3_ENDPOINT like http://minio:9000")
    return parts.netloc, parts.scheme


def configure_s3_env(settings: Settings) -> None:
    """Export the S3 settings for MLflow and boto3 in this process. Settings win over what the
    environment had; nothing is touched when no S3 setting is given (IAM roles, ~/.aws)."""
    if settings.s3_endpoint:
        netloc, scheme = _endpoint_parts(settings.s3_endpoint)
        url = f"{scheme}://{netloc}"
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = url
        os.environ["AWS_ENDPOINT_URL_S3"] = url  # plain boto3 clients (botocore >= 1.31)
    access = settings.s3_access_key.get_secret_value()
    secret = settings.s3_secret_key.get_secret_value()
    if access:
        os.environ["AWS_ACCESS_KEY_ID"] = access
    if secret:
        os.environ["AWS_SECRET_ACCESS_KEY"] = secret
    if settings.s3_endpoint or access:
        os.environ.setdefault("AWS_DEFAULT_REGION", DEFAULT_REGION)


def s3_filesystem(
    settings: Settings, *, connect_timeout_s: float | None = None, attempts: int = 3
) -> pyarrow.fs.S3FileSystem:
    """A pyarrow S3 filesystem for the configured endpoint and keys (for Ray Data reads and writes)."""
    from pyarrow import fs

    kwargs: dict = {"region": region(), "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if settings.s3_endpoint:
        netloc, scheme = _endpoint_parts(settings.s3_endpoint)
        kwargs.update(endpoint_override=netloc, scheme=scheme)
    access = settings.s3_access_key.get_secret_value()
    secret = settings.s3_secret_key.get_secret_value()
    if access or secret:
        kwargs.update(access_key=access, secret_key=secret)
    if connect_timeout_s is not None:
        kwargs.update(connect_timeout=connect_timeout_s, request_timeout=connect_timeout_s * 3)
    return fs.S3FileSystem(**kwargs)


def resolve_uri(uri: str, settings: Settings, **fs_kwargs) -> tuple[str, pyarrow.fs.FileSystem]:
    """(path inside the filesystem, filesystem) for a local path, ``file://`` URI or ``s3://`` URI.

    S3 paths come back as ``bucket/key`` (what pyarrow filesystems take); local ones absolute.
    """
    from pyarrow import fs

    if is_s3(uri):
        path = uri.split("://", 1)[1].strip("/")
        if not path or path.startswith("/"):
            raise InvalidInput(f"{uri!r} names no bucket; use s3://bucket/path")
        return path, s3_filesystem(settings, **fs_kwargs)
    uri = uri.removeprefix("file://")
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise InvalidInput(f"{scheme}:// URIs are not supported; use a local path or s3://bucket/path")
    return str(Path(uri).expanduser().resolve()), fs.LocalFileSystem()


def s3_client(settings: Settings):
    """A boto3 S3 client for the configured endpoint and keys."""
    import boto3

    kwargs: dict = {"region_name": region()}
    if settings.s3_endpoint:
        netloc, scheme = _endpoint_parts(settings.s3_endpoint)
        kwargs["endpoint_url"] = f"{scheme}://{netloc}"
    access = settings.s3_access_key.get_secret_value()
    if access:
        kwargs.update(aws_access_key_id=access, aws_secret_access_key=settings.s3_secret_key.get_secret_value())
    return boto3.client("s3", **kwargs)
