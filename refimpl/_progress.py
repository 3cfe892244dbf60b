"""Progress bars: shown when asked for, unless the environment turns them off.

``progress=True`` (every long-running function's default) shows a tqdm bar; ``TQDM_DISABLE=1``
in the environment (the Makefile sets it for every check) still turns it off. tqdm reads that
variable only for a bar made without an explicit ``disable`` argument, and only when it is
imported; here it is read at each call, so a test can change it.
"""

from __future__ import annotations

import os

from tqdm import tqdm

__all__ = ["progress_bar", "progress_disabled"]


def progress_disabled() -> bool:
    """Whether ``TQDM_DISABLE`` is set to a true value ("1", "true", ...; not "", "0", "false")."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable, progress: bool, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled when ``progress`` is False or by ``TQDM_DISABLE``."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    return tqdm(iterable, disable=not progress or progress_disabled(), **kwargs)
