"""GPT-NeoX (Pythia, GPT-NeoX-20B): RoPE over part of each head, LayerNorm, GELU MLP, parallel residual.

The checkpoint's fused query_key_value rows are per head (q, k, v of head 0, then of head 1, ...); they are
reordered at load into [all q | all k | all v], GPT-2's c_attn layout, so one GEMM still projects all three.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input, Layer0Norms, RotaryCausalLM, layer_qkv
from .common import Attention, activation, apply_rotary, fused_qkv_to_blocks
from .linear import Linear


class GPTNeoXAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.query_key_value = Linear(c.hidden_size, 3 * c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.dense = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)


class GPTNeoXMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.dense_4h_to_h = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = c.hidden_act

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(activation(self.act, self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.attention = GPTNeoXAttention(c)
        self.mlp = GPTNeoXMLP(c)


class GPTNeoXBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_in = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(c) for _ in range(c.num_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class GPTNeoXForCausalLM(RotaryCausalLM):
    key_prefix = "gpt_neox."
    ignored_key_suffixes = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.gpt_neox = GPTNeoXBackbone(config)
        self.embed_out = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.gpt_neox.embed_in

    @property
    def lm_head_module(self) -> nn.Linear:
        return self.embed_out

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """query_key_value's per-head rows [H, (q, k, v), D] reordered to [(q, k, v), H, D]."""
        c = self.config
        if key.endswith("attention.query_key_value.weight") or key.endswith("attention.query_key_value.bias"):
            if tensor.shape[0] == 3 * c.num_heads * c.head_dim:
                tensor = fused_qkv_to_blocks(tensor, c.num_heads, c.num_heads, c.head_dim)
        return [(key, tensor)]

    def layer0_norms(self) -> Layer0Norms:
        layer = self.gpt_neox.layers[0]
        ln, qkv = layer.input_layernorm, layer.attention.query_key_value
        return Layer0Norms(None, None, (ln.weight, ln.bias, ln.eps, "layer"), (qkv.weight, qkv.bias))

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        rope = self.rope_rows(attention, positions)
        width = c.num_heads * c.head_dim
        h = embeds if layer0 is None else layer0.residual
        for i, layer in enumerate(self.gpt_neox.layers):
            a = layer.attention
            qkv = layer_qkv(i, layer0, layer.input_layernorm, h, a.query_key_value)
            qk = qkv[:, : 2 * width].reshape(t, 2 * c.num_heads, c.head_dim)
            if rope is not None:
                qk = apply_rotary(qk, *rope)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads:]
            v = qkv[:, 2 * width:].reshape(t, c.num_heads, c.head_dim)
            out = a.dense(attention(i, q, k, v).reshape(t, width))
            if c.parallel_residual:  # HF: mlp(ln2(h)) + attn + h
                h = layer.mlp(layer.post_attention_layernorm(h)) + out + h
            else:
                h = out + h
                h = layer.mlp(layer.post_attention_layernorm(h)) + h
        return self.gpt_neox.final_layer_norm(h)
