"""gpt-oss (OpenAI's gpt-oss-20b / 120b): Llama's layout with q/k/v/o biases, sliding-window and full-attention layers,
YaRN, attention sinks (a learned logit per head in every query's softmax denominator), and in every layer a mixture
of experts: a biased router whose top-k logits are softmaxed, experts with biases and a clamped SwiGLU whose gate and
up projections the checkpoint stores interleaved ([E, H, 2F]: gate in the even columns, up in the odd ones)."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..config import ModelConfig
from .common import RMSNorm
from .linear import linear
from .llama import LlamaBackbone, LlamaForCausalLM, LlamaLayer, LlamaMLP

_EXPERTS = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias)?")


class GptOssRMSNorm(RMSNorm):
    """RMSNorm scaled in fp32, then cast (Llama's casts, then scales: the same in fp32, not in half precision)."""

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class GptOssExpert(LlamaMLP):
    """One expert: down((up + 1) * gate * sigmoid(alpha * gate)), gate clamped above and up on both sides at the
    limit, every projection with a bias, added after the product is rounded (as transformers' grouped experts add
    it: in half precision, a fused bias rounds once where they round twice)."""

    def __init__(self, c: ModelConfig, intermediate_size: int | None = None):
        super().__init__(c, intermediate_size)
        self.limit, self.alpha = c.moe.swiglu_limit, c.moe.swiglu_alpha

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear(x, self.gate_up_weight).add_(self.gate_up_bias).chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        hidden = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return linear(hidden, self.down_proj.weight).add_(self.down_proj.bias)


class GptOssLayer(LlamaLayer):
    expert_class = GptOssExpert
    norm_class = GptOssRMSNorm


class GptOssBackbone(LlamaBackbone):
    layer_class = GptOssLayer


def expert_tensors(key: str, tensor: Tensor) -> list[tuple[str, Tensor]] | None:
    """gpt-oss's stacked experts under our per-expert names: `gate_up_proj` [E, H, 2F] (gate and up interleaved by
    column) and its bias [E, 2F], `down_proj` [E, F, H] and its bias [E, H]. None: not an expert tensor."""
    match = _EXPERTS.fullmatch(key)
    if match is None:
        return None
    stem, name, bias = match.groups()
    part = "bias" if bias else "weight"
    out = []
    for e, t in enumerate(tensor):
        if name == "down_proj":
            out.append((f"{stem}.{e}.down_proj.{part}", t if bias else t.t()))
        else:
            gate, up = (t[::2], t[1::2]) if bias else (t[:, ::2].t(), t[:, 1::2].t())
            out += [(f"{stem}.{e}.gate_proj.{part}", gate), (f"{stem}.{e}.up_proj.{part}", up)]
    return out


class GptOssForCausalLM(LlamaForCausalLM):
    backbone_class = GptOssBackbone
    checkpoint_renames = ((".mlp.router.", ".mlp.gate."),)

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        mapped = expert_tensors(key, tensor)
        return super().checkpoint_tensors(key, tensor) if mapped is None else mapped
