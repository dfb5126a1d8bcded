"""Falcon (`falcon`: Falcon-7B, 40B, 180B, Falcon2-11B; rotary models): LayerNorm, GELU MLP, RoPE, one fused
query_key_value projection whose rows are regrouped at load into [all q | all k | all v]; multi-query attention
(7B) or grouped K/V (the "new decoder architecture" of 40B/180B/11B); attention and MLP in parallel on one normed
input (7B), on two (40B, 180B), or one after the other.

The checkpoint's fused rows: the new architecture's per K/V group ([q of the group's heads, k, v] per group),
multi-query's [all q | k | v] already, and plain multi-head attention's per head ([q, k, v] per head).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input, Layer0Norms, RotaryCausalLM
from .common import Attention, apply_rotary, fused_qkv_to_blocks
from .gpt_neox import GPTNeoXMLP
from .linear import Linear


class FalconAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.query_key_value = Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=c.qkv_bias)
        self.dense = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)


class FalconLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attention = FalconAttention(c)
        self.mlp = GPTNeoXMLP(c)  # (the same dense_h_to_4h / dense_4h_to_h GELU MLP)
        if c.two_parallel_norms:  # attention and MLP each on their own norm of the same input
            self.ln_attn = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
            self.ln_mlp = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        else:
            self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
            if not c.parallel_residual:
                self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)

    @property
    def attention_norm(self) -> nn.LayerNorm:
        return self.ln_attn if hasattr(self, "ln_attn") else self.input_layernorm


class FalconBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.h = nn.ModuleList(FalconLayer(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class FalconForCausalLM(RotaryCausalLM):
    key_prefix = "transformer."

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.transformer = FalconBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """query_key_value's rows regrouped to [all q | all k | all v] (see the module docstring)."""
        c = self.config
        if not key.endswith(("self_attention.query_key_value.weight", "self_attention.query_key_value.bias")):
            return [(key, tensor)]
        # (every layout is per K/V group: one group is multi-query's, a group per head is per head)
        return [(key, fused_qkv_to_blocks(tensor, c.num_heads, c.num_kv_heads, c.head_dim))]

    def layer0_norms(self) -> Layer0Norms:
        layer = self.transformer.h[0]
        ln, qkv = layer.attention_norm, layer.self_attention.query_key_value
        return Layer0Norms(None, None, (ln.weight, ln.bias, ln.eps, "layer"), (qkv.weight, qkv.bias))

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        rope = self.rope_rows(attention, positions)
        qk_width = (c.num_heads + c.num_kv_heads) * c.head_dim
        h = embeds if layer0 is None else layer0.residual
        for i, layer in enumerate(self.transformer.h):
            a = layer.self_attention
            if i == 0 and layer0 is not None:
                # a parallel MLP takes the normed input too, which a fused QKV kernel never wrote
                x = layer0.normed if layer0.normed is not None else layer.attention_norm(h)
                qkv = layer0.qkv if layer0.qkv is not None else a.query_key_value(x)
            else:
                x = layer.attention_norm(h)
                qkv = a.query_key_value(x)
            qk = qkv[:, :qk_width].view(t, c.num_heads + c.num_kv_heads, c.head_dim)
            if rope is not None:
                qk = apply_rotary(qk, *rope)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads:]
            v = qkv[:, qk_width:].view(t, c.num_kv_heads, c.head_dim)
            out = a.dense(attention(i, q, k, v).reshape(t, c.num_heads * c.head_dim))
            if c.two_parallel_norms:
                h = (layer.mlp(layer.ln_mlp(h)) + out) + h
            elif c.parallel_residual:
                h = (layer.mlp(x) + out) + h
            else:
                h = out + h
                h = layer.mlp(layer.post_attention_layernorm(h)) + h
        return self.transformer.ln_f(h)
