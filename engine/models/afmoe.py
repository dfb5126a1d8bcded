"""AFMoE (Arcee's Trinity models, `afmoe`): Llama's layout with per-head q/k norms, RoPE on the sliding-window layers
only, the heads' outputs gated by sigmoid(gate_proj(x)) before o_proj (`ModelConfig.attention_output_gate`), RMSNorms
scaled in fp32 (gpt-oss's) before and after attention and the MLP, and sigmoid-routed experts with shared ones. Its
checkpoints call the norm after attention `post_attention_layernorm` and the one before the MLP `pre_mlp_layernorm`
(GLM-4's `post_self_attn_layernorm` and `post_attention_layernorm` here), the router `router.gate` and the
correction bias `expert_bias`."""

from __future__ import annotations

from ..config import ModelConfig
from .gpt_oss import GptOssRMSNorm
from .linear import Linear
from .llama import LlamaAttention, LlamaBackbone, LlamaForCausalLM, LlamaLayer

# in this order: the norm after attention takes GLM-4's name before the norm before the MLP takes its old one (the
# router's names are Llama's CHECKPOINT_NAMES)
_NAMES = ((".post_attention_layernorm.", ".post_self_attn_layernorm."),
          (".pre_mlp_layernorm.", ".post_attention_layernorm."))


class AfmoeAttention(LlamaAttention):
    def __init__(self, c: ModelConfig):
        super().__init__(c, norm=GptOssRMSNorm)
        self.gate_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)


class AfmoeLayer(LlamaLayer):
    attention_class = AfmoeAttention
    norm_class = GptOssRMSNorm


class AfmoeBackbone(LlamaBackbone):
    layer_class = AfmoeLayer


class AfmoeForCausalLM(LlamaForCausalLM):
    backbone_class = AfmoeBackbone
    checkpoint_renames = _NAMES

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.fused_layer0 = False  # (its attention gate reads layer 0's normed input, never written by the QKV kernel)
