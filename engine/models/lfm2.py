"""LFM2 (Liquid AI, `lfm2`): gated short-convolution layers with, among them, grouped-query attention layers (per-head
q/k RMSNorms, RoPE); RMSNorms, SwiGLU MLPs, the final norm named `embedding_norm`. LFM2-MoE (`lfm2_moe`): the same
layers, experts in place of the MLP after the first `num_dense_layers` (moe.py's sigmoid router). LFM3 (`lfm3`):
sliding-window and full-attention layers, each type with a RoPE of its own (the full-attention one proportional, over
part of each head), each head's output gated (`ModelConfig.head_gate`), and an RMSNorm on each sublayer's output
before its residual add (`sandwich_norms`).

A convolution layer projects its input to B, C and x, convolves B * x causally over the last `conv_L_cache` tokens
(per channel, no activation) and gates the result with C. A sequence's past in it is the last `conv_L_cache - 1`
values of B * x: its recurrent state (engine/recurrent_state.py), which the attention implementation hands the layer
as `attention.recurrent`; the reference path runs each sequence from zero.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..recurrent_state import RecurrentBatch
from .base import Layer0Input
from .common import Attention, RMSNorm, causal_conv_packed
from .hybrid import HybridAttention, HybridCausalLM, recurrent_batch
from .linear import Linear, linear
from .llama import LlamaMLP, _fuse
from .moe import SparseMoE, moe_checkpoint_tensors

# LFM2-MoE's per-expert projections (the Hub's names) -> the experts' (LlamaMLP's)
_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class Lfm2ShortConv(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        state = c.short_conv
        assert state is not None
        h, bias = c.hidden_size, bool(getattr(c.hf_config, "conv_bias", False))
        self.in_proj = Linear(h, 3 * h, bias=bias)
        self.conv = nn.Conv1d(h, h, state.conv_kernel, groups=h, bias=bias)
        self.out_proj = Linear(h, h, bias=bias)

    def forward(self, layer: int, x: Tensor, batch: RecurrentBatch) -> Tensor:
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        h, kernel = x.shape[1], self.conv.weight.shape[-1]
        state, _ = batch.initial(layer, (h, kernel - 1), (), x.dtype, x.device)
        out, new_state = causal_conv_packed(b * v, self.conv.weight, self.conv.bias, state, batch.lengths,
                                            batch.all_single)
        batch.store(layer, new_state)
        return self.out_proj(c * out.to(x.dtype))


class Lfm2MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.w1 = Linear(c.hidden_size, c.intermediate_size, bias=False)  # gate
        self.w3 = Linear(c.hidden_size, c.intermediate_size, bias=False)  # up
        self.w2 = Linear(c.intermediate_size, c.hidden_size, bias=False)  # down
        self.gate_up_weight: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.gate_up_weight, _ = _fuse([self.w1, self.w3], transposed)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_weight is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Lfm2Layer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        assert c.short_conv is not None
        if index in c.short_conv.layers:
            self.conv = Lfm2ShortConv(c)
        else:
            self.self_attn = HybridAttention(c, qk_norm=True)
        self.feed_forward: nn.Module = (SparseMoE(c, LlamaMLP) if c.moe is not None and index in c.moe.sparse_layers
                                        else Lfm2MLP(c))
        self.operator_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.norm_eps)
        if c.sandwich_norms:  # LFM3's use_sandwich_norm
            self.post_operator_norm = RMSNorm(c.hidden_size, c.norm_eps)
            self.post_ffn_norm = RMSNorm(c.hidden_size, c.norm_eps)


class Lfm2Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Lfm2Layer(c, i) for i in range(c.num_layers))
        self.embedding_norm = RMSNorm(c.hidden_size, c.norm_eps)  # (the final norm, despite its name)


class Lfm2ForCausalLM(HybridCausalLM):
    backbone_class = Lfm2Backbone
    per_layer_rope = True  # (LFM3's sliding and full-attention layers rotate with RoPEs of their own)

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The attention's own names for its output projection and q/k norms under the shared attention's (LFM3's
        head gate: `g_proj`, as transformers names it, or the Hub's `gate_proj`);
        LFM2-MoE's experts (stacked by transformers, or per expert with the dense MLP's w1 / w3 / w2 names) and the
        router's correction bias (`expert_bias`, on the block) under moe.py's names."""
        for theirs, ours in (("self_attn.out_proj.", "self_attn.o_proj."),
                             ("self_attn.q_layernorm.", "self_attn.q_norm."),
                             ("self_attn.k_layernorm.", "self_attn.k_norm."),
                             ("self_attn.gate_proj.", "self_attn.g_proj."),
                             (".feed_forward.expert_bias", ".feed_forward.gate.e_score_correction_bias")):
            key = key.replace(theirs, ours)
        if ".feed_forward.experts." in key and key.endswith(".weight"):
            stem, name, suffix = key.rsplit(".", 2)
            key = f"{stem}.{_EXPERT_NAMES.get(name, name)}.{suffix}"
        return [pair for name, value in super().checkpoint_tensors(key, tensor)
                for pair in moe_checkpoint_tensors(name, value)]


    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes LFM2's layer-0 input (`fused_layer0` is False): `layer0` is never given.
        `attention.recurrent` (a RecurrentBatch) carries the sequences' convolution states; without it, the batch is
        one sequence from zero (the reference path)."""
        h = embeds
        batch = recurrent_batch(attention, h)
        ropes = self.rope_rows_by_layer(attention, positions)
        sandwich = self.config.sandwich_norms
        for i, layer in enumerate(self.model.layers):
            x = layer.operator_norm(h)
            out = layer.conv(i, x, batch) if hasattr(layer, "conv") else layer.self_attn(i, x, ropes[i], attention)
            h = h + (layer.post_operator_norm(out) if sandwich else out)
            out = layer.feed_forward(layer.ffn_norm(h))
            h = h + (layer.post_ffn_norm(out) if sandwich else out)
        return self.model.embedding_norm(h)
