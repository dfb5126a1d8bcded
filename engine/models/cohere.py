"""Cohere (`cohere`: Command R, Command R+, Aya 23, Aya Expanse): the Llama layout with attention and MLP in
parallel on one bias-free LayerNorm (computed in fp32), RoPE in interleaved pairs (2i, 2i+1), optional per-head
q/k LayerNorm (Command R+), logits times `logit_scale`. Cohere 2 and Cohere2-MoE (`engine/config.py`) add sliding
layers and NoPE ones; Cohere2-MoE's sparse layers are mixtures of experts (`moe.py`), its norms maybe RMSNorms.

As for GPT-J, each head's q/k channels are permuted at load (`ModelConfig.key_channel_order`) so that rotate-half
RoPE turns the interleaved pairs; the q/k biases and q/k norm gains are permuted alike."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .common import RMSNorm
from .llama import LlamaAttention, LlamaBackbone, LlamaForCausalLM, LlamaMLP
from .moe import SparseMoE


class CohereLayerNorm(nn.LayerNorm):
    """A bias-free LayerNorm over the last dimension, normalised and scaled in fp32 as HF's, cast back after."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return _normed_fp32(x, self.weight, self.eps)


class CohereHeadNorm(nn.Module):
    """Command R+'s q/k norm: each head's channels normalised, then scaled by that head's own gains [H, D]."""

    def __init__(self, num_heads: int, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _normed_fp32(x, self.weight, self.eps)


def _normed_fp32(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    centred = x32 - x32.mean(-1, keepdim=True)
    normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * normed).to(x.dtype)


class CohereLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = LlamaAttention(replace(c, qk_norm=False))
        if c.qk_norm:
            self.self_attn.q_norm = CohereHeadNorm(c.num_heads, c.head_dim, c.norm_eps)
            self.self_attn.k_norm = CohereHeadNorm(c.num_kv_heads, c.head_dim, c.norm_eps)
        sparse = c.moe is not None and index in c.moe.sparse_layers  # (Cohere2-MoE)
        self.mlp = SparseMoE(c, LlamaMLP) if sparse else LlamaMLP(c)
        self.input_layernorm = _norm(c)


def _norm(c: ModelConfig) -> nn.Module:
    """Cohere's LayerNorm (Cohere2-MoE's RMSNorm where it says so), before each layer and after the last."""
    return RMSNorm(c.hidden_size, c.norm_eps) if c.rms_norm else CohereLayerNorm(c.hidden_size, c.norm_eps)


class CohereBackbone(LlamaBackbone):
    layer_class = CohereLayer

    @staticmethod
    def final_norm(c: ModelConfig) -> nn.Module:
        return _norm(c)


class CohereForCausalLM(LlamaForCausalLM):
    backbone_class = CohereBackbone  # (q/k rows permuted at load by the Llama base)
