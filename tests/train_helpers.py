"""Training runs started side by side, for the system tests that train.

Most of a tiny `rayseg train` here is Ray Train's start-up (its controller and worker processes, torch's import
in each, the process group): tens of seconds of waiting, a few seconds of CPU; the epochs themselves take a second
or two. Runs started together on the session's embedded Ray overlap that waiting; Ray queues a run whose workers do
not fit beside the others' (its controller waits for the CPUs), so nothing is oversubscribed.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Runs:
    """Calls (train(...) usually) started at once on threads; `get(name)` waits for one and returns its result or
    raises its error in the test that asks for it."""

    def __init__(self, calls: dict[str, Callable[[], Any]]):
        self._pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="train-run")
        self._futures: dict[str, Future] = {name: self._pool.submit(call) for name, call in calls.items()}

    def get(self, name: str) -> Any:
        return self._futures[name].result()

    def close(self) -> None:
        """Waits for every call (a module's fixture must not leave a run going into the next module)."""
        self._pool.shutdown(wait=True)
