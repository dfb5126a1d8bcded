"""The public API: Engine (prompts, generate, stream, score, and the step-level add_request/step/abort)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path

import torch

from .attention_triton import check_triton_device
from .beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, SearchedInput
from .block_cache import BlockCache
from .detokenizer import IncrementalText
from .errors import PromptError, RequestError, SoftPromptError
from .hub import resolve_model
from .kv_pool import KVPool, OutOfBlocks
from .loader import load_model
from .model_runner import ModelRunner
from .prefix_cache import PrefixCache
from .prompts import PromptStore, SoftPrompt, tokens_as_input_ids
from .reasoning import ReasoningParser, ThoughtGate, reasoning_parser
from .reference import ReferencePath
from .request import PendingText, Request, RequestOutput, RequestTiming
from .sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob, make_generator, token_logprobs
from .scheduler import Scheduler, SchedulerConfig
from .scoring import score_continuations
from .sequence import Sequence, Status
from .stopping import check_finish
from .structured import GrammarGuide, StructuredOutputs
from .tokenizer import Tokenizer, load_tokenizer, require_tokenizer

_PROCESSES_LOGITS, _SCREENABLE = attrgetter("processes_logits"), attrgetter("screenable")

BACKENDS = ("auto", "torch", "triton", "reference")


def bad_words_token_ids(tokenizer: Tokenizer, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """vLLM's encoding of bad words: each as encoded alone (leading spaces stripped), and after a space where that
    starts with another token and has as many tokens (a word at the start of the text and one inside it)."""
    out = []
    for word in words:
        alone = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not alone:
            continue
        out.append(alone)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if len(spaced) == len(alone) and spaced[0] != alone[0]:
            out.append(spaced)
    return tuple(out)


def _decoded(decode, ids: list[int], end: int | None) -> str:
    return decode(ids)[:end]


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation: its prompt resolved, its input tokenized, its output length capped."""

    request: Request
    prompt: SoftPrompt | None
    input_ids: list[int]
    params: SamplingParams  # max_new_tokens capped so prefix + input + output fits the model's positions
    grammar: object | None = None  # its structured output compiled (engine/structured.py), where it asks for one
    # where its constraint holds on a thinking model's answer alone: ThoughtGate's (start id, end id, open)
    thought: tuple[int, int, bool] | None = None


class Engine:
    """One frozen model serving many soft prompts in one continuous batch.

    model_dir: a Hugging Face checkpoint directory, or a Hub model id (`org/name`, `org/name@revision`, or
    `revision=`) whose safetensors and tokenizer files are fetched into the HF cache (engine/hub.py).
    max_model_len (vLLM's): the most positions a sequence may take (task prompt + input + output), at most the
    model's; default the model's.

    backend="torch" (the default, "auto"): paged KV with per-task prefix reuse, in plain PyTorch.
    backend="triton": the same runtime with the Triton attention and RoPE/KV-write kernels (CUDA; on the CPU
    only under TRITON_INTERPRET=1, for tests).
    backend="reference": the ground truth, one request at a time, plain concat, no cache.

    cuda_graphs (triton backend only; None: on where the device is CUDA): decode steps run at padded static
    shapes, replayed from one CUDA graph per batch-size bucket (engine/decode_graphs.py). True on the CPU runs the
    same padded steps without capture (that is how the tests check them). Not for mixture-of-experts models on
    CUDA (their experts group tokens on the host): their default is off. Never for models with layers that keep a
    recurrent state (Qwen3.5, LFM2, the Mamba-2 hybrids).

    enable_prefix_caching (vLLM's automatic prefix caching; torch and triton backends): the K/V of full blocks of
    request tokens stay cached after their request, and a later request of the same task that begins with the
    same tokens (a shared instruction or few-shot examples, the n samples of one input, a preempted request)
    computes only the rest. A task's soft-prompt K/V are cached whatever this says. Off for models with layers that
    keep a recurrent state (Qwen3.5, LFM2, the Mamba-2 hybrids), which cached blocks cannot restore (a task's prompt
    state is still computed once).

    reasoning_parser ("deepseek_r1", "qwen3", "seed_oss" or "mistral", as the server's --reasoning-parser): a
    thinking model's structured outputs and guided_choice hold on its answer after the `<think> ... </think>`
    thought, not on the thought (see set_reasoning_parser).
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        backend: str = "auto",
        kv_cache_bytes: int | None = None,
        kv_cache_fraction: float | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_batched_tokens: int = 2048,
        cuda_graphs: bool | None = None,
        enable_prefix_caching: bool = True,
        revision: str | None = None,
        max_model_len: int | None = None,
        scheduling_policy: str = "fcfs",
        reasoning_parser: str | None = None,
    ):
        if backend not in BACKENDS:
            raise SoftPromptError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if block_size < 1 or max_num_seqs < 1 or max_batched_tokens < 1:
            raise SoftPromptError("block_size, max_num_seqs and max_batched_tokens must be >= 1")
        # (checked here, before any weights load)
        scheduler_config = SchedulerConfig(max_num_seqs, max_batched_tokens, policy=scheduling_policy)
        self.model_dir = resolve_model(model_dir, revision)
        self.model = load_model(self.model_dir, device=device, dtype=dtype)
        self.config = self.model.config
        if max_model_len is not None:
            if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not (
                    1 <= max_model_len <= self.config.max_positions):
                raise SoftPromptError(f"max_model_len must be an integer in 1..{self.config.max_positions} (the "
                                      f"model's positions), got {max_model_len!r}")
            self.config = replace(self.config, max_positions=max_model_len)
        self.device = self.model.word_embeddings.weight.device
        self.dtype = self.model.word_embeddings.weight.dtype
        self.tokenizer: Tokenizer | None = load_tokenizer(self.model_dir)
        self.eos_token_ids = self._eos_ids()
        self.generation_defaults = self.config.generation_defaults
        self.reasoning: ReasoningParser | None = None
        self._thought_markers: tuple[int, int] | None = None
        if reasoning_parser is not None:
            self.set_reasoning_parser(reasoning_parser)
        self.structured_outputs = StructuredOutputs(None if self.tokenizer is None else self.tokenizer.hf,
                                                    self.config.vocab_size, self.eos_token_ids)
        self.prompts = PromptStore(
            hidden_size=self.config.embedding_width,
            dtype=self.dtype,
            device=self.device,
            max_length=self.config.max_positions,
            vocab_size=self.config.vocab_size,
            # (a text prompt's rows are its tokens' embeddings as the model takes input ids: scaled where it scales)
            embed_tokens=(self.model.embed_tokens if self.config.token_embedding_multiplier == 1.0 else
                          lambda ids: self.model.embed_tokens(ids) * self.config.token_embedding_multiplier),
            tokenize=(lambda text: self.tokenizer.encode(text, add_special_tokens=False)) if self.tokenizer else None,
            kv_layout=None if self.config.kv_prefix_refusal else (self.config.num_layers, self.config.num_kv_heads,
                                                                  self.config.head_dim),
            key_channel_order=self.config.key_channel_order,
            kv_refusal=self.config.kv_prefix_refusal,
        )
        self.backend = "torch" if backend == "auto" else backend
        if self.backend == "triton":
            check_triton_device(self.device)
            if block_size & (block_size - 1):
                raise SoftPromptError(f"backend='triton' needs a power-of-two block_size, got {block_size}")
        self.reference = ReferencePath(self.model)
        if self.backend == "reference":  # no KV cache: the pool only exists to keep one code path (one block)
            kv_cache_bytes = KVPool.unit_bytes(self.config, block_size, self.dtype)
        # (a model with recurrent states: on CUDA, the running sequences' states and a few prompts' are taken out of
        # the memory fraction up front; on the CPU they grow as needed)
        state_slots = max_num_seqs + 16 if self.device.type == "cuda" and self.backend != "reference" else 8
        self.pool = KVPool.sized(self.config, block_size, self.dtype, self.device, kv_cache_bytes, kv_cache_fraction,
                                 state_slots=state_slots)
        if cuda_graphs and self.backend != "triton":
            raise SoftPromptError(f"cuda_graphs=True needs backend='triton', not {self.backend!r}")
        if cuda_graphs and self.pool.states is not None:
            raise SoftPromptError(f"cuda_graphs=True: a {self.config.model_type} model's decode steps cannot be "
                                  f"captured (its {self.config.recurrent_layer_kind} layers look up each sequence's "
                                  "state on the host)")
        if cuda_graphs and self.device.type == "cuda" and not self.model.graph_capturable:
            raise SoftPromptError(f"cuda_graphs=True: a {self.config.model_type} model's decode steps cannot be "
                                  "captured (its experts group their tokens on the host)")
        if cuda_graphs is None:
            cuda_graphs = self.backend == "triton" and self.device.type == "cuda" and self.model.graph_capturable
        self.runner = ModelRunner(self.model, self.pool, self.backend,
                                  decode_graphs_for=max_num_seqs if cuda_graphs else None)
        # (not with recurrent states: a cached block's K/V would not bring back the state after it)
        self.block_cache = (BlockCache(self.pool) if enable_prefix_caching and self.backend != "reference"
                            and self.pool.states is None else None)
        self.prefix_cache = PrefixCache(self.pool, self.runner.compute_prefixes,
                                        reclaim=None if self.block_cache is None else self.block_cache.evict_one)
        self.scheduler = Scheduler(self.prefix_cache, scheduler_config, self.block_cache)
        self._sequences: dict[str, Sequence] = {}
        self._order = itertools.count()

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def set_chat_template(self, template: str) -> None:
        """Chat (the server's /v1/chat/completions) with this Jinja template in place of the tokenizer's own, e.g.
        for a base model that has none (vLLM's --chat-template)."""
        require_tokenizer(self.tokenizer, "a chat template").set_chat_template(template)

    def set_reasoning_parser(self, name: str | None) -> None:
        """Constrain a thinking model's answer, not its thought (vLLM's structured outputs with a reasoning parser):
        a later request's structured output (guided_json / regex / grammar / JSON mode) or guided_choice holds from
        the token after `</think>`, while the thought is free. `deepseek_r1` (and `seed_oss`): the thought is open
        from the first token; `qwen3` (and `mistral`): where the input ends inside an open `<think>`, else the
        first token may be `<think>` (which opens one) or the constraint's. A thought that never closes leaves the
        whole output unconstrained. Needs the parser's markers (`<think>` and `</think>`; `<seed:think>`,
        `[THINK]`, ...) to be single tokens of the tokenizer (as in Qwen3, QwQ, DeepSeek R1's, Seed-OSS and
        Magistral models); None: constraints hold from the first token (the default)."""
        if name is None:
            self.reasoning, self._thought_markers = None, None
            return
        try:
            parser = reasoning_parser(name)
        except ValueError as exc:
            raise SoftPromptError(str(exc)) from None
        markers = parser.marker_ids(require_tokenizer(self.tokenizer, "a reasoning parser"))
        if markers is None or not all(0 <= i < self.config.vocab_size for i in markers):
            raise SoftPromptError(f"reasoning parser {name!r}: {parser.start!r} and {parser.end!r} are not single "
                                  "tokens of this model's tokenizer")
        self.reasoning, self._thought_markers = parser, markers

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's recommended sampling settings (`generation_config.json`'s
        temperature, top_p, top_k, min_p, repetition_penalty, where it sets them; vLLM's
        `LLM.get_default_sampling_params`), then `overrides`. SamplingParams() alone is greedy."""
        return SamplingParams(**{**self.generation_defaults, **overrides})

    # ---- prompts -------------------------------------------------------------------------------------
    def add_prompt(
        self,
        name: str,
        source: str | Path | torch.Tensor | None = None,
        *,
        text: str | None = None,
        token_ids: list[int] | None = None,
        replace: bool = False,
        precompute: bool = False,
        task_id: int | None = None,
    ) -> SoftPrompt:
        """Register a task: a PEFT adapter dir (prompt tuning, P-tuning, CPT, multitask prompt tuning, prefix
        tuning or a cartridge) or its Hub id (`org/name[@revision]`), a .safetensors file, a [P, hidden] tensor,
        or text.

        `replace=True` registers a new version (running requests finish on the old one). `precompute=True`
        computes the prefix K/V now instead of on first use. `task_id` (or a source written `DIR#N`) picks the
        task of a multitask prompt-tuning adapter.
        """
        previous = self.prompts.get(name) if name in self.prompts else None
        prompt = self.prompts.add(name, source, text=text, token_ids=token_ids, replace=replace, task_id=task_id)
        if self.backend != "reference" and self.pool.blocks_for(prompt.length) >= self.pool.num_blocks:
            self.prompts.restore(name, previous)  # a rejected prompt leaves the store as it was
            raise PromptError(
                f"prompt {name!r} ({prompt.length} rows) does not fit the KV pool of {self.pool.num_blocks} blocks "
                "next to a request: raise kv_cache_bytes"
            )
        self.prefix_cache.invalidate(name, keep_version=prompt.version)
        if precompute and self.backend != "reference":
            try:
                self.prefix_cache.precompute(prompt)
            except OutOfBlocks:  # every block is busy right now: computed on first use instead
                pass
        return prompt

    def remove_prompt(self, name: str) -> SoftPrompt:
        """Unregister a task. Requests already running on it finish; new ones are refused."""
        prompt = self.prompts.remove(name)
        self.prefix_cache.invalidate(name)
        return prompt

    # ---- validation ----------------------------------------------------------------------------------
    def prepare(self, request: Request) -> PreparedRequest:
        """Validate a request; raises a SoftPromptError (a ValueError) naming the problem. Changes nothing."""
        if not isinstance(request, Request):
            raise RequestError(f"expected a Request, got {type(request).__name__}")
        if not isinstance(request.sampling, SamplingParams):
            raise RequestError(f"request.sampling must be SamplingParams, got {type(request.sampling).__name__}")
        if isinstance(request.priority, bool) or not isinstance(request.priority, int):
            raise RequestError(f"priority must be an integer, got {request.priority!r}")
        if request.priority != 0 and self.scheduler.config.policy != "priority":
            raise RequestError("a request priority needs Engine(scheduling_policy='priority') (serve "
                               "--scheduling-policy priority); this engine serves first come, first served")
        prompt = None if request.prompt is None else self.prompts.get(request.prompt)
        if request.messages is not None:
            if request.input_ids is not None or request.text is not None:
                raise RequestError("give exactly one of input ids, text or messages")
            options = dict(request.chat_template_kwargs or {})
            if request.tools is not None:
                if "tools" in options:
                    raise RequestError("give tools or chat_template_kwargs['tools'], not both")
                options["tools"] = request.tools
            ids = self._input_ids(require_tokenizer(self.tokenizer, "chat messages").render_chat(
                request.messages, options), None)
        else:
            if request.chat_template_kwargs is not None or request.tools is not None:
                raise RequestError("chat_template_kwargs and tools apply to chat messages: give messages")
            ids = self._input_ids(request.input_ids, request.text)
        if request.sampling.stop:
            require_tokenizer(self.tokenizer, "stop strings")
        p = 0 if prompt is None else prompt.length
        keep = request.sampling.truncate_prompt_tokens
        if keep == -1:
            keep = max(1, self.config.max_positions - p - 1)
        if keep is not None and len(ids) > keep:
            ids = ids[-keep:]  # left truncation: the input's end is what the model continues
        room = self.config.max_positions - p - len(ids)
        if room < 1:
            raise RequestError(
                f"input of {len(ids)} tokens after a {p}-token prompt leaves no room in the model's "
                f"{self.config.max_positions} positions"
            )
        params = request.sampling
        self._check_in_vocab((t for t, _ in params.logit_bias), "logit_bias token id")
        if params.guided_choice is not None and params.choice_token_ids is None:
            tokenizer = require_tokenizer(self.tokenizer, "guided_choice")
            encoded = [tuple(tokenizer.encode(c, add_special_tokens=False)) for c in params.guided_choice]
            empty = [c for c, choice in zip(params.guided_choice, encoded) if not choice]
            if empty:
                raise RequestError(f"guided_choice {empty[0]!r} encodes to no tokens")
            params = replace(params, choice_token_ids=tuple(encoded))
        if params.bad_words:
            words = bad_words_token_ids(require_tokenizer(self.tokenizer, "bad_words"), params.bad_words)
            params = replace(params, bad_words_token_ids=tuple(dict.fromkeys(params.bad_words_token_ids + words)))
        self._check_in_vocab((t for word in params.bad_words_token_ids for t in word), "bad word token id")
        self._check_in_vocab((t for choice in params.choice_token_ids or () for t in choice), "choice token id")
        self._check_in_vocab(params.allowed_token_ids or (), "allowed_token_ids token id")
        if params.structured is not None:
            require_tokenizer(self.tokenizer, f"guided_{params.structured[0]}")
        grammar = self.structured_outputs.compile_for(params)
        thought = None
        if self.reasoning is not None and (grammar is not None or params.choice_token_ids is not None):
            start, end = self._thought_markers
            last = {t: i for i, t in enumerate(ids) if t in (start, end)}  # each marker's last position
            thought = start, end, self.reasoning.thinks_from_the_start or last.get(start, -1) > last.get(end, -1)
        if params.max_new_tokens > room:
            params = replace(params, max_new_tokens=room, min_tokens=min(params.min_tokens, room))
        if self.backend != "reference":
            need = self.pool.blocks_for(p) + self.pool.blocks_for(len(ids) + params.max_new_tokens)
            if need > self.pool.num_blocks:
                raise RequestError(
                    f"request needs {need} KV blocks but the whole pool has {self.pool.num_blocks}: "
                    "raise kv_cache_bytes or shorten the input"
                )
        return PreparedRequest(request, prompt, ids, params, grammar, thought)

    def _check_in_vocab(self, ids, what: str) -> None:
        """Raise naming the first of `ids` outside the vocabulary (a `what` such as "choice token id")."""
        bad = next((i for i in ids if not 0 <= i < self.config.vocab_size), None)
        if bad is not None:
            raise RequestError(f"{what} {bad} is out of range for vocabulary size {self.config.vocab_size}")

    def _input_ids(self, input_ids, text, what: str = "input") -> list[int]:
        if (input_ids is None) == (text is None):
            raise RequestError(f"give exactly one of {what} ids or text")
        if text is not None:
            if not isinstance(text, str):
                raise RequestError(f"{what} text must be a string, got {type(text).__name__}")
            if not text:
                raise RequestError(f"{what} is empty: give at least one token")
            ids = require_tokenizer(self.tokenizer, f"text {what}").encode(text)
        else:
            ids = input_ids.flatten().tolist() if isinstance(input_ids, torch.Tensor) else input_ids
            if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
                raise RequestError(f"{what} ids must be a list of integers")
            ids = list(ids)
        if not ids:
            raise RequestError(f"{what} is empty: give at least one token")
        self._check_in_vocab(ids, "token id")
        return ids

    # ---- step-level API (what a server loop drives) ---------------------------------------------------
    def add_request(self, request: Request) -> str:
        """Validate and queue a request; returns its id. A bad request raises and leaves the engine unchanged."""
        return self._queue(self.prepare(request))

    def _queue(self, prep: PreparedRequest) -> str:
        request = prep.request
        if request.request_id in self._sequences:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        seq = Sequence(
            request=request,
            prompt=prep.prompt,
            input_ids=prep.input_ids,
            params=prep.params,
            generator=make_generator(prep.params),
            timing=RequestTiming(arrival=time.perf_counter()),
            arrival_order=next(self._order),
        )
        if prep.thought is not None:
            seq.gate = ThoughtGate(*prep.thought)
        if prep.grammar is not None:
            seq.guide = GrammarGuide(prep.grammar, seq.gate)
        if self.tokenizer is not None:
            seq.text = IncrementalText(self.tokenizer, seq.generated, prep.params.skip_special_tokens, seq.input_ids)
        if prep.params.prompt_logprobs is not None:
            seq.prompt_logprobs.append(None)  # nothing before the first input token predicts it
        self._sequences[request.request_id] = seq
        self.scheduler.add(seq)
        return request.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its KV; returns its final output (finish_reason "abort")."""
        seq = self._sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        seq.timing.finished = time.perf_counter()
        return self._output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def kv_is_idle(self) -> bool:
        """No request holds KV: every block is free, or held by an unreferenced task prefix or an idle cached
        request block (the state between requests; anything else after all requests ended is a leak)."""
        held = sum(len(e.blocks) for e in self.prefix_cache.entries)
        if any(e.refcount for e in self.prefix_cache.entries):
            return False
        if self.block_cache is not None:
            if self.block_cache.num_idle != self.block_cache.num_cached:
                return False
            held += self.block_cache.num_cached
        return self.pool.num_free + held == self.pool.num_blocks

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns an output for every request that got a token or finished."""
        return self._step(every_output=True)

    def _step(self, every_output: bool) -> list[RequestOutput]:
        """step(); with every_output=False only the requests that finished get an output (`generate` needs no
        other: building every running request's output each step is a fair part of a decode step's host time)."""
        if self.backend == "reference":
            return self._reference_step()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        # sequences that reach the end of their tokens this step sample their next one
        sampled = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_tokens)) if s.num_computed + n == s.num_tokens]
        every = len(sampled) == len(batch.seqs)  # (decode steps): no row to pick out
        decode_only = every and batch.num_tokens.count(1) == len(batch.num_tokens)  # no input row to score
        scoring = [] if decode_only else [i for i, s in enumerate(batch.seqs) if s.params.prompt_logprobs is not None
                                          and len(s.prompt_logprobs) < len(s.input_ids)]
        if scoring:
            hidden = self._prompt_logprobs_step(batch.seqs, batch.num_tokens, scoring, sampled)
        else:
            hidden = self.runner.hidden(batch.seqs, batch.num_tokens, rows_for=None if every else sampled)
        size, cache = self.pool.block_size, self.block_cache
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n
            if cache is not None and seq.num_computed >= (len(seq.cached_serials) + 1) * size:
                cache.register(seq)  # blocks its tokens just filled
        if not sampled:
            return []
        seqs = [batch.seqs[i] for i in sampled]
        processes = list(map(_PROCESSES_LOGITS, seqs))
        histories, guides, gates = None, None, None
        if any(processes):
            histories = [(s.input_ids, s.generated) for s in seqs]
            guides = [s.guide for s in seqs]
            gates = [s.gate for s in seqs]
        tokens, logprobs = self.runner.sample(hidden, [s.params for s in seqs], [s.generator for s in seqs],
                                              histories, self.eos_token_ids, list(map(_SCREENABLE, seqs)), processes,
                                              guides, gates)
        now = time.perf_counter()
        outputs = []
        for seq, token, lp in zip(seqs, tokens, logprobs):
            self._append_token(seq, token, lp, now)
            if every_output or seq.finish_reason is not None:
                outputs.append(self._output(seq))
        return outputs

    def _prompt_logprobs_step(self, seqs: list[Sequence], num_tokens: list[int], scoring: list[int],
                              sampled: list[int]) -> torch.Tensor:
        """A step in which `scoring` sequences prefill input tokens whose logprobs they want: every row's hidden
        state, scored where a row predicts the next input token (once: a recomputed sequence scores nothing
        twice); returns the rows of the `sampled` sequences' last tokens."""
        hidden = self.runner.hidden(seqs, num_tokens, all_rows=True)
        ends = torch.tensor(num_tokens).cumsum(0).tolist()
        for i in scoring:
            seq, n = seqs[i], num_tokens[i]
            first = ends[i] - n  # this sequence's first row; row j holds own token num_computed + j
            lo = max(len(seq.prompt_logprobs) - 1, seq.num_computed)  # own position whose row predicts next
            hi = min(len(seq.input_ids) - 1, seq.num_computed + n)
            if lo < hi:
                rows = hidden[first + lo - seq.num_computed:first + hi - seq.num_computed]
                seq.prompt_logprobs += token_logprobs(self.model.compute_logits(rows), seq.input_ids[lo + 1:hi + 1],
                                                      seq.params.prompt_logprobs)
        last = torch.tensor([ends[i] - 1 for i in sampled], dtype=torch.long, device=hidden.device)
        return hidden.index_select(0, last)

    def _append_token(self, seq: Sequence, token: int, logprob, now: float) -> None:
        seq.generated.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.timing.first_token is None:
            seq.timing.first_token = now
        finish = check_finish(seq.generated, seq.params, self.eos_token_ids, seq.text, seq.gate)
        if finish is not None:
            seq.finish_reason, seq.stop_reason, seq.text_end = finish.reason, finish.stop_reason, finish.text_end
            seq.timing.finished = now
            self.scheduler.finish(seq)
            self._sequences.pop(seq.request_id, None)

    def _reference_step(self) -> list[RequestOutput]:
        """Reference backend: run the oldest waiting request to completion, alone."""
        if not self.scheduler.waiting:
            return []
        seq = self.scheduler.waiting.popleft()
        decode = None if seq.text is None else seq.text.exact
        prefix = None if seq.prompt is None else seq.prompt.reference_input
        as_ids = tokens_as_input_ids(seq.prompt)
        tokens, logprobs, finish = self.reference.generate(prefix, seq.input_ids, seq.params, self.eos_token_ids,
                                                           decode, seq.guide, seq.gate, as_ids)
        seq.generated.extend(tokens)  # the list seq.text reads
        seq.logprobs = logprobs or []
        if seq.params.prompt_logprobs is not None:
            logits = self.reference.logits(prefix, seq.input_ids, as_ids)[:-1]
            seq.prompt_logprobs = [None, *token_logprobs(logits, seq.input_ids[1:], seq.params.prompt_logprobs)]
        seq.finish_reason, seq.stop_reason, seq.text_end = finish.reason, finish.stop_reason, finish.text_end
        seq.timing.first_token = seq.timing.finished = time.perf_counter()
        seq.status = Status.FINISHED
        self._sequences.pop(seq.request_id, None)
        return [self._output(seq)]

    def _output(self, seq: Sequence) -> RequestOutput:
        ids = list(seq.generated)
        text = None
        if self.tokenizer is not None:  # decoded when first read
            final = seq.text.final  # a stop-string check decoded it whole already
            if seq.finish_reason is None:  # the text so far: the new tokens' pieces added to what was read before
                text = PendingText(seq.text.text, len(ids))
            elif final is not None:
                text = final[:seq.text_end]
            else:  # every token's exact text (HF's decode) but a stop token's, cut at a stop string
                stop_token = isinstance(seq.stop_reason, int) and not seq.params.include_stop_str_in_output
                text = PendingText(_decoded, seq.text.exact, ids[:-1] if stop_token else ids, seq.text_end)
        return RequestOutput(
            request_id=seq.request_id,
            prompt=None if seq.prompt is None else seq.prompt.name,
            prompt_version=None if seq.prompt is None else seq.prompt.version,
            input_ids=seq.input_ids,
            token_ids=ids,
            text=text,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            timing=seq.timing,
            # complete before the first token is sampled and never changed after: shared, not copied each step
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens or 0,
        )

    # ---- convenience ---------------------------------------------------------------------------------
    def generate(self, requests: Request | list[Request]) -> list[RequestOutput]:
        """Run requests to completion in one continuous batch; results in request order.
        All requests are validated before any is queued."""
        final: dict[str, RequestOutput] = {}
        ids = self._add_all(requests)
        wanted = set(ids)
        while wanted - final.keys():
            for out in self._step(every_output=False):
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def beam_search(self, requests: Request | list[Request], params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search over each request's input (its prompt, ids, text or messages; no sampling params: the search
        takes its settings from `params`), as HF's `generate(num_beams=...)` runs it (engine/beam_search.py):
        each request's `beam_width` best finished hypotheses, best first. All requests' beams step together, one
        token a step, in one continuous batch. Results in request order."""
        search = self.start_beam_search(requests, params)
        while not search.done:
            search.advance(self.generate(search.step_requests()))
        return search.results(self.beam_text_decoder(params))

    def start_beam_search(self, requests: Request | list[Request], params: BeamSearchParams) -> BeamSearch:
        """The requests validated (all before any is searched) into a BeamSearch for a caller to step (the
        server steps it through its engine loop)."""
        if isinstance(requests, Request):
            requests = [requests]
        if not isinstance(params, BeamSearchParams):
            raise RequestError(f"beam_search needs BeamSearchParams, got {type(params).__name__}")
        inputs = []
        for request in requests:
            if request.sampling != SamplingParams():
                raise RequestError("beam search takes its settings from BeamSearchParams: give its requests no "
                                   "sampling params")
            prep = self.prepare(request)
            used = (0 if prep.prompt is None else prep.prompt.length) + len(prep.input_ids)
            inputs.append(SearchedInput(request.request_id, request.prompt, prep.input_ids,
                                        self.config.max_positions - used, request.priority))
        return BeamSearch(inputs, params, self.eos_token_ids)

    def beam_text_decoder(self, params: BeamSearchParams) -> Callable[[list[int]], str] | None:
        if self.tokenizer is None:
            return None
        return lambda ids: self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    def stream(self, requests: Request | list[Request]) -> Iterator[RequestOutput]:
        """Yield each request's output (cumulative tokens so far) every time it gets a token.
        Closing the iterator early aborts the requests still running."""
        ids = self._add_all(requests)
        pending = set(ids)
        try:
            while pending:
                for out in self.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for request_id in pending:
                self.abort(request_id)

    def _add_all(self, requests: Request | list[Request]) -> list[str]:
        if isinstance(requests, Request):
            requests = [requests]
        prepared = [self.prepare(r) for r in requests]
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise RequestError("request ids in one call must be distinct")
        taken = [i for i in ids if i in self._sequences]
        if taken:
            raise RequestError(f"request id {taken[0]!r} is already in use")
        return [self._queue(p) for p in prepared]

    def score(
        self, prompt: str | None, context: str | list[int], continuations: list[str] | list[list[int]]
    ) -> list[float]:
        """Log-likelihood (sum of token log-probs) of each continuation after `context`, under `prompt`. The
        context's K/V are computed once for all the continuations (engine/scoring.py)."""
        soft = None if prompt is None else self.prompts.get(prompt)
        text, ids = (context, None) if isinstance(context, str) else (None, context)
        ctx = self._input_ids(ids, text, what="context")
        conts = []
        for c in continuations:
            if isinstance(c, str):
                conts.append(self._input_ids(require_tokenizer(self.tokenizer, "text continuation").encode(
                    c, add_special_tokens=False), None, what="continuation"))
            else:
                conts.append(self._input_ids(c, None, what="continuation"))
        p = 0 if soft is None else soft.length
        for c in conts:
            if p + len(ctx) + len(c) > self.config.max_positions:
                raise RequestError(f"context + continuation of {len(ctx) + len(c)} tokens after a {p}-token prompt "
                                   f"exceeds the model's {self.config.max_positions} positions")
        return score_continuations(self, [(soft, ctx, conts)])[0]

    @torch.no_grad()
    def prompt_logprobs(self, prompt: str | None, input_ids: list[int], top_n: int = 0) -> list[TokenLogprob | None]:
        """vLLM's prompt logprobs: each input token's log-prob given the prompt and the tokens before it, with the
        `top_n` likeliest tokens there (the raw model distribution, as `logprobs`). The first token gets None, as
        in vLLM and OpenAI's `echo` (no input token precedes it). One packed pass outside the scheduler (for
        offline use; `SamplingParams(prompt_logprobs=N)` has a request's prefill compute them)."""
        ids = self._input_ids(input_ids, None)
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= MAX_LOGPROBS:
            raise RequestError(f"top_n must be an integer in [0, {MAX_LOGPROBS}], got {top_n!r}")
        p = 0 if prompt is None else self.prompts.get(prompt).length
        if p + len(ids) > self.config.max_positions:
            raise RequestError(f"input of {len(ids)} tokens after a {p}-token prompt exceeds the model's "
                               f"{self.config.max_positions} positions")
        [logits] = self.sequence_logits([(prompt, ids)])
        return [None, *token_logprobs(logits[:-1], ids[1:], top_n)]

    @torch.no_grad()
    def sequence_logits(self, items: list[tuple[str | None, list[int]]]) -> list[torch.Tensor]:
        """fp32 logits [len(ids), vocab] at every token of each (prompt name or None, token ids): one packed pass
        with the missing prefixes computed together (one at a time when the pool cannot hold them all at once;
        the reference backend: one request at a time, no cache)."""
        prompts = [None if name is None else self.prompts.get(name) for name, _ in items]
        if self.backend == "reference":
            return [self.reference.logits(None if p is None else p.reference_input, ids, tokens_as_input_ids(p))
                    for p, (_, ids) in zip(prompts, items)]
        seqs = [Sequence.of_tokens(p, ids) for p, (_, ids) in zip(prompts, items)]
        held = []
        try:
            held = self.prefix_cache.acquire_many([p for p in prompts if p is not None])
            for seq in seqs:
                if seq.prompt is not None:
                    seq.prefix = self.prefix_cache.acquire(seq.prompt)
                seq.blocks = self.prefix_cache.allocate(self.pool.blocks_for(seq.num_tokens))
            logits = self.runner.run(seqs, [s.num_tokens for s in seqs], all_logits=True)
        except OutOfBlocks:
            if len(items) == 1:
                raise RequestError("the KV pool is too busy or too small for this sequence right now") from None
            logits = None
        finally:
            for seq in seqs:
                self.scheduler.release(seq)
            for entry in held:
                self.prefix_cache.release(entry)
        if logits is None:
            return [self.sequence_logits([item])[0] for item in items]
        return list(logits.split([s.num_tokens for s in seqs]))
