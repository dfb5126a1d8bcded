"""`softprompt serve MODEL_DIR --prompts ... --host 127.0.0.1 --port N`: the HTTP server under uvicorn.

Nothing here imports fastapi or uvicorn until `run_serve` runs, so the `softprompt` command works without the
server extra.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import SoftPromptError

ADMIN_TOKEN_ENV = "SOFTPROMPT_ADMIN_TOKEN"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir")
    p.add_argument("--prompts", nargs="*", default=[], metavar="DIR_OR_FILE",
                   help="prompts to serve: a PEFT adapter dir (named after the dir), a .safetensors file (named "
                        "after the file), a dir holding several of those, or NAME=PATH")
    p.add_argument("--text-prompt", action="append", default=[], metavar="NAME=TEXT",
                   help="serve a text (hard) prompt (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prompt-dir", default=None,
                   help="where uploaded prompts are stored (default: a temporary dir removed at exit)")
    p.add_argument("--admin-token", default=None,
                   help=f"bearer token for /v1/prompts (default: ${ADMIN_TOKEN_ENV}; unset: open)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond the running batch; more are refused with 429")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--max-versions", type=int, default=8, help="versions kept per prompt name")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    p.add_argument("--backend", default="auto", help="auto, torch, triton, reference")
    p.add_argument("--log-level", default="info")


def discover_prompts(items: list[str]) -> list[tuple[str, Path]]:
    """(name, source) for each --prompts item; a directory without adapter_config.json is scanned one level."""
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
        else:
            raise SoftPromptError(f"prompt source {item!r} does not exist")
    return found


def _name_of(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def build_server(args: argparse.Namespace):
    """The engine, registry and app for parsed `serve` arguments (no network yet)."""
    from ..api import Engine
    from .app import ServerConfig, create_app
    from .registry import PromptRegistry

    engine = Engine(args.model_dir, device=args.device, dtype=args.dtype, backend=args.backend,
                    kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                    max_batched_tokens=args.max_batched_tokens)
    registry = PromptRegistry(args.prompt_dir, max_versions=args.max_versions)
    for name, source in discover_prompts(args.prompts):
        registry.register(engine, name, source)
    for item in args.text_prompt:
        name, sep, text = item.partition("=")
        if not sep or not name or not text:
            raise SoftPromptError(f"--text-prompt expects NAME=TEXT, got {item!r}")
        registry.register(engine, name, text=text)
    config = ServerConfig(max_queue=args.max_queue, admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV))
    return create_app(engine, registry, config), registry


def run_serve(args: argparse.Namespace) -> int:
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
