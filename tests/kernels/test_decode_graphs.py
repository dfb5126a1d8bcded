"""Decode steps at padded static shapes (engine/decode_graphs.py), the shapes a CUDA graph replays.

On the CPU the padded steps run eagerly under the Triton interpreter: padding rows, the padding group and empty
groups, the scratch block and the static buffers are all exercised, only the capture is not (tests/test_cuda.py
runs the captured graphs on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine
from softprompt.engine.decode_graphs import bucket_sizes
from softprompt.engine.errors import SoftPromptError
from softprompt.engine.kv_pool import KVPool
from softprompt.engine.testing import build_prompt_tensor

from ..runtime_helpers import assert_no_leaks, make_requests, register_tasks, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = bucket_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256 and all(b % 8 == 0 for b in sizes[3:])


def test_scratch_block_is_never_handed_out(model_dir_for):
    config = Engine(model_dir_for("llama"), device="cpu", backend="reference").config
    pool = KVPool(config, 4, 16, torch.float32, torch.device("cpu"))
    scratch = pool.reserve_scratch_block()
    assert pool.num_blocks == pool.num_free == 3
    assert scratch not in pool.allocate(3)
    with pytest.raises(SoftPromptError, match="scratch block"):
        pool.reserve_scratch_block()


@pytest.mark.parametrize("variant", ["llama", "bloom"])  # RoPE in the kernel; ALiBi positions of padded groups
def test_padded_decode_steps_match_reference(variant, model_dir_for):
    d = model_dir_for(variant)
    ref = Engine(d, device=DEVICE, dtype="float32", backend="reference")
    eng = Engine(d, device=DEVICE, dtype="float32", backend="triton", cuda_graphs=True, max_num_seqs=6)
    names = register_tasks([ref, eng], 2) + [None]  # two groups with a prefix, one without
    specs = make_requests(names, 5 if DEVICE == "cpu" else 40, seed=31, max_new_tokens=4 if DEVICE == "cpu" else 12)
    assert run(eng, specs) == run(ref, specs)
    graphs = eng.runner.decode_graphs
    assert graphs.replays > 0  # decode steps went through the padded path (5 running sequences: bucket 6)
    assert_no_leaks(eng)
    if DEVICE == "cuda":
        assert graphs.graphs  # and were captured


def test_cuda_graphs_need_the_triton_backend(model_dir_for):
    with pytest.raises(SoftPromptError, match="cuda_graphs"):
        Engine(model_dir_for("llama"), device=DEVICE, backend="torch", cuda_graphs=True)


@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_a_step_of_padding_rows_alone_touches_only_the_scratch_block(variant, model_dir_for):
    """What capture_all captures for every bucket at start-up, before any request: finite outputs, and of the whole
    pool only the scratch block's first slot written (requests' K/V, here a prefix's, are left as they were)."""
    eng = Engine(model_dir_for(variant), device=DEVICE, dtype="float32", backend="triton", cuda_graphs=True,
                 max_num_seqs=5)
    eng.add_prompt("task", build_prompt_tensor(eng.config.hidden_size, 20, seed=3), precompute=True)  # in the pool
    graphs, pool = eng.runner.decode_graphs, eng.pool
    assert graphs.buckets == [1, 2, 4, 5]
    scratch = pool.kv[:, :, graphs.scratch_block]
    for size in graphs.buckets:
        scratch.fill_(7.0)  # poison: the step must write slot 0 before it reads it
        before = pool.kv.clone()
        graphs.fill_padding(size)
        out = graphs._step(size)
        assert out.shape[0] == size and torch.isfinite(out).all()
        changed = (pool.kv != before).flatten(4).any(-1)  # [layers, 2, blocks, slots]
        assert changed[:, :, graphs.scratch_block, 0].all()
        changed[:, :, graphs.scratch_block, 0] = False
        assert not changed.any()
    kept = pool.kv.clone()
    kept[:, :, graphs.scratch_block] = 0
    assert kept.any()  # the prefix's K/V were there to be left alone
    if DEVICE == "cuda":
        assert set(graphs.graphs) == set(graphs.buckets)  # all captured when the engine started
