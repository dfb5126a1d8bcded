"""Phi-3.5-MoE (`phimoe`): Mixtral's layout (its per-expert checkpoint names) with LayerNorms that have weights and
biases in place of RMSNorms, and the sparsemixer router (`MoEConfig.sparsemixer_eps`, in `moe.py`)."""

from __future__ import annotations

from torch import nn

from .llama import LlamaBackbone, LlamaForCausalLM, LlamaLayer


class PhimoeLayer(LlamaLayer):
    norm_class = nn.LayerNorm


class PhimoeBackbone(LlamaBackbone):
    layer_class = PhimoeLayer


class PhimoeForCausalLM(LlamaForCausalLM):
    backbone_class = PhimoeBackbone
