"""DeepSeek-V2 / V3, GLM-4.7-Flash (glm4_moe_lite), Mistral 4, Youtu-LLM, MiniCPM3 and A.X K1 (V3 with its MoE
blocks' outputs normed): Llama's layers (and DeepSeek's mixtures of experts) with multi-head latent attention (MLA,
`MLAConfig`).

A token's queries come from a low-rank projection (q_a, RMSNorm, q_b; V2-Lite: one q_proj), its keys and values
from one compressed latent (kv_a, RMSNorm, kv_b) plus qk_rope rotated key channels shared by every head. Layer 0's
first projections of the normed input (q_a or q_proj, and kv_a) are fused into one GEMM, which the triton
backend's fused first-layer-input kernel computes. The paged pool holds each head's expanded key and value (the
value zero-padded to the key's width: the attention then returns the values' channels first, zeros after), so
every attention backend serves MLA unchanged; a prefix's K/V are computed once per task as for any model.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input, Layer0Norms, layer_qkv
from .common import Attention, RMSNorm, apply_rotary, permute_head_channels
from .linear import Linear, linear
from .llama import LlamaBackbone, LlamaForCausalLM, LlamaLayer, _fuse

# A.X K1's MoE output norm, on the layer in its checkpoints, on the MoE block in transformers' (and ours)
_OUTPUT_NORM = re.compile(r"(model\.layers\.(\d+))\.(?:mlp\.)?post_mlp_layernorm\.weight")
_PROJECTION = re.compile(r"self_attn(?:\.\d+)?\.((?:q_b_proj|q_proj|kv_a_proj_with_mqa)\.(?:weight|bias))$")
LATENT_NORM_EPS = 1e-6  # q_a_layernorm's and kv_a_layernorm's (HF builds them with the default eps)


class LatentAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        m = c.mla
        assert m is not None
        heads = c.num_heads
        if m.q_lora_rank:
            self.q_a_proj = Linear(c.hidden_size, m.q_lora_rank, bias=c.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(m.q_lora_rank, heads * m.qk_head_dim, bias=False)
        else:
            self.q_proj = Linear(c.hidden_size, heads * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, m.kv_lora_rank + m.qk_rope_head_dim, bias=c.qkv_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = Linear(heads * m.v_head_dim, c.hidden_size, bias=c.o_bias)
        self.mla = m
        self.num_heads = heads
        self.head_dim = c.head_dim
        self.qkv_weight: Tensor | None = None  # (q_a or q_proj, and kv_a, fused: "qkv" as layer 0's kernel names it)
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        first = self.q_a_proj if self.mla.q_lora_rank else self.q_proj
        self.qkv_weight, self.qkv_bias = _fuse([first, self.kv_a_proj_with_mqa], transposed)

    def project_qkv(self, x: Tensor) -> Tensor:
        """The fused first projections of the normed input (q_a or q_proj, and kv_a)."""
        return linear(x, self.qkv_weight, self.qkv_bias)

    def forward(self, layer: int, first: Tensor, rope: tuple[Tensor, Tensor] | None, attention: Attention,
                q_scale: Tensor | None = None) -> Tensor:
        """`first`: the fused first projections of the normed input [T, q width + kv_lora_rank + qk_rope];
        `q_scale` [T, 1, 1]: Mistral 4's query scale by position."""
        m, heads, t = self.mla, self.num_heads, first.shape[0]
        q_width = m.q_lora_rank or heads * m.qk_head_dim
        q, latent, k_rot = first.split([q_width, m.kv_lora_rank, m.qk_rope_head_dim], dim=1)
        if m.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(t, heads, m.qk_head_dim)
        latent = self.kv_a_layernorm(latent)
        if m.q_scale != 1.0:  # LongCat-Flash's LoRA scales (in the model dtype, before RoPE and kv_b, as HF)
            q = q * m.q_scale
        if m.latent_scale != 1.0:
            latent = latent * m.latent_scale
        kv = self.kv_b_proj(latent).view(t, heads, m.qk_nope_head_dim + m.v_head_dim)
        q_rot, k_rot = q[..., m.qk_nope_head_dim:], k_rot.view(t, 1, m.qk_rope_head_dim)
        if rope is not None:  # (Kimi Linear's latent attention has no RoPE: its rotary channels are not rotated)
            q_rot, k_rot = self._rotate(q_rot, k_rot, *rope)
        q = torch.cat((q[..., :m.qk_nope_head_dim], q_rot), dim=-1)
        if q_scale is not None:
            q = q * q_scale
        k = torch.cat((kv[..., :m.qk_nope_head_dim], k_rot.expand(t, heads, m.qk_rope_head_dim)), dim=-1)
        v = kv[..., m.qk_nope_head_dim:]
        q, k, v = (F.pad(x, (0, self.head_dim - x.shape[-1])) if x.shape[-1] < self.head_dim else x for x in (q, k, v))
        out = attention(layer, q, k, v)[..., :m.v_head_dim]
        return self.o_proj(out.reshape(t, heads * m.v_head_dim))

    def _rotate(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE over the rotary channels (rotate-half: interleaved checkpoints' channels are permuted at load);
        DeepSeek-V2's in fp32 tables, cast back after (as its complex-number rotation)."""
        if not self.mla.fp32_rope:
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype)


class DeepseekLayer(LlamaLayer):
    attention_class = LatentAttention


class DeepseekBackbone(LlamaBackbone):
    layer_class = DeepseekLayer


def _halves_order(start: int, rotary: int) -> list[int]:
    """Channels start.. start+rotary-1 from interleaved pairs (2i, 2i+1) to rotate-half's (i, i + rotary/2), the
    channels before `start` in place."""
    return [*range(start), *range(start, start + rotary, 2), *range(start + 1, start + rotary, 2)]


class DeepseekForCausalLM(LlamaForCausalLM):
    backbone_class = DeepseekBackbone
    per_layer_rope = False  # (its forward rotates with the one RoPE)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        hf = config.hf_config
        minicpm = config.model_type == "minicpm3"
        self.embed_scale_value = float(hf.scale_emb) if minicpm else 1.0  # MiniCPM3's, inside the embedding
        self.hidden_divisor = float(hf.hidden_size / hf.dim_model_base) if minicpm else 1.0  # before the LM head
        # token rows are scaled and prompt rows not: the fused input kernels do not do that
        self.fused_layer0 = self.embed_scale_value == 1.0
        if config.model_type == "axk1":  # (A.X K1's releases route without a correction bias)
            self.optional_key_suffixes = ("e_score_correction_bias",)

    @property
    def rope_tables(self) -> tuple[Tensor, Tensor] | None:
        return None  # (the model rotates the rotary channels itself)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """MiniCPM3's token rows times scale_emb (cast to the table's dtype first, as HF's scaled embedding);
        soft-prompt rows go in as they are, as PEFT concatenates them."""
        rows = self.model.embed_tokens(ids)
        return rows if self.embed_scale_value == 1.0 else rows * self.embed_scale

    @property
    def rope_dtype(self) -> torch.dtype:
        return torch.float32 if self.config.mla.fp32_rope else super().rope_dtype  # (V2's cos/sin kept in fp32)

    def init_buffers(self, device: torch.device) -> None:
        super().init_buffers(device)
        dtype = self.word_embeddings.weight.dtype
        self.register_buffer("embed_scale", torch.tensor(self.embed_scale_value).to(device, dtype), persistent=False)

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """Llama's mapping (experts, multi-token-prediction layers left out); with interleaved RoPE, each head's
        rotary query rows and the shared rotary key rows permuted to rotate-half's order."""
        if ".self_attn.indexer." in key:  # (DeepSeek-V3.2's: all keys are kept up to its index_topk, where sequences
            return []  # end)
        if self.config.model_type == "axk1" and (match := _OUTPUT_NORM.fullmatch(key)):  # its MoE output norm
            moe = self.config.moe
            if moe is None or int(match[2]) not in moe.sparse_layers:  # (the dense layers' go unused, as in HF)
                return []
            key = f"{match[1]}.mlp.post_mlp_layernorm.weight"
        mapped = super().checkpoint_tensors(key, tensor)
        m = self.config.mla
        if not m.interleaved_rope:
            return mapped
        out = []
        for name, t in mapped:
            projection = _PROJECTION.search(name)  # (LongCat-Flash's two attention sublayers: `self_attn.{0,1}.`)
            if projection and projection[1] in ("q_b_proj.weight", "q_proj.weight"):
                t = permute_head_channels(t, m.qk_head_dim, _halves_order(m.qk_nope_head_dim, m.qk_rope_head_dim))
            elif projection and projection[1].startswith("kv_a_proj_with_mqa."):
                width = m.kv_lora_rank + m.qk_rope_head_dim
                t = permute_head_channels(t, width, _halves_order(m.kv_lora_rank, m.qk_rope_head_dim))
            out.append((name, t))
        return out

    def layer0_norms(self) -> Layer0Norms:
        layer = self.model.layers[0]
        norm, attn = layer.input_layernorm, layer.self_attn
        return Layer0Norms(None, None, (norm.weight, None, norm.eps, "rms"), (attn.qkv_weight, attn.qkv_bias))

    def query_scale(self, positions: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Mistral 4's query scale by position [T, 1, 1], as Ministral 3's; None for the others."""
        c = self.config
        if not c.query_scale_beta:
            return None
        scale = 1 + c.query_scale_beta * torch.log(1 + torch.floor(positions / c.query_scale_period))
        return scale.to(dtype)[:, None, None]

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        rope = self.rope_cos[positions], self.rope_sin[positions]
        h = embeds if layer0 is None else layer0.residual
        r = c.residual_multiplier  # (MiniCPM3's)
        q_scale = self.query_scale(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            a = layer.self_attn
            first = layer_qkv(i, layer0, layer.input_layernorm, h, a.project_qkv)
            out = a(i, first, rope, attention, q_scale)
            h = (out if r == 1.0 else out.mul_(r)).add_(h)
            out = layer.mlp(layer.post_attention_layernorm(h))
            h = (out if r == 1.0 else out.mul_(r)).add_(h)
        h = self.model.norm(h)
        return h if self.hidden_divisor == 1.0 else h / self.hidden_divisor
