"""Normalised model configuration, read from a Hugging Face `config.json` (and the EOS ids of
`generation_config.json`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModelError
from .sampling import SamplingParams

# model_type -> our architecture family
ARCH_FAMILIES = {
    "llama": "llama", "mistral": "llama", "ministral": "llama", "ministral3": "llama", "mistral3": "llama",
    "qwen2": "llama", "qwen3": "llama", "phi3": "llama", "smollm3": "llama", "granite": "llama", "mixtral": "llama",
    "qwen2_moe": "llama", "qwen3_moe": "llama", "olmoe": "llama", "granitemoe": "llama", "ernie4_5": "llama",
    "ernie4_5_moe": "llama", "seed_oss": "llama", "internlm3": "llama", "helium": "llama", "arcee": "llama",
    "apertus": "llama", "cwm": "llama", "hyperclovax": "llama", "glm4_moe": "llama", "qwen2_vl": "llama",
    "qwen2_5_vl": "llama", "qwen3_vl": "llama",
    "qwen3_vl_moe": "llama", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek", "glm4_moe_lite": "deepseek",
    "deepseek_v32": "deepseek", "glm_moe_dsa": "deepseek", "axk1": "deepseek", "longcat_flash": "longcat",
    "kimi_linear": "kimi_linear",
    "mistral4": "deepseek", "youtu": "deepseek", "minicpm3": "deepseek", "dots1": "llama",
    "iquestcoder": "llama", "vaultgemma": "gemma", "hunyuan_v1_dense": "llama", "hunyuan_v1_moe": "llama",
    "solar_open": "llama", "exaone_moe": "llama", "granitemoeshared": "llama",
    "flex_olmo": "olmo2", "mellum": "llama", "gpt_oss": "gpt_oss", "minimax_m2": "llama", "llama4_text": "llama4",
    "llama4": "llama4", "phimoe": "phimoe", "afmoe": "afmoe", "granite_swa": "llama", "granitemoe_swa": "llama",
    "kolibri1": "llama", "flint": "flint", "mpt": "mpt", "persimmon": "persimmon",
    "dbrx": "dbrx", "nanochat": "nanochat", "gpt-sw3": "gpt2", "hy_v3": "llama",
    "olmo": "olmo", "olmo2": "olmo2", "olmo3": "olmo2", "exaone4": "olmo2", "exaone4_5": "olmo2",
    "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma", "gemma4_text": "gemma4",
    "gemma4": "gemma4", "gemma4_unified_text": "gemma4", "gemma4_unified": "gemma4", "laguna": "laguna",
    "mimo_v2_flash": "mimo_v2",
    "qwen3_5_text": "qwen3_5", "qwen3_5": "qwen3_5", "qwen3_5_moe_text": "qwen3_5", "qwen3_5_moe": "qwen3_5",
    "qwen3_next": "qwen3_5", "lfm2": "lfm2", "lfm2_moe": "lfm2", "lfm3": "lfm2", "lfm2_vl": "lfm2",
    "lfm3_vl": "lfm2", "granitemoehybrid": "granite_hybrid",
    "nemotron_h": "nemotron_h", "bamba": "granite_hybrid", "mamba": "mamba", "falcon_mamba": "mamba",
    "mamba2": "mamba", "jamba": "jamba", "olmo_hybrid": "olmo_hybrid", "falcon_h1": "falcon_h1",
    "gpt_neox": "gpt_neox",
    "phi": "phi", "stablelm": "stablelm", "jais2": "stablelm", "nemotron": "nemotron", "starcoder2": "starcoder2",
    "cohere": "cohere", "cohere2": "cohere", "cohere2_moe": "cohere", "glm": "glm", "glm4": "glm", "falcon": "falcon",
    "gptj": "gptj",
    "codegen": "gptj", "opt": "opt", "xglm": "xglm", "biogpt": "biogpt", "gpt2": "gpt2", "gpt_bigcode": "gpt_bigcode",
    "gpt_neo": "gpt_neo", "bloom": "bloom",
}
# longrope's frequencies are static up to original_max_position_embeddings, where the sequence length is capped;
# dynamic NTK's equal the default ones up to max_position_embeddings (HF rescales only past it, never reached here)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional", "longrope", "dynamic")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "relu2", "bloom_gelu",
                         "xielu")


@dataclass(frozen=True)
class MoEConfig:
    """A sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE)."""

    num_experts: int
    top_k: int  # experts per token
    intermediate_size: int  # each expert's
    norm_topk_prob: bool  # renormalise the chosen experts' router probabilities to sum to 1
    weights_in_model_dtype: bool  # Qwen's routers cast the weights to the model dtype; Mixtral's keep fp32
    sparse_layers: tuple[int, ...]  # the layers with this MLP (the others have a dense one)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (gated by a sigmoid); 0: none
    softmax_over_topk: bool = False  # GraniteMoE: the top-k router logits, then a softmax over those k
    # GLM-4.5's (DeepSeek-V3's) router: sigmoid scores (of fp32 logits); experts chosen by score + a stored correction
    # bias within the best `top_groups` of `num_groups` groups (a group ranked by its two best); weights the chosen
    # scores (renormalised where norm_topk_prob says), times routed_scaling; ungated shared experts summed in
    sigmoid_scores: bool = False
    num_groups: int = 1
    top_groups: int = 1
    routed_scaling: float = 1.0
    ungated_shared_intermediate_size: int = 0
    # ERNIE 4.5's softmax router: experts chosen by probability + the correction bias, weights renormalised over a
    # sum clamped below at norm_min
    correction_bias: bool = False
    norm_min: float = 0.0
    fp32_router: bool = False  # router logits from fp32 casts of the input and weight (GLM-4.5's, ERNIE 4.5's)
    fp32_router_weight: bool = False  # the router weight itself held in fp32, as transformers holds ERNIE 4.5's
    router_in_model_dtype: bool = False  # Mistral 4: the router's logits and softmax in the model dtype
    group_by_best: bool = False  # DeepSeek-V2's group_limited_greedy: a group ranked by its best expert's probability
    router_bias: bool = False  # gpt-oss: the router has a bias
    # MiniMax-M2, AFMoE: the correction bias cast as the model is (as transformers holds theirs; else kept in fp32)
    correction_bias_in_model_dtype: bool = False
    # Llama 4: each token's experts by its top-k logits, weighted by their sigmoids, which scale the expert's input
    # (not its output); an ungated shared expert beside
    sigmoid_over_topk: bool = False
    weights_scale_input: bool = False
    # Phi-3.5-MoE's sparsemixer (as at inference): the best expert, then the best other one, each weighted by its
    # softmax over the logits within this relative distance (x 2) of it; 0: not it
    sparsemixer_eps: float = 0.0
    shared_average: bool = False  # Cohere2-MoE's "average": (routed + shared experts' outputs) / 2, not their sum
    correction_bias_on_logits: bool = False  # Kolibri-1: experts chosen by logit + bias (not by sigmoid score + bias)
    router_logit_softcap: float = 0.0  # Laguna: router logits -> cap * tanh(logits / cap) before the sigmoid; 0: none
    score_bias: bool = True  # a sigmoid router's correction bias (False: Flint's, which chooses by score alone)
    topk_norm_eps: float = 1e-20  # a sigmoid router's renormalised weights: w / (sum + this) (LFM2-MoE's: 1e-6)
    expert_bias: bool = False  # gpt-oss: every expert projection has a bias
    # gpt-oss's clamped SwiGLU: gate clamped above and up on both sides at swiglu_limit, then
    # (up + 1) * gate * sigmoid(swiglu_alpha * gate); 0: plain SwiGLU
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.0
    output_norm: bool = False  # A.X K1: an RMSNorm over the block's output (routed + shared experts)
    # LongCat-Flash: the last identity_experts of num_experts are zero-computation experts (each returns its input,
    # times its weight); with accumulate_by_expert, each expert's weighted rows rounded to the model dtype and summed
    # expert by expert in the model dtype (transformers' index_add_ loop before 5.25), else the computed experts'
    # outputs summed at once and the input times the identity experts' summed weights added (5.25's)
    identity_experts: int = 0
    accumulate_by_expert: bool = False


@dataclass(frozen=True)
class RecurrentStateConfig:
    """What a sequence's past is in the layers that keep a recurrent state instead of K/V (Qwen3.5's Gated DeltaNet,
    LFM2's short convolutions): a causal depthwise convolution's last `conv_kernel - 1` inputs (`conv_channels`
    of them), and a state of `ssm_shape` in fp32 where the layer has one (() where it has none)."""

    layers: tuple[int, ...]
    conv_channels: int
    conv_kernel: int
    ssm_shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Qwen3.5's Gated DeltaNet layers: a causal depthwise convolution (`conv_kernel` wide) over the projected q/k/v
    channels, then the gated delta rule, whose state (a [key_head_dim, value_head_dim] matrix per value head) carries
    a sequence's past in place of K/V; `layers`: the layers that have it (the others attend)."""

    layers: tuple[int, ...]
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    beta_scale: float = 1.0  # OLMo Hybrid's allow_neg_eigval: beta = 2 sigmoid(b), in (0, 2)
    norm_eps: float = 0.0  # the gated output norm's eps where it is not the model's (OLMo Hybrid's 1e-5)

    @property
    def conv_channels(self) -> int:
        """The convolution's channels: q, k (each num_key_heads x key_head_dim wide) and v."""
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim

    @property
    def state(self) -> RecurrentStateConfig:
        """Its layers' recurrent state: the convolution's, and a [key_head_dim, value_head_dim] matrix a value head."""
        return RecurrentStateConfig(self.layers, self.conv_channels, self.conv_kernel,
                                    (self.num_value_heads, self.key_head_dim, self.value_head_dim))


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba-2 mixer layers (Granite 4.0's hybrids): `num_heads` heads of `head_dim` channels, B and C of
    `state_size` per group of heads, a causal depthwise convolution `conv_kernel` wide over x|B|C; the scan's state
    [head_dim, state_size] per head is a sequence's past (with the convolution's)."""

    layers: tuple[int, ...]
    num_heads: int
    head_dim: int
    num_groups: int
    state_size: int
    conv_kernel: int
    chunk_size: int
    conv_bias: bool
    proj_bias: bool
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    # Falcon-H1's: out_proj's bias where it differs from in_proj's (None: the same); the output's gated RMSNorm:
    # "gate_then_norm" (y silu(z), normed per group), "norm_then_gate", or "" (none: y silu(z)); the input times
    # input_multiplier before in_proj, and in_proj's z, x, B, C and dt outputs each times its multiplier
    out_bias: bool | None = None
    gated_norm: str = "gate_then_norm"
    input_multiplier: float = 1.0
    zxbcdt_multipliers: tuple[float, ...] = ()

    @property
    def conv_channels(self) -> int:
        return self.num_heads * self.head_dim + 2 * self.num_groups * self.state_size

    @property
    def state(self) -> RecurrentStateConfig:
        return RecurrentStateConfig(self.layers, self.conv_channels, self.conv_kernel,
                                    (self.num_heads, self.head_dim, self.state_size))


@dataclass(frozen=True)
class SelectiveScanConfig:
    """Mamba-1 mixer layers (Mamba, Falcon-Mamba, Jamba): in_proj gives x and a gate, each `inner` wide; x goes
    through a causal depthwise convolution `conv_kernel` wide; x_proj gives a time-step rank `dt_rank` input and B, C
    of `state_size`; each channel's state [state_size] decays by exp(dt A) a token. RMSNorms on dt, B and C where
    `bcdt_norm_eps` > 0: with gains (`bcdt_norm_weights`: Jamba's) or without (Falcon-Mamba's)."""

    layers: tuple[int, ...]
    inner: int
    state_size: int
    dt_rank: int
    conv_kernel: int
    conv_bias: bool
    proj_bias: bool
    bcdt_norm_eps: float = 0.0  # > 0: RMSNorms on dt, B and C
    bcdt_norm_weights: bool = False

    @property
    def state(self) -> RecurrentStateConfig:
        return RecurrentStateConfig(self.layers, self.inner, self.conv_kernel, (self.inner, self.state_size))


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash, Mistral 4, Youtu-LLM, MiniCPM3):
    queries from a low-rank projection (q_a, its norm, q_b; a plain q_proj where q_lora_rank is 0); keys and values
    from one compressed latent per token (kv_a, its norm, kv_b), each head's key its own qk_nope channels and
    qk_rope rotated channels shared by all heads. The engine caches the expanded per-head K and V (V zero-padded to
    the key width)."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    interleaved_rope: bool  # the rotary channels come in interleaved pairs (each head's permuted at load)
    fp32_rope: bool  # DeepSeek-V2 rotates in fp32 (as complex numbers) and casts back
    # LongCat-Flash's LoRA scales: the queries times q_scale, the normed latent times latent_scale (before kv_b)
    q_scale: float = 1.0
    latent_scale: float = 1.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """What our model implementations need, independent of the HF config class."""

    family: str  # "llama" | "olmo" | "stablelm" | "starcoder2" | "cohere" | "olmo2" | "glm" | "gemma" | "gpt_neox"
    # | "phi" | "gptj" | "falcon" | "opt" | "xglm" | "biogpt" | "gpt2" | "gpt_bigcode" | "gpt_neo" | "bloom"
    # | "nemotron" | "deepseek" | "gpt_oss" | "llama4" | "phimoe" | "afmoe" | "flint" | "mpt" | "persimmon" | "dbrx"
    # | "nanochat" | "gemma4" | "laguna" | "qwen3_5" | "lfm2" | "granite_hybrid" | "nemotron_h" | "mamba" | "jamba"
    # | "olmo_hybrid" | "falcon_h1" | "mimo_v2" | "longcat" | "kimi_linear"
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    hidden_act: str
    position_encoding: str  # "rope" | "learned" | "alibi" | "none"
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False  # (ERNIE 4.5 MoE's with use_bias; Phi's family has its own)
    gated_mlp: bool = True  # Llama's down(act(gate(x)) * up(x)); False: down(act(up(x))) (Arcee, Nemotron, Apertus)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k (head_dim wide) before RoPE
    qk_norm_over_heads: bool = False  # OLMoE: one RMSNorm over all heads' q, one over all heads' k
    qk_norm_after_rope: bool = False  # Hunyuan: the per-head q/k norms on the rotated q and k
    rotary_dim: int = 0  # RoPE rotates each head's first rotary_dim channels (Phi-3's partial_rotary_factor); 0: all
    nope_layers: tuple[int, ...] = ()  # the layers that apply no RoPE at all (SmolLM3's NoPE layers)
    # GPT-J rotates channel pairs (2i, 2i+1); its q/k channels are permuted at load so rotate-half RoPE does it
    interleaved_rope: bool = False
    moe: MoEConfig | None = None  # a sparse mixture-of-experts MLP in (some) layers
    mla: MLAConfig | None = None  # DeepSeek's latent attention (head_dim: the widest of its key and value heads)
    # layers that keep a recurrent state per sequence instead of K/V (their pool shape has 0 K/V heads): Qwen3.5's
    # linear attention, Granite 4.0's and Nemotron-H's Mamba-2, LFM2's short convolutions (a conv state alone)
    linear_attention: LinearAttentionConfig | None = None
    mamba2: Mamba2Config | None = None
    short_conv: RecurrentStateConfig | None = None
    mamba: SelectiveScanConfig | None = None  # Mamba-1 (Mamba, Falcon-Mamba: every layer, no attention; Jamba)
    residual_in_fp32: bool = False  # Mamba's: the residual stream kept in fp32 in half precision
    # Falcon-H1: the model scales the embeddings of the input ids it is given, not inputs_embeds, so not the token
    # embeddings PEFT's prompt learning passes after its rows (engine/prompts.py's tokens_as_input_ids)
    token_embedding_multiplier: float = 1.0
    # Ministral 3's query scale by position: 1 + beta * log(1 + floor(position / original_max)); beta 0: none
    query_scale_beta: float = 0.0
    query_scale_period: int = 1
    # Llama 4's attention temperature tuning: the queries of its NoPE layers scaled by
    # 1 + scale * log(1 + floor((position + 1) / floor)), as (scale, floor); None: none
    nope_query_scale: tuple[float, int] | None = None
    qk_l2_norm: bool = False  # Llama 4: q and k L2-normed per head (no gain) after RoPE, on the RoPE layers
    # Gemma 4: each layer's own head width and K/V head count where the layers differ (empty: all are head_dim and
    # num_kv_heads; else those are the widest and the lcm of the counts), which the KV pool holds per layer
    layer_head_dims: tuple[int, ...] = ()
    layer_kv_heads: tuple[int, ...] = ()
    # Gemma 4's attention_k_eq_v: these layers' values are their key projection (before the key norm and RoPE)
    value_from_key_layers: tuple[int, ...] = ()
    # Gemma 4's num_kv_shared_layers: the layer whose keys and values each layer attends with (itself, or an earlier
    # layer of its type, whose pool tensor it shares); empty: every layer its own
    kv_source_layers: tuple[int, ...] = ()
    layer_intermediate_sizes: tuple[int, ...] = ()  # each layer's MLP width where they differ (Gemma 4's double-wide)
    layer_num_heads: tuple[int, ...] = ()  # Laguna: each layer's query head count where they differ (empty: num_heads)
    # Laguna: the heads' outputs times softplus(g_proj(x)) before o_proj, one gate per "head" or per "element"; "": none
    softplus_output_gate: str = ""
    attention_output_gate: bool = False  # AFMoE: the heads' outputs times sigmoid(gate_proj(x)) before o_proj
    head_gate: bool = False  # LFM3: each head's output times one sigmoid(g_proj(x)) per head before o_proj
    layer_rope_thetas: tuple[float, ...] = ()  # GraniteSWA: each layer's RoPE base (0: that layer has none)
    rms_norm: bool = False  # Cohere2-MoE with rms_norm_eps: RMSNorms in place of Cohere's LayerNorms
    # Granite's multipliers: input embeddings (soft-prompt rows too) x embedding_multiplier, each sublayer's output
    # x residual_multiplier before its residual add, logits / logits_divisor
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    # per layer: a query sees the keys of the last `w` positions, itself included (sliding-window attention); 0: all
    layer_windows: tuple[int, ...] = ()
    sandwich_norms: bool = False  # Gemma 2/3: a norm after attention, norms before and after the MLP; GLM-4: after each
    final_logit_softcap: float = 0.0  # logits -> cap * tanh(logits / cap) (Gemma); 0: none
    attention_softcap: float = 0.0  # attention scores (after the scale) -> cap * tanh(score / cap) (Gemma 2); 0: none
    # gpt-oss, GraniteSWA, Flint: a learned logit per layer and head in each query's softmax denominator
    attention_sinks: bool = False
    sink_layers: tuple[int, ...] = ()  # MiMo-V2-Flash: the only layers with attention sinks (empty: all, where any)
    # MiMo-V2-Flash: value heads narrower than the query/key heads (0: head_dim; the pool holds them zero-padded),
    # and the values times value_scale before attention
    v_head_dim: int = 0
    value_scale: float = 1.0
    # a quantized checkpoint the loader dequantizes (see DEQUANTIZED_AT_LOAD): "mxfp4" (gpt-oss's experts) or "fp8"
    # (block-wise, with its weight_block_size); "": unquantized
    quantization: str = ""
    quantization_block: tuple[int, int] | None = None
    parallel_residual: bool = False  # GPT-NeoX: h + attn(ln1(h)) + mlp(ln2(h)) instead of one after the other
    two_parallel_norms: bool = False  # Falcon-40B: attention and MLP in parallel, each on its own norm of h
    attention_scale: float = 0.0
    inverse_layer_scale: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx: layer i's scores also / (i + 1)
    clip_qkv: float = 0.0  # OLMo: q/k/v projections clamped to [-clip_qkv, clip_qkv]; 0: none
    residual_post_norm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    post_layer_norm: bool = False  # OPT-350m: each sublayer's LayerNorm after its residual add (post-LN)
    word_embed_dim: int = 0  # the token embeddings' width where narrower than the model (OPT-350m); 0: hidden_size
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    generation_defaults: dict[str, float | int] = field(default_factory=dict, compare=False)  # generation_config
    hf_config: Any = field(default=None, compare=False, repr=False)

    @property
    def key_channel_order(self) -> list[int] | None:
        """How each head's q/k channels are permuted at load (GPT-J's interleaved pairs put where rotate-half RoPE
        turns them): each rotated pair (2i, 2i+1) to (i, i + rotary_dim/2). A prefix-tuning adapter's stored keys
        are permuted alike. None: kept in order."""
        if not self.interleaved_rope:
            return None
        r = self.rotary_dim or self.head_dim
        return [*range(0, r, 2), *range(1, r, 2), *range(r, self.head_dim)]

    @property
    def recurrent_state(self) -> RecurrentStateConfig | None:
        """The state of the layers that keep one in place of K/V (None: every layer attends, or computes no
        attention and no state)."""
        if self.linear_attention is not None:
            return self.linear_attention.state
        if self.mamba2 is not None:
            return self.mamba2.state
        if self.mamba is not None:
            return self.mamba.state
        return self.short_conv

    @property
    def attention_free(self) -> bool:
        """No layer attends (Mamba, Mamba-2): every layer keeps a recurrent state and the KV pool holds no K/V."""
        return bool(self.layer_kv_heads) and not any(self.layer_kv_heads)

    @property
    def recurrent_layer_kind(self) -> str:
        """What the layers with a recurrent state are, for messages."""
        return ("linear-attention" if self.linear_attention else "Mamba-2" if self.mamba2 else "Mamba" if self.mamba
                else "convolution")

    @property
    def kv_prefix_refusal(self) -> str | None:
        """Why this model cannot take a prefix-tuning (K/V) adapter; None where it can."""
        if self.recurrent_state is not None:
            return (f"{self.model_type}'s {self.recurrent_layer_kind} layers keep a recurrent state, not keys and "
                    "values, so a prefix-tuning adapter's K/V do not apply to them: use prompt tuning, P-tuning or "
                    "CPT")
        if self.layer_head_dims or self.layer_kv_heads or self.v_head_dim not in (0, self.head_dim):
            return (f"{self.model_type}'s layers differ in K/V head width or count, or its values are narrower "
                    "than its keys; PEFT provisions a prefix-tuning adapter of one shape for all layers and skips or "
                    "slices it elsewhere, which the engine does not reproduce: use prompt tuning, P-tuning or CPT")
        if self.mla is not None:
            return (f"{self.model_type}'s latent attention caches a compressed latent per token, not per-head keys "
                    "and values, so PEFT's prefix tuning does not apply to it (transformers + PEFT fail on it too); "
                    "use prompt tuning, P-tuning or CPT")
        return None

    @property
    def embedding_width(self) -> int:
        """The width of token embeddings, so of soft-prompt rows."""
        return self.word_embed_dim or self.hidden_size

    @property
    def rope_type(self) -> str:
        params = getattr(self.hf_config, "rope_parameters", None) or {}
        return params.get("rope_type", "default")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """A JSON file that must hold an object; `error` (a SoftPromptError) names the file's problem."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise error(f"{path} must hold a JSON object")
    return raw


def read_config_json(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {str(model_dir)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(model_dir)!r} has no config.json: not a Hugging Face checkpoint directory")
    return read_json_object(path, CheckpointError)


GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def read_generation_config(model_dir: Path) -> tuple[tuple[int, ...], dict[str, float | int]]:
    """From `generation_config.json` (nothing without one): its EOS ids, where HF's `generate` takes them from
    (instruction-tuned checkpoints often list an end-of-turn token there that config.json lacks, e.g. Llama 3's
    <|eot_id|>), and the sampling settings it recommends (temperature, top_p, top_k, min_p, repetition_penalty,
    max_new_tokens: those it sets), which vLLM's server uses where a request leaves them out."""
    path = model_dir / "generation_config.json"
    raw = read_json_object(path, CheckpointError) if path.is_file() else {}
    value = raw.get("eos_token_id")
    ids = [value] if value is None or isinstance(value, int) else value
    if not isinstance(ids, list) or any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0)
                                        for v in ids):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
    defaults = {key: raw[key] for key in GENERATION_DEFAULT_KEYS if raw.get(key) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return tuple(v for v in ids if v is not None), defaults


# quantized checkpoints the loader dequantizes to the model dtype, as transformers does where it has no kernels for
# them: quant_method -> the model types it applies to (None: any). gpt-oss's MXFP4 experts; block-wise FP8
# (transformers' FineGrainedFP8: DeepSeek-V3 / R1, the Qwen3 and GLM-4.5 FP8 releases, ...)
DEQUANTIZED_AT_LOAD: dict[str, tuple[str, ...] | None] = {"mxfp4": ("gpt_oss",), "fp8": None}


def _block_size(quantization: Any) -> tuple[int, int] | None:
    """An FP8 checkpoint's `weight_block_size` [rows, cols], where it gives one."""
    block = quantization.get("weight_block_size") if isinstance(quantization, dict) else None
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size must be [rows, cols], got {block!r}")
    return block[0], block[1]


def _dequantized_at_load(model_type: str, method: Any) -> bool:
    if not isinstance(method, str) or method not in DEQUANTIZED_AT_LOAD:
        return False
    types = DEQUANTIZED_AT_LOAD[method]
    return types is None or model_type in types


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json`, check the architecture is supported and normalise it."""
    model_dir = Path(model_dir)
    raw = read_config_json(model_dir)
    model_type = raw.get("model_type")
    if model_type not in ARCH_FAMILIES:
        archs = raw.get("architectures")
        raise UnsupportedModelError(
            f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
            f"supported model types: {', '.join(sorted(ARCH_FAMILIES))}"
        )
    quantization = raw.get("quantization_config")
    method = None
    if quantization is not None:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
    if quantization is not None and not _dequantized_at_load(model_type, method):
        raise UnsupportedModelError(
            f"{model_dir} is a quantized checkpoint (quantization_config: quant_method={method!r}); the engine "
            "serves float32/float16/bfloat16 weights: use the unquantized checkpoint and pick dtype= instead"
        )
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many types for a malformed config
        raise CheckpointError(f"{model_dir}/config.json could not be parsed as a {model_type} config: {exc}") from exc
    family = ARCH_FAMILIES[model_type]
    try:
        cfg = FAMILY_CONFIGS[family](hf, model_type)
    except (AttributeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{model_dir}/config.json lacks a field the {model_type} model needs: {exc}") from exc
    _check(cfg)
    eos_ids, defaults = read_generation_config(model_dir)
    return replace(cfg, eos_token_ids=tuple(sorted({*cfg.eos_token_ids, *eos_ids})), generation_defaults=defaults,
                   quantization=method or "", quantization_block=_block_size(quantization))


def _check(cfg: ModelConfig) -> None:
    if cfg.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(f"unsupported activation {cfg.hidden_act!r}; supported: {SUPPORTED_ACTIVATIONS}")
    if cfg.hidden_act == "xielu" and (cfg.family != "llama" or cfg.gated_mlp or cfg.moe is not None):
        raise UnsupportedModelError(f"{cfg.model_type} with hidden_act='xielu': only Apertus's ungated MLP has it")
    if cfg.attention_free and cfg.recurrent_state is None:
        raise UnsupportedModelError(f"{cfg.model_type} without an attention layer or a recurrent state")
    if cfg.attention_free and cfg.recurrent_state.layers != tuple(range(cfg.num_layers)):
        raise UnsupportedModelError(f"{cfg.model_type}: a model without an attention layer needs a recurrent state in "
                                    "every layer (layers that keep neither would see no past)")
    if cfg.num_heads % cfg.num_kv_heads:
        raise CheckpointError(f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}")
    if cfg.position_encoding == "rope" and cfg.rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_type {cfg.rope_type!r} (its frequencies depend on the sequence length); "
            f"supported: {STATIC_ROPE_TYPES}"
        )


def _decoder_fields(hf: Any, model_type: str, head_dim: int, norm_eps: float | None = None,
                    num_kv_heads: int | None = None) -> dict[str, Any]:
    """The fields the RoPE decoder families (Llama's, Gemma's, GPT-NeoX's) read from their configs alike (`norm_eps`:
    where the config does not call it rms_norm_eps; `num_kv_heads`: where the config's differs by layer); others
    whose configs map these names (GPT-Neo's, XGLM's) take them too, with their own position encoding."""
    heads = hf.num_attention_heads
    return dict(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=num_kv_heads or getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=getattr(hf, "intermediate_size", None),
        norm_eps=hf.rms_norm_eps if norm_eps is None else norm_eps,
        position_encoding="rope",
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        hf_config=hf,
    )


def _windows_by_layer_type(window: int | None, layer_types: list[str] | None,
                           max_positions: int | None = None) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention) where `layer_types` names `sliding_attention` layers; none
    where the window reaches `max_positions` (no key is ever out of it)."""
    if window is None or layer_types is None or (max_positions is not None and window >= max_positions):
        return ()
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)
    return windows if any(windows) else ()


def _full_attention_layers(layer_types: list[str]) -> tuple[int, ...]:
    """The layers `layer_types` does not name `sliding_attention` (Cohere 2's and EXAONE 4's NoPE layers)."""
    return tuple(i for i, t in enumerate(layer_types) if t != "sliding_attention")


def _exaone_nope_layers(hf: Any) -> tuple[int, ...]:
    """EXAONE 4's (and EXAONE-MoE's) "global NoPE": where the config sets a sliding window, HF rotates only the
    sliding layers, and the full-attention ones take no RoPE."""
    layer_types = getattr(hf, "layer_types", None)
    if getattr(hf, "sliding_window", None) is None or not layer_types:
        return ()
    return _full_attention_layers(layer_types)


def _check_rope_types(hf: Any, model_type: str) -> None:
    """Refuse, in the one RoPE or in each layer type's, a rope_type whose frequencies depend on the sequence length,
    and longrope (capped to its short factors by the Llama reader only)."""
    rope = hf.rope_parameters or {}
    for params in (rope.values() if "full_attention" in rope else [rope]):
        if params.get("rope_type", "default") not in STATIC_ROPE_TYPES or params.get("rope_type") == "longrope":
            raise UnsupportedModelError(f"unsupported rope_type {params.get('rope_type')!r} in {model_type}")


def _language_model_config(hf: Any, model_type: str, read: Callable[[Any], ModelConfig]) -> ModelConfig:
    """A multimodal checkpoint's language model: `read(text_config)` under the checkpoint's model_type, with the
    checkpoint's dtype (for dtype="auto") and its tied embeddings where the text config leaves them to the top level
    (Qwen's VL configs)."""
    text = hf.text_config
    if getattr(text, "dtype", None) is None:
        text.dtype = getattr(hf, "dtype", None)
    tied = getattr(text, "tie_word_embeddings", None)
    return replace(read(text), model_type=model_type,
                   tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False) if tied is None else tied))


# multimodal checkpoints whose language model is a Llama-family one -> how to read its text config (None: by its
# own model_type)
MULTIMODAL_TEXT_READERS = {"mistral3": None, "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3",
                           "qwen3_vl_moe": "qwen3_moe"}


def _text_model_config(text: Any, model_type: str) -> ModelConfig:
    """A multimodal checkpoint's language model, read by its family's reader (Mistral 3's around Mistral 4's latent
    attention: DeepSeek's), the Llama reader where the type is not one of ours."""
    return FAMILY_CONFIGS[ARCH_FAMILIES.get(model_type, "llama")](text, model_type)


HUNYUAN = ("hunyuan_v1_dense", "hunyuan_v1_moe")
GRANITE_SWA = ("granite_swa", "granitemoe_swa")


def _llama_config(hf: Any, model_type: str, norm_eps: float | None = None) -> ModelConfig:
    if model_type in MULTIMODAL_TEXT_READERS:  # Mistral Small 3.x, Ministral 3, Qwen2/2.5/3-VL: the language model
        reader = MULTIMODAL_TEXT_READERS[model_type]
        return _language_model_config(hf, model_type, lambda text: _text_model_config(text, reader or text.model_type))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    max_positions = hf.max_position_embeddings
    # Sliding-window layers: Mistral's and Phi-3's apply to every layer, Qwen's to those `layer_types` names
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    windows: tuple[int, ...] = ()
    if window is not None and window < max_positions and getattr(hf, "use_sliding_window", True) is not False:
        if layer_types is not None:
            windows = _windows_by_layer_type(window, layer_types)
        elif model_type in ("mistral", "ministral3", "mixtral", "phi3"):
            windows = (int(window),) * hf.num_hidden_layers
    rope = getattr(hf, "rope_parameters", None) or {}
    if "full_attention" in rope:  # a RoPE per layer type (Mellum's): each one's type checked
        _check_rope_types(hf, model_type)
    if rope.get("rope_type") == "longrope":  # short factors up to here, as HF uses them below this length
        original = rope.get("original_max_position_embeddings") or hf.original_max_position_embeddings
        max_positions = min(max_positions, int(original))
    partial = model_type in ("phi3", "glm4_moe", "minimax_m2")  # RoPE over the first partial_rotary_factor of heads
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0)) if partial else head_dim
    nope_layers: tuple[int, ...] = ()
    if model_type == "smollm3":  # the layers its no_rope_layers marks 0
        nope_layers = tuple(i for i, rotary in enumerate(getattr(hf, "no_rope_layers", None) or []) if not rotary)
    elif model_type in ("exaone_moe", "kolibri1"):
        nope_layers = _exaone_nope_layers(hf)
    elif model_type in GRANITE_SWA:  # a RoPE base per layer, 0 for none
        nope_layers = tuple(i for i, theta in enumerate(hf.layer_rope_theta) if not theta)
    ernie = model_type in ("ernie4_5", "ernie4_5_moe")  # biases on all projections or none (use_bias), interleaved RoPE
    helium = model_type == "helium"  # interleaved RoPE, no bias on the output projection
    no_o_bias = model_type in ("helium", "glm4_moe", "solar_open")  # q/k/v biases by attention_bias, none on o_proj
    granite = model_type in ("granite", "granitemoe", "granitemoeshared", "hyperclovax", *GRANITE_SWA)  # multipliers
    hyperclovax = model_type == "hyperclovax"  # Granite's, logits times logits_scaling, norms after each sublayer
    attention_bias = bool(getattr(hf, "use_bias" if ernie else "attention_bias", False))
    return ModelConfig(
        family="llama",
        **_decoder_fields(hf, model_type, head_dim, norm_eps),
        max_positions=max_positions,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(hf, "qkv_bias", True)) if model_type in ("qwen2", "qwen2_moe") else attention_bias,
        o_bias=bool(hf.attention_out_bias) if model_type == "seed_oss" else attention_bias and not no_o_bias,
        mlp_bias=attention_bias if ernie else bool(getattr(hf, "mlp_bias", False)),
        lm_head_bias=model_type == "ernie4_5_moe" and attention_bias,
        gated_mlp=model_type not in ("arcee", "apertus"),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "apertus", "dots1", "exaone_moe", "mellum", "kolibri1", "hy_v3",
                               *HUNYUAN)
        or (model_type == "glm4_moe" and hf.use_qk_norm),
        qk_norm_after_rope=model_type in HUNYUAN,
        qk_norm_over_heads=model_type in ("olmoe", "minimax_m2"),
        clip_qkv=float(getattr(hf, "clip_qkv", None) or 0.0),
        rotary_dim=rotary_dim,
        interleaved_rope=ernie or helium,
        nope_layers=nope_layers,
        moe=_moe_config(hf, model_type),
        layer_windows=windows,
        attention_scale=float(hf.attention_multiplier) if granite else head_dim**-0.5,
        query_scale_beta=float(rope.get("llama_4_scaling_beta") or 0.0),
        query_scale_period=int(rope.get("original_max_position_embeddings") or 1),
        embedding_multiplier=float(getattr(hf, "embedding_multiplier", 1.0)) if granite else 1.0,
        residual_multiplier=float(getattr(hf, "residual_multiplier", 1.0)) if granite else 1.0,
        logits_divisor=(1.0 / float(hf.logits_scaling) if hyperclovax else float(getattr(hf, "logits_scaling", 1.0)))
        if granite else 1.0,
        sandwich_norms=(hyperclovax and bool(getattr(hf, "use_post_norm", True))) or model_type == "kolibri1",
        attention_sinks=model_type in GRANITE_SWA,
        layer_rope_thetas=_layer_rope_thetas(hf) if model_type in GRANITE_SWA else (),
    )


def _layer_rope_thetas(hf: Any) -> tuple[float, ...]:
    """GraniteSWA's RoPE base per layer (`layer_rope_theta`; 0: a NoPE layer), for plain RoPE only."""
    rope = hf.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"{hf.model_type} with layer_rope_theta and rope_type {rope['rope_type']!r}")
    return tuple(float(t) for t in hf.layer_rope_theta)


def _gpt_oss_config(hf: Any, model_type: str) -> ModelConfig:
    """gpt-oss: Llama's fields (q/k/v/o biases, sliding and full-attention layers by `layer_types`, YaRN) with
    attention sinks and its mixture of experts."""
    return replace(_llama_config(hf, model_type), family="gpt_oss", attention_sinks=True)


def _llama4_config(hf: Any, model_type: str) -> ModelConfig:
    """Llama 4 (Scout, Maverick; `llama4_text`, or the multimodal `llama4` checkpoint's language model): Llama's
    fields, RoPE in interleaved pairs (in fp32, as complex numbers) on the layers `no_rope_layers` marks 1, q/k
    L2-normed after it there (`use_qk_norm`), the NoPE layers' queries temperature-tuned; dense MLPs
    `intermediate_size_mlp` wide, the `moe_layers` sparse (`_moe_config`). Its RoPE layers attend within chunks of
    `attention_chunk_size` tokens, which equals full causal attention below that length: sequences are capped
    there."""
    if model_type == "llama4":
        return _language_model_config(hf, model_type, lambda text: _llama4_config(text, "llama4_text"))
    _check_rope_types(hf, model_type)
    config = _llama_config(hf, model_type)
    chunk = getattr(hf, "attention_chunk_size", None)
    chunked = "chunked_attention" in (getattr(hf, "layer_types", None) or [])
    return replace(config, family="llama4", intermediate_size=hf.intermediate_size_mlp, interleaved_rope=True,
                   nope_layers=tuple(i for i, rotary in enumerate(hf.no_rope_layers) if not rotary),
                   qk_l2_norm=bool(hf.use_qk_norm), layer_windows=(),
                   max_positions=min(config.max_positions, chunk) if chunked and chunk else config.max_positions,
                   nope_query_scale=(float(hf.attn_scale), int(hf.floor_scale)) if hf.attn_temperature_tuning
                   else None)


def _afmoe_config(hf: Any, model_type: str) -> ModelConfig:
    """AFMoE (Arcee's Trinity): Llama's fields with per-head q/k norms, RoPE on the sliding-window layers only (the
    full-attention ones NoPE), the heads' outputs gated, norms before and after attention and the MLP, input
    embeddings (soft-prompt rows too) times sqrt(hidden) where `mup_enabled`, and its mixture of experts."""
    _check_rope_types(hf, model_type)
    return replace(_llama_config(hf, model_type), family="afmoe", qk_norm=True, sandwich_norms=True,
                   attention_output_gate=True, nope_layers=_full_attention_layers(hf.layer_types or []),
                   embedding_multiplier=hf.hidden_size**0.5 if hf.mup_enabled else 1.0)


def _flint_config(hf: Any, model_type: str) -> ModelConfig:
    """Flint: Qwen3-MoE's attention (per-head q/k norms) with attention sinks, RoPE on the sliding-window layers
    only, gpt-oss's RMSNorms, and its mixture of experts."""
    return replace(_llama_config(hf, model_type), family="flint", qk_norm=True, attention_sinks=True,
                   nope_layers=_full_attention_layers(hf.layer_types) if "sliding_attention" in hf.layer_types
                   else ())


def _phimoe_config(hf: Any, model_type: str) -> ModelConfig:
    """Phi-3.5-MoE: Mixtral's layout with LayerNorms (weights and biases), q/k/v/o biases where `attention_bias`
    says, the LM head's by `lm_head_bias`, sparsemixer routing; longrope capped at its original length, as Phi-3's,
    its cos/sin scaled by `short_mscale` there (`rope_inv_freq`)."""
    return replace(_llama_config(hf, model_type), family="phimoe", lm_head_bias=bool(hf.lm_head_bias))


def _olmo_config(hf: Any, model_type: str) -> ModelConfig:
    """OLMo: Llama's fields (its LayerNorms have a fixed eps of 1e-5 and no weights) and `clip_qkv`."""
    return replace(_llama_config(hf, model_type, norm_eps=1e-5), family="olmo")


# DeepSeek sparse attention (DSA): DeepSeek-V3.2, GLM-5
SPARSE_ATTENTION = ("deepseek_v32", "glm_moe_dsa")


def _deepseek_config(hf: Any, model_type: str) -> ModelConfig:
    """DeepSeek-V2 / V3, GLM-4.7-Flash (glm4_moe_lite), Mistral 4, Youtu-LLM and MiniCPM3: Llama's layout with latent
    attention (`MLAConfig`); every head has its own K/V, scores scaled by qk_head_dim^-0.5 (times YaRN's
    mscale_all_dim factor squared). Mistral 4 scales queries by position as Ministral 3 (Llama's reader reads
    that); MiniCPM3 scales token embeddings by scale_emb (`DeepseekForCausalLM`) and each sublayer's output by
    scale_depth / sqrt(layers), and divides the final hidden states by hidden_size / dim_model_base."""
    _check_rope_types(hf, model_type)
    minicpm = model_type == "minicpm3"  # (rotate-half RoPE, no rope_interleave field)
    mla = MLAConfig(q_lora_rank=hf.q_lora_rank or 0, kv_lora_rank=hf.kv_lora_rank,
                    qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
                    v_head_dim=hf.v_head_dim,
                    # (V2, V3.2 and GLM-5 always interleave; V3's rope_interleave says)
                    interleaved_rope=model_type in ("deepseek_v2", *SPARSE_ATTENTION) or (
                        not minicpm and bool(getattr(hf, "rope_interleave", True))),
                    fp32_rope=model_type == "deepseek_v2")
    scale = mla.qk_head_dim**-0.5
    rope = hf.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim") and rope["factor"] > 1:
        scale *= (0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0) ** 2
    config = replace(_llama_config(hf, model_type), family="deepseek", num_kv_heads=hf.num_attention_heads,
                     head_dim=max(mla.qk_head_dim, mla.v_head_dim), rotary_dim=mla.qk_rope_head_dim,
                     attention_scale=scale, mla=mla,
                     residual_multiplier=hf.scale_depth / math.sqrt(hf.num_hidden_layers) if minicpm else 1.0)
    if model_type in SPARSE_ATTENTION:  # its indexer keeps the best index_topk keys of each query: all of them up
        # to that many tokens, where its sparse attention is the dense one (so sequences are capped there)
        config = replace(config, max_positions=min(config.max_positions, int(hf.index_topk)))
    return config


def _longcat_flash_config(hf: Any, model_type: str) -> ModelConfig:
    """LongCat-Flash (Meituan): each of its `num_layers` layers is two sublayers of DeepSeek-V3's latent attention
    (queries and the normed latent scaled by their LoRA ranks, RoPE in interleaved pairs) each followed by a dense
    MLP, and one mixture of experts fed the first sublayer's normed input whose output joins the residual after the
    second; the experts include zero-computation (identity) ones, chosen by the softmax of fp32 router logits plus a
    correction bias, weighted by those probabilities times routed_scaling_factor. Its attention layers, the KV pool's,
    are `num_hidden_layers` (twice `num_layers`). The experts' outputs are summed as the installed transformers sums
    them: before 5.25 expert by expert in the model dtype, the identity experts among them; from 5.25 on, each
    token's computed experts at once, then its input times its identity experts' summed weights added."""
    if hf.head_dim != hf.qk_rope_head_dim or hf.qk_head_dim != hf.qk_nope_head_dim + hf.qk_rope_head_dim:
        raise UnsupportedModelError(f"{model_type} with head_dim={hf.head_dim} or qk_head_dim={hf.qk_head_dim} other "
                                    "than qk_rope_head_dim and qk_nope_head_dim + qk_rope_head_dim (transformers "
                                    "rotates head_dim channels of each query and key)")
    if not hf.q_lora_rank:
        raise UnsupportedModelError(f"{model_type} without a q_lora_rank (its queries always take the LoRA path)")
    config = _deepseek_config(hf, model_type)
    mla = replace(config.mla, interleaved_rope=True, q_scale=(hf.hidden_size / hf.q_lora_rank) ** 0.5,
                  latent_scale=(hf.hidden_size / hf.kv_lora_rank) ** 0.5)
    zero = int(hf.zero_expert_num or 0)
    moe = MoEConfig(num_experts=hf.n_routed_experts + zero, top_k=hf.moe_topk,
                    intermediate_size=hf.expert_ffn_hidden_size, norm_topk_prob=False, weights_in_model_dtype=False,
                    sparse_layers=tuple(range(hf.num_layers)), correction_bias=True, fp32_router=True,
                    routed_scaling=float(hf.routed_scaling_factor), router_bias=bool(getattr(hf, "router_bias", False)),
                    correction_bias_in_model_dtype=True, identity_experts=zero,
                    accumulate_by_expert=not _transformers_at_least(5, 25))
    return replace(config, family="longcat", mla=mla, moe=moe)


def _kimi_linear_config(hf: Any, model_type: str) -> ModelConfig:
    """Kimi Linear (Moonshot AI): Kimi Delta Attention layers (`linear_attention`: the gated delta rule with a decay
    per key channel, a short convolution over q/k/v, a low-rank forget gate and output gate) and, every few layers,
    DeepSeek's latent attention without RoPE (its rotary channels shared by the heads, not rotated); Llama's RMSNorms;
    dense layers by `mlp_layer_types`, then DeepSeek-V3's router and shared experts. The router weight, its correction
    bias and the forget gates' dt_bias are held as the installed transformers holds them: in the model dtype before
    5.24, in fp32 from 5.24 on."""
    if hf.num_key_value_heads != hf.num_attention_heads:
        raise UnsupportedModelError(f"{model_type} with num_key_value_heads={hf.num_key_value_heads} other than "
                                    f"num_attention_heads={hf.num_attention_heads} (its latent attention expands "
                                    "every head's keys and values)")
    kinds = set(hf.layer_types)
    if not kinds <= {"linear_attention", "full_attention"}:
        raise UnsupportedModelError(f"{model_type} with layer types {sorted(kinds)}")
    linear = tuple(i for i, t in enumerate(hf.layer_types) if t == "linear_attention")
    mla = MLAConfig(q_lora_rank=hf.q_lora_rank or 0, kv_lora_rank=hf.kv_lora_rank,
                    qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
                    v_head_dim=hf.v_head_dim, interleaved_rope=False, fp32_rope=False)
    heads = hf.linear_num_heads
    linear_attention = LinearAttentionConfig(layers=linear, num_key_heads=heads, num_value_heads=heads,
                                             key_head_dim=hf.linear_head_dim, value_head_dim=hf.linear_head_dim,
                                             conv_kernel=hf.linear_conv_kernel_dim)
    sparse = tuple(i for i, t in enumerate(hf.mlp_layer_types) if t == "sparse")
    moe = MoEConfig(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                    intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                    weights_in_model_dtype=False, sparse_layers=sparse, sigmoid_scores=True, fp32_router=True,
                    fp32_router_weight=hf_router_weights_in_fp32(),
                    correction_bias_in_model_dtype=not hf_router_weights_in_fp32(), num_groups=hf.n_group or 1,
                    top_groups=hf.topk_group or 1, routed_scaling=float(hf.routed_scaling_factor),
                    ungated_shared_intermediate_size=hf.moe_intermediate_size * (hf.n_shared_experts or 0)
                    ) if sparse else None
    fields = {**_decoder_fields(hf, model_type, max(mla.qk_head_dim, mla.v_head_dim)), "position_encoding": "none"}
    return ModelConfig(
        family="kimi_linear",
        **fields,
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        attention_scale=mla.qk_head_dim**-0.5,
        layer_kv_heads=tuple(0 if i in linear else hf.num_attention_heads for i in range(hf.num_hidden_layers)),
        mla=mla,
        linear_attention=linear_attention,
        moe=moe,
    )


def hf_router_weights_in_fp32() -> bool:
    """Whether the installed transformers keeps the router weights of DeepSeek-V2/V3's routers and their kin (GLM-4.5,
    dots.llm1, Solar Open, EXAONE-MoE, Hy3, MiMo-V2-Flash, A.X K1, Kimi Linear, Nemotron-H's experts) and AFMoE's
    and Kimi Linear's correction biases in fp32
    whatever the model dtype: from 5.24 on (`_keep_in_fp32_modules_strict`); before, they were cast as the model is.
    The two differ only for checkpoints whose router weights are stored finer than the dtype served (an fp32
    checkpoint run in bf16), where a rounded router weight can pick other experts at a near-tie; the engine follows
    the transformers it runs beside, so that `softprompt verify` compares like with like."""
    return _transformers_at_least(5, 24)


def _transformers_at_least(major: int, minor: int) -> bool:
    """Whether the installed transformers is major.minor or later (True where it cannot tell)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version  # (a dependency of transformers)

    try:
        return Version(version("transformers")).release >= (major, minor)
    except (PackageNotFoundError, InvalidVersion):
        return True


def _moe_config(hf: Any, model_type: str) -> MoEConfig | None:
    layers = range(hf.num_hidden_layers)
    if model_type == "gpt_oss":  # every layer sparse: a biased router, the softmax of its top-k logits in the model
        # dtype; experts with biases and a clamped SwiGLU
        return MoEConfig(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.intermediate_size, norm_topk_prob=False, weights_in_model_dtype=True,
                         sparse_layers=tuple(layers), softmax_over_topk=True, router_in_model_dtype=True,
                         router_bias=True, expert_bias=True, swiglu_limit=float(hf.swiglu_limit),
                         swiglu_alpha=float(hf.swiglu_alpha))
    if model_type == "mixtral":  # every layer sparse, top-k renormalised, fp32 router weights
        return MoEConfig(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.intermediate_size, norm_topk_prob=True, weights_in_model_dtype=False,
                         sparse_layers=tuple(layers))
    if model_type in ("granitemoe", "granitemoeshared", "granitemoe_swa"):  # every layer sparse, the top-k logits'
        # softmax, weights in the model dtype (GraniteMoeShared, GraniteMoeSWA: plus an ungated shared MLP, where it
        # has one)
        return MoEConfig(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.intermediate_size, norm_topk_prob=False, weights_in_model_dtype=True,
                         sparse_layers=tuple(layers), softmax_over_topk=True,
                         ungated_shared_intermediate_size=getattr(hf, "shared_intermediate_size", 0) or 0)
    if model_type in ("olmoe", "flex_olmo"):  # every layer sparse, Qwen2-MoE's router, no shared expert
        return MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                         weights_in_model_dtype=True, sparse_layers=tuple(layers))
    if model_type == "ernie4_5_moe":  # sparse layers from moe_layer_start_index to _end_index, every _interval
        sparse = tuple(i for i in layers if (i + 1) % hf.moe_layer_interval == 0
                       and hf.moe_layer_start_index <= i <= hf.moe_layer_end_index)
        return MoEConfig(num_experts=hf.moe_num_experts, top_k=hf.moe_k, intermediate_size=hf.moe_intermediate_size,
                         norm_topk_prob=True, weights_in_model_dtype=True, sparse_layers=sparse,
                         ungated_shared_intermediate_size=hf.moe_intermediate_size * (hf.moe_num_shared_experts or 0),
                         correction_bias=True, fp32_router=True, fp32_router_weight=True,
                         norm_min=float(hf.moe_norm_min))
    if model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "mistral4", "dots1", "solar_open",
                      "exaone_moe", "axk1", *SPARSE_ATTENTION):  # (ungated shared experts)
        shared = hf.moe_intermediate_size * ((hf.num_shared_experts if model_type == "exaone_moe"
                                              else hf.n_shared_experts) or 0)
    if model_type == "deepseek_v2":  # dense first_k_dense_replace layers, then softmax-routed ones, scaled
        if hf.topk_method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(f"deepseek_v2 with topk_method={hf.topk_method!r} (transformers computes "
                                        "'greedy' and 'group_limited_greedy')")
        grouped = hf.topk_method == "group_limited_greedy"
        return MoEConfig(num_experts=hf.n_routed_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=False,
                         weights_in_model_dtype=False, sparse_layers=tuple(layers)[hf.first_k_dense_replace:],
                         fp32_router=True, fp32_router_weight=hf_router_weights_in_fp32(),
                         num_groups=hf.n_group if grouped else 1,
                         top_groups=hf.topk_group if grouped else 1, group_by_best=True,
                         routed_scaling=float(hf.routed_scaling_factor), ungated_shared_intermediate_size=shared)
    if model_type == "hunyuan_v1_moe":  # every layer: a softmax router (its weight kept in fp32), renormalised top-k,
        # and a shared MLP as wide as the experts
        top_k = set(hf.moe_topk) if isinstance(hf.moe_topk, list) else {hf.moe_topk}
        if not isinstance(hf.num_experts, int) or len(top_k) != 1:
            raise UnsupportedModelError("hunyuan_v1_moe with a number of experts or moe_topk that varies by layer")
        return MoEConfig(num_experts=hf.num_experts, top_k=top_k.pop(), intermediate_size=hf.intermediate_size,
                         norm_topk_prob=True, weights_in_model_dtype=False, sparse_layers=tuple(layers),
                         fp32_router=True, fp32_router_weight=True,
                         ungated_shared_intermediate_size=hf.intermediate_size)
    if model_type == "mistral4":  # dense first_k_dense_replace layers, then a softmax router over the best groups
        return MoEConfig(num_experts=hf.n_routed_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                         weights_in_model_dtype=True, sparse_layers=tuple(layers)[hf.first_k_dense_replace:],
                         router_in_model_dtype=True, num_groups=hf.n_group or 1, top_groups=hf.topk_group or 1,
                         routed_scaling=float(hf.routed_scaling_factor), ungated_shared_intermediate_size=shared)
    if model_type in ("glm4_moe", "deepseek_v3", "glm4_moe_lite", "dots1", "solar_open", "exaone_moe", "axk1",
                      *SPARSE_ATTENTION):  # dense
        # layers, then sigmoid-routed ones (GLM-4.7-Flash, EXAONE-MoE and A.X K1 name them, Solar Open has none, the
        # others count the dense ones); A.X K1 norms the MoE block's output
        kinds = getattr(hf, "mlp_layer_types", None)
        if kinds:
            sparse = tuple(i for i in layers if kinds[i] == "sparse")
        else:
            sparse = tuple(layers)[0 if model_type == "solar_open" else hf.first_k_dense_replace:]
        experts = hf.num_experts if model_type == "exaone_moe" else hf.n_routed_experts
        return MoEConfig(num_experts=experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                         weights_in_model_dtype=False, sparse_layers=sparse,
                         sigmoid_scores=True, fp32_router=True, fp32_router_weight=hf_router_weights_in_fp32(),
                         num_groups=hf.n_group, top_groups=hf.topk_group,
                         routed_scaling=float(hf.routed_scaling_factor), ungated_shared_intermediate_size=shared,
                         output_norm=model_type == "axk1")
    if model_type == "mimo_v2_flash":  # the layers mlp_layer_types names sparse: DeepSeek-V3's router (its weight
        # as transformers holds it), no shared expert
        sparse = tuple(i for i in layers if hf.mlp_layer_types[i] == "sparse")
        return MoEConfig(num_experts=hf.n_routed_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                         weights_in_model_dtype=False, sparse_layers=sparse, sigmoid_scores=True, fp32_router=True,
                         fp32_router_weight=hf_router_weights_in_fp32(), num_groups=hf.n_group or 1,
                         top_groups=hf.topk_group or 1,
                         routed_scaling=float(hf.routed_scaling_factor or 1.0)) if sparse else None
    if model_type == "llama4_text":  # the moe_layers sparse: the top-k logits' sigmoids scale the experts' inputs,
        # plus an ungated shared expert as wide as the experts
        return MoEConfig(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.intermediate_size, norm_topk_prob=False, weights_in_model_dtype=True,
                         sparse_layers=tuple(hf.moe_layers), router_in_model_dtype=True, sigmoid_over_topk=True,
                         weights_scale_input=True, ungated_shared_intermediate_size=hf.intermediate_size)
    if model_type == "hy_v3":  # dense layers by mlp_layer_types, then GLM-4.5's router in one group (its bias on the
        # MoE block), scaled by router_scaling_factor, and ungated shared experts
        return MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=True, weights_in_model_dtype=False,
                         sparse_layers=tuple(i for i in layers if hf.mlp_layer_types[i] == "sparse"),
                         sigmoid_scores=True, fp32_router=True, fp32_router_weight=hf_router_weights_in_fp32(),
                         routed_scaling=float(hf.router_scaling_factor),
                         ungated_shared_intermediate_size=hf.moe_intermediate_size * (hf.num_shared_experts or 0))
    if model_type == "flint":  # Qwen2-MoE's dense mlp_only_layers, then experts chosen by the sigmoid of fp32
        # logits (the router weight kept fp32) alone, renormalised, beside an ungated shared expert
        dense = set(hf.mlp_only_layers or [])
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        return MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                         weights_in_model_dtype=False, sigmoid_scores=True, score_bias=False, fp32_router=True,
                         fp32_router_weight=True,
                         sparse_layers=tuple(i for i in layers if i not in dense and (i + 1) % step == 0),
                         ungated_shared_intermediate_size=hf.shared_expert_intermediate_size)
    if model_type == "kolibri1":  # every layer sparse: experts chosen by fp32 logit + correction bias, weighted by
        # their sigmoids (renormalised where norm_topk_prob says), beside an ungated shared expert
        return MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                         weights_in_model_dtype=False, sparse_layers=tuple(layers), sigmoid_scores=True,
                         fp32_router=True, correction_bias_on_logits=True,
                         ungated_shared_intermediate_size=hf.shared_expert_intermediate_size)
    if model_type == "afmoe":  # dense first num_dense_layers, then sigmoid-routed experts (GLM-4.5's router in one
        # group, its correction bias `expert_bias` cast as the model is before transformers 5.24, fp32 since), scaled
        # by route_scale, and shared experts
        return MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=True, weights_in_model_dtype=False,
                         sparse_layers=tuple(layers)[hf.num_dense_layers or 0:], sigmoid_scores=True,
                         routed_scaling=float(hf.route_scale),
                         correction_bias_in_model_dtype=not hf_router_weights_in_fp32(),
                         ungated_shared_intermediate_size=hf.moe_intermediate_size * (hf.num_shared_experts or 0))
    if model_type == "phimoe":  # every layer sparse: sparsemixer's two experts, in the model dtype
        if hf.num_experts_per_tok != 2:
            raise UnsupportedModelError(f"phimoe with num_experts_per_tok={hf.num_experts_per_tok} (sparsemixer "
                                        "picks 2)")
        return MoEConfig(num_experts=hf.num_local_experts, top_k=2, intermediate_size=hf.intermediate_size,
                         norm_topk_prob=False, weights_in_model_dtype=True, sparse_layers=tuple(layers),
                         router_in_model_dtype=True, sparsemixer_eps=float(hf.router_jitter_noise))
    if model_type == "minimax_m2":  # every layer sparse: sigmoid scores of the logits (in the model dtype, then
        # fp32), experts chosen by score + the correction bias (cast as the model is), the chosen scores renormalised
        return MoEConfig(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.intermediate_size, norm_topk_prob=True, weights_in_model_dtype=False,
                         sparse_layers=tuple(layers), sigmoid_scores=True, correction_bias_in_model_dtype=True)
    if model_type == "mellum":  # Qwen3-MoE's router in the layers mlp_layer_types names sparse
        return MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                         weights_in_model_dtype=True,
                         sparse_layers=tuple(i for i in layers if hf.mlp_layer_types[i] == "sparse"))
    if model_type not in ("qwen2_moe", "qwen3_moe") or not hf.num_experts:
        return None
    dense = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    renormalise = bool(getattr(hf, "norm_topk_prob", True))  # (Qwen3-VL-MoE's text config has none: it always does)
    return MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                     intermediate_size=hf.moe_intermediate_size, norm_topk_prob=renormalise,
                     weights_in_model_dtype=True,
                     sparse_layers=tuple(i for i in layers if i not in dense and (i + 1) % step == 0),
                     shared_expert_intermediate_size=getattr(hf, "shared_expert_intermediate_size", 0) or 0)


def _gemma_config(hf: Any, model_type: str) -> ModelConfig:
    if model_type == "gemma3":  # a multimodal Gemma 3 checkpoint (4B and up): its language model, text in, text out
        return _language_model_config(hf, model_type, lambda text: _gemma_config(text, "gemma3_text"))
    if getattr(hf, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention=True is not a causal LM")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    gemma3 = model_type == "gemma3_text"
    later = model_type != "gemma"  # Gemma 2 and 3: sandwich norms, query_pre_attn_scalar, sliding-window layers
    _check_rope_types(hf, model_type)
    windows = _windows_by_layer_type(getattr(hf, "sliding_window", None), getattr(hf, "layer_types", None))
    scalar = getattr(hf, "query_pre_attn_scalar", None) if later else None
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        family="gemma",
        **_decoder_fields(hf, model_type, head_dim),
        max_positions=hf.max_position_embeddings,
        hidden_act=(getattr(hf, "hidden_activation", None) if later else None) or hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=gemma3,
        attention_scale=(scalar or head_dim) ** -0.5,
        layer_windows=windows if later else (),
        sandwich_norms=later and model_type != "vaultgemma",  # (VaultGemma: Gemma 2 without the post-norms)
        final_logit_softcap=float(getattr(hf, "final_logit_softcapping", None) or 0.0),
        attention_softcap=float(getattr(hf, "attn_logit_softcapping", None) or 0.0),
    )


def _gemma4_config(hf: Any, model_type: str) -> ModelConfig:
    """Gemma 4 (`gemma4_text`, `gemma4_unified_text`; `gemma4`, `gemma4_unified`: the multimodal checkpoints'
    language model): Gemma 3's layers with wider K/V heads (and fewer, their values their keys where
    attention_k_eq_v) on the full-attention layers, per `per_layer_config`, an attention scale of 1 and gainless
    value norms; the 26B-A4B's experts beside each dense MLP; the last layers may attend with earlier layers'
    K/V."""
    if model_type in ("gemma4", "gemma4_unified"):
        return _language_model_config(hf, model_type, lambda text: _gemma4_config(text, text.model_type))
    if getattr(hf, "use_bidirectional_attention", None) == "all":
        raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention='all' is not a causal LM")
    if getattr(hf, "hidden_size_per_layer_input", 0):
        raise UnsupportedModelError(
            f"{model_type} with per-layer input embeddings (hidden_size_per_layer_input: Gemma 4 E2B / E4B) is not "
            "supported: they look up each input row's token id, which a soft prompt's rows do not have "
            "(transformers + PEFT fail on them too)")
    per_layer = getattr(hf, "per_layer_attributes", None) or set()
    if per_layer - {"head_dim", "num_key_value_heads"}:
        raise UnsupportedModelError(f"{model_type}'s per_layer_config overrides {sorted(per_layer)}; supported: "
                                    "head_dim, num_key_value_heads")
    layers = range(hf.num_hidden_layers)
    if per_layer:
        layer_configs = hf.per_layer_config
        head_dims = tuple(int(layer_configs[i].head_dim) for i in layers)
        kv_heads = tuple(int(layer_configs[i].num_key_value_heads) for i in layers)
        if any(layer_configs[i].skip for i in layers):
            raise UnsupportedModelError(f"{model_type} with layers that skip sublayers (per_layer_config skip) is "
                                        "not supported")
    elif getattr(hf, "global_head_dim", None) is not None:  # (transformers before 5.15 kept it beside head_dim)
        raise UnsupportedModelError(f"{model_type} needs transformers >= 5.15 (its per_layer_config) to read its "
                                    "full-attention layers' head width")
    else:
        head_dims = (int(hf.head_dim),) * hf.num_hidden_layers
        kv_heads = (int(hf.num_key_value_heads),) * hf.num_hidden_layers
    for count in kv_heads:
        if hf.num_attention_heads % count:
            raise CheckpointError(f"num_attention_heads={hf.num_attention_heads} is not a multiple of a layer's "
                                  f"num_key_value_heads={count}")
    _check_rope_types(hf, model_type)
    uniform = len(set(head_dims)) == 1 and len(set(kv_heads)) == 1
    fields = _decoder_fields(hf, model_type, max(head_dims), num_kv_heads=math.lcm(*kv_heads))
    moe = None
    if getattr(hf, "enable_moe_block", False):
        moe = MoEConfig(num_experts=hf.num_experts, top_k=hf.top_k_experts, intermediate_size=hf.moe_intermediate_size,
                        norm_topk_prob=True, weights_in_model_dtype=False, sparse_layers=tuple(layers))
    sources, widths = (), ()
    if getattr(hf, "num_kv_shared_layers", 0):  # the last layers attend with the last earlier layer of their type's K/V
        modes = hf.kv_sharing_modes
        producers = {hf.layer_types[i]: i for i in layers if modes[i] != "reuse"}
        sources = tuple(producers[hf.layer_types[i]] if modes[i] == "reuse" else i for i in layers)
        if getattr(hf, "use_double_wide_mlp", False):  # (the sharing layers' MLPs twice as wide)
            widths = tuple(hf.intermediate_size * (2 if modes[i] == "reuse" else 1) for i in layers)
    return ModelConfig(
        family="gemma4",
        **fields,
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_activation,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        qk_norm=True,
        attention_scale=1.0,
        layer_windows=_windows_by_layer_type(hf.sliding_window, hf.layer_types),
        sandwich_norms=True,
        final_logit_softcap=float(getattr(hf, "final_logit_softcapping", None) or 0.0),
        layer_head_dims=() if uniform else head_dims,
        layer_kv_heads=() if uniform else kv_heads,
        value_from_key_layers=_full_attention_layers(hf.layer_types) if getattr(hf, "attention_k_eq_v", False) else (),
        kv_source_layers=sources,
        layer_intermediate_sizes=widths,
        moe=moe,
    )


def _laguna_config(hf: Any, model_type: str) -> ModelConfig:
    """Laguna (poolside): Llama's pre-norm layers with per-head q/k norms, a query head count per layer, the heads'
    outputs gated by softplus, sliding and full-attention layers each with a RoPE (and rotary share) of its own; a
    dense first layer, then sigmoid-routed experts (soft-capped router logits, a correction bias, scaled) beside a
    shared expert."""
    if getattr(hf, "moe_apply_router_weight_on_input", False):
        raise UnsupportedModelError(f"{model_type} with moe_apply_router_weight_on_input=True is not supported "
                                    "(transformers does not run it either)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    heads = tuple(int(h) for h in hf.num_attention_heads_per_layer)
    for count in heads:
        if count % hf.num_key_value_heads:
            raise CheckpointError(f"a layer's {count} query heads are not a multiple of num_key_value_heads="
                                  f"{hf.num_key_value_heads}")
    _check_rope_types(hf, model_type)
    sparse = tuple(i for i, t in enumerate(hf.mlp_layer_types) if t == "sparse")
    moe = MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                    intermediate_size=hf.moe_intermediate_size, norm_topk_prob=True, weights_in_model_dtype=True,
                    sparse_layers=sparse, sigmoid_scores=True,
                    routed_scaling=float(hf.moe_routed_scaling_factor), correction_bias_in_model_dtype=True,
                    ungated_shared_intermediate_size=hf.shared_expert_intermediate_size,
                    router_logit_softcap=float(hf.moe_router_logit_softcapping or 0.0)) if sparse else None
    fields = _decoder_fields(hf, model_type, head_dim)
    if len(set(heads)) == 1:  # (one count for every layer: num_heads is it)
        fields["num_heads"] = heads[0]
    return ModelConfig(
        family="laguna",
        **fields,
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        qk_norm=True,
        attention_scale=head_dim**-0.5,
        layer_windows=_windows_by_layer_type(hf.sliding_window, hf.layer_types, hf.max_position_embeddings),
        layer_num_heads=heads if len(set(heads)) > 1 else (),
        softplus_output_gate="head" if hf.gating is True or hf.gating == "per-head" else "element",
        moe=moe,
    )


def _mimo_v2_flash_config(hf: Any, model_type: str) -> ModelConfig:
    """MiMo-V2-Flash (Xiaomi): Llama's pre-norm layers with sliding-window and full-attention layers, each type with a
    RoPE of its own over a third of each head; the sliding layers with twice the K/V heads and attention sinks; value
    heads narrower than the query/key heads, times attention_value_scale; a dense first layer (mlp_layer_types), then
    DeepSeek-V3's sigmoid router over the best groups, with no shared expert."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    sliding = tuple(i for i, t in enumerate(hf.layer_types) if t == "sliding_attention")
    kv_heads = tuple(hf.num_key_value_heads * (2 if i in sliding else 1) for i in range(hf.num_hidden_layers))
    for count in set(kv_heads):
        if hf.num_attention_heads % count:
            raise CheckpointError(f"num_attention_heads={hf.num_attention_heads} is not a multiple of a layer's "
                                  f"{count} K/V heads")
    if not 0 < hf.v_head_dim <= head_dim:
        raise UnsupportedModelError(f"{model_type} with v_head_dim={hf.v_head_dim} wider than head_dim={head_dim}")
    _check_rope_types(hf, model_type)
    uniform = len(set(kv_heads)) == 1
    scale = hf.attention_value_scale
    return ModelConfig(
        family="mimo_v2",
        **_decoder_fields(hf, model_type, head_dim, num_kv_heads=math.lcm(*kv_heads)),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(hf.attention_bias),
        attention_scale=head_dim**-0.5,
        layer_windows=_windows_by_layer_type(hf.sliding_window, hf.layer_types, hf.max_position_embeddings),
        layer_kv_heads=() if uniform else kv_heads,
        attention_sinks=bool(sliding),
        sink_layers=sliding if len(sliding) < hf.num_hidden_layers else (),
        v_head_dim=int(hf.v_head_dim),
        value_scale=1.0 if scale is None else float(scale),
        moe=_moe_config(hf, model_type),
    )


def _gpt_neox_config(hf: Any, model_type: str) -> ModelConfig:
    head_dim = hf.hidden_size // hf.num_attention_heads
    rope = hf.rope_parameters or {}
    bias = bool(getattr(hf, "attention_bias", True))
    return ModelConfig(
        family="gpt_neox",
        **_decoder_fields(hf, model_type, head_dim, norm_eps=hf.layer_norm_eps),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        parallel_residual=bool(getattr(hf, "use_parallel_residual", True)),
        attention_scale=head_dim**-0.5,
    )


def _phi_config(hf: Any, model_type: str) -> ModelConfig:
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = hf.rope_parameters or {}
    return ModelConfig(
        family="phi",
        **_decoder_fields(hf, model_type, head_dim, norm_eps=hf.layer_norm_eps),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        qk_norm=bool(getattr(hf, "qk_layernorm", False)),
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        attention_scale=head_dim**-0.5,
    )


def _stablelm_config(hf: Any, model_type: str) -> ModelConfig:
    if model_type == "jais2":
        return _ungated_layernorm_config(hf, model_type)
    head_dim = hf.hidden_size // hf.num_attention_heads
    rope = hf.rope_parameters or {}
    return ModelConfig(
        family="stablelm",
        **_decoder_fields(hf, model_type, head_dim, norm_eps=hf.layer_norm_eps),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(hf, "use_qkv_bias", False)),
        qk_norm=bool(getattr(hf, "qk_layernorm", False)),
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        parallel_residual=bool(getattr(hf, "use_parallel_residual", False)),
        attention_scale=head_dim**-0.5,
    )


def _ungated_layernorm_config(hf: Any, model_type: str) -> ModelConfig:
    """Nemotron (Nemotron-4, Minitron, Nemotron-Mini): StableLM's serial layout with (1 + w) LayerNorm gains, RoPE
    over `partial_rotary_factor` of each head, an ungated squared-ReLU MLP, biases on every projection or none.
    Jais 2 (`jais2`): the same with plain LayerNorms (StableLM's model) and RoPE over whole heads."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = hf.rope_parameters or {}
    bias = bool(getattr(hf, "attention_bias", False))
    jais2 = model_type == "jais2"
    return ModelConfig(
        family="stablelm" if jais2 else "nemotron",
        **_decoder_fields(hf, model_type, head_dim, norm_eps=hf.layer_norm_eps if jais2 else hf.norm_eps),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        gated_mlp=False,
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        attention_scale=head_dim**-0.5,
    )


def _starcoder2_config(hf: Any, model_type: str) -> ModelConfig:
    head_dim = hf.hidden_size // hf.num_attention_heads
    window = getattr(hf, "sliding_window", None)
    bias = bool(getattr(hf, "use_bias", True))
    return ModelConfig(
        family="starcoder2",
        **_decoder_fields(hf, model_type, head_dim, norm_eps=hf.norm_epsilon),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        layer_windows=(int(window),) * hf.num_hidden_layers if window and window < hf.max_position_embeddings else (),
        attention_scale=head_dim**-0.5,
    )


def _cohere_config(hf: Any, model_type: str) -> ModelConfig:
    """Cohere, and Cohere 2 (Command R7B, Command A): sliding-window layers with RoPE, full-attention layers without
    (NoPE). Cohere2-MoE: the same (its dense prefix layers rotate where `prefix_dense_sliding_window_pattern` is 1)
    with experts in the `mlp_layer_types` sparse layers (`_cohere_moe`), and RMSNorms where it sets rms_norm_eps."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    bias = bool(getattr(hf, "attention_bias", False))
    windows: tuple[int, ...] = ()
    nope_layers: tuple[int, ...] = ()
    moe = _cohere_moe(hf) if model_type == "cohere2_moe" else None
    if model_type in ("cohere2", "cohere2_moe"):
        nope_layers = _full_attention_layers(hf.layer_types)
        windows = _windows_by_layer_type(hf.sliding_window, hf.layer_types, hf.max_position_embeddings)
    if moe is not None and hf.prefix_dense_sliding_window_pattern == 1:  # (its dense layers all rotate)
        nope_layers = tuple(i for i in nope_layers if hf.mlp_layer_types[i] != "dense")
    rms = moe is not None and hf.rms_norm_eps is not None
    return ModelConfig(
        family="cohere",
        **{**_decoder_fields(hf, model_type, head_dim, norm_eps=hf.rms_norm_eps if rms else hf.layer_norm_eps),
           **({"intermediate_size": hf.prefix_dense_intermediate_size or hf.intermediate_size} if moe else {})},
        moe=moe,
        rms_norm=rms,
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=bool(getattr(hf, "use_qk_norm", False)),
        nope_layers=nope_layers,
        layer_windows=windows,
        parallel_residual=True,
        interleaved_rope=True,
        attention_scale=head_dim**-0.5,
        logits_divisor=1.0 / float(getattr(hf, "logit_scale", 1.0)),
    )


def _cohere_moe(hf: Any) -> MoEConfig:
    """Cohere2-MoE's experts: the softmax (fp32) of the top-k router logits, cast back; shared experts summed with the
    routed ones or averaged with them (`shared_expert_combination_strategy`)."""
    if hf.expert_selection_fn != "softmax":
        raise UnsupportedModelError(f"cohere2_moe with expert_selection_fn={hf.expert_selection_fn!r} (the engine "
                                    "computes 'softmax')")
    return MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok, intermediate_size=hf.intermediate_size,
                     norm_topk_prob=False, weights_in_model_dtype=True, softmax_over_topk=True,
                     sparse_layers=tuple(i for i, kind in enumerate(hf.mlp_layer_types) if kind == "sparse"),
                     ungated_shared_intermediate_size=hf.intermediate_size * (hf.num_shared_experts or 0),
                     shared_average=hf.shared_expert_combination_strategy == "average")


def _olmo2_config(hf: Any, model_type: str) -> ModelConfig:
    """OLMo 2; OLMo 3 (sliding-window layers, a RoPE per layer type); EXAONE 4 (per-head q/k norms, sliding-window
    layers with RoPE and full-attention layers without, where a window is set); EXAONE 4.5's multimodal checkpoint
    (its EXAONE 4 language model); FlexOlmo (OLMoE's experts as the MLPs)."""
    if model_type == "exaone4_5":
        return _language_model_config(hf, model_type, lambda text: _olmo2_config(text, "exaone4"))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    bias = bool(getattr(hf, "attention_bias", False))
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    _check_rope_types(hf, model_type)
    return ModelConfig(
        family="olmo2",
        **_decoder_fields(hf, model_type, head_dim),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=model_type == "exaone4",
        nope_layers=_exaone_nope_layers(hf) if model_type == "exaone4" else (),
        layer_windows=_windows_by_layer_type(window, layer_types, hf.max_position_embeddings),
        attention_scale=head_dim**-0.5,
        moe=_moe_config(hf, model_type),  # (FlexOlmo's: OLMoE's experts in OLMo 2's layers)
    )


def _glm_config(hf: Any, model_type: str) -> ModelConfig:
    """GLM and GLM-4: RoPE in interleaved pairs over `partial_rotary_factor` of each head; GLM-4's extra norms."""
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = hf.rope_parameters or {}
    factor = rope.get("partial_rotary_factor", 1.0)  # (transformers puts a config's top-level one here)
    return ModelConfig(
        family="glm",
        **_decoder_fields(hf, model_type, head_dim),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(hf, "attention_bias", True)),
        rotary_dim=int(head_dim * factor),
        interleaved_rope=True,
        sandwich_norms=model_type == "glm4",
        attention_scale=head_dim**-0.5,
    )


def _falcon_config(hf: Any, model_type: str) -> ModelConfig:
    if getattr(hf, "alibi", False):
        raise UnsupportedModelError("Falcon with alibi=True (Falcon-RW) is not supported: HF rounds its ALiBi biases "
                                    "to bfloat16, which the attention kernels do not reproduce; rotary Falcons are")
    head_dim = hf.hidden_size // hf.num_attention_heads
    new = bool(getattr(hf, "new_decoder_architecture", False))
    kv_heads = hf.num_kv_heads if new else 1 if hf.multi_query else hf.num_attention_heads
    norms = getattr(hf, "num_ln_in_parallel_attn", None) or (2 if new else 1)
    bias = bool(getattr(hf, "bias", False))
    return ModelConfig(
        family="falcon",
        **{**_decoder_fields(hf, model_type, head_dim, norm_eps=hf.layer_norm_epsilon), "num_kv_heads": kv_heads,
           "intermediate_size": getattr(hf, "ffn_hidden_size", None) or 4 * hf.hidden_size},
        max_positions=hf.max_position_embeddings,
        hidden_act=getattr(hf, "activation", "gelu"),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        parallel_residual=bool(hf.parallel_attn) or new,
        two_parallel_norms=new and norms == 2,
        attention_scale=head_dim**-0.5,
    )


def _gptj_config(hf: Any, model_type: str) -> ModelConfig:
    """GPT-J, and CodeGen (GPT-J's model with q/k/v fused in model-parallel row groups)."""
    head_dim = hf.n_embd // hf.n_head
    if model_type == "codegen" and hf.n_head % 4:
        raise CheckpointError(f"codegen with n_head={hf.n_head}: CodeGen lays its heads out in 4 groups")
    return ModelConfig(
        family="gptj",
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.n_embd,
        num_layers=hf.n_layer,
        num_heads=hf.n_head,
        num_kv_heads=hf.n_head,
        head_dim=head_dim,
        intermediate_size=hf.n_inner or 4 * hf.n_embd,
        max_positions=hf.n_positions,
        norm_eps=hf.layer_norm_epsilon,
        hidden_act=hf.activation_function,
        position_encoding="rope",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        mlp_bias=True,
        rotary_dim=hf.rotary_dim or head_dim,
        interleaved_rope=True,
        attention_scale=head_dim**-0.5,
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        hf_config=hf,
    )


def _opt_config(hf: Any, model_type: str) -> ModelConfig:
    head_dim = hf.hidden_size // hf.num_attention_heads
    bias = bool(getattr(hf, "enable_bias", True))
    return ModelConfig(
        family="opt",
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=hf.ffn_dim,
        max_positions=hf.max_position_embeddings,
        norm_eps=1e-5,  # nn.LayerNorm's default: OPT's config has no epsilon
        hidden_act=hf.activation_function,
        position_encoding="learned",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        attention_scale=1.0,  # the queries come scaled (as HF scales them, before the product)
        post_layer_norm=not getattr(hf, "do_layer_norm_before", True),
        word_embed_dim=0 if hf.word_embed_proj_dim == hf.hidden_size else hf.word_embed_proj_dim,
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        hf_config=hf,
    )


def _fairseq_lm_config(hf: Any, model_type: str) -> ModelConfig:
    """XGLM and BioGPT (fairseq's decoder, OPT's pre-norm layout): positions two rows into a table (XGLM's
    sinusoidal, BioGPT's learned), token embeddings scaled by sqrt(hidden) where `scale_embedding` says."""
    head_dim = hf.hidden_size // hf.num_attention_heads
    xglm = model_type == "xglm"
    return ModelConfig(
        family=model_type,
        # (nn.LayerNorm's default eps, which both models' norms keep)
        **{**_decoder_fields(hf, model_type, head_dim, norm_eps=1e-5), "position_encoding": "learned",
           "intermediate_size": hf.ffn_dim if xglm else hf.intermediate_size},
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.activation_function if xglm else hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        attention_scale=1.0,  # the queries come scaled, as OPT's
    )


def _gpt2_config(hf: Any, model_type: str) -> ModelConfig:
    """GPT-2's config, and GPTBigCode's (the same fields, and multi_query)."""
    head_dim = hf.n_embd // hf.n_head
    return ModelConfig(
        family=ARCH_FAMILIES[model_type],
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.n_embd,
        num_layers=hf.n_layer,
        num_heads=hf.n_head,
        num_kv_heads=1 if getattr(hf, "multi_query", False) else hf.n_head,
        head_dim=head_dim,
        intermediate_size=hf.n_inner or 4 * hf.n_embd,
        max_positions=hf.n_positions,
        norm_eps=hf.layer_norm_epsilon,
        hidden_act=hf.activation_function,
        position_encoding="learned",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        attention_scale=head_dim**-0.5 if getattr(hf, "scale_attn_weights", True) else 1.0,
        inverse_layer_scale=bool(getattr(hf, "scale_attn_by_inverse_layer_idx", False)),
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        hf_config=hf,
    )


def _gpt_neo_config(hf: Any, model_type: str) -> ModelConfig:
    """GPT-Neo: GPT-2's block, attention scores unscaled, `local` layers (`attention_layers`, expanded from
    `attention_types`) windowed to the last `window_size` positions."""
    head_dim = hf.hidden_size // hf.num_heads
    layer_types = ["sliding_attention" if t == "local" else "full_attention" for t in hf.attention_layers]
    return ModelConfig(
        family="gpt_neo",
        **{**_decoder_fields(hf, model_type, head_dim, norm_eps=hf.layer_norm_epsilon), "position_encoding": "learned",
           "intermediate_size": hf.intermediate_size or 4 * hf.hidden_size},
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.activation_function,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        o_bias=True,
        mlp_bias=True,
        layer_windows=_windows_by_layer_type(hf.window_size, layer_types, hf.max_position_embeddings),
        attention_scale=1.0,  # HF's GPT-Neo never scales q.k
    )


def _bloom_config(hf: Any, model_type: str) -> ModelConfig:
    head_dim = hf.hidden_size // hf.n_head
    # ALiBi has no learned position limit; use the training length the config records, if any.
    max_positions = getattr(hf, "seq_length", None) or getattr(hf, "max_position_embeddings", None) or 2048
    return ModelConfig(
        family="bloom",
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.n_layer,
        num_heads=hf.n_head,
        num_kv_heads=hf.n_head,
        head_dim=head_dim,
        intermediate_size=4 * hf.hidden_size,
        max_positions=int(max_positions),
        norm_eps=hf.layer_norm_epsilon,
        hidden_act="bloom_gelu",
        position_encoding="alibi",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        attention_scale=head_dim**-0.5,
        residual_post_norm=bool(getattr(hf, "apply_residual_connection_post_layernorm", False)),
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        hf_config=hf,
    )


def _persimmon_config(hf: Any, model_type: str) -> ModelConfig:
    """Persimmon: StableLM's serial layout with biases everywhere, an ungated MLP (squared ReLU), RoPE over
    `partial_rotary_factor` of each head, q/k LayerNorms where `qk_layernorm` says."""
    head_dim = hf.hidden_size // hf.num_attention_heads
    rope = hf.rope_parameters or {}
    _check_rope_types(hf, model_type)
    return ModelConfig(
        family="persimmon",
        **_decoder_fields(hf, model_type, head_dim, norm_eps=hf.layer_norm_eps),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=True, o_bias=True, mlp_bias=True, gated_mlp=False,
        qk_norm=bool(hf.qk_layernorm),
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))),
        attention_scale=head_dim**-0.5,
    )


def _dbrx_config(hf: Any, model_type: str) -> ModelConfig:
    """DBRX: Llama's fields under its own names (d_model, n_heads, attn_config.kv_n_heads, ...), LayerNorms of eps
    1e-5 (nn.LayerNorm's default, which transformers uses), q/k/v clamped to attn_config.clip_qkv, experts in every
    layer weighted by the router's softmax (model dtype) over the top-k, renormalised (moe_normalize_expert_weights
    1: their sum; another p-norm is refused)."""
    attn, ffn = hf.attn_config, hf.ffn_config
    p = ffn.moe_normalize_expert_weights
    if p not in (None, 1, 1.0):
        raise UnsupportedModelError(f"dbrx with moe_normalize_expert_weights={p!r} (the engine renormalises by sum)")
    if (ffn.ffn_act_fn or {}).get("name", "silu") != "silu":
        raise UnsupportedModelError(f"dbrx with ffn_act_fn={ffn.ffn_act_fn!r} (the engine computes silu)")
    _check_rope_types(hf, model_type)
    head_dim = hf.d_model // hf.n_heads
    layers = tuple(range(hf.n_layers))
    return ModelConfig(
        family="dbrx",
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.d_model,
        num_layers=hf.n_layers,
        num_heads=hf.n_heads,
        num_kv_heads=attn.kv_n_heads,
        head_dim=head_dim,
        intermediate_size=ffn.ffn_hidden_size,
        max_positions=int(hf.max_seq_len),
        norm_eps=1e-5,
        hidden_act="silu",
        position_encoding="rope",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_scale=head_dim**-0.5,
        clip_qkv=float(attn.clip_qkv or 0.0),
        moe=MoEConfig(num_experts=ffn.moe_num_experts, top_k=ffn.moe_top_k, intermediate_size=ffn.ffn_hidden_size,
                      norm_topk_prob=p is not None, weights_in_model_dtype=True, sparse_layers=layers,
                      router_in_model_dtype=True),
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        hf_config=hf,
    )


def _nanochat_config(hf: Any, model_type: str) -> ModelConfig:
    """nanochat: Llama's fields with gainless norms, q/k L2-normed after RoPE, an ungated MLP, soft-capped logits."""
    _check_rope_types(hf, model_type)
    return replace(_llama_config(hf, model_type), family="nanochat", gated_mlp=False, qk_l2_norm=True,
                   final_logit_softcap=float(hf.final_logit_softcapping or 0.0))


def _mpt_config(hf: Any, model_type: str) -> ModelConfig:
    """MPT: ALiBi (transformers applies it whatever attn_config.alibi says, with MPT's slopes), q/k/v clamped to
    attn_config.clip_qkv, scores scaled by attn_config.softmax_scale (default head_dim^-0.5), an MLP 4x wide."""
    attn = hf.attn_config
    head_dim = hf.d_model // hf.n_heads
    return ModelConfig(
        family="mpt",
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.d_model,
        num_layers=hf.n_layers,
        num_heads=hf.n_heads,
        num_kv_heads=hf.n_heads,
        head_dim=head_dim,
        intermediate_size=4 * hf.d_model,  # (transformers' MPT ignores expansion_ratio)
        max_positions=int(hf.max_seq_len),
        norm_eps=hf.layer_norm_epsilon,
        hidden_act="gelu",
        position_encoding="alibi",
        tie_word_embeddings=True,
        attention_scale=float(attn.softmax_scale or head_dim**-0.5),
        clip_qkv=float(attn.clip_qkv or 0.0),
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        hf_config=hf,
    )


def _require_silu(model_type: str, field: str, value: str) -> None:
    """The recurrent mixers (Mamba's, Gated DeltaNet's) are written for silu."""
    if value != "silu":
        raise UnsupportedModelError(f"{model_type} with {field}={value!r} (the engine runs silu)")


def _time_step_limit(value: Any) -> tuple[float, float]:
    """A Mamba-2 config's time_step_limit ((0, inf) where unset)."""
    return tuple(float(v) for v in (value or (0.0, float("inf"))))


def _gated_deltanet_config(hf: Any, model_type: str, **options: Any) -> LinearAttentionConfig:
    """The Gated DeltaNet layers of a config with `layer_types` (linear_attention / full_attention) and the
    linear_* head fields (Qwen3.5's, Qwen3-Next's, OLMo Hybrid's); `options`: LinearAttentionConfig's others."""
    kinds = set(hf.layer_types)
    if not kinds <= {"linear_attention", "full_attention"}:
        raise UnsupportedModelError(f"{model_type} with layer types {sorted(kinds)}: the engine runs "
                                    "linear_attention and full_attention layers")
    if hf.linear_num_value_heads % hf.linear_num_key_heads:
        raise CheckpointError(f"linear_num_value_heads={hf.linear_num_value_heads} is not a multiple of "
                              f"linear_num_key_heads={hf.linear_num_key_heads}")
    return LinearAttentionConfig(
        layers=tuple(i for i, t in enumerate(hf.layer_types) if t == "linear_attention"),
        num_key_heads=hf.linear_num_key_heads, num_value_heads=hf.linear_num_value_heads,
        key_head_dim=hf.linear_key_head_dim, value_head_dim=hf.linear_value_head_dim,
        conv_kernel=hf.linear_conv_kernel_dim, **options)


def _qwen3_5_config(hf: Any, model_type: str) -> ModelConfig:
    """Qwen3.5 (and Qwen3-Next, its forerunner): Gated DeltaNet (linear-attention) layers and, every few layers,
    gated full attention (q_proj gives each head's query and an output gate; per-head (1 + w) q/k RMSNorms; RoPE
    over the first partial_rotary_factor of each head), all with (1 + w) RMSNorms; SwiGLU MLPs, or Qwen2-MoE's
    experts beside a sigmoid-gated shared expert (Qwen3.5-MoE: every layer; Qwen3-Next: by decoder_sparse_step and
    mlp_only_layers). The multimodal checkpoints (`qwen3_5`, `qwen3_5_moe`): their language model. Text positions
    only (the M-RoPE sections coincide for text)."""
    if model_type in ("qwen3_5", "qwen3_5_moe"):
        return _language_model_config(hf, model_type, lambda text: _qwen3_5_config(text, text.model_type))
    _check_rope_types(hf, model_type)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    linear_attention = _gated_deltanet_config(hf, model_type)
    linear = linear_attention.layers
    rope = hf.rope_parameters or {}
    kv_heads = hf.num_key_value_heads
    moe = None
    if model_type in ("qwen3_5_moe_text", "qwen3_next") and hf.num_experts:
        dense = set(getattr(hf, "mlp_only_layers", None) or [])
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        moe = MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                        intermediate_size=hf.moe_intermediate_size,
                        norm_topk_prob=bool(getattr(hf, "norm_topk_prob", True)), weights_in_model_dtype=True,
                        sparse_layers=tuple(i for i in range(hf.num_hidden_layers)
                                            if i not in dense and (i + 1) % step == 0),
                        shared_expert_intermediate_size=hf.shared_expert_intermediate_size or 0)
    return ModelConfig(
        family="qwen3_5",
        **_decoder_fields(hf, model_type, head_dim),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        qk_norm=True,
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        attention_scale=head_dim**-0.5,
        layer_kv_heads=tuple(0 if i in linear else kv_heads for i in range(hf.num_hidden_layers)),
        linear_attention=linear_attention,
        moe=moe,
    )


def _lfm2_config(hf: Any, model_type: str) -> ModelConfig:
    """LFM2 (Liquid AI): gated short-convolution layers (`conv`) and grouped-query attention layers (per-head q/k
    RMSNorms, RoPE), RMSNorms, SwiGLU MLPs whose width `block_auto_adjust_ff_dim` adjusts as transformers does.
    LFM2-MoE (`lfm2_moe`): the same layers, the MLP after the first `num_dense_layers` experts chosen by their
    sigmoid scores (in the model dtype) plus a correction bias, weighted by the scores (renormalised, scaled).
    LFM3 (`lfm3`): sliding-window and full-attention layers among the convolutions, each type with a RoPE of its own,
    each head's output gated by a sigmoid where `use_attention_gate`, each sublayer's output normed before its
    residual add where `use_sandwich_norm`. LFM2-VL and LFM3-VL (`lfm2_vl`, `lfm3_vl`): the multimodal checkpoints'
    language model, text in and text out."""
    if model_type in ("lfm2_vl", "lfm3_vl"):
        return _language_model_config(hf, model_type, lambda text: _lfm2_config(text, text.model_type))
    _check_rope_types(hf, model_type)
    lfm3 = model_type == "lfm3"
    head_dim = getattr(hf, "head_dim", None) if lfm3 else None
    head_dim = head_dim or hf.hidden_size // hf.num_attention_heads
    kinds = set(hf.layer_types)
    allowed = {"conv", "full_attention", "sliding_attention"} if lfm3 else {"conv", "full_attention"}
    if not kinds <= allowed:
        raise UnsupportedModelError(f"{model_type} with layer types {sorted(kinds)}: the engine runs "
                                    f"{', '.join(sorted(allowed))} layers")
    rope = hf.rope_parameters or {}
    if "full_attention" in rope and not all(t in rope for t in kinds - {"conv"}):
        raise UnsupportedModelError(f"{model_type}: rope_parameters keyed by layer type give none for "
                                    f"{sorted(kinds - {'conv'} - set(rope))}")
    conv = tuple(i for i, t in enumerate(hf.layer_types) if t == "conv")
    width = hf.intermediate_size
    if getattr(hf, "block_auto_adjust_ff_dim", False):
        width = int(2 * width / 3)
        if hf.block_ffn_dim_multiplier is not None:
            width = int(hf.block_ffn_dim_multiplier * width)
            width = hf.block_multiple_of * ((width + hf.block_multiple_of - 1) // hf.block_multiple_of)
    kv_heads = hf.num_key_value_heads
    moe = None
    if model_type == "lfm2_moe" and hf.num_dense_layers < hf.num_hidden_layers:
        moe = MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                        intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                        weights_in_model_dtype=True, sparse_layers=tuple(range(hf.num_dense_layers,
                                                                                hf.num_hidden_layers)),
                        sigmoid_scores=True, score_bias=bool(hf.use_expert_bias),
                        routed_scaling=float(hf.routed_scaling_factor), router_in_model_dtype=True,
                        topk_norm_eps=1e-6)
    lfm3_fields: dict[str, Any] = {}
    if lfm3:
        bias = bool(getattr(hf, "attention_bias", False))
        lfm3_fields = dict(qkv_bias=bias, o_bias=bias, head_gate=bool(hf.use_attention_gate),
                           sandwich_norms=bool(hf.use_sandwich_norm),
                           layer_windows=_windows_by_layer_type(hf.sliding_window, hf.layer_types,
                                                                hf.max_position_embeddings))
    return ModelConfig(
        family="lfm2",
        **{**_decoder_fields(hf, model_type, head_dim, norm_eps=hf.norm_eps), "intermediate_size": width},
        max_positions=hf.max_position_embeddings,
        hidden_act="silu",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        qk_norm=True,
        attention_scale=head_dim**-0.5,
        layer_kv_heads=tuple(0 if i in conv else kv_heads for i in range(hf.num_hidden_layers)),
        short_conv=RecurrentStateConfig(conv, hf.hidden_size, hf.conv_L_cache),
        moe=moe,
        **lfm3_fields,
    )


# the Mamba-2 hybrids' layer types, as their configs name them (the older names and transformers 5's) -> ours
HYBRID_LAYER_KINDS = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention",
                      "full_attention": "attention", "mlp": "mlp", "moe": "moe"}


def _granite_hybrid_config(hf: Any, model_type: str) -> ModelConfig:
    """Granite 4.0's hybrids (`granitemoehybrid`): GraniteMoeShared's layers (multipliers, the top-k logits' softmax
    router, an ungated shared MLP; or the shared MLP alone without experts) whose mixer is Mamba-2 in most layers and
    attention in the others (RoPE or, with position_embedding_type other than "rope", none). Bamba (`bamba`): the
    same layers without multipliers or experts, a SwiGLU MLP, RoPE over half of each head."""
    _check_rope_types(hf, model_type)
    head_dim = hf.hidden_size // hf.num_attention_heads
    bamba = model_type == "bamba"
    block_types = hf.layers_block_type if bamba else hf.layer_types
    types = [HYBRID_LAYER_KINDS.get(t, t) for t in block_types]
    if not set(types) <= {"mamba", "attention"}:
        raise UnsupportedModelError(f"{model_type} with layer types {sorted(set(block_types))}")
    mamba = tuple(i for i, t in enumerate(types) if t == "mamba")
    m = Mamba2Config(layers=mamba, num_heads=hf.mamba_n_heads, head_dim=hf.mamba_d_head, num_groups=hf.mamba_n_groups,
                     state_size=hf.mamba_d_state, conv_kernel=hf.mamba_d_conv, chunk_size=hf.mamba_chunk_size,
                     conv_bias=bool(hf.mamba_conv_bias), proj_bias=bool(hf.mamba_proj_bias),
                     time_step_limit=_time_step_limit(hf.time_step_limit))
    moe = _moe_config(hf, "granitemoeshared") if not bamba and hf.num_local_experts else None
    kv_heads = hf.num_key_value_heads
    layers = range(hf.num_hidden_layers)
    rope = hf.rope_parameters or {}
    partial = float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0)
    return ModelConfig(
        family="granite_hybrid",
        **{**_decoder_fields(hf, model_type, head_dim),
           "intermediate_size": hf.intermediate_size if bamba else hf.shared_intermediate_size},
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        rotary_dim=int(head_dim * partial),
        nope_layers=() if bamba or hf.position_embedding_type == "rope" else tuple(layers),
        attention_scale=head_dim**-0.5 if bamba else float(hf.attention_multiplier),
        embedding_multiplier=1.0 if bamba else float(hf.embedding_multiplier),
        residual_multiplier=1.0 if bamba else float(hf.residual_multiplier),
        logits_divisor=1.0 if bamba else float(hf.logits_scaling),
        layer_kv_heads=tuple(0 if i in mamba else kv_heads for i in layers),
        moe=moe,
        mamba2=m,
    )


def _nemotron_h_config(hf: Any, model_type: str) -> ModelConfig:
    """Nemotron-H (Nemotron-H, Nemotron Nano 2 / 3): one mixer a layer, each after its own RMSNorm (gain in fp32):
    Mamba-2, attention without positions (NoPE), a squared-ReLU MLP, or ungated squared-ReLU experts chosen by
    grouped sigmoid routing with a correction bias, scaled, beside a shared expert."""
    kinds = [HYBRID_LAYER_KINDS.get(t, t) for t in hf.layers_block_type]
    if not set(kinds) <= {"mamba", "attention", "mlp", "moe"}:
        raise UnsupportedModelError(f"{model_type} with layer types {sorted(set(hf.layers_block_type))}")
    if getattr(hf, "moe_latent_size", None):
        raise UnsupportedModelError(f"{model_type} with moe_latent_size (experts in a latent space) is not supported")
    _require_silu(model_type, "mamba_hidden_act", hf.mamba_hidden_act)
    layers = range(hf.num_hidden_layers)
    mamba = tuple(i for i in layers if kinds[i] == "mamba")
    sparse = tuple(i for i in layers if kinds[i] == "moe")
    m = Mamba2Config(layers=mamba, num_heads=hf.mamba_num_heads, head_dim=hf.mamba_head_dim, num_groups=hf.n_groups,
                     state_size=hf.ssm_state_size, conv_kernel=hf.conv_kernel, chunk_size=hf.chunk_size,
                     conv_bias=bool(hf.use_conv_bias), proj_bias=bool(hf.use_bias),
                     time_step_limit=(float(hf.time_step_min), float("inf")))
    moe = MoEConfig(num_experts=hf.n_routed_experts, top_k=hf.num_experts_per_tok,
                    intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                    weights_in_model_dtype=False, sparse_layers=sparse, sigmoid_scores=True, num_groups=hf.n_group,
                    top_groups=hf.topk_group, routed_scaling=float(hf.routed_scaling_factor), fp32_router=True,
                    fp32_router_weight=hf_router_weights_in_fp32(),
                    ungated_shared_intermediate_size=hf.moe_shared_expert_intermediate_size) if sparse else None
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        family="nemotron_h",
        **_decoder_fields(hf, model_type, head_dim, norm_eps=hf.layer_norm_epsilon),
        max_positions=hf.max_position_embeddings,
        hidden_act=hf.mlp_hidden_act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        mlp_bias=bool(hf.mlp_bias),
        gated_mlp=False,
        nope_layers=tuple(layers),
        attention_scale=head_dim**-0.5,
        layer_kv_heads=tuple(hf.num_key_value_heads if kinds[i] == "attention" else 0 for i in layers),
        moe=moe,
        mamba2=m if mamba else None,
    )


# a model without attention has no limit of positions; where its config names none, the engine takes this many
ATTENTION_FREE_MAX_POSITIONS = 1 << 20


def _mamba_config(hf: Any, model_type: str) -> ModelConfig:
    """Mamba (`mamba`), Falcon-Mamba (`falcon_mamba`: gainless RMSNorms on dt, B and C) and Mamba-2 (`mamba2`, e.g.
    Codestral Mamba): every layer a mixer after an RMSNorm, added to the residual (fp32 with residual_in_fp32); no
    attention and no positions, so a sequence's whole past is its recurrent state."""
    _require_silu(model_type, "hidden_act", hf.hidden_act)
    layers = tuple(range(hf.num_hidden_layers))
    scan = ssd = None
    if model_type == "mamba2":
        inner = int(hf.expand * hf.hidden_size)
        if inner != hf.num_heads * hf.head_dim:
            raise CheckpointError(f"mamba2: expand x hidden_size = {inner} is not num_heads x head_dim = "
                                  f"{hf.num_heads * hf.head_dim}")
        ssd = Mamba2Config(layers=layers, num_heads=hf.num_heads, head_dim=hf.head_dim, num_groups=hf.n_groups,
                           state_size=hf.state_size, conv_kernel=hf.conv_kernel, chunk_size=hf.chunk_size,
                           conv_bias=bool(hf.use_conv_bias), proj_bias=bool(hf.use_bias),
                           time_step_limit=_time_step_limit(hf.time_step_limit))
    else:
        scan = SelectiveScanConfig(layers=layers, inner=int(hf.intermediate_size), state_size=hf.state_size,
                                   dt_rank=int(hf.time_step_rank), conv_kernel=hf.conv_kernel,
                                   conv_bias=bool(hf.use_conv_bias), proj_bias=bool(hf.use_bias),
                                   bcdt_norm_eps=float(hf.mixer_rms_eps) if model_type == "falcon_mamba" else 0.0)
    return ModelConfig(
        family="mamba",
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=1,
        num_kv_heads=1,
        head_dim=hf.hidden_size,
        intermediate_size=int(hf.expand * hf.hidden_size),
        max_positions=int(getattr(hf, "max_position_embeddings", None) or ATTENTION_FREE_MAX_POSITIONS),
        norm_eps=hf.layer_norm_epsilon,
        hidden_act="silu",
        position_encoding="none",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        layer_kv_heads=(0,) * hf.num_hidden_layers,
        mamba=scan,
        mamba2=ssd,
        residual_in_fp32=bool(getattr(hf, "residual_in_fp32", True)),
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        hf_config=hf,
    )


def _jamba_config(hf: Any, model_type: str) -> ModelConfig:
    """Jamba (AI21's Jamba, Jamba 1.5 / 1.6 / 1.7, Jamba Reasoning): Llama's layers (RMSNorms, SwiGLU MLPs) whose
    mixer is Mamba-1 (with gained RMSNorms on dt, B and C) in most layers and attention without positions in every
    `attn_layer_period`-th; experts (the softmax's top-k, not renormalised) in every `expert_layer_period`-th."""
    _require_silu(model_type, "hidden_act", hf.hidden_act)
    layers = range(hf.num_hidden_layers)
    kinds = hf.layers_block_type
    mamba = tuple(i for i in layers if kinds[i] == "mamba")
    sparse = tuple(i for i, n in enumerate(hf.layers_num_experts) if n > 1)
    scan = SelectiveScanConfig(layers=mamba, inner=hf.mamba_expand * hf.hidden_size, state_size=hf.mamba_d_state,
                               dt_rank=int(hf.mamba_dt_rank), conv_kernel=hf.mamba_d_conv,
                               conv_bias=bool(hf.mamba_conv_bias), proj_bias=bool(hf.mamba_proj_bias),
                               bcdt_norm_eps=float(hf.rms_norm_eps), bcdt_norm_weights=True)
    moe = MoEConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok, intermediate_size=hf.intermediate_size,
                    norm_topk_prob=False, weights_in_model_dtype=True, sparse_layers=sparse) if sparse else None
    head_dim = hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        family="jamba",
        **{**_decoder_fields(hf, model_type, head_dim), "position_encoding": "none"},
        max_positions=hf.max_position_embeddings,
        hidden_act="silu",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        nope_layers=tuple(layers),
        attention_scale=head_dim**-0.5,
        layer_kv_heads=tuple(0 if i in mamba else hf.num_key_value_heads for i in layers),
        moe=moe,
        mamba=scan if mamba else None,
    )


def _olmo_hybrid_config(hf: Any, model_type: str) -> ModelConfig:
    """OLMo Hybrid: Gated DeltaNet layers (q, k, v, gate, a, b projected separately; beta in (0, 2) with
    allow_neg_eigval; output norm eps 1e-5) in Llama's pre-norm layout, and OLMo 3's attention layers (post-norms, q/k
    norms over all heads) with RoPE where rope_parameters name a rope_theta, else none (the released checkpoints)."""
    _require_silu(model_type, "hidden_act", hf.hidden_act)
    linear_attention = _gated_deltanet_config(hf, model_type, beta_scale=2.0 if hf.linear_allow_neg_eigval else 1.0,
                                              norm_eps=1e-5)
    layers = range(hf.num_hidden_layers)
    linear = linear_attention.layers
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_theta") is not None:
        _check_rope_types(hf, model_type)
    head_dim = hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        family="olmo_hybrid",
        **_decoder_fields(hf, model_type, head_dim),
        max_positions=hf.max_position_embeddings,
        hidden_act="silu",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        nope_layers=() if rope.get("rope_theta") is not None else tuple(layers),
        attention_scale=head_dim**-0.5,
        layer_kv_heads=tuple(0 if i in linear else hf.num_key_value_heads for i in layers),
        linear_attention=linear_attention,
    )


def _falcon_h1_config(hf: Any, model_type: str) -> ModelConfig:
    """Falcon-H1 (TII): every layer runs a Mamba-2 mixer and grouped-query attention (RoPE) side by side on the same
    normed input and adds both, then a SwiGLU MLP; muP multipliers throughout (on the token embeddings of input ids,
    attention's input, keys and output, the mixer's input, its in_proj outputs and output, the MLP's gate and output,
    the logits); the mixer's output RMSNorm optional (`mamba_rms_norm`), before or after its gate."""
    _check_rope_types(hf, model_type)
    _require_silu(model_type, "hidden_act", hf.hidden_act)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    layers = tuple(range(hf.num_hidden_layers))
    inner = hf.mamba_d_ssm or int(hf.mamba_expand * hf.hidden_size)
    if inner != hf.mamba_n_heads * hf.mamba_d_head:
        raise CheckpointError(f"{model_type}: the mixer's width {inner} is not mamba_n_heads x mamba_d_head")
    norm = ("norm_then_gate" if hf.mamba_norm_before_gate else "gate_then_norm") if hf.mamba_rms_norm else ""
    m = Mamba2Config(layers=layers, num_heads=hf.mamba_n_heads, head_dim=hf.mamba_d_head,
                     num_groups=hf.mamba_n_groups, state_size=hf.mamba_d_state, conv_kernel=hf.mamba_d_conv,
                     chunk_size=hf.mamba_chunk_size, conv_bias=bool(hf.mamba_conv_bias),
                     proj_bias=bool(hf.mamba_proj_bias),
                     time_step_limit=_time_step_limit(hf.time_step_limit),
                     out_bias=bool(hf.projectors_bias), gated_norm=norm, input_multiplier=float(hf.ssm_in_multiplier),
                     zxbcdt_multipliers=tuple(float(v) for v in hf.ssm_multipliers))
    return ModelConfig(
        family="falcon_h1",
        **_decoder_fields(hf, model_type, head_dim),
        max_positions=hf.max_position_embeddings,
        hidden_act="silu",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=bool(hf.attention_bias),
        o_bias=bool(hf.attention_bias),
        mlp_bias=bool(hf.mlp_bias),
        attention_scale=head_dim**-0.5,
        logits_divisor=1.0 / float(hf.lm_head_multiplier),
        token_embedding_multiplier=float(hf.embedding_multiplier),
        mamba2=m,
    )


# family -> its config reader
FAMILY_CONFIGS = {
    "llama": _llama_config, "olmo": _olmo_config, "stablelm": _stablelm_config, "nemotron": _ungated_layernorm_config,
    "starcoder2": _starcoder2_config, "cohere": _cohere_config, "olmo2": _olmo2_config, "glm": _glm_config,
    "falcon": _falcon_config, "gptj": _gptj_config, "gemma": _gemma_config, "gpt_neox": _gpt_neox_config,
    "phi": _phi_config, "opt": _opt_config, "xglm": _fairseq_lm_config, "biogpt": _fairseq_lm_config,
    "gpt2": _gpt2_config, "gpt_bigcode": _gpt2_config, "gpt_neo": _gpt_neo_config, "bloom": _bloom_config,
    "deepseek": _deepseek_config, "gpt_oss": _gpt_oss_config, "llama4": _llama4_config, "phimoe": _phimoe_config,
    "afmoe": _afmoe_config, "flint": _flint_config,
    "mpt": _mpt_config, "persimmon": _persimmon_config, "dbrx": _dbrx_config,
    "nanochat": _nanochat_config, "gemma4": _gemma4_config, "laguna": _laguna_config, "qwen3_5": _qwen3_5_config,
    "lfm2": _lfm2_config, "granite_hybrid": _granite_hybrid_config, "nemotron_h": _nemotron_h_config,
    "mamba": _mamba_config, "jamba": _jamba_config, "olmo_hybrid": _olmo_hybrid_config,
    "falcon_h1": _falcon_h1_config, "mimo_v2": _mimo_v2_flash_config, "longcat": _longcat_flash_config,
    "kimi_linear": _kimi_linear_config,
}
