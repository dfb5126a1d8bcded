"""Engine outputs as OpenAI JSON: whole responses, and the stream chunks sent as text arrives."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..reasoning import ReasoningParser, ReasoningStream
from ..request import RequestOutput
from ..sampling import TokenLogprob
from ..stopping import partial_marker_length
from ..tokenizer import Tokenizer
from ..tool_calls import ToolChoice, ToolStream
from .schemas import error_body


def finite(x: float) -> float:
    """JSON has no -inf: a token the model rules out gets a very low finite log-prob instead."""
    return x if math.isfinite(x) else -9999.0


class TokenStrings:
    """Token id -> its text (special tokens included), cached; `token_id:N` without a tokenizer."""

    def __init__(self, tokenizer: Tokenizer | None, max_cache: int = 1 << 16):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._max_cache = max_cache

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = (f"token_id:{token_id}" if self._tokenizer is None
                 else self._tokenizer.hf.decode([token_id], skip_special_tokens=False))
            if len(self._cache) < self._max_cache:
                self._cache[token_id] = s
        return s


def best_first(top: dict[int, float], n: int | None = None) -> list[tuple[int, float]]:
    """A logprob's top alternatives, likeliest first (the first n of them, if n is given)."""
    return sorted(top.items(), key=lambda kv: -kv[1])[:n]


@dataclass
class ChoiceProgress:
    """What one choice has sent so far in a stream."""

    chars: int = 0
    tokens: int = 0
    text_offset: int = 0  # for completions logprobs
    started: bool = False  # chat: the role delta was sent
    last: RequestOutput | None = None
    tools: ToolStream | None = None  # chat with tools: what of the answer has gone out as content or calls
    reasoning: ReasoningStream | None = None  # chat with a reasoning parser: what of the thought has gone out
    content_sent: int = 0  # chat: characters of content sent


def new_text(progress: ChoiceProgress, out: RequestOutput, stops: tuple[str, ...]) -> str:
    """The text to send now: all of it once finished, else up to a possible stop string or partial character."""
    text = out.text or ""
    end = len(text)
    if not out.finished:
        end -= partial_marker_length(text, stops)
        while end > 0 and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence may still change
            end -= 1
    piece = text[progress.chars:end] if end > progress.chars else ""
    progress.chars = max(progress.chars, end)
    return piece


def usage(outputs: dict[int, RequestOutput], n: int) -> dict:
    """OpenAI's usage of the choices `outputs` (index -> output; `n` choices per prompt): each prompt's tokens
    counted once, as OpenAI and vLLM count them, and of those the ones whose K/V were cached (its first choice's)."""
    prompts: dict[int, RequestOutput] = {}
    for i in sorted(outputs):
        prompts.setdefault(i // n, outputs[i])
    prompt = sum(len(o.input_ids) for o in prompts.values())
    completion = sum(len(o.token_ids) for o in outputs.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in prompts.values())}}


@dataclass
class _Format:
    """Shared state of one HTTP call's response: ids, choice progress, what each choice ended with."""

    id: str
    created: int
    model: str
    token_str: TokenStrings
    stops: tuple[str, ...] = ()
    return_token_ids: bool = False
    include_usage: bool = False
    n: int = 1  # choices per prompt
    progress: dict[int, ChoiceProgress] = field(default_factory=dict)
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: the top N asked for (None: not asked)

    continuous_usage: bool = False  # vLLM's continuous_usage_stats: each chunk carries its choice's usage so far

    done_marker = "data: [DONE]\n\n"  # the stream's last line

    def stream_chunks(self, index: int, out: RequestOutput) -> list[dict]:
        """`chunks`, each with its choice's usage so far where continuous usage stats are on."""
        chunks = self.chunks(index, out)
        if self.continuous_usage:
            prompt, completion = len(out.input_ids), len(out.token_ids)
            for chunk in chunks:
                chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                  "total_tokens": prompt + completion}
        return chunks

    def sse(self, chunk: dict) -> str:
        """A chunk as a server-sent event."""
        return f"data: {json.dumps(chunk)}\n\n"

    def error_event(self, status: int, message: str, type_: str, code: str | None) -> str:
        """The event that ends a stream the engine failed in (vLLM's: an error body as data)."""
        return self.sse(error_body(message, type_, code=code))

    def _progress(self, index: int) -> ChoiceProgress:
        return self.progress.setdefault(index, ChoiceProgress())

    def vllm_prompt_logprobs(self, out: RequestOutput) -> list[dict | None] | None:
        """vLLM's prompt_logprobs: for each input token, None for the first, else {token id: {logprob, rank,
        decoded_token}} for the token there and the top N."""
        if self.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        result: list[dict | None] = []
        for lp in out.prompt_logprobs:
            if lp is None:
                result.append(None)
                continue
            entries = {str(t): {"logprob": finite(v), "rank": r, "decoded_token": self.token_str(t)}
                       for r, (t, v) in enumerate(best_first(lp.top, self.prompt_logprobs), start=1)}
            entries[str(lp.token_id)] = {"logprob": finite(lp.logprob), "rank": lp.rank,
                                         "decoded_token": self.token_str(lp.token_id)}
            result.append(entries)
        return result

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage_chunks(self, obj: str) -> list[dict]:
        if not self.include_usage:
            return []
        outs = {i: p.last for i, p in self.progress.items() if p.last is not None}
        return [{**self._head(obj), "choices": [], "usage": usage(outs, self.n)}]


@dataclass(frozen=True)
class EchoedPrompt:
    """What `echo` puts before a choice's completion: the prompt's text and tokens, with their logprobs (None for
    the first token) when the request asked for logprobs."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None


@dataclass
class CompletionFormat(_Format):
    echo: list[str | None] | None = None  # per choice: the prompt text to echo (None: decode its token ids)
    echo_decode: Callable[[list[int]], str] | None = None
    echo_only: bool = False  # max_tokens=0: the one token generated is not part of the response
    top_logprobs: int = 0  # `logprobs`: the top N shown (an echoed prompt's may hold more, for prompt_logprobs)

    def _echoed(self, index: int, out: RequestOutput) -> EchoedPrompt | None:
        if self.echo is None:
            return None
        text = self.echo[index]
        return EchoedPrompt(self.echo_decode(out.input_ids) if text is None else text, out.input_ids,
                            out.prompt_logprobs)

    def _visible(self, out: RequestOutput) -> RequestOutput:
        """The output as the response shows it (with echo and max_tokens=0: no generated token)."""
        if not self.echo_only:
            return out
        return replace(out, token_ids=[], text="", logprobs=None if out.logprobs is None else [],
                       finish_reason=None if out.finish_reason is None else "length", stop_reason=None)

    def logprobs(self, lps: list[TokenLogprob] | None, offset: int,
                 echoed: EchoedPrompt | None = None) -> dict | None:
        if lps is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        pairs = [] if echoed is None else list(zip(echoed.token_ids, echoed.logprobs or []))
        for token_id, lp in pairs + [(lp.token_id, lp) for lp in lps]:
            s = self.token_str(token_id)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if lp is None:  # the prompt's first token: nothing before it predicts it
                values.append(None)
                tops.append(None)
                continue
            values.append(finite(lp.logprob))
            top: dict[str, float] = {}
            for t, v in best_first(lp.top, self.top_logprobs):
                top.setdefault(self.token_str(t), finite(v))  # tokens that print alike: keep the likeliest
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        finals = [self._visible(out) for out in finals]
        # (unstreamed, only each prompt's first choice computed the prompt's logprobs: the others show them too)
        finals = [out if out.prompt_logprobs is not None else replace(out, prompt_logprobs=finals[i - i % self.n]
                                                                      .prompt_logprobs)
                  for i, out in enumerate(finals)]
        for i, out in enumerate(finals):
            echoed = self._echoed(i, out)
            text = (echoed.text if echoed is not None else "") + (out.text or "")
            choice = {"index": i, "text": text, "logprobs": self.logprobs(out.logprobs, 0, echoed),
                      "finish_reason": out.finish_reason}
            if self.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.vllm_prompt_logprobs(out)
            if self.return_token_ids:
                choice["token_ids"] = out.token_ids
                choice["prompt_token_ids"] = out.input_ids
            choices.append(choice)
        return {**self._head("text_completion"), "choices": choices, "usage": usage(dict(enumerate(finals)), self.n)}

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        out = self._visible(out)
        p = self._progress(index)
        p.last = out
        text = new_text(p, out, self.stops)
        if not text and not out.finished and (self.echo is None or p.started):
            return []  # tokens and their logprobs ride with the next chunk that has text
        new_ids = out.token_ids[p.tokens:]
        lps = None if out.logprobs is None else out.logprobs[p.tokens:]
        p.tokens = len(out.token_ids)
        echoed = None
        if self.echo is not None and not p.started:  # the first chunk of a choice starts with its prompt
            p.started, echoed = True, self._echoed(index, out)
            text = echoed.text + text
        logprobs = self.logprobs(lps, p.text_offset, echoed)
        if logprobs is not None and logprobs["tokens"]:
            p.text_offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = new_ids
        return [{**self._head("text_completion"), "choices": [choice]}]

    def final_chunks(self) -> list[dict]:
        return self.usage_chunks("text_completion")


@dataclass
class ChatFormat(_Format):
    tools: ToolChoice | None = None  # how answers are read as tool calls (None: plain content)
    reasoning: ReasoningParser | None = None  # how a thought is told from the answer (None: all content)
    prompt_open: bool = False  # the prompt ends inside an open thought
    include_reasoning: bool = True

    def _split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole answer."""
        return (None, text) if self.reasoning is None else self.reasoning.split(text, self.prompt_open)

    def _with_reasoning(self, message: dict, reasoning: str | None) -> dict:
        if self.reasoning is not None:  # both names: vLLM's, and the one older vLLM, SGLang and llama.cpp send
            message["reasoning"] = message["reasoning_content"] = reasoning if self.include_reasoning else None
        return message

    def _entry(self, token_id: int, logprob: float) -> dict:
        s = self.token_str(token_id)
        return {"token": s, "logprob": finite(logprob), "bytes": list(s.encode("utf-8"))}

    def logprobs(self, lps: list[TokenLogprob] | None) -> dict | None:
        if lps is None:
            return None
        content = []
        for lp in lps:
            content.append({**self._entry(lp.token_id, lp.logprob),
                            "top_logprobs": [self._entry(t, v) for t, v in best_first(lp.top)]})
        return {"content": content}

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(finals):
            reasoning, content = self._split(out.text or "")
            message: dict = {"role": "assistant", "content": content}
            finish_reason = out.finish_reason
            if self.tools is not None:
                answer, calls, finish_reason = self.tools.answer(content or "", out.finish_reason)
                message["content"] = None if content is None and not answer else answer
                if calls:
                    message["tool_calls"] = [call.as_openai() for call in calls]
            message = self._with_reasoning(message, reasoning)
            choice = {"index": i, "message": message, "logprobs": self.logprobs(out.logprobs),
                      "finish_reason": finish_reason}
            if self.return_token_ids:
                choice["token_ids"] = out.token_ids
                choice["prompt_token_ids"] = out.input_ids
            choices.append(choice)
        response = {**self._head("chat.completion"), "choices": choices,
                    "usage": usage(dict(enumerate(finals)), self.n)}
        if self.prompt_logprobs is not None:  # one prompt for every choice: vLLM puts them beside the choices
            response["prompt_logprobs"] = self.vllm_prompt_logprobs(finals[0])
        return response

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        p = self._progress(index)
        p.last = out
        chunks = []
        if not p.started:
            p.started = True
            chunks.append({**self._head("chat.completion.chunk"), "choices": [
                {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]})
        new_text(p, out, self.stops)
        content = (out.text or "")[:p.chars]  # what may be sent: the answer so far, less what new_text holds back
        thought, calls, finish_reason = "", [], out.finish_reason
        if self.reasoning is not None:
            if p.reasoning is None:
                p.reasoning = ReasoningStream(self.reasoning, self.prompt_open)
            thought, content = p.reasoning.feed(content, out.finished)
        if self.tools is not None:
            if p.tools is None:
                p.tools = self.tools.stream()
            text, calls, finish_reason = p.tools.feed(content, out.finished, out.finish_reason)
        else:
            text, p.content_sent = content[p.content_sent:], max(p.content_sent, len(content))
        delta: dict = {}
        if thought and self.include_reasoning:
            delta["reasoning"] = delta["reasoning_content"] = thought
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        if delta or out.finished:
            new_ids = out.token_ids[p.tokens:]
            lps = None if out.logprobs is None else out.logprobs[p.tokens:]
            p.tokens = len(out.token_ids)
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(lps), "finish_reason": finish_reason}
            if self.return_token_ids:
                choice["token_ids"] = new_ids
            chunks.append({**self._head("chat.completion.chunk"), "choices": [choice]})
        return chunks

    def final_chunks(self) -> list[dict]:
        return self.usage_chunks("chat.completion.chunk")
