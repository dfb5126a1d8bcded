"""Paged two-segment attention with the Triton kernels (`backend="triton"`).

Same metadata as the torch backend (`SeqSlice` per sequence); K/V are read in place from the pool:
- RoPE (Llama family) and the K/V write into the pool: one fused kernel (`kernels/rope_kv_write.py`);
- steps where every sequence decodes one token: the shared-prefix cascade kernel, each task's prefix read once
  per group of its sequences (`kernels/decode_attention.py`);
- any other step: varlen prefill attention over [prefix ; own] (`kernels/prefill_attention.py`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .attention_torch import SeqSlice, new_token_slots, pad_block_tables
from .indices import index_tensor
from .errors import SoftPromptError
from .kv_pool import KVPool


def import_kernels():
    """The kernel modules; on the CPU only under the Triton interpreter (TRITON_INTERPRET=1, slow: for tests)."""
    try:
        from softprompt.kernels import decode_attention, prefill_attention, rope_kv_write
    except ImportError as exc:
        raise SoftPromptError(f"backend='triton' needs the triton package: {exc}") from exc
    return decode_attention, prefill_attention, rope_kv_write


def check_triton_device(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SoftPromptError(
            "backend='triton' runs on CUDA; on the CPU it needs the Triton interpreter (set TRITON_INTERPRET=1 "
            "before starting Python; slow, meant for tests) — use backend='torch' on the CPU"
        )
    import_kernels()


def _int32_table(rows: list[list[int]], device: torch.device) -> Tensor:
    return pad_block_tables(rows, torch.int32, device)


class TritonPagedAttention:
    """Callable per layer, like TorchPagedAttention; `applies_rope` tells the model to hand over q/k unrotated."""

    def __init__(self, pool: KVPool, seqs: list[SeqSlice], scale: float, alibi_slopes: Tensor | None,
                 positions: Tensor, rope_tables: tuple[Tensor, Tensor] | None, device: torch.device,
                 windows: tuple[int, ...] = (), softcap: float = 0.0, sinks: Tensor | None = None):
        """`windows[layer]`: that layer's sliding window (queries see keys less than that many positions back);
        `softcap` > 0: attention scores become softcap * tanh(score / softcap) (Gemma 2); `sinks[layer]` [Hq]: that
        layer's attention-sink logits (gpt-oss)."""
        self._common(pool, scale, alibi_slopes, positions, rope_tables, windows, softcap, sinks)
        self.slot_mapping = new_token_slots(seqs, pool.block_size).to(device)
        self.decode = all(s.num_queries == 1 for s in seqs)
        self.prefix_block_m: int | None = None
        if self.decode:
            perm, starts = self.decode_mod.group_by_prefix([tuple(s.prefix_blocks) for s in seqs])
            firsts = [seqs[perm[g]] for g in starts[:-1]]
            self.perm = index_tensor(perm, device)
            self.inverse = torch.argsort(self.perm)
            self.decode_args = dict(
                group_starts=index_tensor(starts, device, torch.int32),
                group_prefix_block_tables=_int32_table([s.prefix_blocks for s in firsts], device),
                group_prefix_lens=index_tensor([s.prefix_len for s in firsts], device, torch.int32),
                own_block_tables=_int32_table([seqs[i].own_blocks for i in perm], device),
                own_lens=index_tensor([seqs[i].own_start + 1 for i in perm], device, torch.int32),
            )
        else:
            counts = index_tensor([0] + [s.num_queries for s in seqs])
            self.prefill_args = dict(
                cu_seqlens_q=counts.cumsum(0).to(device=device, dtype=torch.int32),
                prefix_block_tables=_int32_table([s.prefix_blocks for s in seqs], device),
                prefix_lens=index_tensor([s.prefix_len for s in seqs], device, torch.int32),
                own_block_tables=_int32_table([s.own_blocks for s in seqs], device),
                own_starts=index_tensor([s.own_start for s in seqs], device, torch.int32),
            )

    def _common(self, pool: KVPool, scale: float, alibi_slopes: Tensor | None, positions: Tensor,
                rope_tables: tuple[Tensor, Tensor] | None, windows: tuple[int, ...], softcap: float,
                sinks: Tensor | None = None) -> None:
        self.decode_mod, self.prefill_mod, self.rope_mod = import_kernels()
        self.windows = windows
        self.softcap = softcap
        self.sinks = None if sinks is None else sinks.float().contiguous()
        self.pool = pool
        self.scale = scale
        self.alibi = None if alibi_slopes is None else alibi_slopes.float().contiguous()
        self.positions = positions
        self.rope_tables = rope_tables
        self.applies_rope = rope_tables is not None

    @classmethod
    def static_decode(cls, pool: KVPool, scale: float, alibi_slopes: Tensor | None, positions: Tensor,
                      rope_tables: tuple[Tensor, Tensor] | None, slot_mapping: Tensor, perm: Tensor, inverse: Tensor,
                      decode_args: dict[str, Tensor], windows: tuple[int, ...] = (),
                      softcap: float = 0.0, sinks: Tensor | None = None) -> TritonPagedAttention:
        """A decode step over metadata already on the device, in tensors whose shapes do not change from step to
        step (see decode_graphs.py): nothing is built from Python values, so the step can be captured in a CUDA
        graph. The groups may include empty ones, so prefix programs use full 64-row query tiles."""
        self = cls.__new__(cls)
        self._common(pool, scale, alibi_slopes, positions, rope_tables, windows, softcap, sinks)
        self.slot_mapping, self.perm, self.inverse, self.decode_args = slot_mapping, perm, inverse, decode_args
        self.decode = True
        self.prefix_block_m = 64
        return self

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.pool.kv[layer][0], self.pool.kv[layer][1]
        q = self.rope_mod.rope_kv_write(q, k, v, self.positions, self.rope_tables, k_cache, v_cache,
                                        self.slot_mapping)
        window = self.windows[layer] if layer < len(self.windows) else 0
        sinks = None if self.sinks is None else self.sinks[layer]
        if self.decode:
            out = self.decode_mod.decode_attention(q.index_select(0, self.perm), k_cache, v_cache,
                                                   scale=self.scale, alibi_slopes=self.alibi, window=window,
                                                   softcap=self.softcap, sinks=sinks,
                                                   prefix_block_m=self.prefix_block_m, **self.decode_args)
            return out.index_select(0, self.inverse)
        return self.prefill_mod.prefill_attention(q, k_cache, v_cache, scale=self.scale, alibi_slopes=self.alibi,
                                                  window=window, softcap=self.softcap, sinks=sinks,
                                                  **self.prefill_args)
