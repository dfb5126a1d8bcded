"""The Llama layout with LayerNorm (with bias): StableLM (`stablelm`: StableLM-3B-4E1T, StableLM 2; RoPE over part
of each head, optional q/k/v bias, optional parallel residual (attention and MLP on one normed input), optional
per-head q/k LayerNorm, each head its own gain), Persimmon (`persimmon`), Nemotron (`nemotron`: StableLM's serial
layout with (1 + w) LayerNorm gains and an ungated MLP) and StarCoder2 (`starcoder2`: biases, a GELU MLP, sliding
window)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .common import fused_qkv_to_blocks
from .gpt2 import GPT2MLP
from .llama import LlamaAttention, LlamaBackbone, LlamaForCausalLM, LlamaMLP


class PerHeadLayerNorm(nn.Module):
    """A bias-free LayerNorm of its own for each head of [T, H, D] (checkpoint keys `norms.{h}.weight`)."""

    def __init__(self, num_heads: int, dim: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps, bias=False) for _ in range(num_heads))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        gains = torch.stack([norm.weight for norm in self.norms])
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * gains


class StableLmLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = LlamaAttention(replace(c, qk_norm=False))
        if c.qk_norm:
            self.self_attn.q_norm = PerHeadLayerNorm(c.num_heads, c.head_dim, c.norm_eps)
            self.self_attn.k_norm = PerHeadLayerNorm(c.num_kv_heads, c.head_dim, c.norm_eps)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        if not c.parallel_residual:
            self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class StableLmBackbone(LlamaBackbone):
    layer_class = StableLmLayer

    @staticmethod
    def final_norm(c: ModelConfig) -> nn.Module:
        return nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class StableLmForCausalLM(LlamaForCausalLM):
    backbone_class = StableLmBackbone

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return [(key.replace(".q_layernorm.", ".q_norm.").replace(".k_layernorm.", ".k_norm."), tensor)]


class PersimmonLayer(StableLmLayer):
    """Persimmon's q/k LayerNorms: one over each head's channels, shared by the heads, with a bias."""

    def __init__(self, c: ModelConfig, index: int):
        super().__init__(c, index)
        if c.qk_norm:
            self.self_attn.q_norm = nn.LayerNorm(c.head_dim, eps=c.norm_eps)
            self.self_attn.k_norm = nn.LayerNorm(c.head_dim, eps=c.norm_eps)


class PersimmonBackbone(StableLmBackbone):
    layer_class = PersimmonLayer


class PersimmonForCausalLM(StableLmForCausalLM):
    """Persimmon (`persimmon`: Adept's Persimmon-8B, Fuyu's language model): StableLM's serial layout with biases
    everywhere, an ungated squared-ReLU MLP, RoPE over half of each head and q/k LayerNorms; its fused
    `query_key_value` rows are per head [q, k, v], split at load."""

    backbone_class = PersimmonBackbone
    _NAMES = ((".self_attn.dense.", ".self_attn.o_proj."), (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
              (".mlp.dense_4h_to_h.", ".mlp.down_proj."), ("model.final_layernorm.", "model.norm."))

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        for theirs, ours in self._NAMES:
            key = key.replace(theirs, ours)
        if key.endswith(("self_attn.query_key_value.weight", "self_attn.query_key_value.bias")):
            c = self.config
            stem, part = key.rsplit(".query_key_value.", 1)
            q, k, v = fused_qkv_to_blocks(tensor, c.num_heads, c.num_kv_heads, c.head_dim).chunk(3)
            return [(f"{stem}.{name}.{part}", t) for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v))]
        return super().checkpoint_tensors(key, tensor)


class NemotronForCausalLM(StableLmForCausalLM):
    """StableLM's serial layout (the config makes its MLP ungated) with LayerNorm1P: each norm's gain is 1 + w."""

    def prepare_for_inference(self, device: torch.device) -> None:
        with torch.no_grad():  # 1 + w once, in the model dtype (as HF adds it each call): then plain LayerNorms
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.add_(1.0)
        super().prepare_for_inference(device)


class Starcoder2MLP(GPT2MLP):
    """GPT-2's c_fc / c_proj GELU MLP, in the Llama layout that fuses each MLP's input projections."""

    def fuse(self, transposed: bool) -> None:
        """(one projection in: nothing to fuse)"""


class Starcoder2Layer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = Starcoder2MLP(c)
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class Starcoder2Backbone(StableLmBackbone):  # (its final LayerNorm too)
    layer_class = Starcoder2Layer


class Starcoder2ForCausalLM(LlamaForCausalLM):
    backbone_class = Starcoder2Backbone
