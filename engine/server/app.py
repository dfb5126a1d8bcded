"""The FastAPI app: OpenAI-compatible completions and chat, the prompt registry, health and metrics."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import __version__
from ..api import Engine
from ..beam_search import BeamSearchParams, conflicting_sampling_field
from ..errors import PromptError, RequestError, SamplingParamsError, SoftPromptError, UnknownPromptError
from ..reasoning import reasoning_parser
from ..request import Request as EngineRequest
from ..request import RequestOutput
from ..sampling import SamplingParams
from ..tokenizer import require_tokenizer
from ..tool_calls import tool_call_parser
from .anthropic import CountTokensRequest, MessagesFormat, MessagesRequest
from .auth import APIKeyGuard, presented_key, token_matches
from .engine_loop import EngineFailure, EngineLoop, RequestStream, ServerStopping, compile_constraints
from .formatting import ChatFormat, CompletionFormat, TokenStrings, _Format
from .metrics import METHODS, ServerMetrics, endpoint_label
from .registry import BASE_MODEL, PromptRegistry, PromptVersion, check_public_name
from .responses import ResponsesFormat, ResponsesRequest, ResponseStore
from .schemas import (
    MAX_CHOICES,
    SEED_MAX,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TextPromptUpload,
    TokenizeRequest,
    _SamplingFields,
    anthropic_error_body,
    error_body,
    is_anthropic_path,
)

log = logging.getLogger("softprompt.server")


@dataclass
class ServerConfig:
    max_queue: int = 256  # requests waiting beyond the engine's max_num_seqs running ones; more get 429
    admin_token: str | None = None  # bearer token for /v1/prompts (None: open, or the api_key where one is set)
    api_key: str | None = None  # bearer token every /v1 request needs (vLLM's --api-key; the admin token works too)
    max_body_bytes: int = 8 << 20  # request bodies (413 beyond)
    max_upload_bytes: int = 256 << 20  # POST /v1/prompts bodies (adapter files)
    retry_after_s: int = 1
    disconnect_poll_s: float = 0.25  # how often a waiting handler checks whether its client is still there
    # "auto": a request that leaves out temperature, top_p, top_k, min_p or repetition_penalty gets the value the
    # checkpoint's generation_config.json recommends (vLLM's --generation-config auto); "none": OpenAI's defaults
    generation_config: str = "auto"
    # the format tool_choice="auto" answers are parsed in (vLLM's --tool-call-parser): hermes, llama3_json, mistral;
    # None: "auto" is refused (named and "required" tool choices work without one)
    tool_call_parser: str | None = None
    # how a thinking model's thought is told from its answer (vLLM's --reasoning-parser): deepseek_r1, qwen3; None:
    # the whole answer is content
    reasoning_parser: str | None = None
    stored_responses: int = 1024  # Responses API responses kept (previous_response_id, GET /v1/responses/{id})


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self, path: str = "") -> JSONResponse:
        """The error's response; on an Anthropic route (`path`), in Anthropic's shape."""
        body = (anthropic_error_body(self.status, self.message, self.param) if is_anthropic_path(path)
                else error_body(self.message, self.type, self.param, self.code))
        return JSONResponse(body, self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Engine errors as HTTP errors: unknown prompt 404, other bad input 400, engine trouble 5xx."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, StarletteHTTPException):  # e.g. 413 from the framework's body size limit
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers)
    if isinstance(exc, UnknownPromptError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), code="invalid_sampling_params")
    if isinstance(exc, PromptError):
        return APIError(400, str(exc), code="invalid_prompt")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_request")
    if isinstance(exc, ServerStopping):
        return APIError(503, str(exc), type_="server_error", code="unavailable")
    if isinstance(exc, EngineFailure):
        return APIError(500, str(exc), type_="server_error", code="engine_failure")
    return APIError(500, f"internal error: {type(exc).__name__}", type_="server_error")


class Admission:
    """The bounded queue: at most `limit` engine requests in the server at once (event-loop thread only)."""

    def __init__(self, limit: int, metrics: ServerMetrics):
        self.limit = limit
        self.in_flight = 0
        self._metrics = metrics

    def acquire(self, n: int, retry_after_s: int) -> None:
        if n > self.limit:
            raise APIError(400, f"this request makes {n} generations but the server runs at most {self.limit} "
                           "at once: lower n or send fewer prompts", param="n")
        if self.in_flight + n > self.limit:
            self._metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is at capacity ({self.in_flight} of {self.limit} requests in flight): "
                           "retry later", type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry_after_s)})
        self.in_flight += n
        self._metrics.in_flight.set(self.in_flight)

    def release(self, n: int) -> None:
        self.in_flight -= n
        self._metrics.in_flight.set(self.in_flight)


class _Cleanup:
    """Abort what is still running and give back the admission slots; safe to call more than once."""

    def __init__(self, loop: EngineLoop, stream: RequestStream, admission: Admission):
        self._loop, self._stream, self._admission = loop, stream, admission
        self._done = False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._loop.abort(sorted(self._stream.unfinished))
            self._admission.release(len(self._stream.requests))


class _HTTPMetrics:
    """Pure ASGI middleware (streaming and disconnects pass through untouched): counts responses by code."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.http_requests.labels(endpoint_label(scope["path"]), method, str(status["code"])).inc()


def _sampling(body: _SamplingFields, index: int, max_new_tokens: int, logprobs: int | None,
              prompt_logprobs: int | None = None, defaults: dict | None = None) -> SamplingParams:
    """The engine's sampling parameters for choice `index` (seed + index); its validation errors become 400s.
    `defaults`: values for the fields the request leaves out (the checkpoint's generation config)."""
    left_out = {k: v for k, v in (defaults or {}).items()
                if k in type(body).model_fields and (k not in body.model_fields_set or getattr(body, k) is None)}
    if left_out:
        body = body.model_copy(update=left_out)
    seed = None if body.seed is None else body.seed + index
    if seed is not None and seed > SEED_MAX:
        raise APIError(400, f"seed + n - 1 must be at most {SEED_MAX}", param="seed")
    try:
        logit_bias = body.logit_bias_ids()
    except ValueError as exc:
        raise APIError(400, str(exc), param="logit_bias") from exc
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            top_k=0 if body.top_k is None else body.top_k,
            seed=seed, stop=body.stop_list(), stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos, logprobs=logprobs,
            presence_penalty=0.0 if body.presence_penalty is None else body.presence_penalty,
            frequency_penalty=0.0 if body.frequency_penalty is None else body.frequency_penalty,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            min_p=0.0 if body.min_p is None else body.min_p,
            min_tokens=body.min_tokens or 0,
            logit_bias=logit_bias, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output, skip_special_tokens=body.skip_special_tokens,
            allowed_token_ids=body.allowed_token_ids, **body.structured_kwargs(),
            bad_words=tuple(body.bad_words or ()), truncate_prompt_tokens=body.truncate_prompt_tokens,
        )
    except ValueError as exc:
        raise to_api_error(exc) from exc


# sampling fields a use_beam_search request may set, to no effect (the chat API's temperature defaults to 1.0)
_IGNORED_BY_BEAM_SEARCH = ("temperature", "top_p", "top_k", "min_p", "seed")


def _beam_params(body: _SamplingFields, max_new_tokens: int) -> BeamSearchParams:
    """The BeamSearchParams of a use_beam_search request (400 naming a field that does not go with it). The
    search runs over the model's raw distribution: temperature, top_p, top_k, min_p and seed do not apply."""
    for name, value in (("echo", getattr(body, "echo", False)), ("logprobs", getattr(body, "logprobs", None)),
                        ("prompt_logprobs", body.prompt_logprobs)):
        if value not in (None, False):
            raise APIError(400, f"use_beam_search does not go with {name}", param=name, code="unsupported")
    conflict = conflicting_sampling_field(_sampling(body, 0, max_new_tokens, None), _IGNORED_BY_BEAM_SEARCH)
    if conflict is not None:
        raise APIError(400, f"use_beam_search does not go with {conflict}", param=conflict, code="unsupported")
    try:
        return BeamSearchParams(body.n, max_new_tokens=max_new_tokens, length_penalty=float(body.length_penalty),
                                early_stopping=body.early_stopping, ignore_eos=body.ignore_eos,
                                skip_special_tokens=body.skip_special_tokens)
    except SamplingParamsError as exc:
        raise to_api_error(exc) from exc


def _as_chat(make: Callable[[], ChatCompletionRequest]) -> ChatCompletionRequest:
    """The chat request a Messages or Responses request stands for (`make` makes it; 400 / 422 naming what is
    wrong)."""
    try:
        return make()
    except ValidationError as exc:  # the chat request it makes is not valid (e.g. a tool's name): 422
        raise _schema_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
    except ValueError as exc:
        param, _, message = str(exc).partition(": ")
        raise APIError(400, message or param, param=param if message else None, code="unsupported") from exc


def _render_chat(engine: Engine, messages: list[dict], options: dict[str, Any]) -> list[int]:
    """Runs on the loop thread (the tokenizer is the engine's). `options`: apply_chat_template's keyword arguments
    (add_generation_prompt, continue_final_message, the template's own variables)."""
    return engine.tokenizer.render_chat(messages, options)


def _has_chat_template(engine: Engine) -> bool:
    return engine.tokenizer is not None and engine.tokenizer.has_chat_template


def _gate_thoughts(engine: Engine, parser: str) -> bool:
    """Have the engine hold constraints on the answer after a thought (Engine.set_reasoning_parser), where the
    tokenizer allows; whether it does."""
    try:
        engine.set_reasoning_parser(parser)
    except SoftPromptError as exc:
        log.warning("%s: structured outputs constrain the whole answer, thought and all, and a constrained answer "
                    "is all content", exc)
        return False
    return True


def create_app(engine: Engine, registry: PromptRegistry | None = None, config: ServerConfig | None = None) -> FastAPI:
    """The server for one engine. The engine loop starts with the app (lifespan) and stops with it; from then
    on every engine call goes through it: do not use `engine` directly while the app runs."""
    config = config or ServerConfig()
    if config.generation_config not in ("auto", "none"):
        raise ValueError(f"generation_config must be 'auto' or 'none', got {config.generation_config!r}")
    if config.tool_call_parser is not None:
        tool_call_parser(config.tool_call_parser)  # a ValueError naming the known ones
    if config.tool_call_parser == "openai" and config.reasoning_parser != "openai_gptoss":
        raise ValueError("tool_call_parser 'openai' (gpt-oss's harmony messages) needs reasoning_parser "
                         "'openai_gptoss', which takes the analysis channel out of the answer")
    thinking = None if config.reasoning_parser is None else reasoning_parser(config.reasoning_parser)
    # constraints wait for the answer after the thought where <think> and </think> are tokens (as vLLM's);
    # elsewhere a constrained answer is all answer, held from its first token
    thought_gated = thinking is not None and _gate_thoughts(engine, thinking.name)
    responses_kept = ResponseStore(config.stored_responses)
    defaults = engine.generation_defaults if config.generation_config == "auto" else {}
    registry = registry or PromptRegistry()
    metrics_holder: dict = {}
    loop = EngineLoop(engine, on_output=lambda s, o, t: metrics_holder["m"].observe_output(s, o, t),
                      on_abort=lambda s, rid: metrics_holder["m"].observe_abort(s, rid))
    metrics = metrics_holder["m"] = ServerMetrics(lambda: loop.snapshot)
    admission = Admission(engine.scheduler.config.max_num_seqs + config.max_queue, metrics)
    token_str = TokenStrings(engine.tokenizer)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="softprompt", lifespan=lifespan, max_body_size=config.max_body_bytes)
    app.state.loop, app.state.registry, app.state.metrics, app.state.config = loop, registry, metrics, config
    app.state.admission = admission
    if config.api_key:
        app.add_middleware(APIKeyGuard, keys=[config.api_key, *([config.admin_token] if config.admin_token else [])])
    app.add_middleware(_HTTPMetrics, metrics=metrics)  # outermost: counts the guard's 401s too

    # ---- errors ---------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response(request.url.path)
        return _schema_error(errors).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type_=kind, headers=exc.headers).response(request.url.path)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return to_api_error(exc).response(request.url.path)

    def require_admin(request: Request) -> None:
        if config.admin_token is None:
            return
        if not token_matches(presented_key(request.headers.raw), [config.admin_token]):
            raise APIError(401, "this endpoint needs the admin bearer token (Authorization: Bearer ...)",
                           type_="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # ---- health, metrics, models ---------------------------------------------------------------------
    @app.get("/health")
    async def health():
        s = loop.snapshot
        body = {"status": "ok" if loop.alive else "stopped", "running": s.running, "waiting": s.waiting,
                "in_flight": admission.in_flight, "kv_blocks_free": s.kv_blocks_free,
                "kv_blocks_total": s.kv_blocks_total}
        return JSONResponse(body, 200 if loop.alive else 503)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping():
        """SageMaker's health check (vLLM serves it): /health."""
        return await health()

    @app.post("/invocations")
    async def invocations(http: Request):
        """SageMaker's one generation route (vLLM serves it): a body with `messages` is a chat completion, one with
        `prompt` a completion. Needs the API key where one is set, as /v1 does."""
        try:
            body = json.loads(await http.body())
        except ValueError:
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        kind = (ChatCompletionRequest if "messages" in body else CompletionRequest if "prompt" in body
                else None) if isinstance(body, dict) else None
        if kind is None:
            raise APIError(400, "an /invocations body needs messages (a chat completion) or prompt (a completion)",
                           param="body")
        try:
            request = kind.model_validate(body)
        except ValidationError as exc:
            raise _schema_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
        if kind is ChatCompletionRequest:
            return await chat_completions(request, http)
        return await completions(request, http)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(pv: PromptVersion | None, model_id: str | None = None) -> dict:
        """/v1/models' entry for a prompt version (None: the base model)."""
        if pv is None:
            return {"id": BASE_MODEL, "object": "model", "created": started, "owned_by": "softprompt",
                    "root": str(engine.model_dir), "parent": None, "length": 0}
        return {"id": model_id or pv.name, "object": "model", "created": pv.created, "owned_by": "softprompt",
                "root": str(engine.model_dir), "parent": BASE_MODEL, "version": pv.version,
                "content_hash": pv.content_hash, "length": pv.length, "kind": pv.kind,
                "versions": [v.version for v in registry.versions(pv.name)]}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(None)] + [model_card(pv) for pv in registry.latest()]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        """OpenAI's retrieve: one entry of the list (`name@N` / `name@<content hash>`: that version)."""
        if model == BASE_MODEL:
            return model_card(None)
        try:
            return model_card(registry.get(model), model)
        except UnknownPromptError as exc:
            raise to_api_error(exc) from exc

    @app.get("/version")
    async def version():
        return {"version": __version__}

    # ---- generation ----------------------------------------------------------------------------------
    def resolve(body: _SamplingFields) -> str | None:
        unsupported = body.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported")
        try:
            return registry.resolve(body.model)
        except UnknownPromptError as exc:
            raise to_api_error(exc) from exc

    async def generate(http: Request, body: _SamplingFields, requests: list[EngineRequest], fmt: _Format):
        if body.use_beam_search:
            return await beam_generate(http, body, requests, fmt)
        await compile_constraints(engine, requests)
        admission.acquire(len(requests), config.retry_after_s)
        task = body.model.partition("@")[0]
        stream = loop.submit(requests, task)
        cleanup = _Cleanup(loop, stream, admission)
        try:
            await stream.accepted()
        except BaseException as exc:
            cleanup()
            if not isinstance(exc, Exception):  # cancellation: let it through
                raise
            raise to_api_error(exc) from exc
        if body.stream:
            options = body.stream_options
            if isinstance(fmt, _Format) and options is not None and options.include_usage:
                fmt.continuous_usage = options.continuous_usage_stats
            return StreamingResponse(_sse(http, stream, fmt, cleanup), media_type="text/event-stream",
                                     background=BackgroundTask(cleanup))
        try:
            finals: dict[int, RequestOutput] = {}
            async for index, out in stream.outputs(http.is_disconnected, config.disconnect_poll_s):
                if out.finished:
                    finals[index] = out
            if len(finals) < len(requests):  # the client went away; nobody reads this
                return Response(status_code=499)
            return JSONResponse(fmt.response([finals[i] for i in range(len(requests))]))
        except Exception as exc:
            raise to_api_error(exc) from exc
        finally:
            cleanup()

    async def beam_generate(http: Request, body: _SamplingFields, requests: list[EngineRequest], fmt: _Format):
        """vLLM's use_beam_search: each prompt's n best hypotheses (beam width n) as its n choices, searched as
        Engine.beam_search does, each step's beams submitted through the engine loop beside other requests."""
        n, inputs = body.n, requests[::body.n]  # (a prompt's n requests share its input)
        params = _beam_params(body, requests[0].sampling.max_new_tokens)
        admission.acquire(len(requests), config.retry_after_s)  # a step runs at most n beams a prompt
        try:
            try:
                search = await loop.run(lambda e: e.start_beam_search(
                    [EngineRequest(prompt=r.prompt, input_ids=r.input_ids, request_id=r.request_id,
                                   priority=r.priority) for r in inputs], params))
            except Exception as exc:
                raise to_api_error(exc) from exc
            task = body.model.partition("@")[0]
            while not search.done:
                step = search.step_requests()
                stream = loop.submit(step, task)
                finals: dict[int, RequestOutput] = {}
                try:
                    await stream.accepted()
                    async for index, out in stream.outputs(http.is_disconnected, config.disconnect_poll_s):
                        if out.finished:
                            finals[index] = out
                except Exception as exc:
                    raise to_api_error(exc) from exc
                finally:
                    loop.abort(sorted(stream.unfinished))
                if len(finals) < len(step):  # the client went away; nobody reads this
                    return Response(status_code=499)
                search.advance([finals[i] for i in range(len(step))])
            results = await loop.run(lambda e: search.results(e.beam_text_decoder(params)))
        finally:
            admission.release(len(requests))
        outputs = [RequestOutput(f"{r.request_id}-{j}", r.prompt, None, r.input_ids, seq.token_ids, seq.text,
                                 seq.finish_reason, seq.token_ids[-1] if seq.finish_reason == "stop" else None)
                   for r, result in zip(inputs, results) for j, seq in enumerate(result.sequences[:n])]
        return JSONResponse(fmt.response(outputs))

    async def _sse(http: Request, stream: RequestStream, fmt: _Format | ResponsesFormat | MessagesFormat,
                   cleanup: _Cleanup) -> AsyncIterator[str]:
        try:
            async for index, out in stream.outputs(http.is_disconnected, config.disconnect_poll_s):
                for chunk in fmt.stream_chunks(index, out):
                    yield fmt.sse(chunk)
            if not stream.unfinished:
                for chunk in fmt.final_chunks():
                    yield fmt.sse(chunk)
                if fmt.done_marker:
                    yield fmt.done_marker
        except (EngineFailure, ServerStopping) as exc:
            err = to_api_error(exc)
            yield fmt.error_event(err.status, err.message, err.type, err.code)
        finally:
            cleanup()

    def _ids(kind: str) -> tuple[str, int]:
        return f"{kind}-{uuid.uuid4().hex}", int(time.time())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        prompt = resolve(body)
        inputs = body.prompts()
        if len(inputs) * body.n > MAX_CHOICES:
            raise APIError(400, f"n x number of prompts must be at most {MAX_CHOICES}", param="n")
        max_new = body.max_tokens if body.max_tokens is not None else defaults.get("max_new_tokens", 16)
        echo_only = body.echo and max_new == 0  # scoring a prompt (lm-eval-harness style): nothing to generate
        cid, created = _ids("cmpl")
        requests = []
        # the prompt's logprobs for echo (its top `logprobs`) and vLLM's prompt_logprobs (its own top N), at once;
        # unstreamed, only a prompt's first choice computes them and the others show its (they may then start from
        # its cached blocks); streamed, each choice's first chunk needs them
        wanted = max((n for n in (body.logprobs if body.echo else None, body.prompt_logprobs) if n is not None),
                     default=None)
        for inp in inputs:
            for j in range(body.n):
                scored = wanted if j == 0 or body.stream else None
                params = _sampling(body, j, 1 if echo_only else max_new, body.logprobs, scored, defaults)
                source = {"text": inp} if isinstance(inp, str) else {"input_ids": inp}
                requests.append(EngineRequest(prompt=prompt, sampling=params, request_id=f"{cid}-{len(requests)}",
                                              priority=body.priority, **source))
        fmt = CompletionFormat(cid, created, body.model, token_str, body.stop_list(), body.return_token_ids,
                               bool(body.stream_options and body.stream_options.include_usage), body.n,
                               prompt_logprobs=body.prompt_logprobs, top_logprobs=body.logprobs or 0)
        if body.echo:  # the prompt's text as given; token-id prompts decoded when their output comes
            # a truncated prompt is echoed as what was kept: its ids decoded
            fmt.echo = [inp if isinstance(inp, str) and body.truncate_prompt_tokens is None else None
                        for inp in inputs for _ in range(body.n)]
            fmt.echo_decode = engine.tokenizer.decode if engine.tokenizer is not None else (lambda ids: "")
            fmt.echo_only = echo_only
        return await generate(http, body, requests, fmt)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        body, requests, fmt = await prepare_chat(body, "chatcmpl")
        return await generate(http, body, requests, fmt)

    async def prepare_chat(body: ChatCompletionRequest, kind: str) -> tuple[ChatCompletionRequest,
                                                                             list[EngineRequest], ChatFormat]:
        """The engine requests of a chat request and the format of their answers (`kind`: the id's prefix)."""
        prompt = resolve(body)
        if not _has_chat_template(engine):
            raise APIError(400, "the model's tokenizer has no chat template: use /v1/completions",
                           param="messages", code="no_chat_template")
        try:
            tools = body.tool_mode(config.tool_call_parser)
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice", code="unsupported") from exc
        body = body.decoded_for(tools, thinking)
        messages = [m.for_template() for m in body.messages]
        reasoning = thinking if thought_gated or not body.constrained() else None

        def render(e: Engine) -> tuple[list[int], bool]:
            ids = _render_chat(e, messages, body.template_options())
            tail = "" if reasoning is None else e.tokenizer.decode(ids[-32:], skip_special_tokens=False)
            return ids, reasoning is not None and reasoning.opens_thought(tail)

        try:
            ids, prompt_open = await loop.run(render)
        except (ServerStopping, EngineFailure) as exc:
            raise to_api_error(exc) from exc
        except RequestError as exc:  # "cannot apply the chat template: ..." (jinja errors raised by the template)
            raise APIError(400, str(exc), param="messages") from exc
        # neither: the checkpoint's max_new_tokens (generation config), else as many as fit (the engine caps it)
        max_new = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None),
                       defaults.get("max_new_tokens", engine.config.max_positions))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        cid, created = _ids(kind)
        # prompt_logprobs go beside the choices, from the first: the others need not compute them
        requests = [EngineRequest(prompt=prompt, input_ids=ids, request_id=f"{cid}-{j}", priority=body.priority,
                                  sampling=_sampling(body, j, max_new, logprobs,
                                                     body.prompt_logprobs if j == 0 else None, defaults))
                    for j in range(body.n)]
        fmt = ChatFormat(cid, created, body.model, token_str, body.stop_list(), body.return_token_ids,
                         bool(body.stream_options and body.stream_options.include_usage), body.n,
                         prompt_logprobs=body.prompt_logprobs, tools=tools, reasoning=reasoning,
                         prompt_open=prompt_open, include_reasoning=body.include_reasoning)
        return body, requests, fmt

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, http: Request):
        chat, requests, chat_fmt = await prepare_chat(_as_chat(body.as_chat), "chatcmpl")
        return await generate(http, chat, requests, MessagesFormat(chat_fmt))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest):
        _, requests, _ = await prepare_chat(_as_chat(body.model_copy(update={"stream": False}).as_chat), "count")
        return {"input_tokens": len(requests[0].input_ids)}

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, http: Request):
        history: list[dict] = []
        if body.previous_response_id is not None:
            history = stored_response(body.previous_response_id, "previous_response_id")[1]
        chat, requests, chat_fmt = await prepare_chat(_as_chat(lambda: body.as_chat(history)), "resp")
        conversation = [*history, *body.input_items()]
        store = body.store is not False and config.stored_responses > 0

        def keep(response: dict) -> None:  # its conversation: what it continued, its input, its output
            responses_kept.put(response, [*conversation, *response["output"]])

        fmt = ResponsesFormat(chat_fmt, body.echoed_fields(store), engine.tokenizer, keep if store else None)
        return await generate(http, chat, requests, fmt)

    def stored_response(response_id: str, param: str | None = None) -> tuple[dict, list[dict]]:
        """A kept response and its conversation, or the 404 naming it."""
        entry = responses_kept.get(response_id)
        if entry is None:
            raise APIError(404, f"no stored response {response_id!r} (this server keeps its last "
                           f"{config.stored_responses} responses made without store=false)",
                           type_="not_found_error", param=param, code="response_not_found")
        return entry

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str):
        return stored_response(response_id)[0]

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        stored_response(response_id)
        responses_kept.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    # ---- tokenizer (vLLM's /tokenize and /detokenize) ------------------------------------------------
    def virtual_tokens(model: str) -> int:
        """The number of positions `model`'s prompt takes before the input (0 for the base model)."""
        if model == BASE_MODEL:
            return 0
        try:
            return registry.get(model).length
        except UnknownPromptError as exc:
            raise to_api_error(exc) from exc

    def need_tokenizer(what: str) -> None:
        try:
            require_tokenizer(engine.tokenizer, what)
        except RequestError as exc:
            raise to_api_error(exc) from exc

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        """The ids a completion (`prompt`) or chat (`messages`) request would feed, their count, and the room
        left: `max_model_len` is the model's positions minus those the task's prompt takes (`virtual_tokens`)."""
        p = virtual_tokens(body.model)
        need_tokenizer("/tokenize")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            problem = body.template_problem()
            if problem is not None:
                raise APIError(400, problem[1], param=problem[0])
            if not _has_chat_template(engine):
                raise APIError(400, "the model's tokenizer has no chat template", param="messages",
                               code="no_chat_template")
            messages = [m.for_template() for m in body.messages]

        def render(e: Engine) -> list[int]:  # on the loop thread, like every use of the engine's tokenizer
            if body.messages is not None:
                return _render_chat(e, messages, body.template_options())
            return e.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)

        try:
            ids = await loop.run(render)
        except (ServerStopping, EngineFailure) as exc:
            raise to_api_error(exc) from exc
        except Exception as exc:  # jinja errors raised by a chat template
            raise APIError(400, f"cannot tokenize: {exc}", param="messages" if body.messages else "prompt") from exc
        out = {"count": len(ids), "max_model_len": engine.config.max_positions - p, "tokens": ids,
               "virtual_tokens": p}
        if body.return_token_strs:
            out["token_strs"] = [token_str(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        virtual_tokens(body.model)  # an unknown model is a 404, as for generation
        need_tokenizer("/detokenize")
        bad = [i for i in body.tokens if not 0 <= i < engine.config.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range for vocabulary size "
                           f"{engine.config.vocab_size}", param="tokens")
        tokens = list(body.tokens)
        try:
            text = await loop.run(lambda e: e.tokenizer.decode(tokens))
        except (ServerStopping, EngineFailure) as exc:
            raise to_api_error(exc) from exc
        return {"prompt": text}

    # ---- prompt registry -----------------------------------------------------------------------------
    def describe(name: str) -> dict:
        versions = registry.versions(name)
        return {**versions[-1].describe(), "versions": [v.describe() for v in versions]}

    @app.get("/v1/prompts", dependencies=[Depends(require_admin)])
    async def list_prompts():
        return {"object": "list", "data": [describe(pv.name) for pv in registry.latest()]}

    @app.get("/v1/prompts/{ref}", dependencies=[Depends(require_admin)])
    async def get_prompt(ref: str):
        try:
            pv = registry.get(ref)
        except UnknownPromptError as exc:
            raise APIError(404, str(exc), param="name", code="prompt_not_found") from exc
        return pv.describe() if "@" in ref else describe(pv.name)

    @app.delete("/v1/prompts/{ref}", dependencies=[Depends(require_admin)])
    async def delete_prompt(ref: str):
        try:
            removed = await registry.remove(loop, ref)
        except UnknownPromptError as exc:
            raise APIError(404, str(exc), param="name", code="prompt_not_found") from exc
        return {"object": "prompt.deleted", "id": ref, "deleted": True,
                "versions": [pv.version for pv in removed]}

    @app.post("/v1/prompts", status_code=201, dependencies=[Depends(require_admin)],
              max_body_size=config.max_upload_bytes)
    async def upload_prompt(http: Request):
        ctype = http.headers.get("content-type", "")
        try:
            if ctype.startswith("multipart/form-data"):
                name, text, files, task_id = await _read_form(http)
                token_ids = None
            elif ctype.startswith("application/json"):
                name, text, files, token_ids, task_id = _read_json(await http.body())
            else:
                raise APIError(415, "send multipart/form-data (adapter files) or application/json "
                               "({name, text} / {name, token_ids} / {name, files})", code="unsupported_media_type")
            if not isinstance(name, str):
                raise APIError(422, "the prompt 'name' field is missing", param="name")
            if files and (text is not None or token_ids is not None):
                raise APIError(400, "give files, text or token_ids, not several", param="name")
            if task_id is not None and not files:
                raise APIError(400, "task_id picks a task of an uploaded multitask prompt-tuning adapter: "
                               "send its files", param="task_id")
            if files:
                check_public_name(name)
                source, staged = registry.stage_files(files)
                pv = await registry.add(loop, name, source, staged=staged, task_id=task_id)
            else:
                pv = await registry.add(loop, name, text=text, token_ids=token_ids)
        except Exception as exc:
            raise to_api_error(exc) from exc
        return JSONResponse({**pv.describe(), "versions": [v.describe() for v in registry.versions(pv.name)]}, 201)

    return app


def _schema_error(errors: list[dict]) -> APIError:
    """One message naming the offending fields (first few of pydantic's errors)."""
    messages: dict[str, str] = {}
    for e in errors:
        # drop "body" and pydantic's union-member tags ("float", "list[int]", ...) from the location
        loc = ".".join(str(x) for x in e.get("loc", ())[1:] if isinstance(x, int) or _is_field(x)) or "body"
        msg = e.get("msg", "invalid")
        if loc == "body" and e.get("type") in ("model_attributes_type", "dict_type"):
            msg = "the request body must be a JSON object (Content-Type: application/json)"
        messages.setdefault(loc, msg)
    parts = [f"{loc}: {msg}" for loc, msg in list(messages.items())[:3]]
    return APIError(422, "invalid request: " + "; ".join(parts), param=next(iter(messages), None),
                    code="invalid_request_body")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal", "model"})


def _is_field(part: object) -> bool:
    return isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS and "[" not in part


async def _read_form(http: Request) -> tuple[object, object, list[tuple[str, bytes]], int | None]:
    try:
        form = await http.form(max_files=8, max_fields=16)
    except StarletteHTTPException:
        raise
    except AssertionError as exc:  # starlette's message when python-multipart is missing
        raise APIError(415, "multipart uploads need the python-multipart package on the server; "
                       "send JSON with base64 'files' instead", code="unsupported_media_type") from exc
    except Exception as exc:
        raise APIError(400, f"cannot parse the multipart form: {exc}") from exc
    try:
        name, text = form.get("name"), form.get("text")
        files = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or "", await value.read()))
        if text is not None and not isinstance(text, str):
            raise APIError(400, "the 'text' field must be a string", param="text")
        task_id = form.get("task_id")
        if task_id is not None:
            if not isinstance(task_id, str) or not task_id.isdecimal() or len(task_id) > 6:
                raise APIError(400, "the 'task_id' field must be a non-negative integer", param="task_id")
            task_id = int(task_id)
        return name, text, files, task_id
    finally:
        await form.close()


def _read_json(raw: bytes) -> tuple[str, str | None, list[tuple[str, bytes]], list[int] | None, int | None]:
    try:
        body = TextPromptUpload.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from exc
        raise _schema_error([{**e, "loc": ("body", *e.get("loc", ()))} for e in errors]) from exc
    files = []
    for filename, data in (body.files or {}).items():
        try:
            files.append((filename, base64.b64decode(data, validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise APIError(400, f"file {filename!r} is not valid base64", param="files") from exc
    return body.name, body.text, files, body.token_ids, body.task_id
