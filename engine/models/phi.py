"""Phi-1, Phi-1.5, Phi-2 (`phi`): RoPE over part of each head, LayerNorm, GELU MLP, attention and MLP in parallel
on the same normed input, biases everywhere (the LM head's too); optional per-head q/k LayerNorm. GPT-J (`gptj`)
has the same layout."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input, Layer0Norms, RotaryCausalLM
from .common import Attention, activation, apply_rotary, norm_heads, permute_head_channels
from .linear import Linear, linear
from .llama import LlamaAttention


class PhiMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.fc1 = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = c.hidden_act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class PhiLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        # the checkpoint's `dense`, `q_layernorm` and `k_layernorm` are our o_proj, q_norm and k_norm
        self.self_attn = LlamaAttention(c, norm=nn.LayerNorm)
        self.mlp = PhiMLP(c)
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class PhiBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(PhiLayer(c) for _ in range(c.num_layers))
        self.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class PhiForCausalLM(RotaryCausalLM):
    key_prefix = "model."

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = PhiBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        for theirs, ours in ((".self_attn.dense.", ".self_attn.o_proj."), (".q_layernorm.", ".q_norm."),
                             (".k_layernorm.", ".k_norm.")):
            key = key.replace(theirs, ours)
        return [(key, tensor)]

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            layer.self_attn.fuse(transposed)
        super().prepare_for_inference(device)

    def layer0_norms(self) -> Layer0Norms:
        layer = self.model.layers[0]
        ln, attn = layer.input_layernorm, layer.self_attn
        return Layer0Norms(None, None, (ln.weight, ln.bias, ln.eps, "layer"), (attn.qkv_weight, attn.qkv_bias))

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        rope = self.rope_rows(attention, positions)
        qk_width = (c.num_heads + c.num_kv_heads) * c.head_dim
        h = embeds if layer0 is None else layer0.residual
        for i, layer in enumerate(self.model.layers):
            a = layer.self_attn
            if i == 0 and layer0 is not None:
                # the MLP needs the normed input too: a fused QKV kernel never wrote it, so it is normed here
                x = layer0.normed if layer0.normed is not None else layer.input_layernorm(h)
                qkv = layer0.qkv if layer0.qkv is not None else linear(x, a.qkv_weight, a.qkv_bias)
            else:
                x = layer.input_layernorm(h)
                qkv = linear(x, a.qkv_weight, a.qkv_bias)
            qk = qkv[:, :qk_width].view(t, c.num_heads + c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                qk = norm_heads(qk, c.num_heads, a.q_norm, a.k_norm)
            if rope is not None:
                qk = apply_rotary(qk, *rope)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads:]
            v = qkv[:, qk_width:].view(t, c.num_kv_heads, c.head_dim)
            out = a.o_proj(attention(i, q, k, v).reshape(t, c.num_heads * c.head_dim))
            h = out + layer.mlp(x) + h  # HF: attn + mlp + residual
        return self.model.final_layernorm(h)


CODEGEN_MP_NUM = 4  # the model-parallel groups CodeGen's qkv_proj rows are laid out in (fixed in transformers)
_GPTJ_NAMES = ((".ln_1.", ".input_layernorm."), (".attn.out_proj.", ".self_attn.o_proj."), (".attn.", ".self_attn."),
               (".mlp.fc_in.", ".mlp.fc1."), (".mlp.fc_out.", ".mlp.fc2."))


class GPTJForCausalLM(PhiForCausalLM):
    """GPT-J (`gptj`): Phi's layout (parallel attention and GELU MLP on one LayerNorm, LM-head bias; no q/k/v/out
    bias) under GPT-2-style names, with RoPE over each head's first `rotary_dim` channels in interleaved pairs
    (2i, 2i+1). The q and k projections' rows are permuted at load, the same way per head, to put pair i at
    (i, i + rotary_dim/2), where rotate-half RoPE turns it: q.k, the only use of q and k, does not change
    (`ModelConfig.key_channel_order`; prefix-tuning keys are permuted alike)."""

    key_prefix = ""
    ignored_key_suffixes = ("attn.bias", "attn.masked_bias", "attn.embed_positions")

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        if key.startswith("transformer."):
            key = key.replace("transformer.wte.", "model.embed_tokens.").replace("transformer.ln_f.",
                                                                                 "model.final_layernorm.")
            key = key.replace("transformer.h.", "model.layers.")
            for theirs, ours in _GPTJ_NAMES:
                key = key.replace(theirs, ours)
        if key.endswith("self_attn.qkv_proj.weight"):  # CodeGen
            return [pair for name, part in self._codegen_qkv(key, tensor)
                    for pair in self.checkpoint_tensors(name, part)]
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            tensor = permute_head_channels(tensor, self.config.head_dim, self.config.key_channel_order)
        return [(key, tensor)]

    def _codegen_qkv(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """CodeGen's fused qkv_proj: CODEGEN_MP_NUM row groups, each [q | v | k] for its quarter of the heads, as
        separate q/k/v projections of all heads in order."""
        c = self.config
        groups = tensor.reshape(CODEGEN_MP_NUM, 3, c.num_heads * c.head_dim // CODEGEN_MP_NUM, tensor.shape[-1])
        q, v, k = (groups[:, part].reshape(c.num_heads * c.head_dim, -1) for part in range(3))
        stem = key.removesuffix("qkv_proj.weight")
        return [(stem + "q_proj.weight", q), (stem + "k_proj.weight", k), (stem + "v_proj.weight", v)]
