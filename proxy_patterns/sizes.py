"""Byte sizes as users write them in settings: ``"1 MiB"``, ``"100 kB"``, ``"1MB"``, ``"1024"``.

The syntax is Dask's (``dask.utils.parse_bytes``), so a threshold reads the same in
``register(client, threshold=...)``, in ``dask.config`` and in a Parsl or store setting, without
the core importing Dask: a number (``"5.4"``, ``"1e6"``), a unit, or both, spaces anywhere,
units in any case — decimal ``k``/``kB`` to ``P``/``PB``, binary ``Ki``/``KiB`` to
``Pi``/``PiB``, ``B``. ProxyStore's ``readable_to_bytes`` reads fewer of these (not ``"1M"``,
``"1 PiB"`` nor ``"1e6 kB"``).
"""

from __future__ import annotations

import re

_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}
_UNITS = {
    "": 1,
    "b": 1,
    **{prefix: size for prefix, size in _DECIMAL.items()},
    **{f"{prefix}b": size for prefix, size in _DECIMAL.items()},
    **{f"{prefix}i": size for prefix, size in _BINARY.items()},
    **{f"{prefix}ib": size for prefix, size in _BINARY.items()},
}
_NUMBER_AND_UNIT = re.compile(r"(?P<number>.*?)(?P<unit>[A-Za-z]*)")


def parse_bytes(text: str) -> int:
    """The number of bytes ``text`` says (a unit alone is one of it: ``"MB"`` is 10**6).

    Raises:
        ValueError: ``text`` is blank, or not a number and one of the units above; the message
            quotes it.
    """
    match = _NUMBER_AND_UNIT.fullmatch(text.replace(" ", ""))
    try:
        if match is None or not match[0]:  # Dask reads a blank string as 1 byte: a typo, here
            raise ValueError("blank")
        return int(float(match["number"] or "1") * _UNITS[match["unit"].lower()])
    except (KeyError, ValueError, OverflowError) as error:
        raise ValueError(
            f"cannot read {text!r} as a size in bytes (such as '1 MiB' or '100 kB')"
        ) from error


def as_bytes(value: int | str, setting: str) -> int:
    """A size setting (a number of bytes, or text :func:`parse_bytes` reads) as bytes.

    Raises:
        ValueError: ``value`` cannot be read, or is negative; the message names ``setting``.
    """
    try:
        nbytes = parse_bytes(value) if isinstance(value, str) else value
    except ValueError as e:
        raise ValueError(f"cannot parse {setting} {value!r} as bytes") from e
    if nbytes < 0:
        raise ValueError(f"{setting} must not be negative, got {value!r}")
    return nbytes
