"""An S3 endpoint on 127.0.0.1 that can go away and come back: moto's server in this process, stopped and started
again on the same port while its objects stay in memory. The outage tests and `benchmarks/chaos.py` use it (moto is
a test dependency: `pip install -e '.[test]'`)."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from vray.cluster import free_port


def s3_env(endpoint: str) -> dict[str, str]:
    """What points s3fs, boto3 and pyarrow at the local endpoint; one attempt per botocore call, so vray's own retries
    (vray.storage.retry) are the ones an outage meets."""
    return dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, AWS_MAX_ATTEMPTS="1")


class LocalS3:
    """moto on 127.0.0.1:`port` (a free one by default); `stop()` is an outage, `start()` its end."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self, timeout_s: float = 30) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def up(self) -> bool:
        return self.server is not None

    def create_bucket(self, bucket: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)

    def keys(self, bucket: str) -> set[str]:
        """The objects of `bucket`, read from moto's memory (works while the endpoint is down)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        return set(s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[bucket].keys.keys())


@contextmanager
def local_s3(bucket: str) -> Iterator[LocalS3]:
    """A started LocalS3 with `bucket`, and this process's AWS_* variables pointing at it (restored afterwards)."""
    import s3fs

    s3 = LocalS3()
    saved = {k: os.environ.get(k) for k in [*s3_env(s3.endpoint), "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(s3_env(s3.endpoint))
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    s3fs.S3FileSystem.clear_instance_cache()  # no client that points at another endpoint
    try:
        s3.start()
        s3.create_bucket(bucket)
        yield s3
    finally:
        s3.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
