"""Request bodies (OpenAI's schema, strictly typed) and the OpenAI-style error body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..tool_calls import TOOL_CALL_PARSERS, ToolChoice, parameters_schema, required_schema, tool_call_parser

MAX_CHOICES = 128  # n x number of prompts in one request
MAX_STOP = 16
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

Number = StrictFloat | StrictInt
TokenIds = list[StrictInt]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: with include_usage, every chunk carries its choice's usage


_STRUCTURED_KEYS = ("choice", "json", "regex", "grammar", "json_object", "disable_any_whitespace")


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names, plus vLLM-style extras)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    temperature: Number | None = 1.0  # OpenAI's default: sampling
    top_p: Number | None = 1.0
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    stop: StrictStr | list[StrictStr] | None = Field(None)
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = 0.0
    frequency_penalty: Number | None = 0.0
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None
    # extensions (as vLLM names them; the openai client sends them through extra_body)
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[StrictStr] | None = None
    # structured outputs (vLLM's names; all but guided_choice need xgrammar): at most one constraint
    guided_choice: list[StrictStr] | None = None
    guided_json: Any = None  # a JSON schema (an object or its JSON text)
    guided_regex: StrictStr | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: dict[str, Any] | None = None  # newer vLLM: {"choice" | "json" | "regex" | "grammar" ...}
    response_format: dict[str, Any] | None = None  # OpenAI's: text, json_object, json_schema
    # vLLM's beam search: n is the beam width, the n best hypotheses the choices (engine/beam_search.py)
    use_beam_search: StrictBool = False
    length_penalty: Number = 1.0  # with use_beam_search: a hypothesis scores sum(logprobs) / length ** this
    early_stopping: StrictBool | Literal["never"] = False  # with use_beam_search: HF's rule
    prompt_logprobs: StrictInt | None = None  # vLLM's: each prompt token's logprob, rank and the top N there
    truncate_prompt_tokens: StrictInt | None = None  # vLLM's: keep the prompt's last k tokens (-1: all that fit)
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    return_token_ids: StrictBool = False
    priority: StrictInt = 0  # vLLM's: with --scheduling-policy priority, lower runs first

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def logit_bias_ids(self) -> dict[int, Any]:
        """logit_bias with its keys (OpenAI sends token ids as strings) as ints; the values are checked by
        SamplingParams. Raises ValueError naming a bad key."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            out[int(key)] = value
        return out

    def structured_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields of the constraint asked for, from vLLM's guided_* fields, vLLM's
        structured_outputs and OpenAI's response_format (checked by `unsupported`; SamplingParams refuses two)."""
        out: dict[str, Any] = {}
        outputs = self.structured_outputs or {}
        if self.guided_choice is not None:
            out["guided_choice"] = tuple(self.guided_choice)
        elif outputs.get("choice") is not None:
            out["guided_choice"] = tuple(outputs["choice"])
        for name in ("json", "regex", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is None:
                value = outputs.get(name)
            if value is not None:
                out[f"guided_{name}"] = value
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_schema":
            out["guided_json"] = self.response_format["json_schema"]["schema"]
        if kind == "json_object" or outputs.get("json_object"):
            out["guided_json_object"] = True
        if outputs.get("disable_any_whitespace"):
            out["disable_any_whitespace"] = True
        return out

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for an OpenAI option this server does not implement, given a non-default value."""
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            return "stop", f"at most {MAX_STOP} stop strings are supported, got {len(self.stop)}"
        if self.use_beam_search and self.stream:
            return "use_beam_search", "use_beam_search does not stream"
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs is not supported with stream (echo with logprobs is)"
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            return "response_format", f"response_format type {kind!r} is not supported (text, json_object, json_schema)"
        outputs = self.structured_outputs or {}
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
                return "response_format", "response_format json_schema needs a json_schema object with a schema"
            if self.guided_json is not None or outputs.get("json") is not None:
                return "response_format", "give response_format's json_schema or guided_json, not both"
        other = sorted(k for k, v in outputs.items() if k not in _STRUCTURED_KEYS and v not in (None, False))
        if other:
            return "structured_outputs", (f"structured_outputs {other[0]!r} is not supported "
                                          f"({', '.join(_STRUCTURED_KEYS)} are)")
        choice = outputs.get("choice")
        if choice is not None and (not isinstance(choice, list) or not all(isinstance(c, str) for c in choice)):
            return "structured_outputs", "structured_outputs choice must be a list of strings"
        for name in ("regex", "grammar"):
            if outputs.get(name) is not None and not isinstance(outputs[name], str):
                return "structured_outputs", f"structured_outputs {name} must be a string"
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(outputs.get(name, False), bool):
                return "structured_outputs", f"structured_outputs {name} must be true or false"
        for name in ("choice", "json", "regex", "grammar"):
            if outputs.get(name) is not None and getattr(self, f"guided_{name}") is not None:
                return f"guided_{name}", f"give guided_{name} or structured_outputs' {name}, not both"
        return None


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    logprobs: StrictInt | None = None  # top-N
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of inputs (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]  # an empty list: rejected by the engine as an empty input
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of not in (None, self.n):
            return "best_of", "best_of other than n is not supported"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr | dict[str, Any]  # JSON text (OpenAI's); an object is taken too


class ToolCallMessagePart(BaseModel):
    """A call an earlier assistant turn made (OpenAI's `tool_calls` entry), for the template to render."""

    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallMessagePart] | None = None  # an assistant turn's calls
    tool_call_id: StrictStr | None = None  # a tool turn's answer to that call
    reasoning: StrictStr | None = None  # an assistant turn's thought (vLLM's name; reasoning_content: the older one)
    reasoning_content: StrictStr | None = None

    def text(self) -> str:
        """The content as text: text parts joined by newlines, as vLLM joins them for a template that reads text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message for the chat template (the tokenizer decodes tool-call arguments to objects, as vLLM does)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        thought = self.reasoning if self.reasoning is not None else self.reasoning_content
        if thought is not None:  # templates read one name or another (Qwen3's: reasoning_content; gpt-oss's:
            message["reasoning"] = message["reasoning_content"] = message["thinking"] = thought  # thinking)
        return message


def joined_text(content: Any, text_types: tuple[str, ...], param: str, where: str) -> str:
    """Content as text: a string, or a list of text parts (of `text_types`) joined by newlines, as chat's text parts
    are; ValueError "param: message" naming anything else (the Responses and Messages APIs' content)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{param}: {where}'s content must be a string or a list of text parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in text_types:
            raise ValueError(f"{param}: {where} has a {kind!r} part (only text parts are supported)")
        texts.append(part.get("text", ""))
    return "\n".join(texts)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")  # OpenAI's rule
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: StrictBool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


# apply_chat_template's own parameters: chat_template_kwargs may not set them
_TEMPLATE_CALL_PARAMS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class _ChatTemplateFields(BaseModel):
    """vLLM's chat template options (chat completions and /tokenize with messages)."""

    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False  # the last (assistant) message is continued, not closed
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the template (e.g. enable_thinking)
    chat_template: Any = None  # refused: the checkpoint's template is used
    tools: list[ToolDefinition] | None = None  # OpenAI's: rendered by the template (its `tools` variable)

    def template_problem(self) -> tuple[str, str] | None:
        """(param, message) for chat template options that cannot be honoured."""
        if self.chat_template is not None:
            return "chat_template", "a per-request chat_template is not supported: the checkpoint's template is used"
        if self.continue_final_message and self.add_generation_prompt:
            return "continue_final_message", ("continue_final_message and add_generation_prompt cannot both be "
                                              "true (set add_generation_prompt to false)")
        reserved = sorted(set(self.chat_template_kwargs or ()) & _TEMPLATE_CALL_PARAMS)
        if reserved:
            return "chat_template_kwargs", f"chat_template_kwargs may not set {reserved[0]!r}"
        return None

    def template_options(self) -> dict[str, Any]:
        """apply_chat_template's keyword arguments for these options."""
        options = {**(self.chat_template_kwargs or {}), "add_generation_prompt": self.add_generation_prompt,
                   "continue_final_message": self.continue_final_message}
        if self.tools:  # rendered whatever the tool_choice, "none" too (vLLM's default)
            options["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
        return options


class ChatCompletionRequest(_SamplingFields, _ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # None: as many as fit
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # with tools: "auto"
    parallel_tool_calls: StrictBool = True
    include_reasoning: StrictBool = True  # vLLM's: with a reasoning parser, false leaves the thought out

    def constrained(self) -> bool:
        """Whether the output is held to a constraint (a guided_* field, response_format, a named or required
        tool_choice): it holds on the answer after a thought (where the engine gates thoughts),
        else on all of it."""
        return bool(set(self.structured_kwargs()) - {"disable_any_whitespace"})

    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    def tool_mode(self, parser_name: str | None) -> ToolChoice | None:
        """How the answer is read (None: as plain content); `parser_name`: the server's tool-call parser, which
        tool_choice="auto" needs. Raises ValueError naming what is wrong (after `unsupported` has passed)."""
        choice = self.effective_tool_choice()
        if choice == "none":
            return None
        parser = None if parser_name is None else tool_call_parser(parser_name)
        short_ids = parser is not None and parser.short_ids
        if isinstance(choice, NamedToolChoice):
            return ToolChoice("named", name=choice.function.name, parallel=False, short_ids=short_ids)
        if choice == "required":
            return ToolChoice("required", parallel=self.parallel_tool_calls, short_ids=short_ids)
        if parser is None:
            raise ValueError(f'tool_choice "auto" needs the server started with --tool-call-parser '
                             f'({", ".join(TOOL_CALL_PARSERS)}); name a function or use "required" or "none" instead')
        functions = tuple(tool.function.model_dump(exclude_none=True) for tool in self.tools or ())
        return ToolChoice("auto", parser=parser, parallel=self.parallel_tool_calls, short_ids=short_ids,
                          functions=functions)

    def decoded_for(self, tools: ToolChoice | None, reasoning: Any = None) -> ChatCompletionRequest:
        """The request as its answer must be decoded for `tools`' parser and the `reasoning` parser: with special
        tokens where their markers are special tokens (Mistral's), unless the request says otherwise (vLLM's
        adjustment)."""
        keeps = (tools is not None and tools.parser is not None and tools.parser.keeps_special_tokens) or (
            reasoning is not None and reasoning.keeps_special_tokens)
        if not keeps or "skip_special_tokens" in self.model_fields_set:
            return self
        return self.model_copy(update={"skip_special_tokens": False})

    def structured_kwargs(self) -> dict[str, Any]:
        out = super().structured_kwargs()
        choice = self.effective_tool_choice()
        functions = {tool.function.name: tool.function for tool in self.tools or ()}
        if isinstance(choice, NamedToolChoice):
            out["guided_json"] = parameters_schema(functions[choice.function.name].model_dump(exclude_none=True))
        elif choice == "required":
            out["guided_json"] = required_schema([f.model_dump(exclude_none=True) for f in functions.values()],
                                                 self.parallel_tool_calls)
        return out

    def unsupported(self) -> tuple[str, str] | None:
        choice = self.effective_tool_choice()
        if choice != "none" and not self.tools:
            return "tool_choice", "tool_choice needs tools"
        if self.tools:
            names = [tool.function.name for tool in self.tools]
            if len(set(names)) < len(names):
                return "tools", "tools must have distinct function names"
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            return "tool_choice", f"tool_choice names function {choice.function.name!r}, which is not in tools"
        other_constraints = set(super().structured_kwargs()) - {"disable_any_whitespace"}
        if (isinstance(choice, NamedToolChoice) or choice == "required") and other_constraints:
            return "tool_choice", ("a named or required tool_choice constrains the output to the tools' schemas: "
                                   "give no other structured output constraint (guided_*, response_format)")
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        return self.template_problem() or super().unsupported()


class TokenizeRequest(_ChatTemplateFields):
    """vLLM's POST /tokenize: a completion prompt (text) or chat messages, tokenized as generation would."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr = "base"
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True  # text prompts only (a chat template places its own)
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr = "base"
    tokens: list[StrictInt]


class TextPromptUpload(BaseModel):
    """JSON body of POST /v1/prompts: a text prompt, token ids, or base64-encoded adapter / tensor files."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    text: StrictStr | None = None
    token_ids: list[StrictInt] | None = None
    files: dict[StrictStr, StrictStr] | None = None  # file name -> base64 content
    task_id: StrictInt | None = None  # the task of an uploaded multitask prompt-tuning adapter


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Anthropic's error types by HTTP status (its Messages API's errors; 529's overloaded_error is our 503's)
_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                          503: "overloaded_error"}


def anthropic_error_body(status: int, message: str, param: str | None = None) -> dict:
    """An error as Anthropic's Messages API sends it (`param` kept beside, where there is one)."""
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    error = {"type": kind, "message": message}
    if param is not None:
        error["param"] = param
    return {"type": "error", "error": error}


def is_anthropic_path(path: str) -> bool:
    """Whether a route is one of Anthropic's Messages API (its errors take Anthropic's shape)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")
