"""Retries for writes to an object store (s3:// and the like): exponential backoff with full jitter, within a budget.

An endpoint that goes away (a restart, a network partition, throttling) is waited out for up to
`UPLOAD_RETRY_BUDGET_S` seconds of consecutive failures per operation (`VRAY_UPLOAD_RETRY_BUDGET_S` changes it);
past it, `StorageOutage` names the endpoint and the bucket. Every retried operation writes or reads whole objects,
so a retry never leaves a torn object behind. Errors that a retry cannot fix (a missing object, a refused
permission) are raised at once.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from vray.errors import VrayError, seconds_from_env

UPLOAD_RETRY_BUDGET_S = 600.0  # how long an object store may be unreachable before a run stops (per operation)
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 30.0
_FINAL = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, TypeError, VrayError)
# botocore's errors that no retry fixes (missing credentials or region, a malformed call): raised at once
_FINAL_NAMES = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError",
                "InvalidConfigError", "UnknownServiceError"}

T = TypeVar("T")


class StorageOutage(VrayError):
    """The object store behind `uri` did not answer within the retry budget."""

    def __init__(self, message: str, uri: str):
        super().__init__(message)
        self.uri = uri


def retry_budget_s() -> float:
    """The retry budget in seconds: `VRAY_UPLOAD_RETRY_BUDGET_S`, else `UPLOAD_RETRY_BUDGET_S`."""
    return seconds_from_env("VRAY_UPLOAD_RETRY_BUDGET_S", UPLOAD_RETRY_BUDGET_S)


def endpoint_of(uri: str) -> str:
    """Where `uri` lives, for a message: the endpoint URL (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS's) and
    the bucket."""
    scheme, _, rest = uri.partition("://")
    bucket = rest.split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") if scheme in ("s3", "s3a") else None
    return f"{endpoint or f'{scheme}://'} (bucket {bucket})"


def with_retries(op: Callable[[], T], uri: str, what: str, budget_s: float | None = None) -> T:
    """`op()`, retried with exponential backoff and full jitter while it fails for less than the budget."""
    budget = retry_budget_s() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = _FIRST_DELAY_S
    while True:
        try:
            return op()
        except _FINAL:
            raise
        except Exception as exc:  # noqa: BLE001 - connection refused, timeouts, 5xx, throttling: retried
            if _FINAL_NAMES & {c.__name__ for c in type(exc).__mro__}:
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                raise StorageOutage(f"the object store {endpoint_of(uri)} did not answer for {budget:g} s "
                                    f"(VRAY_UPLOAD_RETRY_BUDGET_S) while {what} ({detail})", uri) from exc
            time.sleep(min(left, random.uniform(0, delay)) + 0.05)
            delay = min(delay * 2, _MAX_DELAY_S)
