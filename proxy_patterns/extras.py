"""Optional dependencies: each framework, and the Redis client, is an extra of the package.

``pip install proxy-patterns`` installs the core (store, policy, proxies, futures, ownership,
``proxy-patterns clean``); ``[dask]``, ``[parsl]``, ``[globus]`` and ``[redis]`` add one
framework each, ``[all]`` all of them. Code that needs an extra imports it inside
``with requires_extra(...)``, so that without it the error says what to install.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ExtraNotInstalledError(ModuleNotFoundError):
    """A module that a feature needs is not installed; the message names the extra to install.

    A ``ModuleNotFoundError``, as the error it replaces: code that falls back when an optional
    module is missing keeps working.
    """


@contextlib.contextmanager
def requires_extra(extra: str, feature: str) -> Iterator[None]:
    """A module missing inside the block raises :class:`ExtraNotInstalledError` naming ``extra``.

    ``feature`` is what needs it, as the user knows it (a plugin's ``__name__``, a command)::

        with requires_extra("parsl", __name__):
            import parsl

    The user learns the one command that installs the whole framework, where the bare error
    would name whichever of its modules happened to be imported first.
    """
    try:
        yield
    except ModuleNotFoundError as error:
        # A feature built on a plugin (a benchmark) names its own extra and the module missing.
        missing = error.__cause__ if isinstance(error, ExtraNotInstalledError) else error
        raise ExtraNotInstalledError(
            f"{feature} needs the '{extra}' extra ({missing}): "
            f"pip install 'proxy-patterns[{extra}]'",
            name=error.name,
        ) from missing
