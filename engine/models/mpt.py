"""MPT (`mpt`: MosaicML's MPT-7B / 30B): ALiBi (MPT's slopes), bias-free LayerNorms and projections, q/k/v fused in
`Wqkv` (optionally clamped to `clip_qkv`), a GELU MLP four times as wide, serial residuals, a tied LM head."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input, Layer0Norms
from .common import Attention, activation
from .linear import Linear


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> Tensor:
    """MPT's ALiBi slopes: 2^-(i * max / n2) for the next power of two n2 >= num_heads, every other one first where
    num_heads is not a power of two (as transformers builds them, with the default maximum it always uses)."""
    n2 = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n2 + 1, dtype=torch.int64).float() * (alibi_bias_max / n2))
    if n2 != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def _layer_norm(c: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=False)


class MptAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.Wqkv = Linear(c.hidden_size, 3 * c.hidden_size, bias=False)
        self.out_proj = Linear(c.hidden_size, c.hidden_size, bias=False)


class MptMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(activation("gelu", self.up_proj(x)))


class MptBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.norm_1 = _layer_norm(c)
        self.attn = MptAttention(c)
        self.norm_2 = _layer_norm(c)
        self.ffn = MptMLP(c)


class MptBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(MptBlock(c) for _ in range(c.num_layers))
        self.norm_f = _layer_norm(c)


class MptForCausalLM(CausalLM):
    key_prefix = "transformer."

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.transformer = MptBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def init_buffers(self, device: torch.device) -> None:
        self.register_buffer("alibi_slopes", mpt_alibi_slopes(self.config.num_heads).to(device), persistent=False)

    def layer0_norms(self) -> Layer0Norms:
        block = self.transformer.blocks[0]
        ln = block.norm_1
        return Layer0Norms(None, None, (ln.weight, None, ln.eps, "layer"), (block.attn.Wqkv.weight, None))

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        h = embeds if layer0 is None else layer0.residual
        for i, block in enumerate(self.transformer.blocks):
            if i == 0 and layer0 is not None:
                qkv = layer0.qkv if layer0.qkv is not None else block.attn.Wqkv(layer0.normed)
            else:
                qkv = block.attn.Wqkv(block.norm_1(h))
            if c.clip_qkv:
                qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
            q, k, v = qkv.view(t, 3, c.num_heads, c.head_dim).unbind(1)
            h = block.attn.out_proj(attention(i, q, k, v).reshape(t, c.hidden_size)) + h
            h = block.ffn(block.norm_2(h)) + h
        return self.transformer.norm_f(h)
