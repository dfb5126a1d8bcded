"""Decode steps at padded static shapes (engine/decode_graphs.py), the shapes a CUDA graph replays.

On the CPU the padded steps run eagerly under the Triton interpreter: padding rows, the padding group and empty
groups, the scratch block and the static buffers are all exercised, only the capture is not (tests/test_cuda.py
runs the captured graphs on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.decode_graphs import DecodeGraphs, bucket_sizes
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
    # blocks of 8: decode steps that continue the last one (metadata updated in place) cross block boundaries
    eng = Engine(d, device=DEVICE, dtype="float32", backend="triton", cuda_graphs=True, max_num_seqs=6, block_size=8)
    names = register_tasks([ref, eng], 2) + [None]  # two groups with a prefix, one without
    specs = make_requests(names, 5 if DEVICE == "cpu" else 40, seed=31, max_new_tokens=6 if DEVICE == "cpu" else 12)
    assert run(eng, specs) == run(ref, specs)
    graphs = eng.runner.decode_graphs
    assert graphs.replays > 0  # decode steps went through the padded path (5 running sequences: bucket 6)
    assert graphs.incremental_fills > 0
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


def _read_entries(graphs: DecodeGraphs, size: int) -> dict[str, list]:
    """What a step of `size` rows reads of the buffers: block-table entries up to each row's length only."""
    b, bs = graphs.buffers, graphs.pool.block_size
    starts = b.group_starts[:size + 1].tolist()
    num_groups = sum(1 for lo, hi in zip(starts, starts[1:]) if hi > lo)
    group_lens, own_lens = b.group_lens[:size].tolist(), b.own_lens[:size].tolist()
    return {
        **{name: getattr(b, name)[:size].tolist() for name in ("ids", "positions", "slots", "perm", "inverse")},
        "group_starts": starts, "group_lens": group_lens[:num_groups], "own_lens": own_lens,
        "group_tables": [b.group_tables[g, :-(-group_lens[g] // bs)].tolist() for g in range(num_groups)],
        "own_tables": [b.own_tables[r, :-(-own_lens[r] // bs)].tolist() for r in range(size)],
    }


def test_a_step_that_continues_the_last_updates_the_metadata_as_a_full_fill_would(model_dir_for):
    """Decode steps of the same sequences one token further update the buffers in place (`_fill_next`). Over a
    run with block boundaries crossed every 4 tokens, requests finishing and arriving, one aborted and a pool small
    enough to preempt, every in-place update must leave what `_fill` writes from scratch (the model's step is
    stubbed: this checks metadata only, and runs on the torch backend without the Triton interpreter)."""
    eng = Engine(model_dir_for("llama"), device="cpu", dtype="float32", backend="torch", block_size=4,
                 max_num_seqs=6, kv_cache_bytes=KVPool.bytes_per_block(
                     Engine(model_dir_for("llama"), backend="reference").config, 4, torch.float32) * 40)
    graphs = DecodeGraphs(eng.runner.model, eng.pool, None, 6, torch.device("cpu"))
    graphs._step = lambda size: torch.zeros(size, eng.config.hidden_size)
    eng.runner.decode_graphs = graphs
    checked = []
    fill_next = graphs._fill_next

    def checked_fill_next(seqs):
        fill_next(seqs)
        size = graphs.bucket_for(len(seqs))
        updated, kept = _read_entries(graphs, size), graphs.buffers.__dict__.copy()
        graphs.buffers = type(graphs.buffers)(**{k: v.clone() for k, v in kept.items()})
        ids, positions, slices = eng.runner.pack(seqs, [1] * len(seqs))
        assert graphs._fill(ids, positions, slices, size) == graphs._last.rows
        assert updated == _read_entries(graphs, size)
        graphs.buffers = type(graphs.buffers)(**kept)  # the step runs on the updated buffers
        checked.append(len(seqs))

    graphs._fill_next = checked_fill_next
    names = register_tasks([eng], 3) + [None]
    g = torch.Generator().manual_seed(5)

    def add(i: int) -> str:
        ids = torch.randint(4, 512, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(max_new_tokens=int(torch.randint(3, 30, (1,), generator=g)), ignore_eos=True)
        return eng.add_request(Request(prompt=names[i % len(names)], input_ids=ids, sampling=params))

    for i in range(6):
        add(i)
    for step in range(400):
        if step % 6 == 0 and step < 150:
            add(6 + step)
        if step == 30:
            eng.abort(eng.scheduler.running[1].request_id)
        last = graphs._last
        if last is not None and graphs.continues(last.seqs, [1] * len(last.seqs)):
            seq = last.seqs[-1]  # preempted and recomputed to the same length: new blocks, so not a continuation
            seq.blocks = list(seq.blocks)
            assert not graphs.continues(last.seqs, [1] * len(last.seqs))
            seq.blocks = last.blocks[-1]
        eng.step()
        if step >= 150 and not eng.has_unfinished_requests():
            break
    assert not eng.has_unfinished_requests()

    assert graphs.incremental_fills == len(checked) > 50 and max(checked) == 6
    assert eng.scheduler.num_preemptions > 0
    assert graphs.replays > graphs.incremental_fills  # steps that did not continue the last were filled anew
    assert_no_leaks(eng)
