"""Laguna (poolside, `laguna`): Llama's pre-norm layers (RMSNorm, SwiGLU) with per-head q/k norms before RoPE, a query
head count of its own in each layer (`ModelConfig.layer_num_heads`; the K/V heads are the same in all), the heads'
outputs times softplus(g_proj(x)) before o_proj (one gate a head, or one a channel), and sliding-window and
full-attention layers, each type with a RoPE of its own over its own share of each head (`partial_rotary_factor`).
Past a dense first layer, experts chosen by the sigmoid of the router's fp32 logits (soft-capped first) plus a
correction bias, weighted by those sigmoids renormalised (in the model dtype); their sum is scaled, then a shared
expert's output is added."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input
from .common import Attention, RMSNorm, apply_rotary, gather_rope_rows, norm_heads, partial_rope_tables_by_type
from .linear import Linear, linear
from .llama import LlamaMLP, _fuse
from .moe import SparseMoE, moe_checkpoint_tensors

_CHECKPOINT_NAMES = ((".mlp.experts.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),
                     (".mlp.shared_expert.", ".mlp.shared_experts."))


class LagunaAttention(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.num_heads = c.layer_num_heads[index] if c.layer_num_heads else c.num_heads
        self.num_kv_heads, self.head_dim = c.num_kv_heads, c.head_dim
        heads, d = self.num_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, heads * d, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.g_proj = Linear(c.hidden_size, heads if c.softplus_output_gate == "head" else heads * d, bias=False)
        self.o_proj = Linear(heads * d, c.hidden_size, bias=c.o_bias)
        self.q_norm = RMSNorm(d, c.norm_eps)
        self.k_norm = RMSNorm(d, c.norm_eps)
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.qkv_weight, self.qkv_bias = _fuse([self.q_proj, self.k_proj, self.v_proj], transposed)

    def forward(self, layer: int, x: Tensor, rope: tuple[Tensor, Tensor], attention: Attention) -> Tensor:
        """The attention sublayer's output for its normed input x [T, hidden]."""
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = linear(x, self.qkv_weight, self.qkv_bias)
        qk = apply_rotary(norm_heads(qkv[:, :(hq + hkv) * d].view(t, hq + hkv, d), hq, self.q_norm, self.k_norm),
                          *rope)
        out = attention(layer, qk[:, :hq], qk[:, hq:], qkv[:, (hq + hkv) * d:].view(t, hkv, d))
        gate = F.softplus(self.g_proj(x).float()).to(out.dtype)
        out = out * gate[..., None] if gate.shape[-1] == hq else out * gate.view(t, hq, d)
        return self.o_proj(out.reshape(t, hq * d))


class LagunaMoE(SparseMoE):
    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Experts by sigmoid(logits) + correction bias, weighted by their sigmoids renormalised, cast to the model
        dtype (the logits in fp32, soft-capped first where the config says)."""
        logits = self.gate(x).float()
        if cap := self.moe.router_logit_softcap:
            logits = torch.tanh(logits / cap) * cap
        scores = torch.sigmoid(logits)
        experts = torch.topk(scores + self.gate.e_score_correction_bias.float(), self.moe.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        return experts, (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """The experts' weighted sum, scaled, plus the shared expert's output."""
        return self.mix(x, *self.route(x)) * self.moe.routed_scaling + self.shared_experts(x)


class LagunaLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = LagunaAttention(c, index)
        self.mlp = LagunaMoE(c, LlamaMLP) if c.moe is not None and index in c.moe.sparse_layers else LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class LagunaBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LagunaLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class LagunaForCausalLM(CausalLM):
    key_prefix = "model."
    ignored_key_suffixes = ("rotary_emb.inv_freq",)
    fused_layer0 = False  # (its output gate reads layer 0's normed input, which the QKV kernel never writes)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = LagunaBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # transformers holds the router's correction bias in the model dtype (a parameter of its router)
        self.fp32_key_suffixes = tuple(s for s in self.fp32_key_suffixes if s != "e_score_correction_bias")

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The router's correction bias and the shared expert under our names, as the Hub's checkpoints store them
        (`mlp.experts.e_score_correction_bias`, `mlp.shared_expert.`) or transformers holds them; stacked experts
        split per expert (moe.py's names)."""
        for old, new in _CHECKPOINT_NAMES:
            key = key.replace(old, new)
        return [pair for name, value in super().checkpoint_tensors(key, tensor)
                for pair in moe_checkpoint_tensors(name, value)]

    def init_buffers(self, device: torch.device) -> None:
        """cos/sin of every position for each layer type, over that type's rotary share of each head."""
        self.rope_by_layer = partial_rope_tables_by_type(self.config, 1.0, device, self.model.embed_tokens.weight.dtype)

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            layer.self_attn.fuse(transposed)
            layer.mlp.fuse(transposed)
        super().prepare_for_inference(device)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes Laguna's layer-0 input (`fused_layer0` is False): `layer0` is never given."""
        h = embeds
        for i, (layer, rope) in enumerate(zip(self.model.layers, gather_rope_rows(self.rope_by_layer, positions))):
            h = h + layer.self_attn(i, layer.input_layernorm(h), rope, attention)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.norm(h)

