"""GLM (`glm`: glm-4-9b-chat-hf) and GLM-4 (`glm4`: GLM-4-9B/32B-0414, GLM-Z1): the Llama layout with q/k/v biases,
a fused `gate_up_proj`, and RoPE over the first `partial_rotary_factor` of each head (half) in interleaved pairs
(2i, 2i+1). GLM-4 adds a norm after attention and after the MLP (`post_self_attn_layernorm`, `post_mlp_layernorm`),
each before its residual add.

As for GPT-J, each head's q/k channels are permuted at load (`ModelConfig.key_channel_order`) so that rotate-half
RoPE turns the interleaved pairs; the q/k biases are permuted alike."""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input
from .common import Attention, RMSNorm, apply_rotary
from .linear import linear
from .llama import LlamaForCausalLM, LlamaLayer


class GlmLayer(LlamaLayer):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__(c, index)
        if c.sandwich_norms:
            self.post_self_attn_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
            self.post_mlp_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class GlmBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(GlmLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class GlmForCausalLM(LlamaForCausalLM):
    backbone_class = GlmBackbone  # (gate_up_proj split and q/k rows permuted at load by the Llama base)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        if not c.sandwich_norms:  # GLM: Llama's forward
            return super().forward(embeds, positions, attention, layer0)
        t = positions.shape[0]
        rope = self.rope_rows(attention, positions)
        qk_width = (c.num_heads + c.num_kv_heads) * c.head_dim
        h = embeds if layer0 is None else layer0.residual
        for i, layer in enumerate(self.model.layers):
            a = layer.self_attn
            if i == 0 and layer0 is not None and layer0.qkv is not None:
                qkv = layer0.qkv
            else:
                x = layer0.normed if (i == 0 and layer0 is not None) else layer.input_layernorm(h)
                qkv = linear(x, a.qkv_weight, a.qkv_bias)
            qk = qkv[:, :qk_width].view(t, c.num_heads + c.num_kv_heads, c.head_dim)
            if rope is not None:
                qk = apply_rotary(qk, *rope)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads:]
            v = qkv[:, qk_width:].view(t, c.num_kv_heads, c.head_dim)
            out = a.o_proj(attention(i, q, k, v).reshape(t, c.num_heads * c.head_dim))
            h = layer.post_self_attn_layernorm(out).add_(h)
            h = layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(h))).add_(h)
        return self.model.norm(h)
