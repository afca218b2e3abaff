"""Seeded blocks that leave the caller's random generators as they were.

``torch.manual_seed`` inside ``torch.random.fork_rng(devices=[])`` restores only the CPU
generator: it also seeds every CUDA device's generator, or, before CUDA is initialised,
queues that seeding for later, replacing a seed the caller queued with their own
``torch.manual_seed``. ``seeded`` seeds only the generators the block draws from and
restores each of them.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterator, Union

import torch


@contextlib.contextmanager
def seeded(seed: int, device: Union[torch.device, str] = "cpu") -> Iterator[None]:
    """Run the block with the CPU generator seeded with ``seed`` and, where ``device`` is a
    CUDA device, that device's generator too (CUDA is initialised first, so nothing is
    queued); all of them are restored on exit, also when the block raises. A ``meta``
    device draws nothing: only the CPU generator is seeded.

    Raises ValueError naming ``seed`` (an int in [-2⁶³, 2⁶⁴) expected, as
    ``torch.manual_seed`` takes) or ``device`` (cpu, meta or an available cuda device
    expected: other accelerators' generators are not forked here).
    """
    try:
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed: expected an int, got {seed!r}") from None
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {seed}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "meta", "cuda"):
        raise ValueError(f"device: expected a cpu, meta or cuda device for a seeded block, got {dev}")
    cuda = []
    if dev.type == "cuda":
        if not torch.cuda.is_available() or (dev.index is not None and dev.index >= torch.cuda.device_count()):
            raise ValueError(f"device: {dev} is not an available CUDA device "
                             f"({torch.cuda.device_count()} visible)")
        torch.cuda.init()
        cuda = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
