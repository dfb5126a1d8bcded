"""Error types. Every user-facing error is a ValueError subclass whose message names the problem."""


class SoftPromptError(ValueError):
    """Base class of all errors the engine raises for bad input."""


class UnsupportedModelError(SoftPromptError):
    """The checkpoint's architecture (or one of its options) is not supported."""


class CheckpointError(SoftPromptError):
    """The checkpoint directory is missing files or holds broken/inconsistent weights."""


class PromptError(SoftPromptError):
    """A soft prompt is invalid: wrong shape, NaN/Inf, bad adapter config, name clash, unknown name."""


class UnknownPromptError(PromptError, KeyError):
    """A request or call names a prompt that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class RequestError(SoftPromptError):
    """A request is invalid: empty or too long input, token id out of range, text without a tokenizer."""


class SamplingParamsError(SoftPromptError):
    """Sampling parameters are out of range."""
