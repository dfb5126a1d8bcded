"""Which tile sizes a kernel launch picks: its GPU tiles on CUDA, small ones under the Triton interpreter (CPU
tests). `gpu_tiles_forced()` makes interpreter launches pick the GPU tiles, so that tests/kernels/
test_compile_hopper.py can record the launches the GPU would see and compile them for Hopper without a GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

_forced = False


def gpu_tiles(t: Tensor) -> bool:
    return t.is_cuda or _forced


@contextlib.contextmanager
def gpu_tiles_forced() -> Iterator[None]:
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous
