"""The Mamba-2 mixer (state-space duality), as the hybrid families use it (Granite 4.0's `granitemoehybrid`).

in_proj gives a gate z, the channels x|B|C and a time step per head. x|B|C go through a causal depthwise convolution
(silu); then each head's state h [head_dim, d_state] decays by exp(dt_t A) and takes dt_t x_t B_t^T at each token,
and reads y_t = h_t C_t + D x_t (B and C shared by the heads of a group). y is gated by silu(z), RMS-normed per group
and projected out. A sequence's past is its conv state and its h (engine/recurrent_state.py). Prefill runs the
scan chunk-wise (within a chunk, a masked (C B^T) x product; between chunks, through h), decode one step at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Mamba2Config
from ..recurrent_state import RecurrentBatch
from .common import causal_conv_packed
from .hybrid import scan_packed
from .linear import Linear


def ssd_step(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of each of B sequences (fp32): x [B, H, P], dt [B, H], a [H] (< 0), b/c [B, H, N], state
    [B, H, P, N] -> y [B, H, P] (without the D term) and the new states."""
    state = state * torch.exp(dt * a)[..., None, None] + (dt[..., None] * x)[..., None] * b[:, :, None, :]
    return (state @ c[..., None])[..., 0], state


def ssd_chunked(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, state: Tensor,
                chunk: int) -> tuple[Tensor, Tensor]:
    """n tokens of one sequence (fp32): x [n, H, P], dt [n, H], a [H], b/c [n, H, N], state [H, P, N] -> y [n, H, P]
    (without the D term) and the final state."""
    n = x.shape[0]
    pad = -n % chunk

    def chunked(t: Tensor) -> Tensor:  # [n, H, ...] -> [H, chunks, chunk, ...], zero-padded (dt = 0: no effect)
        t = t.movedim(0, 1)
        t = F.pad(t, (0, 0, 0, pad)) if t.dim() == 3 else F.pad(t, (0, pad))
        return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])

    xdt = chunked(x * dt[..., None])
    b, c = chunked(b), chunked(c)
    decay = chunked(dt * a).cumsum(-1)  # [H, C, chunk]: log decay from the chunk's start through each token
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    pair_decay = (decay[..., :, None] - decay[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    within = ((c @ b.transpose(-1, -2)) * pair_decay) @ xdt  # [H, C, chunk, P]
    to_end = (decay[..., -1:] - decay).exp()[..., None]
    out = torch.empty_like(within)
    for i in range(within.shape[1]):
        out[:, i] = within[:, i] + decay[:, i].exp()[..., None] * (c[:, i] @ state.transpose(-1, -2))
        state = state * decay[:, i, -1].exp()[:, None, None] + (xdt[:, i] * to_end[:, i]).transpose(-1, -2) @ b[:, i]
    return out.reshape(out.shape[0], -1, out.shape[-1])[:, :n].movedim(0, 1), state


class GroupedGatedRMSNorm(nn.Module):
    """y * silu(z) in fp32, RMS-normed over each group of channels, cast back, scaled. `norm_first` (Falcon-H1's
    norm_before_gate): y RMS-normed per group and scaled, then times silu(z), all in fp32, cast back."""

    def __init__(self, dim: int, groups: int, eps: float, norm_first: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups = groups
        self.eps = eps
        self.norm_first = norm_first

    def _normed(self, h: Tensor) -> Tensor:
        grouped = h.view(*h.shape[:-1], self.groups, -1)
        return (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)).view(h.shape)

    def forward(self, y: Tensor, gate: Tensor) -> Tensor:
        if self.norm_first:
            return (self.weight * self._normed(y.float()) * F.silu(gate.float())).to(y.dtype)
        return self.weight * self._normed(y.float() * F.silu(gate.float())).to(y.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, m: Mamba2Config, hidden_size: int, eps: float):
        super().__init__()
        self.config = m
        inner, heads = m.num_heads * m.head_dim, m.num_heads
        self.inner = inner
        self.in_proj = Linear(hidden_size, inner + m.conv_channels + heads, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(m.conv_channels, m.conv_channels, m.conv_kernel, groups=m.conv_channels,
                                bias=m.conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.ones(heads))
        if m.gated_norm:
            self.norm = GroupedGatedRMSNorm(inner, m.num_groups, eps, norm_first=m.gated_norm == "norm_then_gate")
        self.out_proj = Linear(inner, hidden_size, bias=m.proj_bias if m.out_bias is None else m.out_bias)
        self._zxbcdt_scale: Tensor | None = None  # Falcon-H1's in_proj output multipliers, made on first use

    def forward(self, layer: int, x: Tensor, batch: RecurrentBatch) -> Tensor:
        m = self.config
        t, heads, groups = x.shape[0], m.num_heads, m.num_groups
        projected = self.in_proj(x * m.input_multiplier if m.input_multiplier != 1.0 else x)
        if m.zxbcdt_multipliers:
            projected = projected * self._in_proj_scale(projected)
        gate, xbc, dt = projected.split([self.inner, m.conv_channels, heads], dim=-1)
        conv_state, ssm = batch.initial(layer, (m.conv_channels, m.conv_kernel - 1),
                                        (heads, m.head_dim, m.state_size), x.dtype, x.device)
        xbc, new_conv = causal_conv_packed(xbc, self.conv1d.weight, self.conv1d.bias, conv_state, batch.lengths,
                                           batch.all_single)
        xs, b, c = F.silu(xbc).split([self.inner, groups * m.state_size, groups * m.state_size], dim=-1)
        xs = xs.float().view(t, heads, m.head_dim)
        b = b.float().view(t, groups, m.state_size).repeat_interleave(heads // groups, dim=1)
        c = c.float().view(t, groups, m.state_size).repeat_interleave(heads // groups, dim=1)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype)).float().clamp(*m.time_step_limit)
        a = -torch.exp(self.A_log.float())
        y, new_ssm = scan_packed(batch, (xs, dt, b, c), ssm,
                                 lambda x_, dt_, b_, c_, s_: ssd_step(x_, dt_, a, b_, c_, s_),
                                 lambda x_, dt_, b_, c_, s_: ssd_chunked(x_, dt_, a, b_, c_, s_, m.chunk_size))
        batch.store(layer, new_conv, new_ssm)
        y = (y + xs * self.D.float()[:, None]).reshape(t, self.inner)
        if not m.gated_norm:  # (Falcon-H1 without mamba_rms_norm)
            return self.out_proj((y * F.silu(gate.float())).to(x.dtype))
        return self.out_proj(self.norm(y, gate).to(x.dtype))

    def _in_proj_scale(self, like: Tensor) -> Tensor:
        """in_proj's output multipliers as one row: z and x `inner` wide each, B and C groups x state_size each, dt
        one per head (Falcon-H1's muP vector, in the model dtype as transformers holds it)."""
        if self._zxbcdt_scale is None or self._zxbcdt_scale.device != like.device:
            m = self.config
            widths = [self.inner, self.inner, m.num_groups * m.state_size, m.num_groups * m.state_size, m.num_heads]
            self._zxbcdt_scale = torch.repeat_interleave(torch.tensor(m.zxbcdt_multipliers, dtype=torch.float32),
                                                         torch.tensor(widths)).to(like.device, like.dtype)
        return self._zxbcdt_scale
