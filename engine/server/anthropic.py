"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as vLLM serves it: a request
is turned into the chat request it stands for (the system prompt, text / tool_use / tool_result / thinking
blocks, tools with their input schemas, tool_choice auto / any / tool / none), runs through the chat path, and its
answer comes back as a message of content blocks (thinking, text, tool_use) with Anthropic's stop reasons, whole
or as its stream's events."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..request import RequestOutput
from .blocks import CALL, TEXT, THOUGHT, Block, BlockStream
from .formatting import ChatFormat, usage
from .responses import blocks_of
from .schemas import ChatCompletionRequest, Number, anthropic_error_body, joined_text


class MessagesRequest(BaseModel):
    """The Messages API's body (Anthropic names); the chat API's other fields (vLLM's sampling extras, structured
    outputs, `chat_template_kwargs`) are taken as on chat, other fields ignored."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: StrictInt
    system: StrictStr | list[dict[str, Any]] | None = None
    stop_sequences: list[StrictStr] | None = None
    temperature: Number | None = None  # Anthropic's default: 1.0
    top_p: Number | None = None
    top_k: StrictInt | None = None
    stream: StrictBool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # {"type": "enabled", "budget_tokens"}: accepted; the template decides
    metadata: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def as_chat(self) -> ChatCompletionRequest:
        """The chat request this one stands for; ValueError "param: message" for what is not supported."""
        passed = {k: v for k, v in (self.model_extra or {}).items()
                  if k in ChatCompletionRequest.model_fields and k not in _TRANSLATED}
        chat: dict[str, Any] = {**passed, "model": self.model, "messages": self._messages(), "stream": self.stream,
                                "max_completion_tokens": self.max_tokens}
        for name in ("temperature", "top_p", "top_k", "chat_template_kwargs"):
            if getattr(self, name) is not None:
                chat[name] = getattr(self, name)
        if self.stop_sequences:
            chat["stop"] = self.stop_sequences
        if self.tools:
            chat["tools"] = [_chat_tool(tool) for tool in self.tools]
        if self.tool_choice is not None:
            chat.update(_chat_tool_choice(self.tool_choice))
        return ChatCompletionRequest.model_validate(chat)

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": _texts(self.system, "system")})
        for i, message in enumerate(self.messages):
            role, content = message.get("role"), message.get("content")
            if role not in ("user", "assistant"):
                raise ValueError(f"messages: messages[{i}] has role {role!r} (user or assistant)")
            if isinstance(content, str):
                messages.append({"role": role, "content": content})
                continue
            if not isinstance(content, list):
                raise ValueError(f"messages: messages[{i}]'s content must be a string or a list of blocks")
            texts, calls, thought = [], [], None
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                if kind == "text":
                    texts.append(block.get("text", ""))
                elif kind == "tool_use" and role == "assistant":
                    calls.append({"id": block.get("id"), "type": "function", "function": {
                        "name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}})
                elif kind == "tool_result" and role == "user":  # each a tool turn, before the user's text
                    result = block.get("content", "")
                    text = _texts(result, f"messages[{i}]")
                    messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
                elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                    thought = block.get("thinking")
                else:
                    raise ValueError(f"messages: messages[{i}] has a {kind!r} block (text, tool_use, tool_result and "
                                     "thinking blocks are supported)")
            if texts or calls or thought is not None:
                turn: dict[str, Any] = {"role": role, "content": "\n".join(texts) if texts else None}
                if calls:
                    turn["tool_calls"] = calls
                if thought is not None:
                    turn["reasoning"] = thought
                messages.append(turn)
        return messages


# chat fields a Messages body says in its own words (and so may not set directly)
_TRANSLATED = frozenset({"messages", "stop", "tools", "tool_choice", "parallel_tool_calls", "max_tokens",
                         "max_completion_tokens", "n", "logprobs", "top_logprobs"})


def _texts(content: Any, where: str) -> str:
    return joined_text(content, ("text",), "messages", where)


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") not in (None, "custom"):
        raise ValueError(f"tools: tool type {tool.get('type')!r} is not supported (client tools with an input_schema "
                         "are)")
    function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    kind = choice.get("type")
    out: dict[str, Any] = {"parallel_tool_calls": not choice.get("disable_parallel_tool_use", False)}
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise ValueError("tool_choice: tool_choice must be {\"type\": \"auto\" | \"any\" | \"none\"} or "
                         "{\"type\": \"tool\", \"name\": ...}")
    return out


def _input_of(arguments: str) -> dict:
    """A call's arguments as tool_use's input object ({} where the model wrote no object)."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _content_block(block: Block, streamed: bool = False) -> dict:
    """A block as the message's content block (`streamed`: as content_block_start opens it, empty)."""
    if block.kind == THOUGHT:
        return {"type": "thinking", "thinking": "" if streamed else block.text, "signature": ""}
    if block.kind == TEXT:
        return {"type": "text", "text": "" if streamed else block.text}
    return {"type": "tool_use", "id": block.call_id, "name": block.name,
            "input": {} if streamed else _input_of(block.text)}


def _stop(out: RequestOutput, blocks: list[Block]) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence) of a finished answer, in Anthropic's words."""
    if any(b.kind == CALL for b in blocks) and out.finish_reason != "length":
        return "tool_use", None
    if out.finish_reason == "length":
        return "max_tokens", None
    if isinstance(out.stop_reason, str):
        return "stop_sequence", out.stop_reason
    return "end_turn", None


class MessagesFormat(BlockStream):
    """A chat answer as an Anthropic message: whole (`response`) or as the Messages stream's events."""

    done_marker = None

    def __init__(self, chat: ChatFormat):
        super().__init__(chat)
        self.id = f"msg_{uuid.uuid4().hex}"

    def sse(self, event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    def error_event(self, status: int, message: str, type_: str, code: str | None) -> str:
        return self.sse(anthropic_error_body(status, message))  # Anthropic's `error` event

    def _usage(self, out: RequestOutput) -> dict:
        u = usage({0: out}, 1)
        return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                "cache_read_input_tokens": u["prompt_tokens_details"]["cached_tokens"],
                "cache_creation_input_tokens": 0}

    def _message(self, blocks: list[Block], out: RequestOutput, stop: tuple[str | None, str | None]) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.chat.model,
                "content": [_content_block(b) for b in blocks], "stop_reason": stop[0], "stop_sequence": stop[1],
                "usage": self._usage(out)}

    def response(self, finals: list[RequestOutput]) -> dict:
        [out] = finals
        blocks = blocks_of(self.chat.response(finals)["choices"][0]["message"])
        return self._message(blocks, out, _stop(out, blocks))

    def on_start(self, out: RequestOutput) -> list[dict]:
        message = self._message([], out, (None, None))
        message["usage"]["output_tokens"] = 0
        return [{"type": "message_start", "message": message}]

    def on_open(self, block: Block) -> list[dict]:
        return [{"type": "content_block_start", "index": block.index, "content_block": _content_block(block, True)}]

    def on_delta(self, block: Block, piece: str) -> list[dict]:
        delta = {THOUGHT: {"type": "thinking_delta", "thinking": piece}, TEXT: {"type": "text_delta", "text": piece},
                 CALL: {"type": "input_json_delta", "partial_json": piece}}[block.kind]
        return [{"type": "content_block_delta", "index": block.index, "delta": delta}]

    def on_close(self, block: Block) -> list[dict]:
        return [{"type": "content_block_stop", "index": block.index}]

    def on_finish(self, out: RequestOutput) -> list[dict]:
        stop_reason, stop_sequence = _stop(out, self.blocks)
        return [{"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                 "usage": {"output_tokens": len(out.token_ids)}},
                {"type": "message_stop"}]


class CountTokensRequest(MessagesRequest):
    """`/v1/messages/count_tokens`: a Messages body without max_tokens."""

    max_tokens: StrictInt = 1
