"""OpenAI's Responses API (`POST /v1/responses`), as vLLM serves it: a request is turned into the chat request it
stands for (instructions as the system turn, input items as turns, function tools), runs through the chat path,
and its answer comes back as Response output items (reasoning, message, function calls), whole or as the
Responses stream's events. Responses are kept in memory (the last N, unless `store` is false), so a request may
continue one with `previous_response_id`, and `GET` / `DELETE /v1/responses/{id}` find them."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

from pydantic import ConfigDict, StrictBool, StrictInt, StrictStr

from ..request import RequestOutput
from .blocks import CALL, TEXT, THOUGHT, Block, BlockStream
from .formatting import ChatFormat, usage
from .schemas import ChatCompletionRequest, _SamplingFields, joined_text

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

    def input_items(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.input}] if isinstance(self.input, str) else list(self.input)

    def as_chat(self, history: list[dict[str, Any]] | None = None) -> ChatCompletionRequest:
        """The chat request this one stands for, after the conversation `history` (the items of the stored
        response it continues); ValueError "param: message" for what is not supported."""
        if self.background:
            raise ValueError("background: background responses are not supported")
        if self.n != 1:
            raise ValueError("n: the Responses API makes one answer")
        if self.top_logprobs:
            raise ValueError("top_logprobs: logprobs are not supported on /v1/responses (use chat completions)")
        shared = self.model_dump(include=set(_SamplingFields.model_fields), exclude_unset=True)
        chat: dict[str, Any] = {**shared, "messages": self._messages([*(history or []), *self.input_items()]),
                                "include_reasoning": self.include_reasoning,
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

    def _messages(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat turns: one system turn first (the instructions and the items' system and developer messages,
        as vLLM merges them), then the items; consecutive function calls make one assistant turn, and their
        outputs tool turns."""
        messages: list[dict[str, Any]] = []
        system = [] if self.instructions is None else [self.instructions]
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
                                 "content": _item_text(output, i)})
            elif kind == "reasoning":
                continue  # an earlier turn's thought: templates drop it from the history anyway
            else:
                raise ValueError(f"input: input item type {kind!r} is not supported (message, function_call, "
                                 "function_call_output, reasoning)")
        return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + messages

    def echoed_fields(self, stored: bool) -> dict[str, Any]:
        """The request's settings as a Response object repeats them."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls,
                "tool_choice": self.tool_choice or ("auto" if self.tools else "none"), "tools": self.tools or [],
                "text": self.text or {"format": {"type": "text"}}, "metadata": self.metadata or {},
                "reasoning": self.reasoning or {"effort": None, "summary": None}, "store": stored,
                "previous_response_id": self.previous_response_id, "background": False, "truncation": "disabled",
                "user": self.user}


class ResponseStore:
    """The last `capacity` responses made with `store` (OpenAI's default): each one's object (GET
    /v1/responses/{id}) and its conversation (its input after the one it continued, and its output), which a
    request with `previous_response_id` continues. In memory, least recently used out first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, conversation: list[dict]) -> None:
        if self.capacity <= 0:
            return
        self._entries[response["id"]] = (response, conversation)
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None


def _item_text(content: Any, index: int) -> str:
    return joined_text(content, ("input_text", "output_text", "text"), "input", f"input[{index}]")


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


_ID_PREFIX = {THOUGHT: "rs", TEXT: "msg", CALL: "fc"}


def _item(block: Block, item_id: str, status: str = "completed") -> dict:
    """A block as a Response output item."""
    if block.kind == TEXT:
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [
            {"type": "output_text", "text": block.text, "annotations": [], "logprobs": []}] if block.text else []}
    if block.kind == THOUGHT:
        return {"type": "reasoning", "id": item_id, "summary": [],
                "content": [{"type": "reasoning_text", "text": block.text}] if block.text else []}
    return {"type": "function_call", "id": item_id, "call_id": block.call_id, "name": block.name,
            "arguments": block.text, "status": status}


def blocks_of(message: dict) -> list[Block]:
    """A whole chat message's blocks: its thought, its text, its calls."""
    blocks = []
    if message.get("reasoning"):
        blocks.append(Block(THOUGHT, len(blocks), message["reasoning"]))
    if message.get("content"):
        blocks.append(Block(TEXT, len(blocks), message["content"]))
    for call in message.get("tool_calls") or ():
        blocks.append(Block(CALL, len(blocks), call["function"]["arguments"], call["id"], call["function"]["name"]))
    return blocks


class ResponsesFormat(BlockStream):
    """A chat answer as a Response: whole (`response`), or as the Responses stream's events (`chunks`)."""

    done_marker = None  # the Responses stream ends with its last event (no [DONE])

    def __init__(self, chat: ChatFormat, echoed: dict[str, Any], tokenizer: Any = None,
                 on_done: Callable[[dict], None] | None = None):
        super().__init__(chat)
        self.echoed = echoed
        self.tokenizer = tokenizer  # counts the thought's tokens (usage's reasoning_tokens)
        self.on_done = on_done  # given the finished Response (to store it)
        self.sequence = 0
        self.ids: dict[int, str] = {}  # block index -> item id

    def sse(self, event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    def error_event(self, status: int, message: str, type_: str, code: str | None) -> str:
        return self.sse(self._event("error", code=code or type_, message=message, param=None))  # OpenAI's

    def _object(self, status: str, blocks: list[Block], out: RequestOutput | None = None) -> dict:
        output = [_item(b, self.ids.setdefault(b.index, _new_id(_ID_PREFIX[b.kind]))) for b in blocks]
        obj = {"id": self.chat.id, "object": "response", "created_at": self.chat.created, "status": status,
               "model": self.chat.model, "output": output,
               "output_text": "".join(b.text for b in blocks if b.kind == TEXT), "error": None,
               "incomplete_details": None, "usage": None, **self.echoed}
        if out is not None:
            u = usage({0: out}, 1)
            thought = "".join(b.text for b in blocks if b.kind == THOUGHT)
            obj["usage"] = {
                "input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"],
                "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens_details": {"reasoning_tokens": self._count(thought)}}
            if out.finish_reason == "length":
                obj["status"], obj["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        return obj

    def _count(self, text: str) -> int:
        """The thought's tokens (its text encoded again: the split falls between tokens)."""
        if not text or self.tokenizer is None:
            return 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def response(self, finals: list[RequestOutput]) -> dict:
        [out] = finals
        return self._done(self._object("completed", blocks_of(self.chat.response(finals)["choices"][0]["message"]),
                                       out))

    def _done(self, response: dict) -> dict:
        if self.on_done is not None:
            self.on_done(response)
        return response

    # ---- streaming -----------------------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def on_start(self, out: RequestOutput) -> list[dict]:
        shell = self._object("in_progress", [])
        return [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]

    def on_open(self, block: Block) -> list[dict]:
        item_id = self.ids.setdefault(block.index, _new_id(_ID_PREFIX[block.kind]))
        events = [self._event("response.output_item.added", output_index=block.index,
                              item=_item(block, item_id, "in_progress"))]
        if block.kind == TEXT:
            events.append(self._event("response.content_part.added", item_id=item_id, output_index=block.index,
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                             "logprobs": []}))
        return events

    def on_delta(self, block: Block, piece: str) -> list[dict]:
        at = {"item_id": self.ids[block.index], "output_index": block.index}
        if block.kind == TEXT:
            return [self._event("response.output_text.delta", **at, content_index=0, delta=piece, logprobs=[])]
        if block.kind == THOUGHT:
            return [self._event("response.reasoning_text.delta", **at, content_index=0, delta=piece)]
        return [self._event("response.function_call_arguments.delta", **at, delta=piece)]

    def on_close(self, block: Block) -> list[dict]:
        item_id = self.ids[block.index]
        at = {"item_id": item_id, "output_index": block.index}
        if block.kind == TEXT:
            part = {"type": "output_text", "text": block.text, "annotations": [], "logprobs": []}
            events = [self._event("response.output_text.done", **at, content_index=0, text=block.text, logprobs=[]),
                      self._event("response.content_part.done", **at, content_index=0, part=part)]
        elif block.kind == THOUGHT:
            events = [self._event("response.reasoning_text.done", **at, content_index=0, text=block.text)]
        else:
            events = [self._event("response.function_call_arguments.done", **at, name=block.name,
                                  arguments=block.text)]
        return events + [self._event("response.output_item.done", output_index=block.index,
                                     item=_item(block, item_id))]

    def on_finish(self, out: RequestOutput) -> list[dict]:
        final = self._done(self._object("completed", self.blocks, out))
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [self._event(kind, response=final)]
