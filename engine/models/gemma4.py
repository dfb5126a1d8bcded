"""Gemma 4 (`gemma4_text`, `gemma4_unified_text`, and the multimodal `gemma4` / `gemma4_unified` checkpoints'
language model: the dense models, the 26B-A4B, the unified 12B).

Gemma 3's layout (scaled token embeddings, sandwich norms, q/k norms, sliding and full-attention layers with a
RoPE each, soft-capped logits) with Gemma 4's differences: norms scale by w (not 1 + w); values get a gainless
RMSNorm; the attention scale is 1; full-attention layers have wider heads (`global_head_dim`), fewer K/V heads and,
with attention_k_eq_v, values from the key projection; their RoPE is "proportional" (only the first channels of
each half rotate); each layer's output is scaled by its `layer_scalar`; the 26B-A4B adds a routed mixture of
experts beside each layer's dense MLP; with `num_kv_shared_layers`, the last layers attend with the K/V of the last
earlier layer of their type.

Each layer attends in its own head width and K/V head count (`ModelConfig.layer_head_dims`, `layer_kv_heads`),
which the KV pool holds per layer (`KVPool.layer_shapes`).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input, language_model_tensors
from .common import Attention, apply_rotary, gather_rope_rows, layer_type_rope_inv_freq, rotary_cos_sin
from .gemma import GemmaForCausalLM
from .linear import Linear, linear
from .llama import LlamaMLP, _fuse
from .moe import SparseMoE, moe_checkpoint_tensors

_LAYER_KV_KEY = re.compile(r".*layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\..*")
# a layer's router and experts (HF's, beside its `mlp`) under our `moe`
_MOE_NAMES = ((".router.proj.", ".moe.gate."), (".router.scale", ".moe.router_scale"),
              (".router.per_expert_scale", ".moe.per_expert_scale"), (".experts.", ".moe.experts."))


class Gemma4RMSNorm(nn.Module):
    """HF Gemma 4's: normalise in fp32 (by pow(mean square + eps, -0.5)), scale by the weight (none for the values'
    norm and the router's), cast back."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            normed = normed * self.weight.float()
        return normed.to(x.dtype)


class Gemma4Attention(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.num_heads = c.num_heads
        self.head_dim = c.layer_head_dims[index] if c.layer_head_dims else c.head_dim
        self.kv_heads = c.layer_kv_heads[index] if c.layer_kv_heads else c.num_kv_heads
        self.value_from_key = index in c.value_from_key_layers
        self.kv_source = c.kv_source_layers[index] if c.kv_source_layers else index
        d = self.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * d, bias=c.qkv_bias)
        self.q_norm = Gemma4RMSNorm(d, c.norm_eps)
        self.o_proj = Linear(c.num_heads * d, c.hidden_size, bias=c.o_bias)
        if self.kv_source == index:  # (a layer attending with an earlier one's K/V has no projections for them)
            self.k_proj = Linear(c.hidden_size, self.kv_heads * d, bias=c.qkv_bias)
            if not self.value_from_key:
                self.v_proj = Linear(c.hidden_size, self.kv_heads * d, bias=c.qkv_bias)
            self.k_norm = Gemma4RMSNorm(d, c.norm_eps)
            self.v_norm = Gemma4RMSNorm(d, c.norm_eps, with_scale=False)
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        projections = [self.q_proj]
        if hasattr(self, "k_proj"):
            projections += [self.k_proj] + ([] if self.value_from_key else [self.v_proj])
        self.qkv_weight, self.qkv_bias = _fuse(projections, transposed)

    def forward(self, layer: int, x: Tensor, rope: tuple[Tensor, Tensor], attention: Attention,
                kv_by_layer: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
        """q/k/v of the normed input x [T, hidden], in this layer's head width and K/V head count, through
        `attention`. The new tokens' K/V go into `kv_by_layer` under this layer, or are taken from there under the
        earlier layer this one attends with (whose pool tensor this layer shares: it writes the same values
        there)."""
        t, d, hq, hkv = x.shape[0], self.head_dim, self.num_heads, self.kv_heads
        qkv = linear(x, self.qkv_weight, self.qkv_bias)
        q = qkv[:, :hq * d].view(t, hq, d)
        if self.kv_source != layer:
            q = apply_rotary(self.q_norm(q), *rope)
            k, v = kv_by_layer[self.kv_source]
        else:
            k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
            v = k if self.value_from_key else qkv[:, (hq + hkv) * d:].view(t, hkv, d)
            qk = apply_rotary(torch.cat((self.q_norm(q), self.k_norm(k)), dim=1), *rope)
            q, k, v = qk[:, :hq], qk[:, hq:], self.v_norm(v)
            kv_by_layer[layer] = k, v
        return self.o_proj(attention(layer, q, k, v).reshape(t, hq * d))


class Gemma4MoE(SparseMoE):
    """The 26B-A4B's experts: routed on the layer's un-normed input (a gainless RMSNorm, a learned scale and
    hidden^-0.5, then the router; the softmax of all logits in fp32, the top-k renormalised and each times its
    expert's learned scale), run on the input normed by `pre_feedforward_layernorm_2`."""

    def __init__(self, c: ModelConfig):
        super().__init__(c, LlamaMLP)
        self.router_norm = Gemma4RMSNorm(c.hidden_size, c.norm_eps, with_scale=False)
        self.router_scale = nn.Parameter(torch.ones(c.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(self.moe.num_experts))
        self.input_scale = c.hidden_size**-0.5

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.gate(self.router_norm(x) * self.router_scale * self.input_scale)
        weights, experts = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.moe.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights * self.per_expert_scale[experts]


class Gemma4Layer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = Gemma4Attention(c, index)
        self.mlp = LlamaMLP(c, c.layer_intermediate_sizes[index] if c.layer_intermediate_sizes else None)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, Gemma4RMSNorm(c.hidden_size, c.norm_eps))
        self.layer_scalar = nn.Parameter(torch.ones(1))
        if c.moe is not None:
            self.moe = Gemma4MoE(c)
            for name in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
                setattr(self, name, Gemma4RMSNorm(c.hidden_size, c.norm_eps))

    def feed_forward(self, h: Tensor) -> Tensor:
        """The dense MLP's output, with the experts' beside it (each normed) where the layer has them."""
        out = self.mlp(self.pre_feedforward_layernorm(h))
        if not hasattr(self, "moe"):
            return out
        experts = self.moe.mix(self.pre_feedforward_layernorm_2(h), *self.moe.route(h))
        return self.post_feedforward_layernorm_1(out) + self.post_feedforward_layernorm_2(experts)


class Gemma4Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Gemma4Layer(c, i) for i in range(c.num_layers))
        self.norm = Gemma4RMSNorm(c.hidden_size, c.norm_eps)


class Gemma4ForCausalLM(GemmaForCausalLM):
    """Gemma's embedding scale and logit soft-cap; Gemma 4's layers above."""

    def __init__(self, config: ModelConfig):
        CausalLM.__init__(self, config)
        self.model = Gemma4Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The language model's entries under the text model's names (the multimodal checkpoints' other parts left
        out); each layer's `router.*` and `experts.*` under its `moe.`, the stacked experts split per expert."""
        if self.config.model_type in ("gemma4", "gemma4_unified") and not key.startswith("lm_head.") \
                and language_model_tensors(key, tensor) is None:
            return []  # (a multimodal checkpoint's vision and audio towers and embedders)
        if (match := _LAYER_KV_KEY.fullmatch(key)) and self.config.kv_source_layers:
            if self.config.kv_source_layers[int(match.group(1))] != int(match.group(1)):
                return []  # (a layer attending with an earlier one's K/V: HF ignores its own, where saved)
        pairs = []
        for name, value in super().checkpoint_tensors(key, tensor):
            for old, new in _MOE_NAMES:
                name = name.replace(old, new)
            pairs += moe_checkpoint_tensors(name, value)
        return pairs

    def init_buffers(self, device: torch.device) -> None:
        """The embedding scale in the model dtype; cos/sin of every position for each layer, per layer type and head
        width, as HF builds them (the proportional RoPE of the full-attention layers via transformers)."""
        c = self.config
        dtype = self.model.embed_tokens.weight.dtype
        self.register_buffer("embed_scale", torch.tensor(c.hidden_size**0.5).to(device, dtype), persistent=False)
        positions = torch.arange(c.max_positions, device=device)
        tables: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        self.rope_by_layer = []
        for layer, layer_type in zip(self.model.layers, c.hf_config.layer_types):
            key = (layer_type, layer.self_attn.head_dim)
            if key not in tables:  # (transformers' init reads the layer type's own config, with its head width)
                hf = c.hf_config
                inv_freq, scaling = layer_type_rope_inv_freq(
                    hf, layer_type, key[1], device, hf.per_layer_config[layer_type] if hf.is_heterogeneous else hf)
                tables[key] = rotary_cos_sin(inv_freq, scaling, positions, dtype)
            self.rope_by_layer.append(tables[key])

    def prepare_for_inference(self, device: torch.device) -> None:
        """The experts fused too, where the layers have them (Gemma's fuses the attention and the dense MLP)."""
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            if hasattr(layer, "moe"):
                layer.moe.fuse(transposed)
        super().prepare_for_inference(device)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes Gemma's layer-0 input (`fused_layer0` is False): `layer0` is never given."""
        kv_by_layer: dict[int, tuple[Tensor, Tensor]] = {}
        h = embeds
        for i, (layer, rope) in enumerate(zip(self.model.layers, gather_rope_rows(self.rope_by_layer, positions))):
            out = layer.self_attn(i, layer.input_layernorm(h), rope, attention, kv_by_layer)
            h = h + layer.post_attention_layernorm(out)
            h = h + layer.post_feedforward_layernorm(layer.feed_forward(h))
            h = h * layer.layer_scalar
        return self.model.norm(h)

