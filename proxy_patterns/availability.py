"""A store's backend that cannot be reached gives one error of ours, naming what failed.

Without it, a Redis server that is down surfaces as whatever the code in between makes of the
connection error: ``TypeError: could not serialize the task graph: Error 111 connecting to
...`` from a Dask submit, or a resolve error inside a task. The user needs to know which store
was unreachable and what was being done with which key, and to catch it as what it is: a
:class:`ConnectionError`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class StoreUnavailableError(ConnectionError):
    """A store's backend could not be reached; the message names the store and the operation."""


class StoreAccessError(PermissionError):
    """A store's backend refused our credentials (a Redis password or ACL user)."""


def _refused(error: BaseException) -> bool:
    """Whether ``error`` says the server refused our credentials (not that it is down)."""
    redis = sys.modules.get("redis")
    if redis is None:
        return False
    if isinstance(error, redis.exceptions.AuthenticationError):
        return True
    return isinstance(error, redis.exceptions.ResponseError) and str(error).startswith(
        ("NOAUTH", "WRONGPASS", "NOPERM")
    )


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the backend could not be reached (not that it refused the data,
    nor that a value was awaited in vain: a proxy future's TimeoutError is its own)."""
    if isinstance(error, ConnectionError):
        return True
    redis = sys.modules.get("redis")  # only a Redis store raises redis's errors
    return redis is not None and isinstance(
        error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
    )


@contextlib.contextmanager
def reaching(store: str, doing: str) -> Iterator[None]:
    """Raise :class:`StoreUnavailableError` (chained to the cause) if the backend of ``store``
    cannot be reached in the block, where the caller was ``doing`` something."""
    try:
        yield
    except (StoreUnavailableError, StoreAccessError):
        raise
    except Exception as error:
        if _refused(error):
            raise StoreAccessError(
                f"store {store} refused our credentials: {doing} failed ({error}); give the "
                "password in the spec, or in $PROXY_PATTERNS_REDIS_PASSWORD in every process "
                "that uses the store (workers re-create it from proxies, without the password)"
            ) from error
        if not _unreachable(error):
            raise
        raise StoreUnavailableError(
            f"store {store} is unavailable: {doing} failed ({error})"
        ) from error
