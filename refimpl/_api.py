"""Renamed public parameters: the old spelling raises a TypeError naming the new one.

The package keeps one spelling per concept and no silent aliases; a caller still using an old
keyword learns the new name from the error instead of from a changelog.
"""

from __future__ import annotations

import functools

__all__ = ["check_renamed", "renamed"]


def check_renamed(kwargs: dict, renames: dict, where: str) -> None:
    """Raise TypeError if ``kwargs`` uses an old name in ``renames`` ({old: new})."""
    old = [k for k in kwargs if k in renames]
    if old:
        raise TypeError(f"{where}: parameter {old[0]!r} is now spelled {renames[old[0]]!r}")


def renamed(**renames: str):
    """Decorator: calling ``fn(old=...)`` raises TypeError naming the new parameter."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            check_renamed(kwargs, renames, fn.__qualname__)
            return fn(*args, **kwargs)
        return call
    return wrap
