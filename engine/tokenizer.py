"""Optional tokenizer from the checkpoint directory; without one the engine works on token ids."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError, RequestError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    """Thin wrapper over a transformers tokenizer: encode as a user of HF would, decode without specials."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return Tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{model_dir} has tokenizer files that could not be loaded: {exc}") from exc


def require_tokenizer(tokenizer: Tokenizer | None, what: str) -> Tokenizer:
    if tokenizer is None:
        raise RequestError(f"{what} needs a tokenizer, but the model directory has none: pass token ids instead")
    return tokenizer
