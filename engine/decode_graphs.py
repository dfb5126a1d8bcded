"""Decode steps of the Triton backend at static shapes, replayed from CUDA graphs (one per batch-size bucket).

A decode step of B sequences is launch-bound at small B: a few dozen small kernels per layer. So a step whose
sequences all decode one token runs at the smallest bucket size Bp >= B, over device buffers whose shapes never
change:
- rows B..Bp-1 are padding: token 0 at position 0, writing its K/V into the pool's scratch block (never handed
  out), attending only to that one key; their outputs are dropped;
- the groups of sequences that share a prefix (see kernels/decode_attention.py) are the step's G real groups, then
  one group of the padding rows, then empty groups up to Bp;
- block tables are as wide as the longest possible sequence (the model's positions), and a step writes only the
  part it uses (the lengths bound every read).
Each step's metadata is copied into the buffers, then the bucket's graph is replayed. A step that continues the
previous one (the same sequences, in the same order, each one token further) only updates what moved: the new
token ids and slots, positions and own lengths one up, and the own-table entries of sequences that entered a new
block; the grouping and the prefix tables stay. On CUDA every bucket's graph
is captured when the engine starts (`capture_all`, as vLLM does: no request waits for a capture or a kernel
compile), each over a step of padding rows alone; elsewhere (the CPU under the Triton interpreter, for the tests)
the same padded step runs eagerly, so the padding is tested without a GPU.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention_torch import SeqSlice, new_token_slots
from .attention_triton import TritonPagedAttention, import_kernels
from .indices import index_tensor
from .kv_pool import KVPool
from .models import CausalLM
from .models.base import Layer0Input
from .sequence import Sequence

# (token ids, positions) -> layer 0's input from a fused kernel, or the token embeddings (a model whose embedding
# step no fused kernel computes takes them as `embeds`)
Layer0Fn = Callable[[Tensor, Tensor], Layer0Input | Tensor]


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (vLLM's scheme): at most 7 padding rows above 8."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs + 8, 8))
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


@dataclass
class _StaticStep:
    """Device buffers of the largest bucket; a bucket of size b uses their first b rows (views)."""

    ids: Tensor  # [B] int64
    positions: Tensor  # [B] int64
    slots: Tensor  # [B] int64, in the sequences' order
    perm: Tensor  # [B] int64: row i of the grouped order is sequence perm[i]
    inverse: Tensor  # [B] int64
    group_starts: Tensor  # [B + 1] int32
    group_tables: Tensor  # [B, W] int32
    group_lens: Tensor  # [B] int32
    own_tables: Tensor  # [B, W] int32, in the grouped order
    own_lens: Tensor  # [B] int32


@dataclass
class _LastStep:
    """What the buffers hold for the sequences of the last filled step (checked by `continues`)."""

    seqs: list[Sequence]
    blocks: list[list[int]]  # each sequence's own block list (a preempted sequence gets a new one)
    next_computed: list[int]  # each sequence's num_computed once that step's token is in the pool
    rows: list[int]  # each sequence's row in the grouped order (own tables, own lengths)


class DecodeGraphs:
    def __init__(self, model: CausalLM, pool: KVPool, layer0: Layer0Fn, max_num_seqs: int, device: torch.device):
        self.model = model
        self.pool = pool
        self.layer0 = layer0
        self.device = device
        self.capture = device.type == "cuda"
        self.group_by_prefix = import_kernels()[0].group_by_prefix
        self.buckets = bucket_sizes(max_num_seqs)
        self.scratch_block = pool.reserve_scratch_block()
        c = model.config
        self.width = pool.blocks_for(c.max_positions)
        b, w = self.buckets[-1], self.width

        def buf(*shape: int, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        i32 = torch.int32
        self.buffers = _StaticStep(buf(b), buf(b), buf(b), buf(b), buf(b), buf(b + 1, dtype=i32),
                                   buf(b, w, dtype=i32), buf(b, dtype=i32), buf(b, w, dtype=i32), buf(b, dtype=i32))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0  # steps served by a graph (or, without CUDA, by the padded eager step)
        self.incremental_fills = 0  # of which the metadata was updated from the step before
        self._last: _LastStep | None = None

    def applies(self, slices: list[SeqSlice]) -> bool:
        return 0 < len(slices) <= self.buckets[-1] and all(s.num_queries == 1 for s in slices)

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def continues(self, seqs: list[Sequence], num_tokens: list[int]) -> bool:
        """Whether this step is the last filled one's sequences, in its order, each one token further (only its
        own K/V since written, no preemption in between): then `run_next` updates the buffers in place."""
        last = self._last
        return (
            last is not None
            and seqs == last.seqs  # identity (a Sequence compares by identity)
            and num_tokens.count(1) == len(num_tokens)
            and [s.num_computed for s in seqs] == last.next_computed
            and all(map(operator.is_, [s.blocks for s in seqs], last.blocks))
        )

    def run(self, ids: list[int], positions: list[int], slices: list[SeqSlice],
            seqs: list[Sequence] | None = None) -> Tensor:
        """Final hidden states [len(slices), hidden] of a decode step (one new token per sequence); `seqs`, the
        sequences of the slices, lets the next step update the metadata in place (see `continues`)."""
        size = self.bucket_for(len(slices))
        rows = self._fill(ids, positions, slices, size)
        self._last = None
        if seqs is not None:
            self._last = _LastStep(list(seqs), [s.blocks for s in seqs], [s.num_computed + 1 for s in seqs], rows)
        return self._replay(size, len(slices))

    def run_next(self, seqs: list[Sequence]) -> Tensor:
        """`run` for a step that `continues` the last one."""
        self._fill_next(seqs)
        return self._replay(self.bucket_for(len(seqs)), len(seqs))

    def _replay(self, size: int, n: int) -> Tensor:
        if not self.capture:
            out = self._step(size)
        else:
            if size not in self.graphs:  # only if capture_all was not called
                self._capture(size)
            graph, out = self.graphs[size]
            graph.replay()
        self.replays += 1
        return out[:n]

    def capture_all(self) -> None:
        """Capture every bucket's graph now (CUDA only), largest first so the smaller ones reuse its memory."""
        if not self.capture:
            return
        for size in reversed(self.buckets):
            if size not in self.graphs:
                self.fill_padding(size)
                self._capture(size)

    def fill_padding(self, size: int) -> None:
        """Metadata of a step of `size` padding rows and no sequence: what a capture runs (its K/V go to the
        scratch block alone)."""
        self._fill([], [], [], size)
        self._last = None

    def _fill_next(self, seqs: list[Sequence]) -> None:
        """The buffers one token further for the last step's sequences (what `_fill` would write, for the entries
        a step reads: block-table entries past a sequence's length may differ)."""
        last, b, bs = self._last, self.buffers, self.pool.block_size
        n, computed = len(seqs), last.next_computed
        b.ids[:n].copy_(index_tensor([s.token_slice(i, 1)[0] for s, i in zip(seqs, computed)]))
        b.slots[:n].copy_(index_tensor([blocks[i // bs] * bs + i % bs for blocks, i in zip(last.blocks, computed)]))
        b.positions[:n] += 1  # the padding rows after them stay at position 0, length 1
        b.own_lens[:n] += 1  # (the grouped order puts the n sequences first too)
        entering = [j for j, i in enumerate(computed) if i % bs == 0]  # their new token starts an own block
        if entering:
            rows = index_tensor([last.rows[j] for j in entering])
            cols = index_tensor([computed[j] // bs for j in entering])
            blocks = index_tensor([last.blocks[j][computed[j] // bs] for j in entering], dtype=torch.int32)
            b.own_tables.index_put_((rows.to(self.device), cols.to(self.device)), blocks.to(self.device))
        last.next_computed = [i + 1 for i in computed]
        self.incremental_fills += 1

    def _fill(self, ids: list[int], positions: list[int], slices: list[SeqSlice], size: int) -> list[int]:
        """Copy one step's metadata into the first `size` rows of the buffers (padding rows and groups included);
        returns each sequence's row in the grouped order."""
        n, pad = len(slices), size - len(slices)
        perm, starts = self.group_by_prefix([tuple(s.prefix_blocks) for s in slices])
        num_groups = len(starts) - 1
        firsts = [slices[perm[g]] for g in starts[:-1]]
        perm = perm + list(range(n, size))
        inverse = [0] * size
        for row, seq in enumerate(perm):
            inverse[seq] = row
        starts = starts + [size] * (size + 1 - len(starts))  # the padding group [n, size), then empty groups
        b = self.buffers  # each copy_ below is one host-to-device copy from a host tensor
        b.ids[:size].copy_(index_tensor(ids + [0] * pad))
        b.positions[:size].copy_(index_tensor(positions + [0] * pad))
        b.slots[:n].copy_(new_token_slots(slices, self.pool.block_size))
        b.slots[n:size].fill_(self.scratch_block * self.pool.block_size)
        b.perm[:size].copy_(index_tensor(perm))
        b.inverse[:size].copy_(index_tensor(inverse))
        b.group_starts[:size + 1].copy_(index_tensor(starts, dtype=torch.int32))
        b.group_lens[:size].copy_(index_tensor([s.prefix_len for s in firsts] + [0] * (size - num_groups),
                                               dtype=torch.int32))
        b.own_lens[:size].copy_(index_tensor([slices[i].own_start + 1 for i in perm[:n]] + [1] * pad,
                                             dtype=torch.int32))
        _write_rows(b.group_tables, [s.prefix_blocks for s in firsts])
        _write_rows(b.own_tables, [slices[i].own_blocks for i in perm[:n]] + [[self.scratch_block]] * pad)
        return inverse[:n]

    def _step(self, size: int) -> Tensor:
        """The model over the first `size` rows of the buffers: only device work, no value read back."""
        b, c = self.buffers, self.model.config
        decode_args = dict(group_starts=b.group_starts[:size + 1], group_prefix_block_tables=b.group_tables[:size],
                           group_prefix_lens=b.group_lens[:size], own_block_tables=b.own_tables[:size],
                           own_lens=b.own_lens[:size])
        positions = b.positions[:size]
        attention = TritonPagedAttention.static_decode(
            self.pool, c.attention_scale, self.model.alibi, positions, getattr(self.model, "rope_tables", None),
            b.slots[:size], b.perm[:size], b.inverse[:size], decode_args, c.layer_windows, c.attention_softcap,
            self.model.attention_sinks)
        first = self.layer0(b.ids[:size], positions)
        if isinstance(first, Tensor):
            return self.model(first, positions, attention)
        return self.model(None, positions, attention, first)

    def _capture(self, size: int) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: compiles the kernels (the K/V it writes are the step's own)
            self._step(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self._step(size)
        self.graphs[size] = (graph, out)


def _write_rows(table: Tensor, rows: list[list[int]]) -> None:
    """rows[i] into table[i, :len(rows[i])] in one copy (entries past a row's length are left as they were)."""
    width = max((len(r) for r in rows), default=0)
    if not rows or not width:
        return
    zeros = [0] * width
    flat = list(itertools.chain.from_iterable(r + zeros[len(r):] for r in rows))
    table[:len(rows), :width].copy_(index_tensor(flat, dtype=torch.int32).view(len(rows), width))
