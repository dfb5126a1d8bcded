"""Which transformers class holds a checkpoint's causal LM, and how to load it, for the HF + PEFT sides (verify,
train, testing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def hf_causal_lm_class(config: Any) -> type:
    """`AutoModelForCausalLM`, or `AutoModelForImageTextToText` for a multimodal checkpoint that transformers does
    not register as a causal LM (Mistral 3: Mistral Small 3.x, Ministral 3): PEFT prompt-tunes its language model
    alike. `config`: a transformers config, or a checkpoint directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(config, (str, Path)):
        config = AutoConfig.from_pretrained(str(config))
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def reference_load_kwargs(config: Any) -> dict[str, Any]:
    """`from_pretrained` options that load HF's own reference implementation of the model in `config`: no Hub
    kernels (transformers 5.25 swaps layers for downloaded ones by default, which needs the network and changes the
    numerics), eager attention where the model soft-caps attention scores (Gemma 2): transformers up to 5.17
    ran Gemma 2 on SDPA by default, which skips the cap; and MXFP4 (gpt-oss's experts) and block-wise FP8 weights
    dequantized, as the engine serves them (without that, transformers would need accelerate and MXFP4 / FP8
    kernels, and could not train)."""
    text_config = getattr(config, "text_config", None) or config
    kwargs: dict[str, Any] = {"use_kernels": False}
    if getattr(text_config, "attn_logit_softcapping", None):
        kwargs["attn_implementation"] = "eager"
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    elif method == "fp8":  # (on a GPU transformers would run FP8 kernels, which round otherwise)
        from transformers import FineGrainedFP8Config

        block = quantization.get("weight_block_size")
        kwargs["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, **({"weight_block_size": tuple(block)} if block else {}))
    return kwargs


def load_hf_causal_lm(model_dir: str | Path, **kwargs: Any) -> Any:
    """The checkpoint's transformers causal LM, loaded with `reference_load_kwargs`; `kwargs` (dtype, ...) go to
    `from_pretrained` too."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    options = {**reference_load_kwargs(config), **kwargs}
    return hf_causal_lm_class(config).from_pretrained(str(model_dir), **options)


PEFT_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
PEFT_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer")


def peft_shape_fields(model: Any) -> dict[str, int]:
    """The prompt-learning config fields PEFT cannot read off `model`'s config (a transformers model), which must
    then be given: `num_attention_heads` / `num_layers` where the config calls them otherwise (XGLM's
    `attention_heads`; 1 for a model without attention). Empty for most models, and for multimodal ones (PEFT
    reads their `text_config`)."""
    config = model.config
    if getattr(config, "text_config", None) is not None:
        return {}
    fields = config.to_dict()
    out = {}
    if not any(key in fields for key in PEFT_HEAD_KEYS):
        # (a model without attention, Mamba, has none: PEFT only sizes prefix K/V by it)
        out["num_attention_heads"] = getattr(config, "num_attention_heads", None) or 1
    if not hasattr(config, "num_hidden_layers") and not any(key in fields for key in PEFT_LAYER_KEYS):
        out["num_layers"] = config.num_hidden_layers
    return out


def peft_token_dim(model: Any) -> int | None:
    """PEFT's `token_dim` for a prompt of `model` (a transformers model): its token embeddings' width where that is
    not `config.hidden_size` (OPT-350m's narrower embeddings), which PEFT would size prompt rows by; else None."""
    width = model.get_input_embeddings().embedding_dim
    return width if width != getattr(model.config, "hidden_size", width) else None
