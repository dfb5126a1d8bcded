"""What the families whose layers keep a recurrent state beside attention layers share (Qwen3.5, LFM2, Granite 4.0's
hybrids, Nemotron-H): the state's batch for a step, the packed scan, their plain attention, and a causal LM over a
backbone of `model.embed_tokens`, `model.layers`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..recurrent_state import RecurrentBatch
from .base import RotaryCausalLM
from .common import Attention, RMSNorm, apply_rotary, norm_heads
from .linear import Linear, linear
from .llama import _fuse


def recurrent_batch(attention: Attention, h: Tensor) -> RecurrentBatch:
    """The step's recurrent states, which the engine's attention implementations carry (`attention.recurrent`);
    without them (the reference path), the batch is one sequence from zero."""
    return getattr(attention, "recurrent", None) or RecurrentBatch.single(h.shape[0])


Recurrence = Callable[..., tuple[Tensor, Tensor]]  # (per-token inputs..., state) -> (outputs, new state)


def scan_packed(batch: RecurrentBatch, inputs: tuple[Tensor, ...], state: Tensor, step: Recurrence,
                chunked: Recurrence) -> tuple[Tensor, Tensor]:
    """Each sequence's tokens of the packed per-token `inputs` (each [T, ...]) through a recurrence from its state
    [B, ...]: one batched `step(*inputs, state)` where every sequence has one token (a decode step), else per sequence
    `step` for one token or `chunked(*its inputs, its state)` for several. Returns the outputs [T, ...] and the final
    states [B, ...]."""
    if batch.all_single:
        return step(*inputs, state)
    outs, states, start = [], [], 0
    for i, n in enumerate(batch.lengths):
        part = [x[start:start + n] for x in inputs]
        if n == 1:
            out, new = step(*part, state[i:i + 1])
            new = new[0]
        else:
            out, new = chunked(*part, state[i])
        outs.append(out)
        states.append(new)
        start += n
    return torch.cat(outs), torch.stack(states)


class HybridAttention(nn.Module):
    """q/k/v/o projections (fused at inference), per-head q/k RMSNorms where `qk_norm` (LFM2's), RoPE where the
    model hands rows (none: NoPE), grouped-query attention through the engine's `attention`."""

    def __init__(self, c: ModelConfig, qk_norm: bool = False, key_multiplier: float = 1.0):
        """`key_multiplier`: the keys scaled after their projection (Falcon-H1's). `c.head_gate`: each head's output
        times sigmoid(g_proj(x)), one gate per head (LFM3's)."""
        super().__init__()
        self.key_multiplier = key_multiplier
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        d = c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * d, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_heads * d, c.hidden_size, bias=c.o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(d, c.norm_eps)
            self.k_norm = RMSNorm(d, c.norm_eps)
        self.qk_norm = qk_norm
        self.g_proj = Linear(c.hidden_size, c.num_heads, bias=False) if c.head_gate else None
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.qkv_weight, self.qkv_bias = _fuse([self.q_proj, self.k_proj, self.v_proj], transposed)

    def forward(self, layer: int, x: Tensor, rope: tuple[Tensor, Tensor] | None, attention: Attention) -> Tensor:
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_weight is not None:
            qkv = linear(x, self.qkv_weight, self.qkv_bias)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qk = qkv[:, :(hq + hkv) * d].view(t, hq + hkv, d)
        if self.qk_norm:
            qk = norm_heads(qk, hq, self.q_norm, self.k_norm)
        if self.key_multiplier != 1.0:
            qk = torch.cat([qk[:, :hq], qk[:, hq:] * self.key_multiplier], dim=1)
        if rope is not None:
            qk = apply_rotary(qk, *rope)
        out = attention(layer, qk[:, :hq], qk[:, hq:], qkv[:, (hq + hkv) * d:].view(t, hkv, d))
        if self.g_proj is not None:
            out = out.view(t, hq, d) * torch.sigmoid(self.g_proj(x))[:, :, None]
        return self.o_proj(out.reshape(t, hq * d))


class HybridCausalLM(RotaryCausalLM):
    """A model over `backbone_class(config)` (its `embed_tokens`, layers and final norm), an untied or tied LM head;
    no fused layer-0 input (the QKV kernel computes no stateful layer). (No CUDA-graph decode either:
    `CausalLM.graph_capturable`.)"""

    key_prefix = "model."
    fused_layer0 = False
    backbone_class: type[nn.Module]

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def prepare_for_inference(self, device: torch.device) -> None:
        """Every layer's projections fused: each of its parts that can (attention, linear attention, the MLP or
        the experts: their `fuse`)."""
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            for part in layer.children():
                fuse = getattr(part, "fuse", None)
                if fuse is not None:
                    fuse(transposed)
        super().prepare_for_inference(device)
