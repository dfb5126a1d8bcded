"""Optional tokenizer from the checkpoint directory; without one the engine works on token ids."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, partial
from pathlib import Path

from .errors import CheckpointError, RequestError, SoftPromptError
from .tool_calls import template_messages

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    """Thin wrapper over a transformers tokenizer: encode as a user of HF would, decode without specials."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    def set_chat_template(self, template: str) -> None:
        """Use `template` (Jinja, as in tokenizer_config.json) for chat, checked to compile first."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(template, str) or not template.strip():
            raise SoftPromptError("a chat template must be a non-empty Jinja template string")
        try:
            ImmutableSandboxedEnvironment().parse(template)
        except TemplateError as exc:
            raise SoftPromptError(f"the chat template does not compile: {exc}") from exc
        self.hf.chat_template = template

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def render_chat(self, messages: list[dict], options: dict | None = None) -> list[int]:
        """The ids of `messages` through the chat template, as HF's `apply_chat_template` renders them (`options`:
        its keyword arguments and the template's own variables; add_generation_prompt defaults to True). Tool-call
        arguments given as JSON text reach the template as objects, and a `developer` turn as a `system` one where
        the template does not name that role (as vLLM and llama.cpp read it)."""
        if not self.has_chat_template:
            raise RequestError("the tokenizer has no chat template: give text or token ids (or set a template)")
        if not isinstance(messages, list) or not messages or any(
                not isinstance(m, dict) or not isinstance(m.get("role"), str) for m in messages):
            raise RequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        options = {"add_generation_prompt": True, **(options or {})}
        messages = template_messages(messages)
        if "developer" not in str(self.hf.chat_template):  # OpenAI's newer name for the system turn
            messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, **options)
        except Exception as exc:  # jinja and template errors of many types
            raise RequestError(f"cannot apply the chat template: {exc}") from exc
        return list(self.hf(text, add_special_tokens=False)["input_ids"])  # the template places special tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def decoder(self, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
        """`decode` with special tokens' text left out (the default) or kept."""
        return self.decode if skip_special_tokens else partial(self.decode, skip_special_tokens=False)

    def decode_stream(self, skip_special_tokens: bool = True) -> object | None:
        """A new `tokenizers.decoders.DecodeStream` whose steps (`stream_step`) add up to `decode`'s text, or None
        where this tokenizer cannot promise that (engine/detokenizer.py then windows over `decode`)."""
        factory = self._decode_stream_factory
        return None if factory is None else factory(skip_special_tokens)

    def stream_step(self, stream, token_id: int) -> str:
        """The text that `token_id` adds to the stream ("" while a character is incomplete)."""
        return stream.step(self.hf.backend_tokenizer, token_id) or ""

    @cached_property
    def _decode_stream_factory(self) -> Callable[[bool], object] | None:
        """DecodeStream gives HF's decode of the same ids for a tokenizers-backed transformers tokenizer whose
        decode is not overridden and does no clean-up of spaces in Python."""
        try:
            from tokenizers.decoders import DecodeStream
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:
            return None
        hf, kind = self.hf, type(self.hf)
        if not isinstance(hf, TokenizersBackend) or kind.decode is not TokenizersBackend.decode \
                or kind._decode is not TokenizersBackend._decode:
            return None
        if hf.clean_up_tokenization_spaces:  # transformers skips the clean-up for BPE models unless forced
            skipped = (hasattr(kind, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
                       and type(hf.backend_tokenizer.model).__name__ == "BPE"
                       and not hf.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output)
            if not skipped:
                return None
        return lambda skip_special_tokens: DecodeStream(skip_special_tokens=skip_special_tokens)

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
