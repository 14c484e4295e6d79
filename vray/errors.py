"""Errors a user can cause and fix: the CLI prints them without a traceback."""

from __future__ import annotations

import os


class VrayError(Exception):
    """An error the user can fix: the message names the field, row or request and the fix."""

    exit_code = 1


class SpecError(VrayError):
    """A run spec that fails validation; holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid run spec ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n{lines}")


class DataError(VrayError):
    """A dataset row or file that cannot be used as given. `kind` names the problem for reports that count them
    (`vray data check`): "missing image", "over token budget", ...; None when no report needs it. `file` is the
    image or video it is about, when it is about one."""

    def __init__(self, message: str, kind: str | None = None, file: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.file = file


class RequestError(VrayError):
    """A bad inference request; the server answers it with `status` (400 unless the request is too large, 413, or
    names something that does not exist, 404)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class PlanError(VrayError):
    """A run that does not fit the GPUs it may use (exit code 2, like `vray plan`)."""

    exit_code = 2


def seconds_from_env(name: str, default: float) -> float:
    """A duration a `VRAY_*` variable sets (seconds, at least 0), else `default`; a value that is no number is an
    error naming the variable."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return max(0.0, float(text))
    except ValueError:
        raise VrayError(f"{name}={text!r} is not a number of seconds; set it to e.g. {default:g}") from None
