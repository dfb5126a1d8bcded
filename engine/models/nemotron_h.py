"""Nemotron-H (`nemotron_h`: NVIDIA's Nemotron-H, Nemotron Nano 2 and 3): each layer is one mixer after its own
RMSNorm (gain applied in fp32), added to the residual: Mamba-2 (engine/models/mamba2.py), attention without positions
(NoPE), a squared-ReLU MLP, or ungated squared-ReLU experts (grouped sigmoid routing with a correction bias, scaled)
beside a shared expert. A Mamba-2 layer's past is a recurrent state (engine/recurrent_state.py), which the attention
implementation hands the layer as `attention.recurrent`; the reference path runs each sequence from zero."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import HYBRID_LAYER_KINDS, ModelConfig
from .base import CausalLM, Layer0Input
from .common import Attention
from .gpt_oss import GptOssRMSNorm
from .hybrid import HybridAttention, recurrent_batch
from .linear import Linear
from .llama import LlamaMLP
from .mamba2 import Mamba2Mixer
from .moe import SparseMoE, moe_checkpoint_tensors


class NemotronHLayer(nn.Module):
    def __init__(self, c: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = GptOssRMSNorm(c.hidden_size, c.norm_eps)
        if kind == "mamba":
            assert c.mamba2 is not None
            self.mixer = Mamba2Mixer(c.mamba2, c.hidden_size, c.norm_eps)
        elif kind == "attention":
            self.mixer = HybridAttention(c)  # (no RoPE: the model hands it none)
        elif kind == "moe":
            self.mixer = SparseMoE(c, LlamaMLP)
        else:
            self.mixer = LlamaMLP(c)


class NemotronHBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        kinds = [HYBRID_LAYER_KINDS[t] for t in c.hf_config.layers_block_type]
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(NemotronHLayer(c, kind) for kind in kinds)
        self.norm_f = GptOssRMSNorm(c.hidden_size, c.norm_eps)


class NemotronHForCausalLM(CausalLM):
    key_prefix = "backbone."
    fused_layer0 = False  # (the QKV kernel computes no Mamba-2 or MLP layer)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.backbone = NemotronHBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.moe is not None and config.moe.fp32_router_weight:  # (transformers >= 5.24 keeps it in fp32)
            self.fp32_key_suffixes = (*self.fp32_key_suffixes, "mixer.gate.weight")

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The Hub's `backbone.` names, or transformers' `model.` ones; the experts under moe.py's names (one entry
        per expert where they are stacked), the multi-token-prediction layers (`mtp.`) left out as transformers
        does."""
        if key.startswith(("mtp.", "model.mtp.", "backbone.mtp.")):
            return []
        if key.startswith("model."):
            key = "backbone." + key.removeprefix("model.")
        if key.endswith((".experts.up_proj", ".experts.down_proj")) and tensor.dim() == 3:  # (ungated, stacked)
            stem, name = key.rsplit(".", 1)
            return [(f"{stem}.{e}.{name}.weight", t) for e, t in enumerate(tensor)]
        return moe_checkpoint_tensors(key, tensor)

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.backbone.layers:
            if layer.kind in ("attention", "moe", "mlp"):
                layer.mixer.fuse(transposed)
        super().prepare_for_inference(device)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes Nemotron-H's layer-0 input (`fused_layer0` is False): `layer0` is never given.
        `attention.recurrent` (a RecurrentBatch) carries the sequences' states; without it, the batch is one
        sequence from zero (the reference path)."""
        h = embeds
        batch = recurrent_batch(attention, h)
        for i, layer in enumerate(self.backbone.layers):
            x = layer.norm(h)
            if layer.kind == "mamba":
                h = h + layer.mixer(i, x, batch)
            elif layer.kind == "attention":
                h = h + layer.mixer(i, x, None, attention)
            else:
                h = h + layer.mixer(x)
        return self.backbone.norm_f(h)
