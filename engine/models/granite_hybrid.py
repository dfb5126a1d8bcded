"""Granite 4.0's hybrids (`granitemoehybrid`): GraniteMoeShared's layers (embedding, residual and attention
multipliers, logits divided by logits_scaling; experts routed by the softmax of their top-k logits beside an ungated
shared MLP, or the shared MLP alone) whose mixer is Mamba-2 (engine/models/mamba2.py) in most layers and attention
(RoPE or none) in the others. Bamba (`bamba`): the same layers without multipliers or experts, a SwiGLU MLP
(`feed_forward`, after `pre_ff_layernorm`), RoPE over half of each head, the final norm `final_layernorm`. A Mamba-2
layer's past is a recurrent state (engine/recurrent_state.py), which the attention implementation hands the layer as
`attention.recurrent`; the reference path runs each sequence from zero.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input
from .common import Attention, RMSNorm
from .hybrid import HybridAttention, HybridCausalLM, recurrent_batch
from .llama import LlamaMLP
from .mamba2 import Mamba2Mixer
from .moe import SparseMoE, moe_checkpoint_tensors


class GraniteHybridLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        assert c.mamba2 is not None
        if index in c.mamba2.layers:
            self.mamba = Mamba2Mixer(c.mamba2, c.hidden_size, c.norm_eps)
        else:
            self.self_attn = HybridAttention(c)
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
