"""`softprompt serve MODEL_DIR --prompts ... --host 127.0.0.1 --port N`: the HTTP server under uvicorn.

Nothing here imports fastapi or uvicorn until `run_serve` runs, so the `softprompt` command works without the
server extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import SoftPromptError
from ..reasoning import REASONING_PARSERS
from ..scheduler import SCHEDULING_POLICIES
from ..tool_calls import TOOL_CALL_PARSERS

ADMIN_TOKEN_ENV = "SOFTPROMPT_ADMIN_TOKEN"
API_KEY_ENV = "SOFTPROMPT_API_KEY"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a Hugging Face checkpoint directory, or a Hub model id "
                   "(org/name or org/name@revision)")
    p.add_argument("--prompts", nargs="*", default=[], metavar="DIR_OR_FILE",
                   help="prompts to serve: a PEFT adapter dir (named after the dir), a .safetensors file (named "
                        "after the file), a dir holding several of those, a Hub adapter id ORG/NAME (named NAME), "
                        "or NAME=SOURCE; DIR#N is task N of a multitask prompt-tuning adapter")
    p.add_argument("--text-prompt", action="append", default=[], metavar="NAME=TEXT",
                   help="serve a text (hard) prompt (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prompt-dir", default=None,
                   help="where uploaded prompts are stored (default: a temporary dir removed at exit); with --ray, "
                        "the shared directory every replica loads prompts from on demand, by name")
    p.add_argument("--admin-token", default=None,
                   help=f"bearer token for /v1/prompts (default: ${ADMIN_TOKEN_ENV}; unset: open, or the API key)")
    p.add_argument("--api-key", default=None,
                   help=f"bearer token every /v1 request must carry, as vLLM's (default: ${API_KEY_ENV}; unset: open)")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template (a file, or the template itself) for /v1/chat/completions, in place "
                        "of the tokenizer's (a base model without one can then serve chat)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the most positions a sequence may take (prompt + input + output); default: the model's")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond the running batch; more are refused with 429")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                   help="fcfs: first come, first served; priority: by each request's `priority` (lower first), "
                   "then arrival, as vLLM's")
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--max-versions", type=int, default=8, help="versions kept per prompt name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    p.add_argument("--backend", default="auto", help="auto, torch, triton, reference")
    p.add_argument("--enforce-eager", action="store_true",
                   help="triton backend: launch decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not keep the K/V of full blocks of request tokens for later requests that begin the "
                   "same way (vLLM's automatic prefix caching; task prefixes are cached either way)")
    p.add_argument("--generation-config", choices=("auto", "none"), default="auto",
                   help="auto: requests that leave out temperature, top_p, top_k, min_p, repetition_penalty or "
                   "their length get the checkpoint's generation_config.json values (max_new_tokens for the "
                   "length; as vLLM); none: OpenAI's defaults")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS), default=None,
                   help="read tool_choice='auto' answers in this format (vLLM's names: hermes for Qwen 2.5/3, "
                   "Hermes and others; llama3_json for Llama 3.1+; mistral for Mistral, whose call ids are then 9 "
                   "characters); without it 'auto' is refused (a named or 'required' tool_choice works without one)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM command lines: tool_choice='auto' is on whenever --tool-call-parser is set")
    p.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                   help="give a thinking model's <think> part as the chat message's reasoning, apart from its "
                   "content, and hold structured outputs on the content (vLLM's names: deepseek_r1 for R1 and QwQ, "
                   "qwen3 for Qwen3, seed_oss for Seed-OSS, mistral for Magistral)")
    p.add_argument("--log-level", default="info")
    ray = p.add_argument_group("Ray Serve (needs the ray extra): several engine replicas with task-affinity routing")
    ray.add_argument("--ray", action="store_true", help="serve with Ray Serve instead of one process")
    ray.add_argument("--replicas", type=int, default=2, help="engine replicas (one per GPU, or per CPU process)")
    ray.add_argument("--ray-address", default=None,
                     help="an existing Ray cluster ('auto', or ray://HOST:10001); default: start a local one")
    ray.add_argument("--routing", choices=("affinity", "round-robin"), default="affinity",
                     help="affinity: a task's requests go preferably to replicas that hold its prefix K/V")
    ray.add_argument("--affinity-imbalance", type=int, default=16,
                     help="affinity routing sends a request to the least loaded replica instead once the task's "
                          "replicas have this many more requests in flight")
    ray.add_argument("--max-prompts-per-replica", type=int, default=64,
                     help="prompts a replica keeps loaded (least recently used ones are unloaded)")
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="CPUs per replica (Ray resources; on the CPU also its torch threads)")
    ray.add_argument("--replica-gpus", type=float, default=None,
                     help="GPUs per replica (default: 1 with --device cuda, or when the cluster has GPUs and "
                          "--device is not cpu)")


def discover_prompts(items: list[str]) -> list[tuple[str, Path]]:
    """(name, source) for each --prompts item; a directory without adapter_config.json is scanned one level."""
    from ..hub import hub_prompt_name
    from ..prompts import split_task_suffix

    found: list[tuple[str, Path]] = []
    for item in items:
        name, sep, rest = item.partition("=")
        if sep and name and rest and not Path(item).exists():
            found.append((name, Path(rest)))
            continue
        path = Path(item)
        if path.is_dir() and not (path / "adapter_config.json").is_file():
            children = sorted(c for c in path.iterdir()
                              if (c / "adapter_config.json").is_file() or c.suffix == ".safetensors")
            if not children:
                raise SoftPromptError(f"{path} holds no PEFT adapter dirs or .safetensors prompt files")
            found.extend((_name_of(c), c) for c in children)
        elif path.exists():
            found.append((_name_of(path), path))
        elif (task := split_task_suffix(item))[1] is not None and task[0].is_dir():
            found.append((f"{task[0].name}-task{task[1]}", path))  # DIR#N: a multitask adapter's task N
        elif (hub_name := hub_prompt_name(item)) is not None:
            found.append((hub_name, path))  # a Hub adapter id: fetched when registered
        else:
            raise SoftPromptError(f"prompt source {item!r} does not exist")
    return found


def read_chat_template(value: str) -> str:
    """`--chat-template`: a file's text, or the value itself where it is a Jinja template (vLLM's rule)."""
    try:
        if Path(value).is_file():
            return Path(value).read_text()
    except OSError:  # a long inline template is no file name (ENAMETOOLONG)
        pass
    if "{{" in value or "{%" in value:
        return value
    raise SoftPromptError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def parse_text_prompts(items: list[str]) -> dict[str, str]:
    """{name: text} from --text-prompt NAME=TEXT items."""
    texts = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name or not text:
            raise SoftPromptError(f"--text-prompt expects NAME=TEXT, got {item!r}")
        texts[name] = text
    return texts


def _name_of(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def build_server(args: argparse.Namespace):
    """The engine, registry and app for parsed `serve` arguments (no network yet)."""
    from ..api import Engine
    from .app import ServerConfig, create_app
    from .registry import PromptRegistry

    engine = Engine(args.model_dir, device=args.device, dtype=args.dtype, backend=args.backend,
                    kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                    max_batched_tokens=args.max_batched_tokens, max_model_len=args.max_model_len,
                    cuda_graphs=False if args.enforce_eager else None, enable_prefix_caching=args.enable_prefix_caching,
                    scheduling_policy=args.scheduling_policy)
    if args.chat_template is not None:
        engine.set_chat_template(read_chat_template(args.chat_template))
    registry = PromptRegistry(args.prompt_dir, max_versions=args.max_versions)
    for name, source in discover_prompts(args.prompts):
        registry.register(engine, name, source)
    for name, text in parse_text_prompts(args.text_prompt).items():
        registry.register(engine, name, text=text)
    config = ServerConfig(max_queue=args.max_queue, admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV),
                          api_key=args.api_key or os.environ.get(API_KEY_ENV), generation_config=args.generation_config,
                          tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser)
    if args.generation_config == "auto" and engine.generation_defaults:
        print(f"requests that leave them out get {args.model_dir}/generation_config.json's sampling settings "
              f"{engine.generation_defaults} (--generation-config none: OpenAI's defaults)", file=sys.stderr)
    return create_app(engine, registry, config), registry


def run_serve(args: argparse.Namespace) -> int:
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SoftPromptError(f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})")
    if args.tool_call_parser == "openai" and args.reasoning_parser != "openai_gptoss":
        raise SoftPromptError("--tool-call-parser openai (gpt-oss's harmony messages) needs --reasoning-parser "
                              "openai_gptoss")
    if args.ray:
        from .ray_cli import run_ray_serve

        return run_ray_serve(args)
    try:
        import uvicorn
    except ImportError:
        raise SoftPromptError("softprompt serve needs the server extra: pip install 'softprompt-engine[server]'")
    app, registry = build_server(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        registry.close()
    return 0
