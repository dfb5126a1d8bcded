"""Models without attention (`mamba`, `falcon_mamba`, `mamba2`): every layer is a mixer after an RMSNorm, added to the
residual (kept in fp32 with residual_in_fp32); a Mamba-1 selective scan (below) or a Mamba-2 mixer (mamba2.py).

Mamba-1's mixer: in_proj gives x and a gate z; x goes through a causal depthwise convolution (silu); x_proj gives a
low-rank time-step input (dt_proj lifts it to a step per channel, softplus) and B, C (Falcon-Mamba RMS-normalises
the three without gains, Jamba with); each channel's state h [state_size] decays by exp(dt A) and takes dt x B a
token, and reads y = h C + D x; y is gated by silu(z) and projected out. A sequence's whole past is its conv state
and its h (engine/recurrent_state.py): a task's state after its soft prompt is computed once and every request
starts from a copy. Prefill runs the scan chunk-wise (within a chunk, pairwise decays; between chunks, through h),
decode one step at a time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, SelectiveScanConfig
from ..recurrent_state import RecurrentBatch
from .base import CausalLM, Layer0Input
from .common import Attention, RMSNorm, causal_conv_packed, l2_norm
from .hybrid import recurrent_batch, scan_packed
from .linear import Linear
from .mamba2 import Mamba2Mixer

# a chunk's pairwise decays [chunk, chunk, channels, states] stay within this many elements
PAIRWISE_ELEMENTS = 1 << 24


def selective_step(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of each of B sequences (fp32): x, dt [B, D], a [D, N] (< 0), b/c [B, N], state [B, D, N] -> y [B, D]
    (without the D term) and the new states."""
    state = state * torch.exp(dt[..., None] * a) + (dt * x)[..., None] * b[:, None, :]
    return (state @ c[..., None])[..., 0], state


def selective_chunked(x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """n tokens of one sequence (fp32): x, dt [n, D], a [D, N], b/c [n, N], state [D, N] -> y [n, D] (without the D
    term) and the final state. Chunks as long as their pairwise decays fit PAIRWISE_ELEMENTS."""
    n, channels, states = x.shape[0], *a.shape
    chunk = max(1, min(n, math.isqrt(PAIRWISE_ELEMENTS // (channels * states))))
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()[..., None, None]
    outs = []
    for start in range(0, n, chunk):
        xs, dts, bs, cs = (t[start:start + chunk] for t in (x, dt, b, c))
        m = xs.shape[0]
        decay = (dts[..., None] * a).cumsum(0)  # [m, D, N]: log decay from the chunk's start through each token
        u = (dts * xs)[..., None] * bs[:, None, :]  # [m, D, N]: what each token adds
        pair = (decay[:, None] - decay[None]).masked_fill(~lower[:m, :m], float("-inf")).exp()  # [t, s, D, N]
        within = ((pair * u[None]).sum(1) * cs[:, None, :]).sum(-1)
        outs.append(within + ((decay.exp() * state) * cs[:, None, :]).sum(-1))
        state = decay[-1].exp() * state + ((decay[-1] - decay).exp() * u).sum(0)
    return torch.cat(outs), state


class MambaMixer(nn.Module):
    def __init__(self, m: SelectiveScanConfig, hidden_size: int):
        super().__init__()
        self.config = m
        self.in_proj = Linear(hidden_size, 2 * m.inner, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(m.inner, m.inner, m.conv_kernel, groups=m.inner, bias=m.conv_bias)
        self.x_proj = Linear(m.inner, m.dt_rank + 2 * m.state_size, bias=False)
        self.dt_proj = Linear(m.dt_rank, m.inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(m.inner, m.state_size))
        self.D = nn.Parameter(torch.ones(m.inner))
        self.out_proj = Linear(m.inner, hidden_size, bias=m.proj_bias)
        if m.bcdt_norm_weights:  # (Jamba's)
            self.dt_layernorm = RMSNorm(m.dt_rank, m.bcdt_norm_eps)
            self.b_layernorm = RMSNorm(m.state_size, m.bcdt_norm_eps)
            self.c_layernorm = RMSNorm(m.state_size, m.bcdt_norm_eps)

    def forward(self, layer: int, x: Tensor, batch: RecurrentBatch) -> Tensor:
        m = self.config
        xs, gate = self.in_proj(x).chunk(2, dim=-1)
        conv_state, ssm = batch.initial(layer, (m.inner, m.conv_kernel - 1), (m.inner, m.state_size), x.dtype,
                                        x.device)
        xs, new_conv = causal_conv_packed(xs, self.conv1d.weight, self.conv1d.bias, conv_state, batch.lengths,
                                          batch.all_single)
        xs = F.silu(xs)
        dt, b, c = self.x_proj(xs).split([m.dt_rank, m.state_size, m.state_size], dim=-1)
        if m.bcdt_norm_weights:
            dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        elif m.bcdt_norm_eps:
            dt, b, c = (l2_norm(t, m.bcdt_norm_eps) for t in (dt, b, c))  # (Falcon-Mamba's: no gains)
        dt = F.softplus(self.dt_proj(dt)).float()  # (in the model dtype, as transformers' scan adds the bias)
        a = -torch.exp(self.A_log.float())
        x32 = xs.float()
        y, new_ssm = scan_packed(batch, (x32, dt, b.float(), c.float()), ssm,
                                 lambda x_, dt_, b_, c_, s_: selective_step(x_, dt_, a, b_, c_, s_),
                                 lambda x_, dt_, b_, c_, s_: selective_chunked(x_, dt_, a, b_, c_, s_))
        batch.store(layer, new_conv, new_ssm)
        y = (y + x32 * self.D.float()) * F.silu(gate.float())
        return self.out_proj(y.to(x.dtype))


class MambaLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mixer: nn.Module
        if c.mamba is not None:
            self.mixer = MambaMixer(c.mamba, c.hidden_size)
        else:
            assert c.mamba2 is not None
            self.mixer = Mamba2Mixer(c.mamba2, c.hidden_size, c.norm_eps)


class MambaBackbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(MambaLayer(c) for _ in range(c.num_layers))
        self.norm_f = RMSNorm(c.hidden_size, c.norm_eps)


class MambaForCausalLM(CausalLM):
    key_prefix = "backbone."
    fused_layer0 = False  # (the fused kernel feeds an attention layer's QKV projection; there is none)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.backbone = MambaBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The original checkpoints' `embedding.` under transformers' `embeddings.` (as its load hook renames it)."""
        return [(key.replace("backbone.embedding.", "backbone.embeddings."), tensor)]

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """No fused kernel computes the input (`fused_layer0` is False): `layer0` is never given. `attention`
        attends with nothing; it carries the sequences' recurrent states (`attention.recurrent`); without them, the
        batch is one sequence from zero (the reference path)."""
        assert embeds is not None
        dtype = embeds.dtype
        batch = recurrent_batch(attention, embeds)
        h = embeds.float() if self.config.residual_in_fp32 else embeds
        for i, layer in enumerate(self.backbone.layers):
            h = h + layer.mixer(i, layer.norm(h.to(dtype)), batch)
        return self.backbone.norm_f(h).to(dtype)
