"""Gemma family: Gemma (1), Gemma 2 and Gemma 3 text models (`gemma`, `gemma2`, `gemma3_text`), VaultGemma.

Llama's layout with Gemma's differences: token embeddings scaled by sqrt(hidden) (inside the embedding, as HF
does, so a soft prompt's rows are fed unscaled, exactly as PEFT concatenates them), RMSNorm gains of (1 + w)
applied in fp32, a GeGLU MLP. Gemma 2 and 3 add norms after attention and around the MLP, sliding-window layers
and an attention scale of query_pre_attn_scalar^-0.5; Gemma 2 softcaps attention scores and logits (the attention
implementations apply the score cap), Gemma 3 norms each head's q and k and gives sliding layers their own RoPE.
VaultGemma is Gemma 2 with only Gemma 1's two norms per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input
from .common import Attention, apply_rotary, gather_rope_rows, norm_heads, rope_layer_types, rope_tables_by_layer
from .linear import Linear, linear
from .llama import LlamaAttention, LlamaMLP


class GemmaRMSNorm(nn.Module):
    """HF Gemma's: normalise and scale by (1 + weight) in fp32, then cast back (Llama casts before scaling)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GemmaLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(c, norm=GemmaRMSNorm)  # Gemma 3's q/k norms are Gemma's
        self.mlp = LlamaMLP(c)
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)
        if c.sandwich_norms:  # Gemma 2/3: post_attention_layernorm is on the attention output, these around the MLP
            self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)


class GemmaBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(GemmaLayer(c) for _ in range(c.num_layers))
        self.norm = GemmaRMSNorm(c.hidden_size, c.norm_eps)


class GemmaForCausalLM(CausalLM):
    key_prefix = "model."
    ignored_key_suffixes = ("rotary_emb.inv_freq",)
    fused_layer0 = False  # token rows are scaled and prompt rows not: the fused input kernels do not do that

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = GemmaBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """VaultGemma's MLP input norm under Gemma 1's name (it is Gemma 2 without the norms after attention and
        the MLP)."""
        if self.config.model_type == "vaultgemma":
            key = key.replace(".pre_feedforward_layernorm.", ".post_attention_layernorm.")
        return super().checkpoint_tensors(key, tensor)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Scaled by sqrt(hidden), the scale rounded to the table's dtype first, as HF's scaled embedding does."""
        return self.model.embed_tokens(ids) * self.embed_scale

    def init_buffers(self, device: torch.device) -> None:
        """The embedding scale in the model dtype, and cos/sin of every position for each layer type (Gemma 3:
        sliding layers have their own RoPE base)."""
        c = self.config
        dtype = self.model.embed_tokens.weight.dtype
        self.register_buffer("embed_scale", torch.tensor(c.hidden_size**0.5).to(device, dtype), persistent=False)
        positions = torch.arange(c.max_positions, device=device)
        # (Gemma 3: a RoPE per layer type)
        self.rope_by_layer = rope_tables_by_layer(c, rope_layer_types(c), c.head_dim, positions, dtype)

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            layer.self_attn.fuse(transposed)
            layer.mlp.fuse(transposed)
        super().prepare_for_inference(device)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes Gemma's layer-0 input (`fused_layer0` is False): `layer0` is never given."""
        c = self.config
        t = positions.shape[0]
        qk_width = (c.num_heads + c.num_kv_heads) * c.head_dim
        h = embeds
        rope_by_layer = gather_rope_rows(self.rope_by_layer, positions)
        for i, (layer, rope) in enumerate(zip(self.model.layers, rope_by_layer)):
            a = layer.self_attn
            qkv = linear(layer.input_layernorm(h), a.qkv_weight, a.qkv_bias)
            qk = qkv[:, :qk_width].view(t, c.num_heads + c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                qk = norm_heads(qk, c.num_heads, a.q_norm, a.k_norm)
            qk = apply_rotary(qk, *rope)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads:]
            v = qkv[:, qk_width:].view(t, c.num_kv_heads, c.head_dim)
            out = a.o_proj(attention(i, q, k, v).reshape(t, c.num_heads * c.head_dim))
            if c.sandwich_norms:
                h = h + layer.post_attention_layernorm(out)
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = out.add_(h)
                h = layer.mlp(layer.post_attention_layernorm(h)).add_(h)
        return self.model.norm(h)
