"""A real S3-compatible HTTP server for tests: moto in server mode on 127.0.0.1 and a free
port. Clients (boto3, MLflow, pyarrow, Ray workers) talk to it over HTTP like to MinIO."""

from __future__ import annotations

from dataclasses import dataclass

ACCESS_KEY = "matih-test-key"
SECRET_KEY = "matih-test-secret"


@dataclass
class S3Server:
    endpoint: str
    server: object

    def settings(self) -> dict[str, str]:
        """Settings overrides that point the platform at this server."""
        return {"s3_endpoint": self.endpoint, "s3_access_key": ACCESS_KEY, "s3_secret_key": SECRET_KEY}

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def stop(self) -> None:
        self.server.stop()


def start_s3_server() -> S3Server:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(f"http://{host}:{port}", server)
