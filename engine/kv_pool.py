"""The paged KV pool: fixed-size blocks of keys and values for every layer, and a free list."""

from __future__ import annotations

import os

import torch

from .config import ModelConfig
from .errors import SoftPromptError
from .recurrent_state import RecurrentStates


class OutOfBlocks(Exception):
    """Raised internally when the pool cannot satisfy an allocation; the scheduler evicts or preempts."""


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def layer_kv_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """Each layer's (K/V heads, head width) in the pool: the config's, or each layer's own where they differ (Gemma
    4's full-attention layers). (A stand-in config without the per-layer fields has one shape.)"""
    heads = getattr(config, "layer_kv_heads", ()) or (config.num_kv_heads,) * config.num_layers
    widths = getattr(config, "layer_head_dims", ()) or (config.head_dim,) * config.num_layers
    return list(zip(heads, widths))


def kv_sources(config: ModelConfig) -> list[int]:
    """The layer whose K/V each layer's pool slots are: itself, or the earlier layer it attends with (Gemma 4's
    num_kv_shared_layers), whose tensor it shares."""
    return list(getattr(config, "kv_source_layers", ()) or range(config.num_layers))


class KVPool:
    """K and V of all layers. `kv[layer]` is that layer's [2, num_blocks, block_size, kv_heads, head_dim]; block ids
    index its dim 1. Where every layer has the same shape, `kv` is one tensor [layers, 2, num_blocks, ...]; where
    they differ, a list of each layer's own (no layer padded to another's shape), in which a layer that attends
    with an earlier layer's K/V has that layer's tensor (it writes the same values there). `states`: the recurrent
    states of a model whose layers keep one instead of K/V (Qwen3.5's linear attention, Mamba-2, LFM2's convolutions;
    their K/V tensors are empty), kept with blocks and freed with them; None for others.

    A model without attention (Mamba, Mamba-2) keeps no K/V at all: its blocks only account for sequences, each
    holding one block as long as the model's positions (its state lives with it), so `num_blocks` is the number
    of states (a running sequence's or a cached prompt's) the memory holds."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 state_slots: int = 8):
        """`state_slots`: the recurrent states allocated up front (more are added as sequences need them)."""
        if num_blocks < 1:
            raise SoftPromptError("the KV pool needs at least one block: raise kv_cache_bytes")
        self.attention_free = bool(getattr(config, "attention_free", False))
        self.block_size = config.max_positions if self.attention_free else block_size
        self.num_blocks = num_blocks
        self.layer_shapes = layer_kv_shapes(config)
        self.kv: torch.Tensor | list[torch.Tensor]
        sources = kv_sources(config)
        if len(set(self.layer_shapes)) == 1 and sources == list(range(config.num_layers)):
            heads, width = self.layer_shapes[0]
            self.kv = torch.zeros((config.num_layers, 2, num_blocks, block_size, heads, width), dtype=dtype,
                                  device=device)
        else:
            self.kv = []
            for layer, (source, (heads, width)) in enumerate(zip(sources, self.layer_shapes)):
                self.kv.append(self.kv[source] if source != layer else
                               torch.zeros((2, num_blocks, block_size, heads, width), dtype=dtype, device=device))
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        recurrent = getattr(config, "recurrent_state", None)
        self.states = None if recurrent is None else RecurrentStates(recurrent, dtype, device,
                                                                     min(state_slots, num_blocks))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(2 * block_size * heads * width * itemsize
                   for layer, (source, (heads, width)) in enumerate(zip(kv_sources(config), layer_kv_shapes(config)))
                   if source == layer)

    @classmethod
    def unit_bytes(cls, config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """What one block costs: its K/V, or for a model without attention one recurrent state."""
        if getattr(config, "attention_free", False):
            return RecurrentStates.bytes_per_state(config.recurrent_state, dtype)
        return cls.bytes_per_block(config, block_size, dtype)

    @classmethod
    def sized(
        cls,
        config: ModelConfig,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_bytes: int | None,
        kv_cache_fraction: float | None,
        state_slots: int = 8,
    ) -> KVPool:
        """A pool of `kv_cache_bytes`, or of `kv_cache_fraction` of the device's free memory. A model with
        recurrent states gets `state_slots` of them up front, taken out of the fraction (not out of
        an explicit kv_cache_bytes, which is the K/V's alone). A model without attention: the states are all there is,
        as many as the bytes hold (allocated as sequences need them)."""
        recurrent = getattr(config, "recurrent_state", None)
        state_bytes = (0 if recurrent is None or getattr(config, "attention_free", False)
                       else state_slots * RecurrentStates.bytes_per_state(recurrent, dtype))
        if kv_cache_bytes is None:
            fraction = 0.5 if kv_cache_fraction is None else kv_cache_fraction
            if not 0 < fraction <= 1:
                raise SoftPromptError(f"kv_cache_fraction must be in (0, 1], got {fraction}")
            budget = int(available_memory_bytes(device) * fraction)
            if device.type == "cpu":  # a CPU pool never needs more than a few thousand blocks for tiny models
                budget = min(budget, 1 << 30)
            kv_cache_bytes = budget - state_bytes
            if kv_cache_bytes <= 0:
                raise SoftPromptError(f"kv_cache_fraction={fraction} leaves {budget} bytes, less than the recurrent "
                                      f"states of {state_slots} sequences need ({state_bytes} bytes): raise it or "
                                      "lower max_num_seqs")
        if kv_cache_bytes <= 0:
            raise SoftPromptError(f"kv_cache_bytes must be positive, got {kv_cache_bytes}")
        return cls(config, kv_cache_bytes // cls.unit_bytes(config, block_size, dtype), block_size, dtype, device,
                   state_slots)

    def reserve_scratch_block(self) -> int:
        """Take one block out of use for good (`num_blocks` counts the usable ones): the padding rows of a
        static-shape step (a CUDA-graph decode step) write their K/V there. Call before anything is allocated."""
        if self.num_blocks < 2 or len(self._free) != self.num_blocks:
            raise SoftPromptError("the scratch block needs a pool of >= 2 blocks with none allocated yet")
        self.num_blocks -= 1
        return self._free.pop(0)  # the highest id: low ids keep being handed out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(n)
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        if self.states is not None:
            self.states.release(blocks)
        self._free.extend(reversed(blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
