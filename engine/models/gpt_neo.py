"""GPT-Neo (`gpt_neo`: EleutherAI gpt-neo-125m / 1.3B / 2.7B): GPT-2's block (learned positions, LayerNorm,
GELU MLP in nn.Linear weights) with separate bias-free q/k/v projections, unscaled attention scores, and local
layers (`attention_types`) that see only the last `window_size` positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input, Layer0Norms, layer_qkv
from .common import Attention
from .gpt2 import GPT2MLP
from .linear import Linear
from .opt import OPTAttention


class GPTNeoAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attention = OPTAttention(c)  # q_proj, k_proj, v_proj (no bias), out_proj (bias): HF's names


class GPTNeoBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.attn = GPTNeoAttention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = GPT2MLP(c)


class GPTNeoBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_positions, c.hidden_size)
        self.h = nn.ModuleList(GPTNeoBlock(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class GPTNeoForCausalLM(CausalLM):
    key_prefix = "transformer."
    ignored_key_suffixes = ("attn.attention.bias", "attn.attention.masked_bias")  # old checkpoints' mask buffers

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.transformer = GPTNeoBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for block in self.transformer.h:
            block.attn.attention.fuse(transposed)
        super().prepare_for_inference(device)

    def layer0_norms(self) -> Layer0Norms:
        block = self.transformer.h[0]
        ln, attn = block.ln_1, block.attn.attention
        return Layer0Norms(self.transformer.wpe.weight, None, (ln.weight, ln.bias, ln.eps, "layer"),
                           (attn.qkv_weight, attn.qkv_bias))

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        width = c.num_heads * c.head_dim
        # soft-prompt rows get position embeddings too (as in PEFT)
        h = embeds + self.transformer.wpe(positions) if layer0 is None else layer0.residual
        for i, block in enumerate(self.transformer.h):
            a = block.attn.attention
            qkv = layer_qkv(i, layer0, block.ln_1, h, a.project_qkv)
            q, k, v = (part.reshape(t, c.num_heads, c.head_dim) for part in qkv.split(width, dim=-1))
            h = h + a.out_proj(attention(i, q, k, v).reshape(t, width))
            h = h + block.mlp(block.ln_2(h))
        return self.transformer.ln_f(h)
