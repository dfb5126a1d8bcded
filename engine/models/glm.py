"""GLM (`glm`: glm-4-9b-chat-hf) and GLM-4 (`glm4`: GLM-4-9B/32B-0414, GLM-Z1): the Llama layout with q/k/v biases,
a fused `gate_up_proj`, and RoPE over the first `partial_rotary_factor` of each head (half) in interleaved pairs
(2i, 2i+1). GLM-4 adds a norm after attention and after the MLP (`post_self_attn_layernorm`, `post_mlp_layernorm`),
each before its residual add.

As for GPT-J, each head's q/k channels are permuted at load (`ModelConfig.key_channel_order`) so that rotate-half
RoPE turns the interleaved pairs; the q/k biases are permuted alike."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .common import RMSNorm
from .llama import LlamaForCausalLM, LlamaLayer


class GlmLayer(LlamaLayer):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__(c, index)
        if c.sandwich_norms:
            self.post_self_attn_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
            self.post_mlp_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class GlmBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(GlmLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class GlmForCausalLM(LlamaForCausalLM):
    """Llama's forward (with GLM-4's `sandwich_norms`) over GLM's layers; the Llama base splits gate_up_proj and
    permutes the q/k rows at load."""

    backbone_class = GlmBackbone
