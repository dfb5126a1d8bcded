"""Which transformers class holds a checkpoint's causal LM, for the HF + PEFT sides (verify, train, testing)."""

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


def peft_token_dim(model: Any) -> int | None:
    """PEFT's `token_dim` for a prompt of `model` (a transformers model): its token embeddings' width where that is
    not `config.hidden_size` (OPT-350m's narrower embeddings), which PEFT would size prompt rows by; else None."""
    width = model.get_input_embeddings().embedding_dim
    return width if width != getattr(model.config, "hidden_size", width) else None
