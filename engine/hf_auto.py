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
