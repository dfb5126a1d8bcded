"""Llama family: Llama 2/3, Mistral, Qwen2 (RoPE, GQA, RMSNorm, SwiGLU)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM
from .common import Attention, RMSNorm, activation, apply_rotary, rope_inv_freq, rotary_cos_sin


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = c.hidden_act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(activation(self.act, self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class LlamaBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class LlamaForCausalLM(CausalLM):
    key_prefix = "model."
    ignored_key_suffixes = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_scaling = 1.0

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def init_buffers(self, device: torch.device) -> None:
        inv_freq, self.rope_scaling = rope_inv_freq(self.config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, embeds: Tensor, positions: Tensor, attention: Attention) -> Tensor:
        c = self.config
        t = embeds.shape[0]
        cos, sin = rotary_cos_sin(self.inv_freq, self.rope_scaling, positions, embeds.dtype)
        h = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            a = layer.self_attn
            q = apply_rotary(a.q_proj(x).view(t, c.num_heads, c.head_dim), cos, sin)
            k = apply_rotary(a.k_proj(x).view(t, c.num_kv_heads, c.head_dim), cos, sin)
            v = a.v_proj(x).view(t, c.num_kv_heads, c.head_dim)
            h = h + a.o_proj(attention(i, q, k, v).reshape(t, c.num_heads * c.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.norm(h)
