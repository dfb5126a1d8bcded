"""LongCat-Flash (Meituan, `longcat_flash`): each layer is two sublayers of DeepSeek-V3's latent attention (queries
and the normed latent times their LoRA scales, `MLAConfig.q_scale` / `latent_scale`), each followed by a dense
SwiGLU MLP, and a "shortcut" mixture of experts fed the first sublayer's normed input, whose output joins the
residual stream after the second MLP. Its experts include zero-computation ones that return their input
(`MoEConfig.identity_experts`), routed by the softmax of fp32 logits plus a correction bias, weighted by those
probabilities times `routed_scaling_factor`, and summed expert by expert in the model dtype, as transformers sums
them. The attention sublayers are the pool's layers: sublayer j of layer i is layer 2i + j."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input, RotaryCausalLM
from .common import Attention, RMSNorm
from .deepseek import DeepseekForCausalLM, LatentAttention
from .llama import LlamaMLP
from .moe import SparseMoE

_NAMES = ((".mlp.router.classifier.", ".mlp.gate."),
          (".mlp.router.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"))
_EXPERT = re.compile(r".*\.mlp\.experts\.(\d+)\..*")


class LongcatLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = nn.ModuleList(LatentAttention(c) for _ in range(2))
        self.mlps = nn.ModuleList(LlamaMLP(c) for _ in range(2))
        self.input_layernorm = nn.ModuleList(RMSNorm(c.hidden_size, c.norm_eps) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(RMSNorm(c.hidden_size, c.norm_eps) for _ in range(2))
        self.mlp = SparseMoE(c, LlamaMLP)


class LongcatBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LongcatLayer(c, i) for i in range(c.num_layers // 2))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class LongcatFlashForCausalLM(DeepseekForCausalLM):
    backbone_class = LongcatBackbone

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.fused_layer0 = False  # (the fused first-layer kernel reads one input norm a layer)
        # transformers keeps the router weight in fp32 where the model is fp16 (`_keep_in_fp32_modules`)
        self.fp32_in_fp16_key_suffixes = ("mlp.gate.weight",)

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The router under our names; the checkpoint's multi-token-prediction layers and any weights of the
        zero-computation experts (which have none: transformers' stacked tensors carry rows for them) left out."""
        if key.startswith("model.mtp."):
            return []
        for theirs, ours in _NAMES:
            key = key.replace(theirs, ours)
        computed = self.config.moe.num_experts - self.config.moe.identity_experts
        return [(name, t) for name, t in super().checkpoint_tensors(key, tensor)
                if not ((match := _EXPERT.fullmatch(name)) and int(match[1]) >= computed)]

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            for module in (*layer.self_attn, *layer.mlps, layer.mlp):
                module.fuse(transposed)
        RotaryCausalLM.prepare_for_inference(self, device)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes LongCat's layer-0 input (`fused_layer0` is False): `layer0` is never given."""
        rope = self.rope_cos[positions], self.rope_sin[positions]
        h = embeds
        for i, layer in enumerate(self.model.layers):
            shortcut = None
            for j in (0, 1):
                a = layer.self_attn[j]
                h = a(2 * i + j, a.project_qkv(layer.input_layernorm[j](h)), rope, attention).add_(h)
                x = layer.post_attention_layernorm[j](h)
                if j == 0:
                    shortcut = layer.mlp(x)
                h = layer.mlps[j](x).add_(h)
            h = h.add_(shortcut)  # ((h + mlp) + shortcut, in HF's order)
        return self.model.norm(h)
