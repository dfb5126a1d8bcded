"""The recurrent state of layers that keep one instead of K/V (Qwen3.5's Gated DeltaNet, LFM2's short convolutions):
one per sequence, not one per token.

For each such layer a sequence's past is its convolution's last `conv_kernel - 1` inputs and, where the layer has
one, a state of fixed shape (the delta rule's matrices). As a prompt's K/V are, a prompt's state after its rows is
computed once and kept with its prefix; each request of the task starts from a copy of it, so a request still pays
only for its own tokens.

A state lives with a block of the KV pool: a prefix's with its first block, a sequence's with its first own block
(the block cache, which shares own blocks between sequences, is off for these models). Freeing the block frees
the state (`KVPool.free`), so preemption, aborts and prefix eviction need no bookkeeping of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import RecurrentStateConfig


class RecurrentStates:
    """Every stateful layer's states in slots: `conv[layer]` [slots, channels, kernel - 1] in the model dtype (as
    transformers caches it), `ssm[layer]` [slots, *ssm_shape] in fp32 (none where the layers have no such state). A
    block id maps to a slot while the block holds a state; the slots grow (doubling) as sequences need them."""

    def __init__(self, config: RecurrentStateConfig, dtype: torch.dtype, device: torch.device, capacity: int = 8):
        self.config = config
        self.dtype = dtype
        self.device = device
        self.conv: dict[int, Tensor] = {}
        self.ssm: dict[int, Tensor] = {}
        self.capacity = 0
        self._slot_of: dict[int, int] = {}
        self._free: list[int] = []
        self._grow(max(1, capacity))

    def _grow(self, capacity: int) -> None:
        c = self.config
        for layer in c.layers:
            conv = torch.zeros((capacity, c.conv_channels, c.conv_kernel - 1), dtype=self.dtype, device=self.device)
            if self.capacity:
                conv[:self.capacity] = self.conv[layer]
            self.conv[layer] = conv
            if c.ssm_shape:
                ssm = torch.zeros((capacity, *c.ssm_shape), dtype=torch.float32, device=self.device)
                if self.capacity:
                    ssm[:self.capacity] = self.ssm[layer]
                self.ssm[layer] = ssm
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))  # pop() hands out low slots first
        self.capacity = capacity

    @staticmethod
    def bytes_per_state(config: RecurrentStateConfig, dtype: torch.dtype) -> int:
        """One sequence's state over all layers (the conv states in `dtype`, the others in fp32)."""
        conv = config.conv_channels * (config.conv_kernel - 1) * torch.empty((), dtype=dtype).element_size()
        ssm = 4 * math.prod(config.ssm_shape) if config.ssm_shape else 0
        return len(config.layers) * (conv + ssm)

    @property
    def num_held(self) -> int:
        return len(self._slot_of)

    def slot(self, block: int) -> int:
        """The slot of the state kept with `block`, taken now if it has none."""
        slot = self._slot_of.get(block)
        if slot is None:
            if not self._free:
                self._grow(2 * self.capacity)
            slot = self._slot_of[block] = self._free.pop()
        return slot

    def held_slot(self, block: int) -> int:
        """The slot of a state that must exist (a prefix's, or a sequence's own after its first tokens)."""
        slot = self._slot_of.get(block)
        if slot is None:
            raise RuntimeError(f"no recurrent state is kept with block {block}")
        return slot

    def release(self, blocks: list[int]) -> None:
        """Forget the states kept with these blocks (they are being freed)."""
        for block in blocks:
            slot = self._slot_of.pop(block, None)
            if slot is not None:
                self._free.append(slot)


@dataclass(frozen=True)
class RecurrentSegment:
    """One sequence's part of a packed batch for the layers that keep a recurrent state."""

    num_tokens: int
    source: int | None  # the slot its state starts from; None: a zero state (no prompt, or a prompt's own rows)
    target: int | None  # the slot its state ends in; None: dropped (the reference path)


class RecurrentBatch:
    """What a stateful layer reads and writes for one packed batch: the sequences' token counts, their
    starting states (`initial`) and where their final states go (`store`)."""

    def __init__(self, segments: list[RecurrentSegment], states: RecurrentStates | None = None):
        self.segments = segments
        self.states = states
        self.lengths = [s.num_tokens for s in segments]
        self.all_single = all(n == 1 for n in self.lengths)
        if states is not None:
            device = states.device
            self._sources = torch.tensor([-1 if s.source is None else s.source for s in segments], device=device)
            self._targets = torch.tensor([s.target for s in segments], device=device)
            self._fresh = self._sources < 0
            self._any_fresh = any(s.source is None for s in segments)

    @classmethod
    def single(cls, num_tokens: int) -> RecurrentBatch:
        """One sequence from a zero state, its final state dropped (the reference path)."""
        return cls([RecurrentSegment(num_tokens, None, None)])

    @classmethod
    def of_slices(cls, slices: list, states: RecurrentStates) -> RecurrentBatch:
        """The batch of a model-runner step (`SeqSlice`s): a sequence continues its own state where some of its
        tokens are computed already, else starts from its prefix's (or from zero without a prompt); its state
        ends with its first own block. A prompt's own computation (no prefix, the prompt's blocks as own blocks)
        starts from zero and ends with the prompt's first block."""
        segments = []
        for s in slices:
            if s.own_start > 0:
                source: int | None = states.held_slot(s.own_blocks[0])
            elif s.prefix_len > 0:
                source = states.held_slot(s.prefix_blocks[0])
            else:
                source = None
            segments.append(RecurrentSegment(s.num_queries, source, states.slot(s.own_blocks[0])))
        return cls(segments, states)

    def initial(self, layer: int, conv_shape: tuple[int, ...], ssm_shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Each sequence's starting conv state [B, channels, kernel - 1] and other state [B, *ssm_shape] (None where
        `ssm_shape` is ())."""
        b = len(self.segments)
        if self.states is None:
            return (torch.zeros((b, *conv_shape), dtype=dtype, device=device),
                    torch.zeros((b, *ssm_shape), dtype=torch.float32, device=device) if ssm_shape else None)
        rows = self._sources.clamp(min=0)
        conv = self.states.conv[layer].index_select(0, rows)
        ssm = self.states.ssm[layer].index_select(0, rows) if ssm_shape else None
        if self._any_fresh:
            conv[self._fresh] = 0
            if ssm is not None:
                ssm[self._fresh] = 0
        return conv, ssm

    def store(self, layer: int, conv: Tensor, ssm: Tensor | None = None) -> None:
        """Keep each sequence's final states (nothing on the reference path)."""
        if self.states is not None:
            self.states.conv[layer].index_copy_(0, self._targets, conv.to(self.states.dtype))
            if ssm is not None:
                self.states.ssm[layer].index_copy_(0, self._targets, ssm.float())
