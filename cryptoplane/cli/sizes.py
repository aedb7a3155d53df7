"""Sizes on the command line: ``256M``, ``1G``, ``4k``, ``1.5GiB`` (powers of 1024)."""

from __future__ import annotations

import click

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str, *, least: int = 1) -> int:
    """Bytes in ``text``; ``click.BadParameter`` for what is not a size or is below
    ``least``."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = _UNITS.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in _UNITS else t
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 256M, 1G)") from None
    if value < least:
        raise click.BadParameter(f"{text!r} is too small: at least {least >> 20}M")
    return value
