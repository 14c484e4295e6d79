"""Several generations on one model, taking turns one decoding step at a time.

A model holds state that every forward pass reads (which LoRA adapter is active), so two generations never run a
step at the same time. But a generation does not hold the model for its whole length either: after each step it
lets every generation that is waiting run one step first, in arrival order. A long stream therefore slows a batch
that arrives during it instead of blocking it, and each generation's adapter is put back when its turn comes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_NO_MODE = object()  # the model's mode is unknown (just changed by an exclusive turn)


class Turns:
    """First come, first served turns on one model. `switch(mode)` puts the model in a generation's mode (its
    adapter); it runs inside the turn, and only when the mode differs from the last one set."""

    def __init__(self, switch: Callable[[Any], None]):
        self._switch = switch
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._holder: object | None = None
        self._mode: Any = _NO_MODE

    def _take(self, ticket: object) -> None:
        with self._cond:
            self._waiting.append(ticket)
            while self._holder is not None or self._waiting[0] is not ticket:
                self._cond.wait()
            self._waiting.popleft()
            self._holder = ticket

    def _give(self, ticket: object) -> None:
        with self._cond:
            if self._holder is ticket:
                self._holder = None
                self._cond.notify_all()

    def _enter(self, ticket: object, mode: Any) -> None:
        self._take(ticket)
        if self._mode != mode:
            self._mode = _NO_MODE
            try:
                self._switch(mode)
            except BaseException:
                self._give(ticket)
                raise
            self._mode = mode

    @contextmanager
    def turn(self, mode: Any) -> Iterator[Callable[[], None]]:
        """Hold the model in `mode`; the yielded `step_done()` lets waiting generations run one step each, then
        takes the model back (in `mode` again)."""
        ticket = object()
        self._enter(ticket, mode)

        def step_done() -> None:
            with self._cond:
                if not self._waiting:
                    return
            self._give(ticket)
            self._enter(ticket, mode)

        try:
            yield step_done
        finally:
            self._give(ticket)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model to change it (load or drop an adapter); the next turn sets its mode again."""
        ticket = object()
        self._take(ticket)
        try:
            yield
        finally:
            self._mode = _NO_MODE
            self._give(ticket)
