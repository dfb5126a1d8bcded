"""End to end: backend="triton" gives the reference path's greedy tokens (fp32), on every architecture family.

On the CPU this runs the kernels under the Triton interpreter (set by this folder's conftest), so it stays tiny.
"""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine
from softprompt.engine.errors import SoftPromptError

from ..runtime_helpers import assert_no_leaks, make_requests, register_tasks, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gpt2", "bloom", "bloom_post_norm"])
def test_triton_backend_matches_reference(variant, model_dir_for):
    d = model_dir_for(variant)
    ref = Engine(d, device=DEVICE, dtype="float32", backend="reference")
    eng = Engine(d, device=DEVICE, dtype="float32", backend="triton", max_batched_tokens=48)
    names = register_tasks([ref, eng], 3) + [None]
    n = 5 if DEVICE == "cpu" else 40
    specs = make_requests(names, n, seed=30, max_new_tokens=4 if DEVICE == "cpu" else 12)
    assert run(eng, specs) == run(ref, specs)  # prefill kernel (incl. chunks), cascade decode kernel
    assert_no_leaks(eng)


def test_triton_backend_needs_power_of_two_blocks(model_dir_for):
    with pytest.raises(SoftPromptError, match="power-of-two"):
        Engine(model_dir_for("llama"), device=DEVICE, backend="triton", block_size=12)
