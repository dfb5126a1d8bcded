"""MiMo-V2-Flash (Xiaomi, `mimo_v2_flash`): Llama's pre-norm layers (RMSNorm, SwiGLU) with sliding-window and
full-attention layers, each type with a RoPE of its own over its share of each head (a third by default). The
sliding layers have twice the K/V heads of the full ones (`ModelConfig.layer_kv_heads`: the pool holds each layer's
own) and attention sinks (`sink_layers`); the value heads are narrower than the query/key heads (`v_head_dim`: zero-
padded to the key width in the pool, as the latent-attention models' are) and scaled by `value_scale` before
attention. Past a dense first layer (`mlp_layer_types`), DeepSeek-V3's sigmoid router over the best groups picks the
experts; there is no shared expert. The checkpoint's multi-token-prediction layers (`model.mtp.`) are left out, as
transformers leaves them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input
from .common import Attention, RMSNorm, apply_rotary, gather_rope_rows, partial_rope_tables_by_type
from .linear import Linear, linear
from .llama import LlamaMLP, _fuse
from .moe import SparseMoE, moe_checkpoint_tensors

# (the sliding layers' sinks; none on the full-attention layers: their logit is this, whose exp is 0 beside any score)
NO_SINK = -1e30
DEFAULT_ROTARY_SHARE = 0.334  # (transformers' default where a layer type's RoPE names no partial_rotary_factor)


class MiMoV2Attention(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.num_kv_heads = c.layer_kv_heads[index] if c.layer_kv_heads else c.num_kv_heads
        self.v_head_dim = c.v_head_dim or c.head_dim
        self.value_scale = c.value_scale
        heads, kv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        self.q_proj = Linear(c.hidden_size, heads * d, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, kv * d, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, kv * dv, bias=c.qkv_bias)
        self.o_proj = Linear(heads * dv, c.hidden_size, bias=False)
        if c.attention_sinks and (not c.sink_layers or index in c.sink_layers):
            self.sinks = nn.Parameter(torch.zeros(heads))
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.qkv_weight, self.qkv_bias = _fuse([self.q_proj, self.k_proj, self.v_proj], transposed)

    def forward(self, layer: int, x: Tensor, rope: tuple[Tensor, Tensor], attention: Attention) -> Tensor:
        """The attention sublayer's output for its normed input x [T, hidden]."""
        t, hq, hkv, d, dv = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        qkv = linear(x, self.qkv_weight, self.qkv_bias)
        qk = apply_rotary(qkv[:, :(hq + hkv) * d].view(t, hq + hkv, d), *rope)
        v = qkv[:, (hq + hkv) * d:].view(t, hkv, dv)
        if self.value_scale != 1.0:  # (in the model dtype, as HF scales them)
            v = v * self.value_scale
        if dv < d:  # the pool's value slots are as wide as the keys: the attention returns zeros past dv
            v = F.pad(v, (0, d - dv))
        out = attention(layer, qk[:, :hq], qk[:, hq:], v)[..., :dv]
        return self.o_proj(out.reshape(t, hq * dv))


class MiMoV2Layer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = MiMoV2Attention(c, index)
        sparse = c.moe is not None and index in c.moe.sparse_layers
        self.mlp = SparseMoE(c, LlamaMLP) if sparse else LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class MiMoV2Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(MiMoV2Layer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class MiMoV2ForCausalLM(CausalLM):
    key_prefix = "model."
    ignored_key_suffixes = ("rotary_emb.inv_freq",)
    fused_layer0 = False  # (the fused QKV kernel assumes value heads as wide as the keys)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = MiMoV2Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.moe is not None and config.moe.fp32_router_weight:  # (as transformers >= 5.24 holds it)
            self.fp32_key_suffixes = (*self.fp32_key_suffixes, "mlp.gate.weight")
        self._sinks: Tensor | None = None

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def attention_sinks(self) -> Tensor | None:
        """[layers, Hq] fp32: the sliding layers' sink logits, NO_SINK on the others."""
        if not self.config.attention_sinks:
            return None
        if self._sinks is None:  # (once, after loading: CUDA graphs keep reading the same tensor)
            rows = [getattr(layer.self_attn, "sinks", None) for layer in self.model.layers]
            self._sinks = torch.stack([torch.full((self.config.num_heads,), NO_SINK, device=self.lm_head.weight.device)
                                       if row is None else row.float() for row in rows]).contiguous()
        return self._sinks

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The Hub's sink name (`attention_sink_bias`) as ours; the multi-token-prediction layers (`model.mtp.`) none;
        stacked experts split per expert (moe.py's names)."""
        if key.startswith("model.mtp."):
            return []
        key = key.replace(".self_attn.attention_sink_bias", ".self_attn.sinks")
        return [pair for name, value in super().checkpoint_tensors(key, tensor)
                for pair in moe_checkpoint_tensors(name, value)]

    def init_buffers(self, device: torch.device) -> None:
        """cos/sin of every position for each layer type, over that type's rotary share of each head."""
        self.rope_by_layer = partial_rope_tables_by_type(self.config, DEFAULT_ROTARY_SHARE, device,
                                                         self.model.embed_tokens.weight.dtype)

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            layer.self_attn.fuse(transposed)
            layer.mlp.fuse(transposed)
        super().prepare_for_inference(device)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes MiMo's layer-0 input (`fused_layer0` is False): `layer0` is never given."""
        h = embeds
        for i, (layer, rope) in enumerate(zip(self.model.layers, gather_rope_rows(self.rope_by_layer, positions))):
            h = layer.self_attn(i, layer.input_layernorm(h), rope, attention).add_(h)
            h = layer.mlp(layer.post_attention_layernorm(h)).add_(h)
        return self.model.norm(h)
