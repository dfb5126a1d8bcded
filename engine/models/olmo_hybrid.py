"""OLMo Hybrid (`olmo_hybrid`, AllenAI): Gated DeltaNet layers (engine/models/qwen3_5.py's, with q, k, v, the output
gate, a and b projected separately, beta = 2 sigmoid(b) where allow_neg_eigval, a gated output norm of eps 1e-5) in
Llama's pre-norm layout, and every few layers OLMo 3's attention layer (post-norms, q/k RMSNorms over all heads, RoPE
or, as the released checkpoints, none). A Gated DeltaNet layer's past is a recurrent state (engine/recurrent_state.py),
which the attention implementation hands the layer as `attention.recurrent`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input
from .common import Attention
from .hybrid import HybridCausalLM, recurrent_batch
from .llama import LlamaMLP
from .olmo2 import Olmo2Layer, Olmo2RMSNorm, olmo2_layer
from .qwen3_5 import GatedDeltaNet

# OLMo Hybrid's Gated DeltaNet names -> Qwen3.5's
_LINEAR_NAMES = {"g_proj": "in_proj_z", "a_proj": "in_proj_a", "b_proj": "in_proj_b", "o_proj": "out_proj",
                 "o_norm": "norm"}


class OlmoHybridLinearLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.linear_attn = GatedDeltaNet(c, split_qkv=True)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = Olmo2RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = Olmo2RMSNorm(c.hidden_size, c.norm_eps)


class OlmoHybridBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        assert c.linear_attention is not None
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(OlmoHybridLinearLayer(c) if i in c.linear_attention.layers else Olmo2Layer(c)
                                    for i in range(c.num_layers))
        self.norm = Olmo2RMSNorm(c.hidden_size, c.norm_eps)


class OlmoHybridForCausalLM(HybridCausalLM):
    backbone_class = OlmoHybridBackbone

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self._conv_parts: dict[str, dict[str, Tensor]] = {}  # a layer's q/k/v conv weights until all three are read

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The checkpoint's names as transformers renames them at load (`attention_layer_norm`,
        `feedforward_layer_norm`; the q, k and v convolutions' weights concatenated into one, once all three are
        read), and the Gated DeltaNet's own (`g_proj`, `a_proj`, `b_proj`, `o_proj`, `o_norm`) under Qwen3.5's."""
        key = key.replace(".attention_layer_norm.", ".input_layernorm.").replace(
            ".feedforward_layer_norm.", ".post_attention_layernorm.")
        for part in ("q", "k", "v"):
            if key.endswith(f".linear_attn.{part}_conv1d.weight"):
                stem = key.removesuffix(f".{part}_conv1d.weight")
                parts = self._conv_parts.setdefault(stem, {})
                parts[part] = tensor
                if len(parts) < 3:
                    return []
                del self._conv_parts[stem]
                return [(f"{stem}.conv1d.weight", torch.cat([parts["q"], parts["k"], parts["v"]]))]
        if ".linear_attn." in key:
            stem, rest = key.split(".linear_attn.", 1)
            name, _, suffix = rest.partition(".")
            key = f"{stem}.linear_attn.{_LINEAR_NAMES.get(name, name)}" + (f".{suffix}" if suffix else "")
        return super().checkpoint_tensors(key, tensor)


    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes OLMo Hybrid's layer-0 input (`fused_layer0` is False): `layer0` is never given.
        `attention.recurrent` carries the sequences' states; without it, the batch is one sequence from zero (the
        reference path)."""
        c = self.config
        assert embeds is not None
        h = embeds
        batch = recurrent_batch(attention, h)
        rope = None if len(c.nope_layers) == c.num_layers else self.rope_rows(attention, positions)
        for i, layer in enumerate(self.model.layers):
            if hasattr(layer, "linear_attn"):
                h = h + layer.linear_attn(i, layer.input_layernorm(h), batch)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            else:
                h = olmo2_layer(c, i, layer, h, rope, attention)
        return self.model.norm(h)
