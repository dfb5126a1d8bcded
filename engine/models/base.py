"""What every model family provides to the runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from .common import (
    Attention,
    gather_rope_rows,
    rope_inv_freq,
    rope_layer_types,
    rope_tables_by_layer,
    rope_tables_by_theta,
    rotary_cos_sin,
)
from .linear import transposed_storage


@dataclass(frozen=True)
class Layer0Input:
    """What a fused first-layer-input kernel computed in place of the embedding step and layer 0's input norm.

    `residual`: the residual stream after the embedding step (layer 0's normed input for a model that adds the
    residual after the norm). Then either `normed`, layer 0's normed input, or `qkv`, layer 0's QKV projection
    of it [T, qkv width] (kernels/input_qkv.py: the normed input never exists).
    """

    residual: Tensor
    normed: Tensor | None = None
    qkv: Tensor | None = None


def layer_qkv(i: int, layer0: Layer0Input | None, norm: Callable[[Tensor], Tensor], h: Tensor,
              project: Callable[[Tensor], Tensor]) -> Tensor:
    """Layer i's QKV projection of its normed input, `project(norm(h))`: at layer 0, what a fused input kernel
    computed (the projection itself, or the normed input to project) where one did."""
    if i == 0 and layer0 is not None:
        return layer0.qkv if layer0.qkv is not None else project(layer0.normed)
    return project(norm(h))


@dataclass(frozen=True)
class Layer0Norms:
    pos_table: Tensor | None  # GPT-2 learned positions
    embed_norm: tuple[Tensor, Tensor, float] | None  # BLOOM's embedding LayerNorm
    input_norm: tuple[Tensor, Tensor | None, float, str]  # layer 0's input norm: weight, bias, eps, "rms"|"layer"
    qkv: tuple[Tensor, Tensor | None]  # layer 0's QKV projection: weight [qkv width, hidden], bias
    residual_is_normed: bool = False  # layer 0's residual is its normed input (BLOOM's post-norm residual option)


def language_model_tensors(key: str, tensor: Tensor) -> list[tuple[str, Tensor]] | None:
    """A multimodal checkpoint's language-model entry under the text model's names (`model.`, `lm_head.`), as
    saved (`language_model.model.`) or as transformers 5 holds it (`model.language_model.`); its vision tower and
    projector left out (an empty list). None: not a multimodal checkpoint's key."""
    for prefix in ("language_model.model.", "model.language_model."):
        if key.startswith(prefix):
            return [("model." + key.removeprefix(prefix), tensor)]
    if key.startswith("language_model.lm_head."):
        return [(key.removeprefix("language_model."), tensor)]
    if key.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.", "visual.", "model.visual.", "vision_model.",
                       "model.vision_model.")):  # (Qwen-VL's: `visual`; Llama 4's: `vision_model`)
        return []
    return None


class CausalLM(nn.Module):
    """A decoder-only LM over a packed batch of tokens.

    `embed_tokens` gives the raw word embeddings (what PEFT concatenates soft prompts with);
    `forward` takes input embeddings [T, hidden] (soft-prompt rows and/or token rows) with their absolute
    positions [T], applies the family's embedding step (GPT-2 position embeddings, BLOOM's embedding
    LayerNorm), runs every layer through `attention`, and returns the final normed hidden states.
    """

    # checkpoint key prefix our parameter names carry ("model." for Llama, "transformer." for GPT-2/BLOOM)
    key_prefix: str = ""
    # HF Conv1D weights stored [in, out] that we keep as nn.Linear [out, in]
    transposed_weight_suffixes: tuple[str, ...] = ()
    # checkpoint entries that are buffers, not weights
    ignored_key_suffixes: tuple[str, ...] = ()
    # checkpoint entries kept in fp32 whatever the model dtype, as transformers keeps them (a MoE router's
    # score-correction bias)
    fp32_key_suffixes: tuple[str, ...] = ("e_score_correction_bias",)
    # checkpoint entries kept in fp32 where the model is fp16 only, as transformers keeps them (`_keep_in_fp32_modules`:
    # LongCat-Flash's router weight)
    fp32_in_fp16_key_suffixes: tuple[str, ...] = ()
    # weights a checkpoint may leave out, which are zeros then, as transformers leaves them (A.X K1's routers'
    # correction biases)
    optional_key_suffixes: tuple[str, ...] = ()
    # whether the fused first-layer-input kernels (kernels/input_qkv.py) compute this family's embedding step and
    # layer 0's input (else the triton backend embeds as the torch backend does and the model takes it from there)
    fused_layer0: bool = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    @property
    def word_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def lm_head_module(self) -> nn.Linear:
        return self.lm_head

    @property
    def graph_capturable(self) -> bool:
        """Whether a decode step's forward can be captured in a CUDA graph (no host reads of device values): not
        with a mixture of experts, whose experts group their tokens on the host, nor with layers that keep a
        recurrent state, whose states are looked up by slot on the host, nor where token embeddings are scaled per
        sequence (Falcon-H1's, which the captured embedding step does not do)."""
        return (self.config.moe is None and self.config.recurrent_state is None
                and self.config.token_embedding_multiplier == 1.0)

    @property
    def attention_sinks(self) -> Tensor | None:
        """Each layer's per-head attention-sink logits [layers, Hq] in fp32 (gpt-oss, GraniteSWA, Flint), which every
        attention implementation adds to each query's softmax denominator; None for a model without them."""
        return None

    @property
    def alibi(self) -> Tensor | None:
        """Per-head ALiBi slopes for the attention implementations (None: positions are not ALiBi)."""
        return getattr(self, "alibi_slopes", None)

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """The (checkpoint key, tensor) pairs our parameters take from one checkpoint entry (a fused entry may
        hold several); a multimodal checkpoint's language-model entry under the text model's name, its vision
        tower's entries none (Gemma 3's, EXAONE 4.5's)."""
        mapped = language_model_tensors(key, tensor)
        return [(key, tensor)] if mapped is None else mapped

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.word_embeddings(ids)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        """`layer0` replaces the embedding step and layer 0's input norm (and its QKV projection, where given)
        when a fused kernel has computed them (then `embeds` is None)."""
        raise NotImplementedError

    def layer0_norms(self) -> Layer0Norms:
        """The parameters a fused first-layer-input kernel needs (see kernels/prompt_input.py)."""
        raise NotImplementedError

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """LM head in the model dtype, logits returned in fp32 (divided by Granite's logits_scaling first)."""
        logits = self.lm_head_module(hidden)
        if self.config.logits_divisor != 1.0:
            logits = logits / self.config.logits_divisor
        return logits.float()

    def init_buffers(self, device: torch.device) -> None:
        """Create non-persistent buffers (RoPE frequencies, ALiBi slopes) after the weights are loaded."""

    def prepare_for_inference(self, device: torch.device) -> None:
        """On the CPU, keep weights in [in, out] storage (a transposed view with the same values), which oneDNN's
        GEMM reads fastest: every float32 projection (see linear.py), and an untied LM head in any dtype (~20%
        faster for decode shapes: few rows, a wide vocabulary). A tied head stays the embedding table. (The model
        runner takes an untied fp32 head back to row-major where its int8 greedy screen applies.)"""
        if device.type != "cpu":
            return
        head = self.lm_head_module
        for module in self.modules():
            if not isinstance(module, nn.Linear) or module.weight is self.word_embeddings.weight:
                continue
            if module is head or self.fp32_on_cpu(device):
                module.weight = nn.Parameter(transposed_storage(module.weight), requires_grad=False)

    def fp32_on_cpu(self, device: torch.device) -> bool:
        return device.type == "cpu" and self.word_embeddings.weight.dtype == torch.float32

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head_module.weight = self.word_embeddings.weight


class RotaryCausalLM(CausalLM):
    """A model with one RoPE for every layer (the Llama family, GPT-NeoX, ...): cos/sin tables of every position,
    which the triton backend's RoPE kernel reads where RoPE spans whole heads. A family whose forward rotates with
    `rope_rows_by_layer` (`per_layer_rope`) also takes a RoPE per layer type (OLMo 3's sliding and full-attention
    layers); the model then rotates q/k itself."""

    ignored_key_suffixes = ("rotary_emb.inv_freq",)
    per_layer_rope = False

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.rope_scaling = 1.0
        self.rope_by_layer: list[tuple[Tensor, Tensor]] | None = None  # with a RoPE per layer type

    @property
    def rope_tables(self) -> tuple[Tensor, Tensor] | None:
        """cos/sin [max_positions, head_dim] in the model dtype, for kernels that apply RoPE themselves (None with
        partial rotary, layers without RoPE, a RoPE per layer type or norms after RoPE: the model rotates q/k
        itself)."""
        c = self.config
        if (self.rope_cos.shape[-1] != c.head_dim or c.nope_layers or self.rope_by_layer or c.qk_norm_after_rope
                or c.qk_l2_norm):
            return None
        return self.rope_cos, self.rope_sin

    @property
    def rope_dtype(self) -> torch.dtype:
        """The dtype of the cos/sin tables: the model's (DeepSeek-V2 rotates in fp32)."""
        return self.word_embeddings.weight.dtype

    def rope_rows(self, attention: Attention, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """cos/sin rows of the positions for the model to rotate q and k with; None where the attention kernel
        rotates them itself (`applies_rope`)."""
        if getattr(attention, "applies_rope", False):
            return None
        return self.rope_cos[positions], self.rope_sin[positions]

    def rope_rows_by_layer(self, attention: Attention, positions: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """`rope_rows` for each layer: each layer type's rows gathered once where the types have RoPEs of their
        own."""
        if self.rope_by_layer is None:
            return [self.rope_rows(attention, positions)] * self.config.num_layers
        return gather_rope_rows(self.rope_by_layer, positions)

    def init_buffers(self, device: torch.device) -> None:
        # cos/sin of every position, computed once with the same ops as per step (so bit-identical)
        c = self.config
        positions = torch.arange(c.max_positions, device=device)
        dtype = self.rope_dtype
        layer_types = rope_layer_types(c)
        if c.layer_rope_thetas:  # GraniteSWA: a RoPE base per layer
            if not self.per_layer_rope:
                raise UnsupportedModelError(f"{c.model_type} with a RoPE base per layer is not supported")
            self.rope_by_layer = rope_tables_by_theta(c.layer_rope_thetas, c.rotary_dim or c.head_dim, positions,
                                                      dtype)
            cos, sin = self.rope_by_layer[0]
        elif layer_types is None:
            inv_freq, self.rope_scaling = rope_inv_freq(c, device)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            cos, sin = rotary_cos_sin(inv_freq, self.rope_scaling, positions, dtype)
        else:
            if not self.per_layer_rope:
                raise UnsupportedModelError(f"{c.model_type} with a RoPE per layer type (rope_parameters keyed by "
                                            "layer type) is not supported")
            self.rope_by_layer = rope_tables_by_layer(c, layer_types, c.rotary_dim or c.head_dim, positions, dtype)
            cos, sin = self.rope_by_layer[0]
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
