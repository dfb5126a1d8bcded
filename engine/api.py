"""The public API: Engine, add/remove prompts, generate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RequestError, SoftPromptError
from .loader import load_model
from .prompts import PromptStore, SoftPrompt
from .reference import ReferencePath
from .request import Request, RequestOutput, RequestTiming
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer, require_tokenizer

BACKENDS = ("auto", "reference")


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation: its prompt resolved, its input tokenized."""

    request: Request
    prompt: SoftPrompt | None
    input_ids: list[int]
    max_new_tokens: int  # capped so prefix + input + output fits the model's positions


class Engine:
    """One frozen model serving many soft prompts.

    `backend="reference"` runs the pure-PyTorch ground truth: one request at a time, plain concat, no cache.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        backend: str = "auto",
    ):
        if backend not in BACKENDS:
            raise SoftPromptError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.model_dir = Path(model_dir)
        self.model = load_model(model_dir, device=device, dtype=dtype)
        self.config = self.model.config
        self.device = self.model.word_embeddings.weight.device
        self.dtype = self.model.word_embeddings.weight.dtype
        self.tokenizer: Tokenizer | None = load_tokenizer(model_dir)
        self.eos_token_ids = self._eos_ids()
        self.prompts = PromptStore(
            hidden_size=self.config.hidden_size,
            dtype=self.dtype,
            device=self.device,
            max_length=self.config.max_positions,
            vocab_size=self.config.vocab_size,
            embed_tokens=self.model.embed_tokens,
            tokenize=(lambda text: self.tokenizer.encode(text, add_special_tokens=False)) if self.tokenizer else None,
        )
        self.backend = "reference"
        self.reference = ReferencePath(self.model)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    # ---- prompts -------------------------------------------------------------------------------------
    def add_prompt(
        self,
        name: str,
        source: str | Path | torch.Tensor | None = None,
        *,
        text: str | None = None,
        token_ids: list[int] | None = None,
        replace: bool = False,
    ) -> SoftPrompt:
        """Register a task: a PEFT prompt-tuning adapter dir, a .safetensors file, a [P, hidden] tensor, or text."""
        return self.prompts.add(name, source, text=text, token_ids=token_ids, replace=replace)

    def remove_prompt(self, name: str) -> SoftPrompt:
        return self.prompts.remove(name)

    # ---- requests ------------------------------------------------------------------------------------
    def prepare(self, request: Request) -> PreparedRequest:
        """Validate a request; raises a SoftPromptError (a ValueError) naming the problem."""
        if not isinstance(request, Request):
            raise RequestError(f"expected a Request, got {type(request).__name__}")
        if not isinstance(request.sampling, SamplingParams):
            raise RequestError(f"request.sampling must be SamplingParams, got {type(request.sampling).__name__}")
        prompt = None if request.prompt is None else self.prompts.get(request.prompt)
        if (request.input_ids is None) == (request.text is None):
            raise RequestError("give exactly one of input_ids or text")
        if request.text is not None:
            if not isinstance(request.text, str):
                raise RequestError(f"text must be a string, got {type(request.text).__name__}")
            ids = require_tokenizer(self.tokenizer, "text input").encode(request.text)
        else:
            ids = request.input_ids
            if isinstance(ids, torch.Tensor):
                ids = ids.flatten().tolist()
            if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
                raise RequestError("input_ids must be a list of integers")
            ids = list(ids)
        if not ids:
            raise RequestError("input is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is out of range for vocabulary size {self.config.vocab_size}")
        if request.sampling.stop:
            require_tokenizer(self.tokenizer, "stop strings")
        p = 0 if prompt is None else prompt.length
        room = self.config.max_positions - p - len(ids)
        if room < 1:
            raise RequestError(
                f"input of {len(ids)} tokens after a {p}-token prompt leaves no room in the model's "
                f"{self.config.max_positions} positions"
            )
        return PreparedRequest(request, prompt, ids, min(request.sampling.max_new_tokens, room))

    def decode(self, ids: list[int]) -> str:
        return require_tokenizer(self.tokenizer, "decoding text").decode(ids)

    def generate(self, requests: Request | list[Request]) -> list[RequestOutput]:
        """Run requests to completion; results in request order. All are validated before any runs."""
        if isinstance(requests, Request):
            requests = [requests]
        prepared = [self.prepare(r) for r in requests]
        return [self._generate_reference(p) for p in prepared]

    def _generate_reference(self, prep: PreparedRequest) -> RequestOutput:
        timing = RequestTiming(arrival=time.perf_counter())
        params = prep.request.sampling
        if prep.max_new_tokens != params.max_new_tokens:
            params = _with_max_new_tokens(params, prep.max_new_tokens)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        prefix = None if prep.prompt is None else prep.prompt.embeds
        tokens, logprobs, finish = self.reference.generate(prefix, prep.input_ids, params, self.eos_token_ids, decode)
        timing.finished = time.perf_counter()
        return self._output(prep, tokens, logprobs, finish.reason, finish.stop_reason, finish.text_end, timing)

    def _output(self, prep, tokens, logprobs, reason, stop_reason, text_end, timing) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(tokens)
            if text_end is not None:
                text = text[:text_end]
        return RequestOutput(
            request_id=prep.request.request_id,
            prompt=None if prep.prompt is None else prep.prompt.name,
            prompt_version=None if prep.prompt is None else prep.prompt.version,
            input_ids=prep.input_ids,
            token_ids=tokens,
            text=text,
            finish_reason=reason,
            stop_reason=stop_reason,
            logprobs=logprobs,
            timing=timing,
        )


def _with_max_new_tokens(params: SamplingParams, n: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_new_tokens=n)
