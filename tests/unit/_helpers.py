"""Small helpers shared by the unit tests."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_without_suspending(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never has to wait (its awaitables answer at once) to its end,
    without an event loop; fail if it suspends."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("the coroutine suspended")
