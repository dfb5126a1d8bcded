"""BLOOM: ALiBi, embedding LayerNorm, fused qkv laid out per head as [q, k, v]."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input, Layer0Norms
from .common import Attention, activation, alibi_slopes
from .linear import Linear


class BloomAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.query_key_value = Linear(c.hidden_size, 3 * c.hidden_size)
        self.dense = Linear(c.hidden_size, c.hidden_size)


class BloomMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(c.hidden_size, c.intermediate_size)
        self.dense_4h_to_h = Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(activation("bloom_gelu", self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.self_attention = BloomAttention(c)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = BloomMLP(c)


class BloomBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.h = nn.ModuleList(BloomBlock(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class BloomForCausalLM(CausalLM):
    key_prefix = "transformer."

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.transformer = BloomBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def init_buffers(self, device: torch.device) -> None:
        self.register_buffer("alibi_slopes", alibi_slopes(self.config.num_heads).to(device), persistent=False)

    def layer0_norms(self) -> Layer0Norms:
        block = self.transformer.h[0]
        emb, ln = self.transformer.word_embeddings_layernorm, block.input_layernorm
        qkv = block.self_attention.query_key_value
        return Layer0Norms(None, (emb.weight, emb.bias, emb.eps), (ln.weight, ln.bias, ln.eps, "layer"),
                           (qkv.weight, qkv.bias), self.config.residual_post_norm)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        if layer0 is None:
            h = self.transformer.word_embeddings_layernorm(embeds)  # applied to soft-prompt rows too (as in PEFT)
        else:
            h = layer0.residual  # with layer0.qkv: the normed input where c.residual_post_norm (residual_is_normed)
        for i, block in enumerate(self.transformer.h):
            if i == 0 and layer0 is not None and layer0.qkv is not None:
                residual, qkv = h, layer0.qkv
            else:
                x = layer0.normed if (i == 0 and layer0 is not None) else block.input_layernorm(h)
                residual = x if c.residual_post_norm else h
                qkv = block.self_attention.query_key_value(x)
            qkv = qkv.view(t, c.num_heads, 3, c.head_dim)
            out = attention(i, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
            h = residual + block.self_attention.dense(out.reshape(t, c.hidden_size))
            x = block.post_attention_layernorm(h)
            residual = x if c.residual_post_norm else h
            h = residual + block.mlp(x)
        return self.transformer.ln_f(h)
