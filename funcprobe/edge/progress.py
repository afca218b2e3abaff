"""Progress bars (tqdm) over prompt chunks, the package logger, and quiet model loading."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
from typing import Callable, Iterable, Iterator, TypeVar

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


#: the FutureWarning PEFT's ``PeftModel.__init__`` raises by reading transformers'
#: deprecated ``is_gradient_checkpointing`` (peft 0.21 with transformers 5): not the caller's to fix
PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def quiet_loading(*, bars: bool) -> Iterator[None]:
    """Load a model through transformers / PEFT without their noise, restoring everything on exit.

    Always silences the ``FutureWarning`` PEFT triggers in every ``PeftModel`` build
    (``PEFT_DEPRECATION``, a warnings filter inside ``warnings.catch_warnings``). With
    ``bars=False`` also transformers' loading progress bars: its own switch
    (``transformers.utils.logging.disable_progress_bar``, re-enabled after if it was on)
    and the GGUF de-quantising bar, which calls tqdm directly (that module's ``tqdm`` is
    replaced by a disabled one for the duration).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        if not bars:
            from unittest import mock

            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                stack.callback(hf_logging.enable_progress_bar)
            try:
                from transformers import modeling_gguf_pytorch_utils as gguf_utils
            except ImportError:  # pragma: no cover - the module exists in every transformers 5 release
                gguf_utils = None
            if gguf_utils is not None and hasattr(gguf_utils, "tqdm"):
                stack.enter_context(mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True)))
        yield
