"""OLMo 2 (`olmo2`) and OLMo 3 (`olmo3`): the Llama layout with the norms moved: no norm before attention or the
MLP, an RMSNorm on each one's output before its residual add, and RMSNorms over the whole query and key projections
(all heads at once) before RoPE. Its RMSNorms scale in fp32 before casting back. OLMo 3 adds sliding-window layers
(`layer_types`), each layer type with a RoPE of its own (YaRN on the full-attention layers of the long-context
checkpoints). EXAONE 4 (`exaone4`) has OLMo 2's norm placement with Llama's RMSNorm (cast back, then scaled),
per-head q/k norms (as Qwen3), and sliding-window layers with RoPE beside full-attention layers without (NoPE).
FlexOlmo (`flex_olmo`) is OLMo 2 with OLMoE's mixture of experts as each layer's MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input, RotaryCausalLM
from .common import Attention, RMSNorm, apply_rotary
from .linear import Linear, linear
from .llama import LlamaAttention, LlamaMLP
from .moe import SparseMoE, moe_checkpoint_tensors


class Olmo2RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def _norm_class(c: ModelConfig) -> type[nn.Module]:
    return RMSNorm if c.model_type in ("exaone4", "exaone4_5") else Olmo2RMSNorm


class Olmo2Layer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        norm = _norm_class(c)
        self.self_attn = LlamaAttention(c)  # (with per-head q/k norms where c.qk_norm: EXAONE 4)
        if not c.qk_norm:  # OLMo: over all heads at once
            self.self_attn.q_norm = norm(c.num_heads * c.head_dim, c.norm_eps)
            self.self_attn.k_norm = norm(c.num_kv_heads * c.head_dim, c.norm_eps)
        self.mlp = SparseMoE(c, LlamaMLP) if c.moe is not None else LlamaMLP(c)  # (FlexOlmo: experts)
        self.post_attention_layernorm = norm(c.hidden_size, c.norm_eps)
        self.post_feedforward_layernorm = norm(c.hidden_size, c.norm_eps)


class Olmo2Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Olmo2Layer(c) for _ in range(c.num_layers))
        self.norm = _norm_class(c)(c.hidden_size, c.norm_eps)


class Olmo2ForCausalLM(RotaryCausalLM):
    key_prefix = "model."
    fused_layer0 = False  # layer 0's input is the plain embedding: nothing for a fused kernel to do
    per_layer_rope = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = Olmo2Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """FlexOlmo's experts (stacked or per expert) under our names."""
        mapped = super().checkpoint_tensors(key, tensor)
        if self.config.moe is None:
            return mapped
        return [pair for name, t in mapped for pair in moe_checkpoint_tensors(name, t)]

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            layer.self_attn.fuse(transposed)
            layer.mlp.fuse(transposed)
        super().prepare_for_inference(device)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        h = embeds
        for i, (layer, rope) in enumerate(zip(self.model.layers, self.rope_rows_by_layer(attention, positions))):
            h = olmo2_layer(self.config, i, layer, h, rope, attention)
        return self.model.norm(h)


def olmo2_layer(c: ModelConfig, i: int, layer: Olmo2Layer, h: Tensor, rope: tuple[Tensor, Tensor] | None,
                attention: Attention) -> Tensor:
    """One OLMo 2 layer (post-norms, q/k norms over all heads or per head) on the residual h; also OLMo Hybrid's
    attention layers."""
    t = h.shape[0]
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    a = layer.self_attn
    qkv = linear(h, a.qkv_weight, a.qkv_bias)
    if c.qk_norm:  # per head
        q = a.q_norm(qkv[:, :q_width].view(t, c.num_heads, c.head_dim))
        k = a.k_norm(qkv[:, q_width:q_width + kv_width].view(t, c.num_kv_heads, c.head_dim))
    else:
        q = a.q_norm(qkv[:, :q_width]).view(t, c.num_heads, c.head_dim)
        k = a.k_norm(qkv[:, q_width:q_width + kv_width]).view(t, c.num_kv_heads, c.head_dim)
    if rope is not None and i not in c.nope_layers:
        qk = apply_rotary(torch.cat((q, k), dim=1), *rope)
        q, k = qk[:, : c.num_heads], qk[:, c.num_heads:]
    v = qkv[:, q_width + kv_width:].view(t, c.num_kv_heads, c.head_dim)
    out = a.o_proj(attention(i, q, k, v).reshape(t, q_width))
    h = layer.post_attention_layernorm(out) + h
    return layer.post_feedforward_layernorm(layer.mlp(h)) + h
