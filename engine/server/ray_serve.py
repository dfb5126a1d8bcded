"""Several engine replicas behind one OpenAI-compatible endpoint, on Ray Serve, with task-affinity routing.

    client --HTTP--> OpenAIIngress --handle, multiplexed_model_id=<task>--> SoftPromptReplica x N
                                                                              (Engine + the single-process app)

- **One app, two transports.** Each replica runs the engine loop and the very app `softprompt serve` runs
  (`create_app`); the ingress forwards the raw HTTP request to a replica, which runs it through that app in
  process (`asgi_call`). Completions, chat, streaming, validation and error bodies are the same code.
- **Task affinity** rides on Serve model multiplexing: the ingress reads `model` from the body and sets it as
  the request's multiplexed model id; `ray_routing.TaskAffinityRouter` sends it to a replica that holds the task
  (its prompt loaded, its prefix K/V computed) or, before any does, to the task's rendezvous-hash home, so a
  task's prefix is computed once per replica that serves it, not once per request, even for a burst of first
  requests. A replica loads a prompt on demand from the shared prompt directory (or the start-up sources) the
  first time it serves the task, keeps the `max_prompts_per_replica` most recent ones (LRU, Serve's multiplex
  cache), and reloads a prompt whose files changed.
- **Replica loss.** Serve replaces a dead replica. A request whose replica died before the client got anything
  is retried on another replica; a stream that already sent tokens ends with an error event, never with
  tokens from somebody else.
- **ReplicaBoard** collects each replica's counters (requests and prefix K/V computations per task), shown by
  the ingress's `GET /health` and used by the affinity benchmark.
"""

import asyncio
import json
import logging
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from ... import __version__
from ..api import Engine
from ..errors import PromptError, UnknownPromptError
from ..hub import resolve_model, resolve_prompt_source
from .app import APIError, ServerConfig, create_app, to_api_error
from .asgi_call import ForwardedRequest, ResponseHead, call_asgi
from .auth import missing_api_key, presented_key, token_matches
from .registry import _VERSION_SUFFIX, BASE_MODEL, PromptRegistry, check_public_name
from .schemas import error_body
from .shared_prompts import SharedPrompts

log = logging.getLogger("softprompt.ray")

ROUTINGS = ("affinity", "round-robin")
REPLICA_HEADER = b"x-softprompt-replica"
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)  # the replica died or left: the request can go elsewhere
RETRY_BACKOFF_S = 0.5
_DROPPED_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


@dataclass
class RayServeSettings:
    """Everything a deployment needs; plain data, so it travels to every replica (and from `serve run` args)."""

    model_dir: str
    prompt_dir: str | None = None  # shared directory of prompts loaded on demand (visible to every replica)
    prompts: dict[str, str] = field(default_factory=dict)  # name -> adapter dir / .safetensors path
    text_prompts: dict[str, str] = field(default_factory=dict)  # name -> text (hard prompt)
    replicas: int = 1
    routing: str = "affinity"  # or "round-robin" (no affinity: each request to the next replica)
    max_prompts_per_replica: int = 64
    affinity_imbalance: int = 16  # affinity yields to the least loaded replica past this many more requests
    device: str | None = None
    dtype: str | None = None
    backend: str = "auto"
    cuda_graphs: bool | None = None  # triton backend: decode steps from CUDA graphs (None: on CUDA)
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    max_queue: int = 256  # per replica, as the single-process server's --max-queue
    replica_cpus: float = 1.0  # Ray resources of each replica (on the CPU: also its torch threads)
    replica_gpus: float = 0.0
    max_retries: int = 3  # attempts on other replicas when a replica dies before answering
    max_body_bytes: int = 8 << 20
    stats_interval_s: float = 0.5
    generation_config: str = "auto"  # as the single-process server's --generation-config
    tool_call_parser: str | None = None  # as its --tool-call-parser
    reasoning_parser: str | None = None  # as its --reasoning-parser
    api_key: str | None = None  # as --api-key: checked by the ingress and again by each replica's app
    chat_template: str | None = None  # as --chat-template (the template's text)
    max_model_len: int | None = None  # as --max-model-len
    enable_prefix_caching: bool = True  # as the single-process server's (--no-prefix-caching: False)
    scheduling_policy: str = "fcfs"  # as its --scheduling-policy

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.replicas < 1 or self.max_prompts_per_replica < 1 or self.max_retries < 0:
            raise ValueError("replicas and max_prompts_per_replica must be >= 1, max_retries >= 0")
        if self.affinity_imbalance < 0:
            raise ValueError("affinity_imbalance must be >= 0")
        # Hub ids are fetched here, on the driver: the replicas read the local snapshots (one machine's HF cache)
        self.model_dir = str(resolve_model(self.model_dir).resolve())
        if self.prompt_dir is not None:
            self.prompt_dir = str(Path(self.prompt_dir).resolve())
        self.prompts = {name: str(resolve_prompt_source(path).resolve()) for name, path in self.prompts.items()}

    def shared_prompts(self) -> SharedPrompts:
        return SharedPrompts(self.prompt_dir, self.prompts, self.text_prompts)


def routed_prompt(body: bytes) -> str:
    """The task a request body names (its `model`, without `@version`), or "" (the base model, or a body the
    replica's app will reject: it answers those with the single-process server's errors)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""
    if not isinstance(model, str) or model == BASE_MODEL:
        return ""
    name = model.partition("@")[0]
    try:
        return check_public_name(name)
    except PromptError:
        return ""


def public_name(engine_name: str) -> str:
    """`sentiment.v3` (a replica registry's engine name) -> `sentiment`."""
    return _VERSION_SUFFIX.sub("", engine_name)


# ---- the replica ----------------------------------------------------------------------------------------------
class _LoadedPrompt:
    """One task registered on a replica. Serve's multiplex cache holds these and, when it evicts one (LRU),
    awaits its `__del__` attribute: that unregisters the versions this holder registered, and no others."""

    def __init__(self, name: str, replica: "SoftPromptReplica"):
        self.name = name
        self._replica = replica
        self._signature: tuple | None = None
        self._versions: list[int] = []
        self._lock = asyncio.Lock()
        self.__del__ = self.unload  # an instance attribute: Serve's hook, not a finalizer the GC would call

    async def refresh(self) -> None:
        """Register the prompt's current content unless this replica has it already; a prompt gone from the
        prompt directory is unregistered (UnknownPromptError)."""
        async with self._lock:
            try:
                source = self._replica.prompts.find(self.name)
                signature = source.signature()
            except UnknownPromptError:
                await self._unload()
                raise
            if signature != self._signature:
                pv = await self._replica.registry.add(self._replica.loop, self.name, source.path,
                                                                text=source.text, task_id=source.task_id)
                self._versions.append(pv.version)
                self._signature = signature

    async def unload(self) -> None:
        async with self._lock:
            await self._unload()

    async def _unload(self) -> None:
        for version in self._versions:
            try:
                await self._replica.registry.remove(self._replica.loop, f"{self.name}@{version}")
            except UnknownPromptError:  # already dropped (the registry keeps a few versions)
                pass
        self._versions, self._signature = [], None


class SoftPromptReplica:
    """One engine, its loop thread and the single-process app, serving forwarded requests."""

    async def __init__(self, settings: RayServeSettings, board: DeploymentHandle):
        self.settings = settings
        if settings.device is None or settings.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(settings.replica_cpus)))
        self.engine = Engine(settings.model_dir, device=settings.device, dtype=settings.dtype, backend=settings.backend,
                             kv_cache_bytes=settings.kv_cache_bytes, max_num_seqs=settings.max_num_seqs,
                             max_batched_tokens=settings.max_batched_tokens, cuda_graphs=settings.cuda_graphs,
                             enable_prefix_caching=settings.enable_prefix_caching,
                             max_model_len=settings.max_model_len, scheduling_policy=settings.scheduling_policy)
        if settings.chat_template is not None:
            self.engine.set_chat_template(settings.chat_template)
        self.registry = PromptRegistry(max_versions=2)
        self.app = create_app(self.engine, self.registry, ServerConfig(
            max_queue=settings.max_queue, max_body_bytes=settings.max_body_bytes,
            generation_config=settings.generation_config, api_key=settings.api_key,
            tool_call_parser=settings.tool_call_parser, reasoning_parser=settings.reasoning_parser))
        self.loop = self.app.state.loop
        self.loop.start()
        self.prompts = settings.shared_prompts()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.requests: Counter[str] = Counter()

        async def load_prompt(name: str) -> _LoadedPrompt:  # a plain function: Serve keeps its cache on it
            loaded = _LoadedPrompt(name, self)
            await loaded.refresh()
            return loaded

        self._load = serve.multiplexed(max_num_models_per_replica=settings.max_prompts_per_replica)(load_prompt)
        self._board = board
        self._reporter = asyncio.create_task(self._report_forever())

    async def handle(self, request: ForwardedRequest, prompt: str):
        """Yield the response's head (status, headers, first chunk), then its further body chunks."""
        if prompt:
            self.requests[prompt] += 1
            try:
                self.prompts.find(prompt)  # an unknown name never enters Serve's multiplex cache
                loaded = await self._load(prompt)
                await loaded.refresh()
            except PromptError as exc:  # unknown or removed (404), or files that do not load (400)
                yield self._error(exc, request.path)
                return
        else:
            self.requests[BASE_MODEL] += 1
        async for part in call_asgi(self.app, request):
            if isinstance(part, ResponseHead):
                part.headers.append((REPLICA_HEADER, self.replica_id.encode()))
            yield part

    def _error(self, exc: Exception, path: str) -> ResponseHead:
        response = to_api_error(exc).response(path)
        head = ResponseHead(response.status_code, list(response.raw_headers), bytes(response.body))
        head.headers.append((REPLICA_HEADER, self.replica_id.encode()))
        return head

    async def stats(self) -> dict[str, Any]:
        """This replica's counters: requests and prefix K/V computations per task, running batch, KV blocks (free,
        held by task prefixes, by cached request blocks, in all)."""

        def read(engine) -> dict[str, Any]:
            computed: Counter[str] = Counter()
            for key, n in engine.prefix_cache.stats.computations.items():
                computed[public_name(key.partition("@")[0])] += n
            return {"prefix_computations": dict(computed), "running": len(engine.scheduler.running),
                    "waiting": len(engine.scheduler.waiting), "kv_blocks_free": engine.pool.num_free,
                    "kv_blocks_prefixes": sum(len(e.blocks) for e in engine.prefix_cache.entries),
                    "kv_blocks_cached": 0 if engine.block_cache is None else engine.block_cache.num_cached,
                    "kv_blocks_total": engine.pool.num_blocks}

        state = await self.loop.run(read)
        return {"replica": self.replica_id, "updated": time.time(), "requests": dict(self.requests),
                "loaded_prompts": [pv.name for pv in self.registry.latest()], **state}

    async def _report_forever(self) -> None:
        last: dict | None = None
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            try:
                stats = await self.stats()
                comparable = {k: v for k, v in stats.items() if k != "updated"}
                if comparable != last:
                    await self._board.report.remote(stats)
                    last = comparable
            except Exception:  # the board restarting must never disturb serving
                log.debug("stats report failed", exc_info=True)

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        if getattr(self, "loop", None) is not None:
            self.loop.stop()
            self.registry.close()


class ReplicaBoard:
    """The replicas' latest reports, by replica id (a replaced replica's last report stays, marked by its age)."""

    def __init__(self) -> None:
        self.reports: dict[str, dict] = {}

    def report(self, stats: dict) -> None:
        self.reports[stats["replica"]] = stats

    def all(self) -> dict[str, dict]:
        return self.reports


# ---- the ingress ----------------------------------------------------------------------------------------------
ingress_app = FastAPI(title="softprompt on Ray Serve")
# everything the ingress class uses is defined above it: Serve captures the class when it is decorated


async def _rest(first: bytes, chunks):
    """A streamed body: the first chunk, then the replica's; a replica lost mid-stream ends it with an error
    event (the client already has tokens, so it is not retried: nothing is repeated or invented)."""
    finished = False
    try:
        yield first
        async for chunk in chunks:
            yield chunk
        finished = True
    except REPLICA_GONE as exc:
        finished = True
        body = error_body(f"the replica serving this stream was lost: {exc}", "server_error", code="replica_lost")
        yield f"data: {json.dumps(body)}\n\n".encode()
    finally:
        if not finished:  # the client went away: stop the replica's work
            chunks.cancel()


@serve.ingress(ingress_app)
class OpenAIIngress:
    """The HTTP entry: forwards completions and chat to a replica chosen for the request's task."""

    def __init__(self, replicas: DeploymentHandle, board: DeploymentHandle, settings: RayServeSettings):
        self.replicas = replicas
        self.board = board
        self.settings = settings
        self.prompts = settings.shared_prompts()
        self.started = int(time.time())
        self.retries = 0

    @ingress_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return self._refused(request) or await self._forward(request)

    @ingress_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return self._refused(request) or await self._forward(request)

    @ingress_app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        return self._refused(request) or await self._forward(request)

    @ingress_app.post("/v1/messages")
    async def messages(self, request: Request) -> Response:
        return self._refused(request) or await self._forward(request)

    @ingress_app.post("/v1/messages/count_tokens")
    async def count_tokens(self, request: Request) -> Response:
        return self._refused(request) or await self._forward(request)

    @ingress_app.post("/invocations")
    async def invocations(self, request: Request) -> Response:
        """SageMaker's generation route: forwarded as chat or completion, by its body, to the task's replica."""
        return self._refused(request) or await self._forward(request)

    def _refused(self, request: Request) -> Response | None:
        """A 401 for a request without the API key (where one is set); None to go on."""
        key = self.settings.api_key
        if key and not token_matches(presented_key(request.headers.raw), [key]):
            return missing_api_key(request.url.path)
        return None

    def _card(self, name: str) -> dict:
        """/v1/models' entry for `name` (raises UnknownPromptError for no servable prompt)."""
        card = {"id": name, "object": "model", "created": self.started, "owned_by": "softprompt",
                "root": self.settings.model_dir, "parent": None, "length": 0}
        if name == BASE_MODEL:
            return card
        source = self.prompts.find(name)
        return {**card, "parent": BASE_MODEL, "kind": source.kind, "length": source.length}

    @ingress_app.get("/v1/models")
    async def models(self, request: Request):
        if refused := self._refused(request):
            return refused
        return {"object": "list", "data": [self._card(name) for name in [BASE_MODEL, *self.prompts.names()]]}

    @ingress_app.get("/v1/models/{model:path}")
    async def retrieve_model(self, model: str, request: Request):
        if refused := self._refused(request):
            return refused
        try:
            return self._card(model)
        except UnknownPromptError as exc:
            return to_api_error(exc).response()

    @ingress_app.get("/version")
    async def version(self) -> dict:
        return {"version": __version__}

    @ingress_app.api_route("/ping", methods=["GET", "POST"])
    async def ping(self) -> dict:
        """SageMaker's health check: /health."""
        return await self.health()

    @ingress_app.get("/health")
    async def health(self) -> dict:
        reports = await self.board.all.remote()
        return {"status": "ok", "replicas_configured": self.settings.replicas, "routing": self.settings.routing,
                "retries": self.retries, "replicas": reports}

    async def _forward(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.settings.max_body_bytes:
                return APIError(413, f"the request body is larger than {self.settings.max_body_bytes} bytes"
                                ).response(request.url.path)
        forwarded = ForwardedRequest(request.method, request.url.path, body, request.url.query.encode(),
                                     tuple(request.headers.raw),
                                     (request.client.host, request.client.port) if request.client else None)
        prompt = routed_prompt(body)
        handle = self.replicas.options(stream=True)
        if prompt and self.settings.routing == "affinity":
            handle = handle.options(multiplexed_model_id=prompt)
        error: BaseException | None = None
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                self.retries += 1
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
            chunks = handle.handle.remote(forwarded, prompt)
            try:
                head: ResponseHead = await chunks.__anext__()
            except REPLICA_GONE as exc:  # nothing reached the client yet: another replica may answer
                log.warning("replica lost before answering (attempt %d): %s", attempt + 1, exc)
                error = exc
                continue
            except asyncio.CancelledError:
                chunks.cancel()
                raise
            if head.status == 503 and attempt < self.settings.max_retries:  # that replica is shutting down
                chunks.cancel()
                error = RuntimeError(head.body.decode(errors="replace"))
                continue
            return self._response(head, chunks)
        return APIError(503, f"no replica could serve this request after {self.settings.max_retries + 1} attempts: "
                        f"{error}", "server_error", code="unavailable", headers={"Retry-After": "1"}
                        ).response(request.url.path)

    def _response(self, head: ResponseHead, chunks) -> Response:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers
                   if k.lower() not in _DROPPED_HEADERS}
        if not head.more:
            return Response(head.body, status_code=head.status, headers=headers)
        return StreamingResponse(_rest(head.body, chunks), status_code=head.status, headers=headers)


# ---- building the application --------------------------------------------------------------------------------
def build_app(settings: RayServeSettings):
    """The Serve application: ingress -> N engine replicas (+ the board). Run with `serve.run(build_app(...))`."""
    replica_options: dict[str, Any] = dict(
        name="SoftPromptReplica", num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_num_seqs + settings.max_queue,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
    )
    router = {"affinity": "TaskAffinityRouter", "round-robin": "RoundRobinRouter"}[settings.routing]
    replica_options["request_router_config"] = RequestRouterConfig(
        request_router_class=f"softprompt.engine.server.ray_routing:{router}",
        request_router_kwargs={"imbalance": settings.affinity_imbalance} if settings.routing == "affinity" else {})
    board = serve.deployment(ReplicaBoard, name="ReplicaBoard", num_replicas=1,
                             ray_actor_options={"num_cpus": 0}).bind()
    replicas = serve.deployment(SoftPromptReplica, **replica_options).bind(settings, board)
    return serve.deployment(OpenAIIngress, name="OpenAIIngress", ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=4096).bind(replicas, board, settings)


def app_builder(args: dict[str, Any]):
    """For `serve run softprompt.engine.server.ray_serve:app_builder model_dir=... prompt_dir=... replicas=2`
    (or a Serve config file's `args`): the settings' fields, as strings or as their types."""
    fields = RayServeSettings.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; known: {sorted(fields)}")
    parsed = {key: _coerce(fields[key].type, value) for key, value in args.items()}
    return build_app(RayServeSettings(**parsed))


def _coerce(kind: Any, value: Any) -> Any:
    """A `serve run` key=value string as the field's type (values from a config file may be typed already)."""
    if not isinstance(value, str):
        return value
    if kind in (int, int | None):
        return int(value)
    if kind in (float, float | None):
        return float(value)
    if typing.get_origin(kind) is dict:
        return json.loads(value)
    return value
