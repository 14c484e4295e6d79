"""Files by path or URI: one entry point to fsspec for local paths, s3:// and the other schemes it knows.

Everything vray reads or writes by URI (datasets, media, checkpoints, run directories) goes through here, so
credentials and endpoints are handled one way. `storage_options` are the explicit S3 settings of this process's
environment, for filesystems that are built here and used elsewhere (Ray Train's controller and workers may
lack the environment).
"""

from __future__ import annotations

import os
from typing import Any


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a local path or URI."""
    import fsspec

    return fsspec.core.url_to_fs(uri)


def storage_options(uri: str) -> dict[str, Any]:
    """The credentials and endpoint of this environment for `uri`'s scheme, spelled out (empty for local paths)."""
    options: dict[str, Any] = {}
    if uri.startswith("s3://"):
        env = os.environ
        if env.get("AWS_ACCESS_KEY_ID"):
            options.update(key=env["AWS_ACCESS_KEY_ID"], secret=env.get("AWS_SECRET_ACCESS_KEY"),
                           token=env.get("AWS_SESSION_TOKEN"))
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def explicit_filesystem(uri: str) -> Any:
    """A filesystem for `uri`'s scheme that carries `storage_options` with it (it may be pickled to other processes)."""
    import fsspec

    return fsspec.filesystem(uri.split("://", 1)[0], **storage_options(uri))
