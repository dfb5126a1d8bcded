"""OpenAI tool calling, as vLLM serves it: the tools go to the chat template, and the model's answer is read back
as tool calls.

- A named `tool_choice` constrains the output to that function's parameters schema (structured outputs): the
  whole output is the call's arguments.
- `tool_choice="required"` constrains it to a JSON array of `{"name", "parameters"}` objects, one of the tools
  each (vLLM's schema); the array is the calls.
- `tool_choice="auto"` lets the model choose, and a parser for its family's tool-call format finds the calls in
  the text: `hermes` (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`: Qwen 2.5 / 3, Hermes, many
  others), `llama3_json` (Llama 3.1+: the answer is `{"name": ..., "parameters": ...}` objects, `; `-separated),
  `mistral` (`[TOOL_CALLS]` and a JSON array of calls), `pythonic` (Llama 3.2 / 4: `[f(a=1), g()]`) or
  `qwen3_coder` (`<tool_call><function=f><parameter=a>1</parameter></function></tool_call>`) or `seed_oss`
  (the same inside `<seed:tool_call>`) or `openai` (gpt-oss's harmony messages to `functions.NAME`, kept in the
  answer by the `openai_gptoss` reasoning parser).

A streamed answer sends content while it can be sure it is content, and the calls once they are complete.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import harmony
from .stopping import partial_marker_length


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ParsedAnswer:
    content: str | None  # the text besides the calls (None: there is none)
    calls: list[ToolCall]


def _arguments_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _call_from(obj: Any, *argument_keys: str) -> ToolCall | None:
    """A call from a decoded `{"name": ..., "<arguments key>": {...}}` object, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in argument_keys:
        if key in obj:
            return ToolCall(obj["name"], _arguments_text(obj[key]))
    return ToolCall(obj["name"], "{}")


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after optional content (vLLM's `hermes`);
    an unclosed last block (the answer hit max_tokens) is read if its JSON is complete."""

    name = "hermes"
    keeps_special_tokens = short_ids = False
    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str, functions: Sequence[dict] = ()) -> ParsedAnswer:
        first = text.find(self.start)
        if first < 0:
            return ParsedAnswer(text, [])
        calls, at = [], first
        while at >= 0:
            body_start = at + len(self.start)
            close = text.find(self.end, body_start)
            body = text[body_start:] if close < 0 else text[body_start:close]
            try:
                call = _call_from(json.loads(body), "arguments", "parameters")
            except ValueError:
                call = None
            if call is None:
                return ParsedAnswer(text, [])  # not what a tool call looks like: it is all content
            calls.append(call)
            at = -1 if close < 0 else text.find(self.start, close + len(self.end))
        return ParsedAnswer(text[:first] or None, calls)

    def content_end(self, text: str) -> int:
        """How much of a growing answer is surely content (nothing after it can turn it into a call)."""
        first = text.find(self.start)
        return first if first >= 0 else len(text) - partial_marker_length(text, (self.start,))


class Llama3JsonParser:
    """Llama 3.1+'s JSON tool calls (vLLM's `llama3_json`): an answer that is `{"name": ..., "parameters": ...}`
    objects (`arguments` too), `; `-separated, after an optional `<|python_tag|>`; any other answer is content."""

    name = "llama3_json"
    keeps_special_tokens = short_ids = False
    python_tag = "<|python_tag|>"

    def parse(self, text: str, functions: Sequence[dict] = ()) -> ParsedAnswer:
        body = text.lstrip()
        if body.startswith(self.python_tag):
            body = body[len(self.python_tag):].lstrip()
        if not body.startswith("{"):
            return ParsedAnswer(text, [])
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                obj, at = decoder.raw_decode(body, at)
            except ValueError:
                return ParsedAnswer(text, [])
            call = _call_from(obj, "parameters", "arguments")
            if call is None:
                return ParsedAnswer(text, [])
            calls.append(call)
            rest = body[at:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return ParsedAnswer(text, [])  # text after a call: not a tool-call answer
            at = len(body) - len(rest)
        return ParsedAnswer(None, calls)

    def content_end(self, text: str) -> int:
        return _whole_answer_content_end(text, "{", self.python_tag)


class MistralParser:
    """Mistral's tool calls (vLLM's `mistral`): content, then `[TOOL_CALLS]` and a JSON array of `{"name",
    "arguments"}` objects (v3 tokenizers), or `[TOOL_CALLS]name[ARGS]{...}` per call (v11+). Both markers are
    special tokens, so answers are decoded with them (`skip_special_tokens` false unless the request says
    otherwise); an answer that is only the array is read too. Call ids are 9 letters and digits: Mistral's
    templates refuse others when the calls come back in the conversation."""

    name = "mistral"
    marker, args_marker = "[TOOL_CALLS]", "[ARGS]"
    keeps_special_tokens = True
    short_ids = True

    def parse(self, text: str, functions: Sequence[dict] = ()) -> ParsedAnswer:
        at = text.find(self.marker)
        if at < 0:
            calls = _array_of_calls(text, "arguments", "parameters") if text.lstrip().startswith("[") else None
            return ParsedAnswer(None, calls) if calls else ParsedAnswer(text, [])
        rest = text[at + len(self.marker):]
        if rest.lstrip().startswith("["):
            calls = _array_of_calls(rest, "arguments", "parameters")
        else:
            calls = [self._named_call(part) for part in rest.split(self.marker)]
            calls = None if any(c is None for c in calls) else calls
        return ParsedAnswer(text[:at] or None, calls) if calls else ParsedAnswer(text, [])

    def _named_call(self, part: str) -> ToolCall | None:
        name, sep, arguments = part.partition(self.args_marker)
        if not sep or not name.strip():
            return None
        try:
            return ToolCall(name.strip(), _arguments_text(json.loads(arguments)))
        except ValueError:
            return None

    def content_end(self, text: str) -> int:
        at = text.find(self.marker)
        if at >= 0:
            return at
        if not text.strip() or text.lstrip().startswith("["):
            return 0  # may be an array of calls whose marker was left out
        return len(text) - partial_marker_length(text, (self.marker,))


class PythonicParser:
    """Python-call tool calls (vLLM's `pythonic`: Llama 3.2, Llama 4, ToolACE and others): an answer that is a
    list of calls with keyword arguments, `[get_weather(city="Oslo", days=2), now()]`, optionally between Llama 4's
    `<|python_start|>` and `<|python_end|>`; any other answer is content. It is read with Python's parser and each
    argument as a literal (`ast.literal_eval`: numbers, strings, True/False/None, lists, dicts): nothing is run."""

    name = "pythonic"
    keeps_special_tokens = short_ids = False
    start, end = "<|python_start|>", "<|python_end|>"

    def parse(self, text: str, functions: Sequence[dict] = ()) -> ParsedAnswer:
        body = text.strip()
        if body.startswith(self.start):
            body = body[len(self.start):].removesuffix(self.end).strip()
        if not (body.startswith("[") and body.endswith("]")):
            return ParsedAnswer(text, [])
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return ParsedAnswer(text, [])
            calls = [self._call(node) for node in tree.elts]
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return ParsedAnswer(text, [])
        return ParsedAnswer(None, calls)

    @staticmethod
    def _call(node: ast.expr) -> ToolCall:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            raise ValueError("not a call with keyword arguments")
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None:  # **kwargs
                raise ValueError("not a keyword argument")
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        return ToolCall(node.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False))

    def content_end(self, text: str) -> int:
        return _whole_answer_content_end(text, "[", self.start)


class Qwen3CoderParser:
    """Qwen3-Coder's XML tool calls (vLLM's `qwen3_coder`): content, then `<tool_call>` blocks of
    `<function=NAME>` with `<parameter=KEY>` value `</parameter>` pairs (the wrapper may be left out). Values are
    text, turned into the type the function's parameters schema gives the key (integer, number, boolean, object,
    array, null; a string or an unknown key stays text), as vLLM turns them; a block that is not a function is
    content."""

    name = "qwen3_coder"
    keeps_special_tokens = short_ids = False
    start, function = "<tool_call>", "<function="
    _function = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
    _parameter = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)",
                            re.DOTALL)

    def parse(self, text: str, functions: Sequence[dict] = ()) -> ParsedAnswer:
        first = self._first_marker(text)
        if first < 0:
            return ParsedAnswer(text, [])
        schemas = {f.get("name"): parameters_schema(f).get("properties") or {} for f in functions}
        blocks = list(self._function.finditer(text, first))
        if not blocks:
            return ParsedAnswer(text, [])
        calls = []
        for block in blocks:
            name, body = block.group(1).strip(), block.group(2)
            properties = schemas.get(name, {})
            arguments = {key.strip(): _typed(value, properties.get(key.strip()))
                         for key, value in (m.groups() for m in self._parameter.finditer(body))}
            calls.append(ToolCall(name, json.dumps(arguments, ensure_ascii=False)))
        return ParsedAnswer(text[:first] or None, calls)

    def _first_marker(self, text: str) -> int:
        found = [at for at in (text.find(self.start), text.find(self.function)) if at >= 0]
        return min(found) if found else -1

    def content_end(self, text: str) -> int:
        first = self._first_marker(text)
        return first if first >= 0 else len(text) - partial_marker_length(text, (self.start, self.function))


class SeedOssParser(Qwen3CoderParser):
    """Seed-OSS's tool calls (vLLM's `seed_oss`): qwen3_coder's blocks inside `<seed:tool_call>`."""

    name = "seed_oss"
    start = "<seed:tool_call>"


class HarmonyParser:
    """gpt-oss's tool calls (vLLM's `openai`): harmony messages addressed to `functions.NAME` (on the commentary
    channel, `<|constrain|>json`), each body the call's arguments, after optional content. It reads the answer the
    `openai_gptoss` reasoning parser gives (its thought taken out, tool-call messages kept whole), which the server
    requires beside it."""

    name = "openai"
    keeps_special_tokens = True
    short_ids = False

    def parse(self, text: str, functions: Sequence[dict] = ()) -> ParsedAnswer:
        first = text.find(harmony.START)
        if first < 0:
            return ParsedAnswer(text, [])
        content, calls = [text[:first]], []
        for m in harmony.read_messages(text[first:]):
            if m.recipient is not None:
                calls.append(ToolCall(m.recipient.removeprefix("functions."), m.body.strip() or "{}"))
            else:
                content.append(m.body)
        return ParsedAnswer("".join(content) or None, calls)

    def content_end(self, text: str) -> int:
        first = text.find(harmony.START)
        return first if first >= 0 else len(text) - partial_marker_length(text, (harmony.START,))


def _typed(value: str, schema: dict | None) -> Any:
    """A qwen3_coder parameter's text as its schema's type (vLLM's conversion)."""
    value = value.removeprefix("\n").removesuffix("\n")
    if value.strip().lower() == "null":
        return None
    kind = (schema or {}).get("type", "string")
    kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
    text = value.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            number = float(text)
            return int(number) if number.is_integer() and re.fullmatch(r"-?\d+", text) else number
    except ValueError:
        return value
    if kind == "boolean":
        return {"true": True, "false": False}.get(text.lower(), value)
    if kind in ("object", "array"):
        try:
            return json.loads(text)
        except ValueError:
            return value
    return value


def _whole_answer_content_end(text: str, opener: str, tag: str) -> int:
    """content_end of a format whose calls are the whole answer (llama3_json's objects, pythonic's list): nothing
    while the answer may be (or is) calls, starting with `opener` or an optional `tag`; else all of it."""
    body = text.lstrip()
    if not body or body.startswith(opener) or tag.startswith(body[:len(tag)]):
        return 0
    return len(text)


def _array_of_calls(text: str, *argument_keys: str) -> list[ToolCall] | None:
    """The calls of a JSON array of `{"name", <arguments>}` objects that is the whole of `text` (but for
    whitespace), or None where it is not one (cut off, another value, an item without a name)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = [_call_from(item, *argument_keys) for item in items]
    return None if any(c is None for c in calls) else calls


def short_call_id() -> str:
    """A call id of 9 letters and digits (what Mistral's templates accept)."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


TOOL_CALL_PARSERS = {p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser(), PythonicParser(),
                                          Qwen3CoderParser(), SeedOssParser(), HarmonyParser())}


def tool_call_parser(name: str):
    try:
        return TOOL_CALL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r} (known: {', '.join(sorted(TOOL_CALL_PARSERS))})") from None


def parameters_schema(function: dict) -> dict:
    """A function's parameters schema (a function without one takes an empty object)."""
    return function.get("parameters") or {"type": "object", "properties": {}}


def required_schema(functions: list[dict], parallel: bool = True) -> dict:
    """vLLM's schema for tool_choice="required": a non-empty array of calls, each one of the functions by name with
    its parameters (the functions' `$defs` merged at the top, where the array's items can refer to them)."""
    options, defs = [], {}
    for function in functions:
        params = dict(parameters_schema(function))
        defs.update(params.pop("$defs", {}))
        options.append({"properties": {"name": {"type": "string", "enum": [function["name"]]},
                                       "parameters": params},
                        "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def calls_from_required(text: str) -> list[ToolCall] | None:
    """The calls of a tool_choice="required" answer, or None where it is not a complete array of them (cut off)."""
    return _array_of_calls(text, "parameters")


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates read them: an assistant turn's tool-call arguments as objects, not JSON
    text (what HF's templates and vLLM pass), where they decode."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(message)
    return out


def _with_object_arguments(call: dict) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


@dataclass(frozen=True)
class ToolChoice:
    """How a chat request's answer is read: "named" (the output is `name`'s arguments), "required" (a JSON array of
    calls) or "auto" (a parser finds calls in the text). `parallel`: more than one call may be made."""

    kind: str
    name: str | None = None
    parser: HermesParser | Llama3JsonParser | MistralParser | PythonicParser | Qwen3CoderParser | HarmonyParser \
        | None = None
    parallel: bool = True
    short_ids: bool = False  # 9-character call ids (the server's parser is mistral)
    functions: tuple[dict, ...] = ()  # the tools' function definitions (qwen3_coder types its values by them)

    def with_ids(self, calls: list[ToolCall]) -> list[ToolCall]:
        """The calls with the ids this choice gives (9-character ones for Mistral)."""
        return [replace(c, id=short_call_id()) for c in calls] if self.short_ids else calls

    def answer(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall], str | None]:
        content, calls, reason = self._answer(text, finish_reason)
        return content, self.with_ids(calls), reason

    def _answer(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall], str | None]:
        """(content, calls, finish_reason) of a whole answer; finish_reason becomes "tool_calls" where the model
        chose to call (OpenAI's: a forced named call ends with "stop", as it does there)."""
        if self.kind == "named":
            return None, [ToolCall(self.name, text)], finish_reason
        if self.kind == "required":
            calls = calls_from_required(text)
            if calls is None:  # cut off before the array closed: what there is, as content
                return text, [], finish_reason
            return None, calls, "tool_calls" if finish_reason == "stop" else finish_reason
        parsed = self.parser.parse(text, self.functions)
        if not parsed.calls:
            return text, [], finish_reason
        calls = parsed.calls if self.parallel else parsed.calls[:1]
        return parsed.content, calls, "tool_calls"

    def stream(self) -> ToolStream:
        return ToolStream(self)


@dataclass
class ToolStream:
    """One streamed choice's answer: feed it the answer's text so far; it says what to send now."""

    choice: ToolChoice
    content_sent: int = 0
    named_call: ToolCall | None = None
    done: bool = False

    def feed(self, text: str, finished: bool, finish_reason: str | None) -> tuple[str, list[dict], str | None]:
        """(content to send, tool-call deltas to send, finish_reason to send) for the answer's text so far."""
        if self.done:
            return "", [], finish_reason
        kind = self.choice.kind
        if kind == "named":  # the arguments stream as they come (OpenAI's and vLLM's deltas)
            piece, self.content_sent = text[self.content_sent:], len(text)
            if self.named_call is None:
                if not piece and not finished:
                    return "", [], None
                self.named_call = self.choice.with_ids([ToolCall(self.choice.name, "")])[0]
                delta = {"index": 0, **self.named_call.as_openai(), "function": {"name": self.choice.name,
                                                                                  "arguments": piece}}
                return "", [delta], finish_reason
            return "", ([{"index": 0, "function": {"arguments": piece}}] if piece else []), finish_reason
        if not finished:
            if kind == "required":
                return "", [], None
            end = self.choice.parser.content_end(text)
            piece = text[self.content_sent:end] if end > self.content_sent else ""
            self.content_sent = max(self.content_sent, end)
            return piece, [], None
        self.done = True
        content, calls, reason = self.choice.answer(text, finish_reason)
        rest = (content or "")[self.content_sent:]
        return rest, [call.as_openai(i) for i, call in enumerate(calls)], reason
