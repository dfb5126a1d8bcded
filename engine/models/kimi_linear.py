"""Kimi Linear (Moonshot AI, `kimi_linear`): Kimi Delta Attention (KDA) layers with, every few layers, DeepSeek's
latent attention without RoPE; Llama's RMSNorms; dense MLPs, then DeepSeek-V3's experts and shared experts.

A KDA layer is Qwen3.5's Gated DeltaNet with a decay per key channel instead of one per head: q/k/v projections
through a causal depthwise convolution (silu), L2-normalised q and k (q also times key_head_dim^-0.5), and per head
a state S [Dk, Dv] that decays by exp(g_t) channel by channel (g from a low-rank forget gate: -exp(A_log) *
softplus(f_b(f_a(x)) + dt_bias)) and is corrected towards v_t at k_t with rate beta_t = sigmoid(b(x)); the heads'
outputs RMS-normed in fp32 and gated by sigmoid(g_b(g_a(x))). A sequence's past is its states
(engine/recurrent_state.py), as for Qwen3.5. Prefill runs the rule chunk-wise (64 tokens, the per-channel decays
of a chunk's token pairs held at once), decode one step at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, hf_router_weights_in_fp32
from ..recurrent_state import RecurrentBatch
from .base import CausalLM, Layer0Input
from .common import Attention, RMSNorm, activation, causal_conv_packed
from .deepseek import LatentAttention
from .hybrid import recurrent_batch, scan_packed
from .linear import Linear, linear
from .llama import LlamaMLP, _fuse
from .moe import SparseMoE, moe_checkpoint_tensors
from .qwen3_5 import DELTA_RULE_CHUNK

# the Hub's names for the forget gate (on the attention) and its split convolutions -> ours (transformers' names
# for the forget gate are read too)
_NAMES = ((".self_attn.forget_gate.", ".self_attn."),)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as transformers' KDA computes it (a division, not rsqrt)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def kda_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of each of B sequences: q/k/g [B, H, Dk], v [B, H, Dv], beta [B, H], state [B, H, Dk, Dv], fp32
    -> outputs [B, H, Dv] and the new states."""
    state = state * g.exp()[..., None]
    remembered = (state * k[..., None]).sum(-2)
    state = state + k[..., None] * ((v - remembered) * beta[..., None])[..., None, :]
    return (state * q[..., None]).sum(-2), state


def kda_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                chunk: int = DELTA_RULE_CHUNK) -> tuple[Tensor, Tensor]:
    """n tokens of one sequence: q/k/g [n, H, Dk], v [n, H, Dv], beta [n, H], state [H, Dk, Dv], fp32 -> outputs
    [n, H, Dv] and the final state. Within a chunk the corrections are one lower-triangular system whose entries
    sum over key channels, each decayed by its own cumulative gate between the two tokens."""
    n = q.shape[0]
    pad = -n % chunk

    def chunked(x: Tensor) -> Tensor:  # [n, H, ...] -> [H, chunks, chunk, ...], zero-padded
        x = x.movedim(0, 1)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 3 else F.pad(x, (0, pad))
        return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])

    q, k, v, g, beta = map(chunked, (q, k, v, g, beta))  # (padded tokens: g = 0, beta = 0, k = 0)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()[..., None]
    out = torch.empty_like(v)
    for i in range(q.shape[1]):
        decay = g[:, i].cumsum(-2)  # [H, chunk, Dk]: log of each channel's decay from the chunk's start
        pair = (decay[:, :, None] - decay[:, None]).masked_fill(~lower, float("-inf")).exp()  # [H, chunk, chunk, Dk]
        k_i, q_i = k[:, i], q[:, i]
        k_beta = k_i * beta[:, i][..., None]
        system = (k_beta[:, :, None] * k_i[:, None] * pair).sum(-1)  # its strictly lower part: unit diagonal assumed
        corrected_v = torch.linalg.solve_triangular(system, v[:, i] * beta[:, i][..., None], upper=False,
                                                    unitriangular=True)
        state_read = torch.linalg.solve_triangular(system, k_beta * decay.exp(), upper=False, unitriangular=True)
        within = (q_i[:, :, None] * k_i[:, None] * pair).sum(-1)
        new_v = corrected_v - state_read @ state
        out[:, i] = (q_i * decay.exp()) @ state + within @ new_v
        state = state * decay[:, -1].exp()[..., None] + (k_i * (decay[:, -1:] - decay).exp()).transpose(-1, -2) @ new_v
    return out.reshape(out.shape[0], -1, out.shape[-1])[:, :n].movedim(0, 1), state


class SigmoidGatedRMSNorm(nn.Module):
    """Each head's output RMS-normed and scaled in fp32 (no cast between), times sigmoid(gate) in fp32, cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        x32 = x.float()
        normed = self.weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))
        return (normed * torch.sigmoid(gate.float())).to(x.dtype)


class KimiDeltaAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        la = c.linear_attention
        assert la is not None
        self.config = la
        heads, d = la.num_key_heads, la.key_head_dim
        self.width = heads * d
        self.q_proj = Linear(c.hidden_size, self.width, bias=False)
        self.k_proj = Linear(c.hidden_size, self.width, bias=False)
        self.v_proj = Linear(c.hidden_size, self.width, bias=False)
        # the Hub's three short convolutions (transformers stacks them into one)
        self.q_conv1d = nn.Conv1d(self.width, self.width, la.conv_kernel, groups=self.width, bias=False)
        self.k_conv1d = nn.Conv1d(self.width, self.width, la.conv_kernel, groups=self.width, bias=False)
        self.v_conv1d = nn.Conv1d(self.width, self.width, la.conv_kernel, groups=self.width, bias=False)
        self.f_a_proj = Linear(c.hidden_size, d, bias=False)  # the forget gate
        self.f_b_proj = Linear(d, self.width, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(self.width))
        self.A_log = nn.Parameter(torch.zeros(1, 1, heads, 1))
        self.b_proj = Linear(c.hidden_size, heads, bias=False)
        self.g_a_proj = Linear(c.hidden_size, d, bias=False)  # the output gate
        self.g_b_proj = Linear(d, self.width, bias=False)
        self.o_norm = SigmoidGatedRMSNorm(d, c.norm_eps)
        self.o_proj = Linear(self.width, c.hidden_size, bias=False)
        self.act = c.hidden_act
        self.in_weight: Tensor | None = None
        self.conv_weight: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.in_weight, _ = _fuse([self.q_proj, self.k_proj, self.v_proj, self.f_a_proj, self.b_proj, self.g_a_proj],
                                  transposed)
        self.conv_weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])

    def forward(self, layer: int, x: Tensor, batch: RecurrentBatch) -> Tensor:
        la, t = self.config, x.shape[0]
        heads, d = la.num_key_heads, la.key_head_dim
        if self.in_weight is not None:
            mixed, f_a, b, g_a = linear(x, self.in_weight).split([3 * self.width, d, heads, d], dim=-1)
            conv_weight = self.conv_weight
        else:
            mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            f_a, b, g_a = self.f_a_proj(x), self.b_proj(x), self.g_a_proj(x)
            conv_weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])
        conv_state, ssm = batch.initial(layer, (la.conv_channels, la.conv_kernel - 1), (heads, d, d), mixed.dtype,
                                        mixed.device)
        conv, new_conv = causal_conv_packed(mixed, conv_weight, None, conv_state, batch.lengths, batch.all_single)
        conv = activation(self.act, conv)
        q, k, v = (part.float().view(t, heads, d) for part in conv.split(self.width, dim=-1))
        q, k = l2_normalize(q) * d**-0.5, l2_normalize(k)
        gate = (self.f_b_proj(f_a).float() + self.dt_bias.float()).view(t, heads, d)
        softplus = torch.where(gate > 20.0, gate, torch.log(1.0 + torch.exp(gate)))  # (transformers' form)
        g = -self.A_log.float().view(heads, 1).exp() * softplus
        beta = torch.sigmoid(b).float()
        out, new_ssm = scan_packed(batch, (q, k, v, g, beta), ssm, kda_step, kda_chunked)
        batch.store(layer, new_conv, new_ssm)
        out = self.o_norm(out.to(x.dtype), self.g_b_proj(g_a).view(t, heads, d))
        return self.o_proj(out.reshape(t, self.width))


class KimiLinearLayer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        assert c.linear_attention is not None
        linear_layer = index in c.linear_attention.layers
        self.self_attn = KimiDeltaAttention(c) if linear_layer else LatentAttention(c)
        self.mlp = SparseMoE(c, LlamaMLP) if c.moe is not None and index in c.moe.sparse_layers else LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)


class KimiLinearBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(KimiLinearLayer(c, i) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class KimiLinearForCausalLM(CausalLM):
    key_prefix = "model."
    fused_layer0 = False  # (the fused QKV kernel computes no stateful layer)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = KimiLinearBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # the router weight, its correction bias and dt_bias held as the installed transformers holds them
        if hf_router_weights_in_fp32():
            self.fp32_key_suffixes = (*self.fp32_key_suffixes, "mlp.gate.weight", "self_attn.dt_bias")
        else:
            self.fp32_key_suffixes = tuple(s for s in self.fp32_key_suffixes if s != "e_score_correction_bias")

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The Hub's names (`block_sparse_moe.`, Mixtral's per-expert `w1`/`w2`/`w3`) and transformers' (the forget
        gate's module, one stacked `conv1d`, stacked experts) under ours."""
        for theirs, ours in _NAMES:
            key = key.replace(theirs, ours)
        if key.endswith(".self_attn.A_log"):
            return [(key, tensor.reshape(1, 1, -1, 1))]
        if key.endswith(".self_attn.conv1d.weight"):  # transformers' stacked convolution: q, k, v
            stem = key.removesuffix("conv1d.weight")
            return list(zip((stem + "q_conv1d.weight", stem + "k_conv1d.weight", stem + "v_conv1d.weight"),
                            tensor.chunk(3)))
        return moe_checkpoint_tensors(key, tensor)  # (also a dense MLP's `block_sparse_moe.` name)

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:
            layer.self_attn.fuse(transposed)
            layer.mlp.fuse(transposed)
        super().prepare_for_inference(device)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes Kimi Linear's layer-0 input (`fused_layer0` is False): `layer0` is never given.
        `attention.recurrent` carries the sequences' states; without it, the batch is one sequence from zero."""
        h = embeds
        batch = recurrent_batch(attention, h)
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            a = layer.self_attn
            if isinstance(a, KimiDeltaAttention):
                h = h + a(i, x, batch)
            else:
                h = h + a(i, a.project_qkv(x), None, attention)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.norm(h)
