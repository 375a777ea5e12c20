"""Surface our own errors raised inside Ray actors and tasks as themselves.

Ray wraps an exception raised in an actor (``RayTaskError``, and Ray Data adds ``UserCodeException``), so a
user would see a page of traceback instead of "error: data.train:12: column 'output' is empty". Where a
driver waits on Ray work, it unwraps the chain and re-raises the first :class:`SrdError` it finds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from srd_ray.errors import SrdError


def find_srd_error(error: BaseException) -> SrdError | None:
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # RayTaskError(DataError) subclasses DataError but prints the remote traceback: prefer its cause.
        cause = getattr(current, "cause", None)
        if isinstance(current, SrdError) and cause is None:
            return current
        pending += [current.__context__, current.__cause__, cause]
    return None


@contextmanager
def reraise_srd_error() -> Iterator[None]:
    try:
        yield
    except Exception as error:
        found = find_srd_error(error)
        if found is None:
            raise
        raise found from None
