"""Pieces shared by the model families: the attention interface, norms, activations, RoPE, ALiBi."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig


class Attention(Protocol):
    """Attention over a packed batch of T new tokens: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    The implementation owns the KV history (none for the reference path, the paged pool for the engine)
    and the mask (causal, with or without a task prefix); models only hand over the new tokens' q/k/v.
    """

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Same op order as HF Llama: normalise in fp32, cast back, then scale.
        dtype = x.dtype
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if torch.is_grad_enabled():
            return self.weight * normed
        return normed.mul_(self.weight)  # a fresh tensor: scaled in place, the same products


class XIELU(nn.Module):
    """xIELU (Apertus), with its learned alpha_p / alpha_n and the beta / eps its checkpoint stores, computed as
    transformers' Python version does."""

    def __init__(self):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.zeros(1))
        self.alpha_n = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.eps = nn.Parameter(torch.tensor(-1e-6))

    def forward(self, x: Tensor) -> Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x)


def activation(name: str, x: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name == "bloom_gelu":  # BLOOM's own tanh approximation, kept bit-for-bit
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
    if name == "relu":
        return F.relu(x)
    if name == "relu2":  # squared ReLU (Arcee)
        return torch.square(F.relu(x))
    raise ValueError(f"unsupported activation {name!r}")


def default_rope_inv_freq(base: float, dim: int) -> Tensor:
    """Plain RoPE's inverse frequencies base^(-2i/dim), computed as HF's default init does (fp32, on the CPU)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(config: ModelConfig, device: torch.device | str) -> tuple[Tensor, float]:
    """Inverse frequencies and cos/sin scaling, as HF computes them (llama3, linear, yarn via transformers)."""
    hf = config.hf_config
    rope_type = config.rope_type
    params = getattr(hf, "rope_parameters", None) or {}
    if rope_type == "dynamic" and params.get("alpha") and config.model_type.startswith("hunyuan_v1"):
        # Hunyuan's NTK scaling by a fixed alpha: a stretched base, the same frequencies at every length
        dim = config.rotary_dim or config.head_dim
        base = params["rope_theta"] * params["alpha"] ** (dim / (dim - 2))
        return default_rope_inv_freq(base, dim).to(device), 1.0
    if rope_type == "default":
        base = params.get("rope_theta", 10000.0)  # (GPT-J's config has none)
        dim = config.rotary_dim or config.head_dim
        return default_rope_inv_freq(base, dim).to(device), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, device)
    if config.model_type == "phimoe" and params.get("short_mscale"):  # (its own cos/sin scale, below the original
        scaling = params["short_mscale"]  # length, where sequences are capped)
    return inv_freq.float().to(device), float(scaling)


def rope_layer_types(config: ModelConfig) -> list[str] | None:
    """Each layer's type where the checkpoint gives each layer type a RoPE of its own (`rope_parameters` keyed by
    layer type: Gemma 3's and OLMo 3's sliding and full-attention layers), else None."""
    hf = config.hf_config
    if "full_attention" not in (getattr(hf, "rope_parameters", None) or {}):
        return None
    return list(hf.layer_types)


def layer_type_rope_inv_freq(hf: Any, layer_type: str | None, head_dim: int, device: torch.device | str,
                             init_config: Any = None) -> tuple[Tensor, float]:
    """One layer type's inverse frequencies and cos/sin scaling, as HF computes them (`layer_type` None: the
    config's one RoPE): the default RoPE over `head_dim` channels, other types by transformers' init function, which
    reads `init_config` (default `hf`; Gemma 4's: the layer type's own config, with its head width)."""
    params = hf.rope_parameters if layer_type is None else hf.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return default_rope_inv_freq(params["rope_theta"], head_dim).to(device), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf if init_config is None else init_config, device, **kwargs)
    return inv.float().to(device), float(scaling)


def rotary_cos_sin(inv_freq: Tensor, scaling: float, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [T, D] for the given positions, computed in fp32 and cast like HF does."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rope_tables_by_layer(config: ModelConfig, layer_types: list[str] | None, dim: int, positions: Tensor,
                         dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """cos/sin of `positions` for each layer: one table per layer type, each as HF builds it (`layer_types` None:
    the config's one RoPE, for every layer). A layer type without RoPE parameters (LFM3's `conv` layers, which
    attend to nothing) gets any table, never read."""
    tables: dict[str | None, tuple[Tensor, Tensor]] = {}
    keyed = config.hf_config.rope_parameters if layer_types else {}
    for layer_type in dict.fromkeys(layer_types or [None]):
        if layer_type is not None and layer_type not in keyed:
            continue
        inv_freq, scaling = layer_type_rope_inv_freq(config.hf_config, layer_type, dim, positions.device)
        tables[layer_type] = rotary_cos_sin(inv_freq, scaling, positions, dtype)
    first = next(iter(tables.values()))
    return [tables.get(layer_types[i] if layer_types else None, first) for i in range(config.num_layers)]


def partial_rope_tables_by_type(config: ModelConfig, default_share: float, device: torch.device,
                                dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """cos/sin of every position for each layer, one table per layer type (`hf_config.layer_types`), each over that
    type's own rotary share of each head (its `partial_rotary_factor`; `default_share` where it names none), as HF
    builds them (Laguna's, MiMo-V2-Flash's)."""
    hf = config.hf_config
    positions = torch.arange(config.max_positions, device=device)
    tables: dict[str, tuple[Tensor, Tensor]] = {}
    for layer_type in dict.fromkeys(hf.layer_types):
        rotary = int(config.head_dim * hf.rope_parameters[layer_type].get("partial_rotary_factor", default_share))
        inv_freq, scaling = layer_type_rope_inv_freq(hf, layer_type, rotary, device)
        tables[layer_type] = rotary_cos_sin(inv_freq, scaling, positions, dtype)
    return [tables[t] for t in hf.layer_types]


def rope_tables_by_theta(thetas: tuple[float, ...], dim: int, positions: Tensor,
                         dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """cos/sin of `positions` for each layer from its plain-RoPE base (one table per distinct base; a layer whose base
    is 0 has no RoPE and gets any table, never read)."""
    tables: dict[float, tuple[Tensor, Tensor]] = {}
    for theta in dict.fromkeys(t for t in thetas if t) or [10000.0]:
        tables[theta] = rotary_cos_sin(default_rope_inv_freq(theta, dim).to(positions.device), 1.0, positions, dtype)
    first = next(iter(tables.values()))
    return [tables.get(t, first) for t in thetas]


def gather_rope_rows(tables: list[tuple[Tensor, Tensor]], positions: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Each layer's cos/sin rows of `positions` from its table in `tables`, gathered once per distinct table."""
    rows: dict[int, tuple[Tensor, Tensor]] = {}
    for cos, sin in tables:
        if id(cos) not in rows:
            rows[id(cos)] = (cos[positions], sin[positions])
    return [rows[id(cos)] for cos, _ in tables]


def fused_qkv_to_blocks(tensor: Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """A fused QKV projection's rows (weight or bias) stored per K/V group (each group's query heads, then its key,
    then its value: per head [q, k, v] where every head has its own K/V, [all q | k | v] with one) as
    [all q | all k | all v], the layout our models split."""
    rest = tensor.shape[1:]
    groups = tensor.view(num_kv_heads, num_heads // num_kv_heads + 2, head_dim, *rest)
    return torch.cat([groups[:, :-2].reshape(-1, *rest), groups[:, -2].reshape(-1, *rest),
                      groups[:, -1].reshape(-1, *rest)])


def permute_head_channels(tensor: Tensor, head_dim: int, order: list[int]) -> Tensor:
    """A projection's output rows (weight or bias), head by head, with each head's channels in `order`."""
    rest = tensor.shape[1:]
    return tensor.view(-1, head_dim, *rest)[:, order].reshape(-1, *rest)


def norm_heads(qk: Tensor, num_heads: int, q_norm: nn.Module, k_norm: nn.Module) -> Tensor:
    """Queries and keys [T, Hq + Hkv, D] with each query head normed by `q_norm` and each key head by `k_norm`
    (Qwen3's, Gemma 3's, Phi's per-head q/k norms)."""
    return torch.cat((q_norm(qk[:, :num_heads]), k_norm(qk[:, num_heads:])), dim=1)


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """Each row of the last dim divided by its root mean square, without a gain, in fp32 and cast back (Llama 4's
    q/k norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D] rotated with cos/sin [T, R] (rotate-half convention): `x * cos + rotate_half(x) * sin` over the
    first R channels of each head (R < D: partial rotary, Phi-3's; the other channels pass as they are).

    cos/sin repeat their first half (`rotary_cos_sin` builds them from cat(freqs, freqs)), so each output half is
    x1 * c - x2 * s or x2 * c + x1 * s: the same products and sums, rounded the same way, written straight into
    the output (fewer passes over memory than negating, concatenating and broadcasting whole rows)."""
    rotary = cos.shape[-1]
    half = rotary // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., :half], x[..., half:rotary]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x1, c, out=out[..., :half]).sub_(x2 * s)
    torch.mul(x2, c, out=out[..., half:rotary]).add_(x1 * s)
    if rotary < x.shape[-1]:
        out[..., rotary:] = x[..., rotary:]
    return out


def causal_conv_packed(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: list[int],
                       all_single: bool) -> tuple[Tensor, Tensor]:
    """A causal depthwise convolution over each sequence of a packed batch x [T, C] (`lengths` its sequences'
    token counts), each continuing after its conv state [B, C, kernel - 1] (its last inputs; zeros for a fresh
    sequence); weight [C, 1, kernel]. Returns the outputs [T, C] and the new conv states. `all_single`: one token a
    sequence (a decode step: one batched call)."""
    channels, keep = x.shape[1], weight.shape[-1] - 1
    if all_single:
        window = torch.cat([state, x[:, :, None].to(state.dtype)], dim=-1)  # [B, C, kernel]
        out = F.conv1d(window, weight, bias, groups=channels)[..., -1]
        return out, window[..., window.shape[-1] - keep:]
    outs, states = [], []
    for i, part in enumerate(x.split(lengths)):
        window = torch.cat([state[i], part.t().to(state.dtype)], dim=-1)  # [C, kernel - 1 + n]
        outs.append(F.conv1d(window[None], weight, bias, groups=channels)[0].t())
        states.append(window[:, window.shape[-1] - keep:])
    return torch.cat(outs), torch.stack(states)


def alibi_slopes(num_heads: int) -> Tensor:
    """BLOOM's ALiBi slopes (also for head counts that are not powers of two)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base, dtype=torch.float32), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(
            torch.tensor(extra_base, dtype=torch.float32), torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32)
        )
        slopes = torch.cat([slopes, extra])
    return slopes
