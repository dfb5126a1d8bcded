"""Jamba (`jamba`: AI21's Jamba, Jamba 1.5 / 1.6 / 1.7): Llama's layers (RMSNorms, SwiGLU MLPs) whose mixer is a
Mamba-1 selective scan (engine/models/mamba.py, with gained RMSNorms on dt, B and C) in most layers and grouped-query
attention without positions in every `attn_layer_period`-th; the MLP is experts (the top-k of a softmax over all,
not renormalised) in every `expert_layer_period`-th layer. A Mamba layer's past is a recurrent state
(engine/recurrent_state.py), which the attention implementation hands the layer as `attention.recurrent`."""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input
from .common import Attention, RMSNorm
from .hybrid import HybridAttention, HybridCausalLM, recurrent_batch
from .llama import LlamaMLP
from .mamba import MambaMixer
from .moe import SparseMoE, moe_checkpoint_tensors


class JambaLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        assert c.mamba is not None
        if index in c.mamba.layers:
            self.mamba = MambaMixer(c.mamba, c.hidden_size)
        else:
            self.self_attn = HybridAttention(c)  # (no RoPE: the model hands it none)
        self.mlp = SparseMoE(c, LlamaMLP) if c.moe is not None and index in c.moe.sparse_layers else LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class JambaBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(JambaLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class JambaForCausalLM(HybridCausalLM):
    backbone_class = JambaBackbone

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """Jamba's names (`feed_forward`, `pre_ff_layernorm`, `final_layernorm`, the experts' `router`) under ours;
        the experts one entry each (stacked by transformers, or per expert as the Hub holds them)."""
        for theirs, ours in ((".feed_forward.router.", ".mlp.gate."), (".feed_forward.", ".mlp."),
                             (".pre_ff_layernorm.", ".post_attention_layernorm."),
                             ("model.final_layernorm.", "model.norm.")):
            key = key.replace(theirs, ours)
        return [pair for name, value in super().checkpoint_tensors(key, tensor)
                for pair in moe_checkpoint_tensors(name, value)]


    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes Jamba's layer-0 input (`fused_layer0` is False): `layer0` is never given.
        `attention.recurrent` carries the sequences' states; without it, the batch is one sequence from zero (the
        reference path)."""
        assert embeds is not None
        h = embeds
        batch = recurrent_batch(attention, h)
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            h = h + (layer.mamba(i, x, batch) if hasattr(layer, "mamba") else layer.self_attn(i, x, None, attention))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.norm(h)
