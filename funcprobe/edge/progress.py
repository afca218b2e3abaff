"""Progress bars (tqdm) over prompt chunks, and the package logger."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

log = logging.getLogger("funcprobe")


def progress_bar(items: Iterable[T], *, total: int, desc: str, enabled: bool | None) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar on stderr.

    ``enabled=None`` shows it only when stderr is a terminal and there is more than one
    item; ``False`` never; ``True`` always.
    """
    show = (sys.stderr.isatty() and total > 1) if enabled is None else bool(enabled)
    return tqdm(items, total=total, desc=desc, unit="chunk", disable=not show, leave=False)


def chunk_progress(desc: str, enabled: bool | None) -> Callable[[Iterable[int], int], Iterable[int]]:
    """A ``wrap(starts, total)`` for ``funcprobe.core.transforms`` that shows a bar."""

    def wrap(starts: Iterable[int], total: int) -> Iterable[int]:
        return progress_bar(starts, total=total, desc=desc, enabled=enabled)

    return wrap
