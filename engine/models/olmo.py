"""OLMo (`olmo`: OLMo-1B/7B-hf, OLMo-7B-0424/0724-hf): the Llama layout with LayerNorms that have neither gain nor
bias (normalised in fp32, eps 1e-5), and q/k/v clipped to [-clip_qkv, clip_qkv] where the config sets it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .llama import LlamaBackbone, LlamaForCausalLM, LlamaLayer


class NonParametricLayerNorm(nn.Module):
    """LayerNorm without gain or bias, computed in fp32 and cast back, as OLMo's."""

    def __init__(self, dim: int):
        super().__init__()
        self.shape = (dim,)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.shape, None, None, eps=1e-5).to(x.dtype)


class OlmoLayer(LlamaLayer):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__(c, index)
        self.input_layernorm = NonParametricLayerNorm(c.hidden_size)
        self.post_attention_layernorm = NonParametricLayerNorm(c.hidden_size)


class OlmoBackbone(LlamaBackbone):
    layer_class = OlmoLayer

    @staticmethod
    def final_norm(c: ModelConfig) -> nn.Module:
        return NonParametricLayerNorm(c.hidden_size)


class OlmoForCausalLM(LlamaForCausalLM):
    """Llama's forward (which clips q/k/v where `clip_qkv` is set) over OLMo's layers."""

    backbone_class = OlmoBackbone

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.fused_layer0 = False  # (the fused input kernels take a norm with a gain)
