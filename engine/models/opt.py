"""OPT (`opt`: facebook/opt-125m ... opt-66b): learned positions (table offset by 2), LayerNorm, ReLU MLP, biases;
pre-norm, or post-norm as opt-350m has it (`do_layer_norm_before=False`), whose embeddings are narrower than the
model (`word_embed_proj_dim`: projected in after the embedding and out before the LM head). XGLM and BioGPT, the
same pre-norm decoder from fairseq: token embeddings scaled by sqrt(hidden) (`scale_embedding`), XGLM's positions
sinusoidal."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input, Layer0Norms
from .common import Attention, activation
from .linear import Linear, linear
from .llama import _fuse

POSITION_OFFSET = 2  # OPT's position table starts two rows in


class OPTAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        width = c.num_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, width, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, width, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, width, bias=c.qkv_bias)
        self.out_proj = Linear(width, c.hidden_size, bias=c.o_bias)
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.qkv_weight, self.qkv_bias = _fuse([self.q_proj, self.k_proj, self.v_proj], transposed)

    def project_qkv(self, x: Tensor) -> Tensor:
        return linear(x, self.qkv_weight, self.qkv_bias)


class OPTLayer(nn.Module):
    def __init__(self, c: ModelConfig, affine: bool):
        super().__init__()
        self.self_attn = OPTAttention(c)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps, elementwise_affine=affine)
        self.fc1 = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps, elementwise_affine=affine)


class OPTDecoder(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        hf = c.hf_config
        affine = bool(getattr(hf, "layer_norm_elementwise_affine", True))
        embed_dim = c.embedding_width
        self.embed_tokens = nn.Embedding(c.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(c.max_positions + POSITION_OFFSET, c.hidden_size)
        if embed_dim != c.hidden_size:
            self.project_in = Linear(embed_dim, c.hidden_size, bias=False)
            self.project_out = Linear(c.hidden_size, embed_dim, bias=False)
        self.layers = nn.ModuleList(OPTLayer(c, affine) for _ in range(c.num_layers))
        if not c.post_layer_norm and not getattr(hf, "_remove_final_layer_norm", False):
            self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps, elementwise_affine=affine)


class OPTBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.decoder = OPTDecoder(c)


class OPTForCausalLM(CausalLM):
    key_prefix = "model."

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = OPTBackbone(config)
        decoder = self.model.decoder
        self.lm_head = Linear(config.embedding_width, config.vocab_size, bias=False)
        # layer 0's input is LayerNorm(embedding + position) only pre-norm, at the model's width, with a gain
        self.fused_layer0 = (not config.post_layer_norm and not hasattr(decoder, "project_in")
                             and decoder.layers[0].self_attn_layer_norm.weight is not None)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.decoder.layers:
            layer.self_attn.fuse(transposed)
        super().prepare_for_inference(device)

    def layer0_norms(self) -> Layer0Norms:
        decoder = self.model.decoder
        ln, attn = decoder.layers[0].self_attn_layer_norm, decoder.layers[0].self_attn
        positions = decoder.embed_positions.weight[POSITION_OFFSET:]  # row p: position p
        return Layer0Norms(positions, None, (ln.weight, ln.bias, ln.eps, "layer"), (attn.qkv_weight, attn.qkv_bias))

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        decoder = self.model.decoder
        width = c.num_heads * c.head_dim
        if layer0 is None:
            if hasattr(decoder, "project_in"):
                embeds = decoder.project_in(embeds)
            h = embeds + decoder.embed_positions(positions + POSITION_OFFSET)  # soft-prompt rows too, as in PEFT
        else:
            h = layer0.residual
        for i, layer in enumerate(decoder.layers):
            a = layer.self_attn
            if i == 0 and layer0 is not None and layer0.qkv is not None:
                qkv = layer0.qkv
            elif c.post_layer_norm:
                qkv = linear(h, a.qkv_weight, a.qkv_bias)
            else:
                x = layer0.normed if (i == 0 and layer0 is not None) else layer.self_attn_layer_norm(h)
                qkv = linear(x, a.qkv_weight, a.qkv_bias)
            q = qkv[:, :width] * c.head_dim**-0.5  # HF scales the queries, then attends unscaled
            k, v = qkv[:, width:2 * width], qkv[:, 2 * width:]
            shape = (t, c.num_heads, c.head_dim)
            h = a.out_proj(attention(i, q.reshape(shape), k.reshape(shape), v.reshape(shape)).reshape(t, width)) + h
            if c.post_layer_norm:
                h = layer.self_attn_layer_norm(h)
                h = layer.final_layer_norm(layer.fc2(activation(c.hidden_act, layer.fc1(h))) + h)
            else:
                h = layer.fc2(activation(c.hidden_act, layer.fc1(layer.final_layer_norm(h)))) + h
        if hasattr(decoder, "final_layer_norm"):
            h = decoder.final_layer_norm(h)
        if hasattr(decoder, "project_out"):
            h = decoder.project_out(h)
        return h


class SinusoidalPositions(nn.Module):
    """XGLM's fixed position table (fairseq's sinusoids: sines, then cosines), rows offset as OPT's; computed at
    init_buffers, never loaded."""

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        self.weight: Tensor | None = None

    def build(self, device: torch.device, dtype: torch.dtype, padding_idx: int | None) -> None:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
        angles = torch.arange(self.num_rows, dtype=torch.int64).float().unsqueeze(1) * freq.unsqueeze(0)
        table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        if self.dim % 2:
            table = torch.cat([table, torch.zeros(self.num_rows, 1)], dim=1)
        if padding_idx is not None:
            table[padding_idx] = 0
        self.weight = table.to(device, dtype)

    def forward(self, positions: Tensor) -> Tensor:
        return self.weight[positions]


class FairseqLMForCausalLM(OPTForCausalLM):
    """XGLM's and BioGPT's checkpoints under OPT's names; token rows scaled (soft-prompt rows go in as PEFT
    concatenates them, unscaled: the scaled embedding is their models' input embedding)."""

    checkpoint_names: tuple[tuple[str, str], ...] = ()

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.fused_layer0 = False  # token rows scaled, prompt rows not: the fused input kernels do not do that
        self.embed_scale = math.sqrt(config.hidden_size) if config.hf_config.scale_embedding else 1.0

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        for theirs, ours in self.checkpoint_names:
            if key.startswith(theirs):
                return [(ours + key.removeprefix(theirs), tensor)]
        return [(key, tensor)]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.word_embeddings(ids) * self.embed_scale  # (a Python float, as HF multiplies)


class XGLMForCausalLM(FairseqLMForCausalLM):
    checkpoint_names = (("model.layer_norm.", "model.decoder.final_layer_norm."), ("model.", "model.decoder."))

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model.decoder.embed_positions = SinusoidalPositions(config.max_positions + POSITION_OFFSET,
                                                                 config.hidden_size)

    def init_buffers(self, device: torch.device) -> None:
        self.model.decoder.embed_positions.build(device, self.word_embeddings.weight.dtype,
                                                 self.config.hf_config.pad_token_id)


class BioGptForCausalLM(FairseqLMForCausalLM):
    checkpoint_names = (("biogpt.layer_norm.", "model.decoder.final_layer_norm."), ("biogpt.", "model.decoder."),
                        ("output_projection.", "lm_head."))
