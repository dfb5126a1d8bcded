"""Flint (`flint`): Qwen3-MoE's layout with attention sinks (`softmax_offset` in its checkpoints, kept in fp32 as
transformers keeps them), RoPE on the sliding-window layers only, gpt-oss's RMSNorms (scaled in fp32), and experts
chosen by the sigmoid of fp32 router logits (the router weight kept in fp32) beside an ungated shared expert
(`shared_expert` in its checkpoints; Qwen2-MoE's of that name is gated)."""

from __future__ import annotations

from ..config import ModelConfig
from .gpt_oss import GptOssRMSNorm
from .llama import LlamaAttention, LlamaBackbone, LlamaForCausalLM, LlamaLayer

_NAMES = ((".self_attn.softmax_offset", ".self_attn.sinks"), (".mlp.shared_expert.", ".mlp.shared_experts."))


class FlintAttention(LlamaAttention):
    def __init__(self, c: ModelConfig):
        super().__init__(c, norm=GptOssRMSNorm)


class FlintLayer(LlamaLayer):
    attention_class = FlintAttention
    norm_class = GptOssRMSNorm


class FlintBackbone(LlamaBackbone):
    layer_class = FlintLayer


class FlintForCausalLM(LlamaForCausalLM):
    backbone_class = FlintBackbone
    checkpoint_renames = _NAMES

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.fp32_key_suffixes = (*self.fp32_key_suffixes, "self_attn.sinks")
