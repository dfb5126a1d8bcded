"""OpenAI's Responses API (`POST /v1/responses`), as vLLM serves it: a request is turned into the chat request it
stands for (instructions as the system turn, input items as turns, function tools), runs through the chat path,
and its answer comes back as Response output items (reasoning, message, function calls), whole or as the
Responses stream's events. Nothing is stored: `previous_response_id` is refused and the conversation is sent
whole each time (`store` is answered false)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, StrictBool, StrictInt, StrictStr

from ..request import RequestOutput
from .formatting import ChatFormat, usage
from .schemas import ChatCompletionRequest, _SamplingFields

_MESSAGE_ROLES = ("user", "assistant", "system", "developer")


class ResponsesRequest(_SamplingFields):
    """The Responses API's body (OpenAI names; vLLM's sampling extras too)."""

    input: StrictStr | list[dict[str, Any]]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    reasoning: dict[str, Any] | None = None  # {"effort", "summary"}: accepted, the model decides how it thinks
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    background: StrictBool = False
    top_logprobs: StrictInt | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's, as on chat
    include_reasoning: StrictBool = True
    model_config = ConfigDict(extra="ignore")

    def as_chat(self) -> ChatCompletionRequest:
        """The chat request this one stands for; ValueError "param: message" for what is not supported."""
        if self.previous_response_id is not None:
            raise ValueError("previous_response_id: responses are not stored: send the whole conversation as input")
        if self.background:
            raise ValueError("background: background responses are not supported")
        if self.n != 1:
            raise ValueError("n: the Responses API makes one answer")
        if self.top_logprobs:
            raise ValueError("top_logprobs: logprobs are not supported on /v1/responses (use chat completions)")
        shared = self.model_dump(include=set(_SamplingFields.model_fields), exclude_unset=True)
        chat: dict[str, Any] = {**shared, "messages": self._messages(), "include_reasoning": self.include_reasoning,
                                "parallel_tool_calls": self.parallel_tool_calls}
        if self.max_output_tokens is not None:
            chat["max_completion_tokens"] = self.max_output_tokens
        if self.chat_template_kwargs is not None:
            chat["chat_template_kwargs"] = self.chat_template_kwargs
        if self.tools:
            chat["tools"] = [_chat_tool(tool) for tool in self.tools]
        if self.tool_choice is not None:
            chat["tool_choice"] = _chat_tool_choice(self.tool_choice)
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "answer"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        elif fmt.get("type") == "json_object":
            chat["response_format"] = {"type": "json_object"}
        elif fmt.get("type") != "text":
            raise ValueError(f"text: text.format type {fmt.get('type')!r} is not supported (text, json_object, "
                             "json_schema)")
        return ChatCompletionRequest.model_validate(chat)

    def _messages(self) -> list[dict[str, Any]]:
        """The chat turns: one system turn first (the instructions and the input's system and developer messages,
        as vLLM merges them), then the input items; consecutive function calls make one assistant turn, and their
        outputs tool turns."""
        messages: list[dict[str, Any]] = []
        system = [] if self.instructions is None else [self.instructions]
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                if role not in _MESSAGE_ROLES:
                    raise ValueError(f"input: input[{i}] has role {role!r} ({', '.join(_MESSAGE_ROLES)} are known)")
                text = _item_text(item.get("content"), i)
                if role in ("system", "developer"):  # one system turn, first: many templates take no other
                    system.append(text)
                else:
                    messages.append({"role": role, "content": text})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                                 "content": output if isinstance(output, str) else _item_text(output, i)})
            elif kind == "reasoning":
                continue  # an earlier turn's thought: templates drop it from the history anyway
            else:
                raise ValueError(f"input: input item type {kind!r} is not supported (message, function_call, "
                                 "function_call_output, reasoning)")
        return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + messages

    def echoed_fields(self) -> dict[str, Any]:
        """The request's settings as a Response object repeats them."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls,
                "tool_choice": self.tool_choice or ("auto" if self.tools else "none"), "tools": self.tools or [],
                "text": self.text or {"format": {"type": "text"}}, "metadata": self.metadata or {},
                "reasoning": self.reasoning or {"effort": None, "summary": None}, "store": False,
                "previous_response_id": None, "background": False, "truncation": "disabled", "user": self.user}


def _item_text(content: Any, index: int) -> str:
    """An input item's content as text: a string, or its text parts (input_text / output_text) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"input: input[{index}] has a {kind!r} part (only text parts are supported)")
            texts.append(part.get("text", ""))
        return "\n".join(texts)
    raise ValueError(f"input: input[{index}]'s content must be a string or a list of text parts")


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise ValueError(f"tools: tool type {tool.get('type')!r} is not supported (function tools are)")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                             if tool.get(k) is not None}}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise ValueError("tool_choice: tool_choice must be none, auto, required or {\"type\": \"function\", "
                         "\"name\": ...}")
    return {"type": "function", "function": {"name": choice["name"]}}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text else []}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


@dataclass
class _OpenItem:
    kind: str  # "reasoning" | "message" | "function_call"
    item_id: str
    output_index: int
    text: str = ""
    call: dict | None = None


@dataclass
class ResponsesFormat:
    """A chat answer as a Response: whole (`response`), or as the Responses stream's events (`chunks`), from the
    chat format's message and deltas."""

    chat: ChatFormat
    echoed: dict[str, Any]
    tokenizer: Any = None  # counts the thought's tokens (usage's reasoning_tokens)
    output: list[dict] = field(default_factory=list)
    sequence: int = 0
    started: bool = False
    open: _OpenItem | None = None

    done_marker = None  # the Responses stream ends with its last event (no [DONE])

    def sse(self, event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    def _object(self, status: str, output: list[dict], out: RequestOutput | None = None,
                reasoning: str | None = None) -> dict:
        texts = [part["text"] for item in output if item["type"] == "message" for part in item["content"]]
        obj = {"id": self.chat.id, "object": "response", "created_at": self.chat.created, "status": status,
               "model": self.chat.model, "output": output, "output_text": "".join(texts), "error": None,
               "incomplete_details": None, "usage": None, **self.echoed}
        if out is not None:
            u = usage({0: out}, 1)
            obj["usage"] = {
                "input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"],
                "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens_details": {"reasoning_tokens": self._count(reasoning)}}
            if out.finish_reason == "length":
                obj["status"], obj["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        return obj

    def _count(self, text: str | None) -> int:
        """The thought's tokens (its text encoded again: the split falls between tokens)."""
        if not text or self.tokenizer is None:
            return 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def response(self, finals: list[RequestOutput]) -> dict:
        [out] = finals
        message = self.chat.response(finals)["choices"][0]["message"]
        output = []
        if message.get("reasoning"):
            output.append(_reasoning_item(_new_id("rs"), message["reasoning"]))
        if message.get("content"):
            output.append(_message_item(_new_id("msg"), message["content"]))
        output.extend(_call_item(_new_id("fc"), call) for call in message.get("tool_calls") or ())
        return self._object("completed", output, out, message.get("reasoning"))

    # ---- streaming ---------------------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _close(self) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        at = {"item_id": item.item_id, "output_index": item.output_index}
        if item.kind == "message":
            done = _message_item(item.item_id, item.text)
            part = {"type": "output_text", "text": item.text, "annotations": [], "logprobs": []}
            events = [self._event("response.output_text.done", **at, content_index=0, text=item.text, logprobs=[]),
                      self._event("response.content_part.done", **at, content_index=0, part=part)]
        elif item.kind == "reasoning":
            done = _reasoning_item(item.item_id, item.text)
            events = [self._event("response.reasoning_text.done", **at, content_index=0, text=item.text)]
        else:
            done = _call_item(item.item_id, item.call)
            events = [self._event("response.function_call_arguments.done", **at, name=item.call["function"]["name"],
                                  arguments=item.call["function"]["arguments"])]
        self.output.append(done)
        return [*events, self._event("response.output_item.done", output_index=item.output_index, item=done)]

    def _open(self, kind: str, call: dict | None = None) -> list[dict]:
        events = self._close()
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        self.open = _OpenItem(kind, _new_id(prefix), len(self.output), call=call)
        item_id = self.open.item_id
        if kind == "message":
            item = _message_item(item_id, "", "in_progress")
        elif kind == "reasoning":
            item = {**_reasoning_item(item_id, ""), "content": []}
        else:
            item = _call_item(item_id, {**call, "function": {**call["function"], "arguments": ""}}, "in_progress")
        events.append(self._event("response.output_item.added", output_index=self.open.output_index, item=item))
        if kind == "message":
            events.append(self._event("response.content_part.added", item_id=self.open.item_id,
                                      output_index=self.open.output_index, content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        return events

    def _text(self, kind: str, piece: str) -> list[dict]:
        events = [] if self.open is not None and self.open.kind == kind else self._open(kind)
        self.open.text += piece
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        return [*events, self._event(name, item_id=self.open.item_id, output_index=self.open.output_index,
                                     content_index=0, delta=piece, **extra)]

    def _call_delta(self, delta: dict) -> list[dict]:
        events = []
        function = delta.get("function", {})
        if delta.get("id") is not None:  # a new call
            call = {"id": delta["id"], "function": {"name": function.get("name", ""), "arguments": ""}}
            events += self._open("function_call", call)
        piece = function.get("arguments", "")
        if piece and self.open is not None and self.open.kind == "function_call":
            self.open.call["function"]["arguments"] += piece
            events.append(self._event("response.function_call_arguments.delta", item_id=self.open.item_id,
                                      output_index=self.open.output_index, delta=piece))
        return events

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        events = []
        if not self.started:
            self.started = True
            shell = self._object("in_progress", [])
            events += [self._event("response.created", response=shell),
                       self._event("response.in_progress", response=shell)]
        for chunk in self.chat.chunks(index, out):
            delta = chunk["choices"][0]["delta"]
            if delta.get("reasoning_content"):
                events += self._text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                events += self._text("message", delta["content"])
            for call in delta.get("tool_calls") or ():
                events += self._call_delta(call)
        if out.finished:
            events += self._close()
            reasoning = next((item["content"][0]["text"] for item in self.output if item["type"] == "reasoning"), None)
            final = self._object("completed", self.output, out, reasoning)
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            events.append(self._event(kind, response=final))
        return events

    def final_chunks(self) -> list[dict]:
        return []
