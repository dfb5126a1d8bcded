"""Qwen3.5 (`qwen3_5_text`, and the multimodal `qwen3_5` checkpoints' language model): Gated DeltaNet layers with,
every few layers, gated full attention; (1 + w) RMSNorms, SwiGLU MLPs.

A Gated DeltaNet layer projects its input to q/k/v channels, runs them through a causal depthwise convolution
(silu), L2-normalises each key head and query head (queries also scaled by key_head_dim^-0.5), and reads them with
the gated delta rule: per value head a state S [Dk, Dv] that decays by exp(g_t) and is corrected towards v_t at
k_t with rate beta_t at each token (S += k_t (beta_t (v_t - S^T k_t))^T), each output S^T q_t; the heads' outputs are
RMS-normed, gated by silu(z) and projected out. A sequence's past is its states (engine/recurrent_state.py), which
the attention implementation hands the layer as `attention.recurrent`; the reference path runs each sequence from
zero. Prefill runs the rule chunk-wise (the WY form: one triangular solve per chunk), decode one step at a time.

The attention layers: q_proj gives each head's query and an output gate (sigmoid), q/k normed per head, RoPE over
the first partial_rotary_factor of each head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..recurrent_state import RecurrentBatch
from .base import Layer0Input
from .common import Attention, apply_rotary, causal_conv_packed
from .gemma import GemmaRMSNorm
from .hybrid import HybridCausalLM, recurrent_batch, scan_packed
from .linear import Linear, linear
from .llama import LlamaMLP, _fuse
from .moe import SparseMoE, moe_checkpoint_tensors

DELTA_RULE_CHUNK = 64  # tokens a prefill chunk of the delta rule takes (transformers': 64)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (as the flash-linear-attention kernels and transformers do)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of each of B sequences: q/k [B, H, Dk], v [B, H, Dv], g/beta [B, H], state [B, H, Dk, Dv], all
    fp32 -> outputs [B, H, Dv] and the new states."""
    state = state * g.exp()[..., None, None]
    remembered = (state * k[..., None]).sum(-2)  # S^T k [B, H, Dv]
    state = state + k[..., None] * ((v - remembered) * beta[..., None])[..., None, :]
    return (state * q[..., None]).sum(-2), state


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                       chunk: int = DELTA_RULE_CHUNK) -> tuple[Tensor, Tensor]:
    """n tokens of one sequence: q/k [n, H, Dk], v [n, H, Dv], g/beta [n, H], state [H, Dk, Dv], all fp32 ->
    outputs [n, H, Dv] and the final state. Within a chunk the n sequential corrections are one lower-triangular
    system (UT transform); chunks follow each other through the state."""
    n = q.shape[0]
    pad = -n % chunk

    def chunked(x: Tensor) -> Tensor:  # [n, H, ...] -> [H, chunks, chunk, ...], zero-padded
        x = x.movedim(0, 1)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 3 else F.pad(x, (0, pad))
        return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])

    q, k, v, g, beta = map(chunked, (q, k, v, g, beta))  # (padded tokens: g = 0, beta = 0, k = 0)
    decay = g.cumsum(-1)  # [H, C, chunk]: log of the decay from the chunk's start up to each token
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    pair_decay = (decay[..., :, None] - decay[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    k_beta = k * beta[..., None]
    system = (k_beta @ k.transpose(-1, -2)) * pair_decay  # its strictly lower part: unit diagonal assumed
    corrected_v = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    state_read = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False,
                                               unitriangular=True)
    within = (q @ k.transpose(-1, -2)) * pair_decay
    q_decayed = q * decay.exp()[..., None]
    k_to_end = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]  # [H, C, 1, 1]
    out = torch.empty_like(corrected_v)
    for i in range(q.shape[1]):
        new_v = corrected_v[:, i] - state_read[:, i] @ state
        out[:, i] = q_decayed[:, i] @ state + within[:, i] @ new_v
        state = state * chunk_decay[:, i] + k_to_end[:, i].transpose(-1, -2) @ new_v
    return out.reshape(out.shape[0], -1, out.shape[-1])[:, :n].movedim(0, 1), state


class GatedRMSNorm(nn.Module):
    """Each head's output RMS-normed (fp32, cast back), scaled, times silu(gate) in fp32, cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, c: ModelConfig, split_qkv: bool = False):
        """`split_qkv`: q, k and v projected by modules of their own (OLMo Hybrid's q_proj, k_proj, v_proj), not one
        in_proj_qkv (fused into one GEMM at inference either way)."""
        super().__init__()
        la = c.linear_attention
        assert la is not None
        self.config = la
        self.key_width = la.num_key_heads * la.key_head_dim
        self.value_width = la.num_value_heads * la.value_head_dim
        channels = la.conv_channels
        self.split_qkv = split_qkv
        if split_qkv:
            self.q_proj = Linear(c.hidden_size, self.key_width, bias=False)
            self.k_proj = Linear(c.hidden_size, self.key_width, bias=False)
            self.v_proj = Linear(c.hidden_size, self.value_width, bias=False)
        else:
            self.in_proj_qkv = Linear(c.hidden_size, channels, bias=False)
        self.in_proj_z = Linear(c.hidden_size, self.value_width, bias=False)
        self.in_proj_b = Linear(c.hidden_size, la.num_value_heads, bias=False)
        self.in_proj_a = Linear(c.hidden_size, la.num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, la.conv_kernel, groups=channels, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(la.num_value_heads))
        self.A_log = nn.Parameter(torch.zeros(la.num_value_heads))
        self.norm = GatedRMSNorm(la.value_head_dim, la.norm_eps or c.norm_eps)
        self.out_proj = Linear(self.value_width, c.hidden_size, bias=False)
        self.in_weight: Tensor | None = None

    def _qkv_modules(self) -> list[Linear]:
        return [self.q_proj, self.k_proj, self.v_proj] if self.split_qkv else [self.in_proj_qkv]

    def fuse(self, transposed: bool) -> None:
        self.in_weight, _ = _fuse([*self._qkv_modules(), self.in_proj_z, self.in_proj_b, self.in_proj_a], transposed)

    def forward(self, layer: int, x: Tensor, batch: RecurrentBatch) -> Tensor:
        la = self.config
        t = x.shape[0]
        if self.in_weight is not None:
            mixed, z, b, a = linear(x, self.in_weight).split(
                [la.conv_channels, self.value_width, la.num_value_heads, la.num_value_heads], dim=-1)
        else:
            mixed = torch.cat([proj(x) for proj in self._qkv_modules()], dim=-1)
            z, b, a = self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        conv_state, ssm = batch.initial(layer, (la.conv_channels, la.conv_kernel - 1),
                                        (la.num_value_heads, la.key_head_dim, la.value_head_dim), mixed.dtype,
                                        mixed.device)
        conv, new_conv = causal_conv_packed(mixed, self.conv1d.weight, None, conv_state, batch.lengths,
                                            batch.all_single)
        conv = F.silu(conv)
        q, k, v = conv.split([self.key_width, self.key_width, self.value_width], dim=-1)
        repeat = la.num_value_heads // la.num_key_heads
        q = l2_normalize(q.float().view(t, la.num_key_heads, -1)).repeat_interleave(repeat, dim=1)
        q = q * la.key_head_dim**-0.5
        k = l2_normalize(k.float().view(t, la.num_key_heads, -1)).repeat_interleave(repeat, dim=1)
        v = v.float().view(t, la.num_value_heads, -1)
        beta = b.sigmoid().float() * la.beta_scale
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out, new_ssm = scan_packed(batch, (q, k, v, g, beta), ssm, delta_rule_step, delta_rule_chunked)
        batch.store(layer, new_conv, new_ssm)
        out = self.norm(out.to(x.dtype), z.view(t, la.num_value_heads, -1))
        return self.out_proj(out.reshape(t, self.value_width))


class Qwen3_5Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        heads, d = c.num_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, 2 * heads * d, bias=c.qkv_bias)  # each head's query, then its gate
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.o_proj = Linear(heads * d, c.hidden_size, bias=c.o_bias)
        self.q_norm = GemmaRMSNorm(d, c.norm_eps)
        self.k_norm = GemmaRMSNorm(d, c.norm_eps)
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.qkv_weight, self.qkv_bias = _fuse([self.q_proj, self.k_proj, self.v_proj], transposed)

    def forward(self, layer: int, x: Tensor, rope: tuple[Tensor, Tensor] | None, attention: Attention) -> Tensor:
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_weight is not None:
            qg, k, v = linear(x, self.qkv_weight, self.qkv_bias).split([2 * hq * d, hkv * d, hkv * d], dim=-1)
        else:
            qg, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qg = qg.view(t, hq, 2 * d)
        q, gate = self.q_norm(qg[..., :d]), qg[..., d:]
        k = self.k_norm(k.view(t, hkv, d))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = attention(layer, q, k, v.reshape(t, hkv, d)).reshape(t, hq * d)
        return self.o_proj(out * torch.sigmoid(gate.reshape(t, hq * d)))


class Qwen3_5Layer(nn.Module):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        assert c.linear_attention is not None
        if index in c.linear_attention.layers:
            self.linear_attn = GatedDeltaNet(c)
        else:
            self.self_attn = Qwen3_5Attention(c)
        self.mlp = SparseMoE(c, LlamaMLP) if c.moe is not None and index in c.moe.sparse_layers else LlamaMLP(c)
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)


class Qwen3_5Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Qwen3_5Layer(c, i) for i in range(c.num_layers))
        self.norm = GemmaRMSNorm(c.hidden_size, c.norm_eps)


class Qwen3_5ForCausalLM(HybridCausalLM):
    backbone_class = Qwen3_5Backbone

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The multi-token-prediction block (`mtp.`, for speculative decoding) left out, as transformers does;
        Qwen3-Next's fused projections split into Qwen3.5's; stacked experts split per expert (moe.py's names)."""
        if key.startswith(("mtp.", "model.mtp.")):
            return []
        pairs = []
        for name, value in super().checkpoint_tensors(key, tensor):
            if name.endswith((".in_proj_qkvz.weight", ".in_proj_ba.weight")):
                pairs += self._split_qwen3_next_projection(name, value)
            else:
                pairs += moe_checkpoint_tensors(name, value)
        return pairs

    def _split_qwen3_next_projection(self, key: str, weight: Tensor) -> list[tuple[str, Tensor]]:
        """Qwen3-Next's in_proj_qkvz rows come per key head: its q, k, then its value heads' v and z; in_proj_ba's
        per key head: its value heads' b, then their a. Qwen3.5's in_proj_qkv holds all q, all k, all v."""
        la = self.config.linear_attention
        assert la is not None
        stem = key.rsplit(".", 2)[0]
        group = la.num_value_heads // la.num_key_heads
        per_head = weight.view(la.num_key_heads, -1, weight.shape[-1])
        if key.endswith(".in_proj_ba.weight"):
            b, a = per_head.split([group, group], dim=1)
            return [(f"{stem}.in_proj_b.weight", b.reshape(-1, weight.shape[-1])),
                    (f"{stem}.in_proj_a.weight", a.reshape(-1, weight.shape[-1]))]
        dk, dv = la.key_head_dim, group * la.value_head_dim
        q, k, v, z = (part.reshape(-1, weight.shape[-1]) for part in per_head.split([dk, dk, dv, dv], dim=1))
        return [(f"{stem}.in_proj_qkv.weight", torch.cat([q, k, v])), (f"{stem}.in_proj_z.weight", z)]


    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes Qwen3.5's layer-0 input (`fused_layer0` is False): `layer0` is never given.
        `attention.recurrent` (a RecurrentBatch) carries the sequences' states; without it, the batch is one
        sequence from zero (the reference path)."""
        h = embeds
        batch = recurrent_batch(attention, h)
        rope = self.rope_rows(attention, positions)
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            if hasattr(layer, "linear_attn"):
                h = h + layer.linear_attn(i, x, batch)
            else:
                h = h + layer.self_attn(i, x, rope, attention)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.norm(h)
