"""softprompt.engine: serve many soft prompts over one frozen decoder-only LM."""

from .api import Engine
from .async_engine import AsyncEngine, EngineStopped
from .beam_search import BeamSearchOutput, BeamSearchParams, BeamSequence
from .errors import (
    CheckpointError,
    PromptError,
    RequestError,
    SamplingParamsError,
    SoftPromptError,
    UnknownPromptError,
    UnsupportedModelError,
)
from .prompts import SoftPrompt
from .request import Request, RequestOutput
from .sampling import SamplingParams, TokenLogprob

__all__ = [
    "AsyncEngine", "BeamSearchOutput", "BeamSearchParams", "BeamSequence", "CheckpointError", "Engine",
    "EngineStopped", "PromptError", "Request", "RequestError", "RequestOutput", "SamplingParams",
    "SamplingParamsError", "SoftPrompt", "SoftPromptError", "TokenLogprob", "UnknownPromptError",
    "UnsupportedModelError",
]
