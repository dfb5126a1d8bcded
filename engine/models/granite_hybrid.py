"""Granite 4.0's hybrids (`granitemoehybrid`): GraniteMoeShared's layers (embedding, residual and attention
multipliers, logits divided by logits_scaling; experts routed by the softmax of their top-k logits beside an ungated
shared MLP, or the shared MLP alone) whose mixer is Mamba-2 (engine/models/mamba2.py) in most layers and attention
(RoPE or none) in the others. Bamba (`bamba`): the same layers without multipliers or experts, a SwiGLU MLP
(`feed_forward`, after `pre_ff_layernorm`), RoPE over half of each head, the final norm `final_layernorm`. A Mamba-2
layer's past is a recurrent state (engine/recurrent_state.py), which the attention implementation hands the layer as
`attention.recurrent`; the reference path runs each sequence from zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input
from .common import Attention, RMSNorm, apply_rotary
from .hybrid import HybridCausalLM, recurrent_batch
from .linear import Linear, linear
from .llama import LlamaMLP, _fuse
from .mamba2 import Mamba2Mixer
from .moe import SparseMoE, moe_checkpoint_tensors


class GraniteHybridAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        d = c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * d, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_heads * d, c.hidden_size, bias=c.o_bias)
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.qkv_weight, self.qkv_bias = _fuse([self.q_proj, self.k_proj, self.v_proj], transposed)

    def forward(self, layer: int, x: Tensor, rope: tuple[Tensor, Tensor] | None, attention: Attention) -> Tensor:
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_weight is not None:
            qkv = linear(x, self.qkv_weight, self.qkv_bias)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qk = qkv[:, :(hq + hkv) * d].view(t, hq + hkv, d)
        if rope is not None:
            qk = apply_rotary(qk, *rope)
        out = attention(layer, qk[:, :hq], qk[:, hq:], qkv[:, (hq + hkv) * d:].view(t, hkv, d))
        return self.o_proj(out.reshape(t, hq * d))


class GraniteHybridLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        assert c.mamba2 is not None
        if index in c.mamba2.layers:
            self.mamba = Mamba2Mixer(c.mamba2, c.hidden_size, c.norm_eps)
        else:
            self.self_attn = GraniteHybridAttention(c)
        # (the shared MLP alone is the config's intermediate_size wide)
        self.mlp = SparseMoE(c, LlamaMLP) if c.moe is not None else LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class GraniteHybridBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(GraniteHybridLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class GraniteHybridForCausalLM(HybridCausalLM):
    backbone_class = GraniteHybridBackbone

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The experts (`block_sparse_moe`) and shared MLP (`shared_mlp`, [gate | up] fused) under moe.py's names;
        without experts, the shared MLP is the layer's MLP."""
        if self.config.model_type == "bamba":  # (its own names for the MLP and the norms around it)
            for theirs, ours in (("feed_forward.", "mlp."), ("pre_ff_layernorm.", "post_attention_layernorm."),
                                 ("model.final_layernorm.", "model.norm.")):
                key = key.replace(theirs, ours)
        pairs = []
        for name, value in super().checkpoint_tensors(key, tensor):
            if self.config.moe is None and ".shared_mlp." in name:
                stem = name.split(".shared_mlp.", 1)[0]
                if name.endswith("input_linear.weight"):
                    pairs += zip((f"{stem}.mlp.gate_proj.weight", f"{stem}.mlp.up_proj.weight"), value.chunk(2))
                else:
                    pairs.append((name.replace(".shared_mlp.output_linear.", ".mlp.down_proj."), value))
            else:
                pairs += moe_checkpoint_tensors(name, value)
        return pairs

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            if hasattr(layer, "self_attn"):
                layer.self_attn.fuse(transposed)
            layer.mlp.fuse(transposed)
        super().prepare_for_inference(device)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes this family's layer-0 input (`fused_layer0` is False): `layer0` is never
        given. `attention.recurrent` (a RecurrentBatch) carries the sequences' states; without it, the batch is
        one sequence from zero (the reference path)."""
        c = self.config
        h = embeds * c.embedding_multiplier
        r = c.residual_multiplier
        batch = recurrent_batch(attention, h)
        rope = None if c.nope_layers else self.rope_rows(attention, positions)
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            out = layer.mamba(i, x, batch) if hasattr(layer, "mamba") else layer.self_attn(i, x, rope, attention)
            h = h + out * r
            h = h + layer.mlp(layer.post_attention_layernorm(h)) * r
        return self.model.norm(h)
