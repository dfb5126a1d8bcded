"""nanochat (`nanochat`: Karpathy's nanochat): Llama's layout with RMSNorms that have no gain (one also on the input
embeddings, soft-prompt rows included, before the first layer), RoPE turning the other way (transformers' nanochat
rotate_half is [x2, -x1]: rotation by -angle, so the sine tables are negated), q and k L2-normed per head after RoPE,
an ungated squared-ReLU MLP (`fc1`, `fc2`), and logits soft-capped at `final_logit_softcapping`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input
from .common import Attention, l2_norm
from .llama import LlamaBackbone, LlamaForCausalLM, LlamaLayer

_NAMES = ((".mlp.fc1.", ".mlp.up_proj."), (".mlp.fc2.", ".mlp.down_proj."))


class GainlessRMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back: no learned gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return l2_norm(x, self.eps)


class NanoChatLayer(LlamaLayer):
    norm_class = GainlessRMSNorm


class NanoChatBackbone(LlamaBackbone):
    layer_class = NanoChatLayer


class NanoChatForCausalLM(LlamaForCausalLM):
    backbone_class = NanoChatBackbone
    checkpoint_renames = _NAMES

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.fused_layer0 = False  # (the input embeddings are normed before layer 0's own norm)

    def init_buffers(self, device: torch.device) -> None:
        super().init_buffers(device)
        self.rope_sin = -self.rope_sin  # (its RoPE turns the other way)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        return super().forward(self.model.norm(embeds), positions, attention)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap
