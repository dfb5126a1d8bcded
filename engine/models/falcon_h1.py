"""Falcon-H1 (`falcon_h1`, TII): every layer runs a Mamba-2 mixer (engine/models/mamba2.py) and grouped-query
attention (RoPE) side by side on the same normed input and adds both to the residual, then a SwiGLU MLP. muP
multipliers: on the token embeddings of input ids (ModelConfig.token_embedding_multiplier; not on PEFT's
inputs_embeds), on attention's input, keys and output, on the mixer's input, its in_proj outputs (z, x, B, C, dt
each its own) and its output, on the MLP's gate and output, and on the logits. Every layer keeps both K/V and a
recurrent state (engine/recurrent_state.py), which the attention implementation hands the mixer as
`attention.recurrent`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input
from .common import Attention, RMSNorm
from .hybrid import HybridAttention, HybridCausalLM, recurrent_batch
from .linear import linear
from .llama import LlamaMLP
from .mamba2 import Mamba2Mixer


class FalconH1MLP(LlamaMLP):
    """down(silu(gate(x) * gate_multiplier) * up(x)) * down_multiplier."""

    def __init__(self, c: ModelConfig):
        super().__init__(c)
        self.gate_multiplier, self.down_multiplier = (float(v) for v in c.hf_config.mlp_multipliers)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate * self.gate_multiplier) * up) * self.down_multiplier


class FalconH1Layer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        assert c.mamba2 is not None
        hf = c.hf_config
        self.mamba = Mamba2Mixer(c.mamba2, c.hidden_size, c.norm_eps)
        self.self_attn = HybridAttention(c, key_multiplier=float(hf.key_multiplier))
        self.feed_forward = FalconH1MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.pre_ff_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.ssm_out, self.attn_in, self.attn_out = (float(v) for v in (
            hf.ssm_out_multiplier, hf.attention_in_multiplier, hf.attention_out_multiplier))


class FalconH1Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(FalconH1Layer(c) for _ in range(c.num_layers))
        self.final_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class FalconH1ForCausalLM(HybridCausalLM):
    backbone_class = FalconH1Backbone


    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """`embeds`: soft-prompt rows and token embeddings, the latter already times token_embedding_multiplier
        where the model would see input ids (the model runner and the reference path scale them). No fused
        kernel computes Falcon-H1's layer-0 input (`fused_layer0` is False): `layer0` is never given.
        `attention.recurrent` carries the sequences' states; without it, one sequence from zero (the reference
        path)."""
        assert embeds is not None
        h = embeds
        batch = recurrent_batch(attention, h)
        rope = self.rope_rows(attention, positions)
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            mixed = layer.mamba(i, x, batch) * layer.ssm_out
            attended = layer.self_attn(i, x * layer.attn_in, rope, attention) * layer.attn_out
            h = h + (mixed + attended)
            h = h + layer.feed_forward(layer.pre_ff_layernorm(h))
        return self.model.final_layernorm(h)
