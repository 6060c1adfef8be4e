"""Where a run's seconds went, by phase, so a regression in a benchmark or a slow scheduled run shows where it is.

A phase is a named step (``listing``, ``markers``, ``upsert``, ``reconcile``...); its figure is the seconds
spent in it, summed over every time it ran: steps that run on several threads or actors at once (upserts,
the actors' reads and encodes) can add up to more than the run's wall time. ``RunSummary.phases`` carries
the figures of one run (``reembed run --json``); ``bench/scale.py`` prints them.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


class Phases:
    """Seconds per phase, safe to add to from several threads."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {name: round(seconds, 4) for name, seconds in self._seconds.items()}


def timed_phase(name: str) -> Callable[[F], F]:
    """Decorate a step whose first argument carries ``phases`` (a flow's ``RunSession``): its seconds, retries
    included, are added to phase ``name``. Put under ``@task`` so Prefect still sees the step's signature."""

    def decorate(step: F) -> F:
        @functools.wraps(step)
        def timed(owner: Any, *args: Any, **kwargs: Any) -> Any:
            with owner.phases.timed(name):
                return step(owner, *args, **kwargs)

        return cast(F, timed)

    return decorate
