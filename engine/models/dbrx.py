"""DBRX (`dbrx`: Databricks' DBRX): Llama's serial layout with bias-free LayerNorms, q/k/v fused in `Wqkv` [q | k | v]
(clamped to `attn_config.clip_qkv`), and in every layer a mixture of experts (the router's softmax in the model dtype,
top-k, renormalised), the experts stored as `w1` / `v1` / `w2` [E x F, H] (gate, up, and down transposed)."""

from __future__ import annotations

import re

from torch import Tensor, nn

from .llama import LlamaBackbone, LlamaForCausalLM, LlamaLayer

_NAMES = (("transformer.blocks.", "model.layers."), (".norm_attn_norm.norm_1.", ".input_layernorm."),
          (".norm_attn_norm.norm_2.", ".post_attention_layernorm."),
          (".norm_attn_norm.attn.out_proj.", ".self_attn.o_proj."),
          (".norm_attn_norm.attn.Wqkv.", ".self_attn.qkv_proj."),
          (".ffn.router.layer.", ".mlp.gate."), ("transformer.wte.", "model.embed_tokens."),
          ("transformer.norm_f.", "model.norm."))
_EXPERTS = re.compile(r"(.*)\.ffn\.experts\.mlp\.(w1|v1|w2)")
_EXPERT_NAMES = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}


class BiasFreeLayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps, bias=False)


class DbrxLayer(LlamaLayer):
    norm_class = BiasFreeLayerNorm


class DbrxBackbone(LlamaBackbone):
    layer_class = DbrxLayer


class DbrxForCausalLM(LlamaForCausalLM):
    backbone_class = DbrxBackbone
    checkpoint_renames = _NAMES

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        c = self.config
        if match := _EXPERTS.fullmatch(key):  # [E x F, H]: each expert's gate, up, or down transposed
            stem, name = match.groups()
            stem = stem.replace("transformer.blocks.", "model.layers.")
            experts = tensor.view(c.moe.num_experts, c.moe.intermediate_size, c.hidden_size)
            return [(f"{stem}.mlp.experts.{e}.{_EXPERT_NAMES[name]}.weight", t.t() if name == "w2" else t)
                    for e, t in enumerate(experts)]
        return super().checkpoint_tensors(key, tensor)
