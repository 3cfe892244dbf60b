"""Progress bars: shown when asked for, unless the environment turns them off.

``progress=True`` (every long-running function's default) shows a tqdm bar; ``TQDM_DISABLE=1``
in the environment (the Makefile sets it for every check) still turns it off, because the bar is
made without an explicit ``disable`` argument, which would override the environment.
"""

from __future__ import annotations

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable, progress: bool, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled when ``progress`` is False or by ``TQDM_DISABLE``."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    return tqdm(iterable, **kwargs) if progress else tqdm(iterable, disable=True, **kwargs)
